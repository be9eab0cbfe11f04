"""How steerlm's modules may import each other (docs/architecture.md): a stage module (what `steerlm <command>` runs)
imports no other stage module, only shared ones, except the orchestrators that run stages; and no import cycle runs
through module-level imports. Read from the source with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import steerlm
from steerlm.cli import COMMANDS

SRC = Path(steerlm.__file__).parent
STAGES = {module for module, _ in COMMANDS.values()}
#: Modules that run other stages (their Config and main) and may import them: the two recipes, bootstrap (sample,
#: re-annotate, fine-tune) and the command line itself.
ORCHESTRATORS = {"steerlm.pipeline", "steerlm.rlhf", "steerlm.bootstrap", "steerlm.cli"}
#: Packages that are part of a stage: `steerlm/evaluation/` holds the pieces of `steerlm evaluate`, `steerlm/serving/`
#: those of `steerlm serve`.
STAGE_PACKAGES = {"steerlm.evaluation": "steerlm.evaluate", "steerlm.serving": "steerlm.serve"}


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name, parsed."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


MODULES = _modules()


def _targets(node: ast.Import | ast.ImportFrom) -> set[str]:
    """The steerlm modules an import statement imports (`from steerlm import x` imports steerlm.x where x is a
    module), with the packages above them, whose __init__ runs first."""
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
    elif node.level or not node.module:
        raise AssertionError(f"relative import at line {node.lineno}; steerlm imports absolutely")
    else:
        names = {
            f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module for a in node.names
        }
    out = set()
    for name in names:
        parts = name.split(".")
        out |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return out & MODULES.keys()


def _is_type_checking(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _module_level(body: list[ast.stmt]) -> set[str]:
    """Imports run when the module is imported: top-level statements and those in top-level if/try blocks, but
    not inside functions or classes (run later) nor under `if TYPE_CHECKING:` (never run)."""
    out: set[str] = set()
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out |= _targets(node)
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            out |= _module_level(node.body) | _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                out |= _module_level(block)
    return out


def _stage_of(module: str) -> str:
    for package, stage in STAGE_PACKAGES.items():
        if module.startswith(package + "."):
            return stage
    return module


def test_no_stage_module_imports_another_stage_module():
    """Anywhere in a module (inside functions and under TYPE_CHECKING too): a stage, or a shared module, that
    needs what a stage defines gets it from a shared module instead (e.g. `apm_model.load_apm`, not `apm`)."""
    found = []
    for name, tree in MODULES.items():
        owner = _stage_of(name)
        if owner in ORCHESTRATORS:
            continue
        imported = {t for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) for t in _targets(n)}
        for stage in sorted((imported & STAGES) - {owner}):
            found.append(f"{name} imports the stage module {stage}")
    assert not found, "; ".join(found)


def test_orchestrators_and_stages_exist():
    """The lists above name real modules, so a rename cannot make the check pass by missing its target."""
    assert STAGES | ORCHESTRATORS | set(STAGE_PACKAGES) <= MODULES.keys()


def test_no_import_cycles_at_module_level():
    graph = {name: _module_level(tree.body) - {name} for name, tree in MODULES.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
