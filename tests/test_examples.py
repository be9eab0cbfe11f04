"""Every `steerlm` command line the project shows a user works: README.md, docs/*.md, module docstrings and the
preset headers.

- Each full command line (in a code block or a docstring) goes through the real argument loader (`cli.parse_args`,
  `config.load` with its preset and the stage's `Config` checks); an unknown or ill-typed flag, a wrong positional
  argument or an unknown preset fails. Settings the line leaves out on purpose (`steerlm ppo ... --resume`) get
  placeholder values, and only those.
- A command named inline in prose (`steerlm prepare --computed=verbosity`) must exist and each flag it names must
  be a setting of that command.
- The lines that run in seconds on tiny models run for real, in one process: `steerlm pipeline --preset tiny`, then
  up to two lines each of prepare / generate / annotate / eval-apm / sft / train-apm, with their model and data
  paths pointed at its outputs (`runs/<x>/sft/best` -> its SFT model, `smollm2-135m-instruct` -> `tiny-lm`, real
  data files -> their first 60 lines) and training cut to 2 steps.
"""

from __future__ import annotations

import ast
import gzip
import itertools
import re
import shlex
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path

import pytest
from conftest import ROOT, SHARED_DATA

from steerlm import cli
from steerlm import config as config_lib
from steerlm.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Example:
    source: str
    """Where the line is shown (file path relative to the repository)."""
    text: str
    """The command line as shown (continuation lines joined)."""
    inline: bool
    """Named in prose rather than shown as a command to run."""


_COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*steerlm\s")


def _from_text(text: str, source: str, *, all_code: bool = False) -> list[Example]:
    """Command lines of fenced code blocks (or of the whole text, `all_code`), then inline `steerlm ...` spans."""
    out, code, lines, i = [], all_code, text.splitlines(), 0
    variables: dict[str, str] = {}  # shell variables a block sets (`Q=runs/quickstart; base="--data=$Q/data"`)
    while i < len(lines):
        line = lines[i]
        if line.strip().startswith("```"):
            code = not code
        elif code:
            cmd = line.strip()
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            for name, value in re.findall(r'(?:^|;\s*)([A-Za-z_]\w*)=("[^"]*"|[^\s;]+)(?=;|$)', cmd):
                variables[name] = re.sub(r"\$(\w+)", lambda m: variables.get(m[1], m[0]), value.strip('"'))
            if _COMMAND.match(cmd):
                cmd = re.sub(r"\$(\w+)", lambda m: variables.get(m[1], m[0]), cmd)
                out.append(Example(source, cmd, inline=False))
        else:
            out += [Example(source, m, inline=True) for m in re.findall(r"`((?:[A-Z_]+=\S+ )*steerlm [^`]+)`", line)]
        i += 1
    return out


def collect() -> list[Example]:
    examples = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        examples += _from_text(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    for path in sorted((ROOT / "src" / "steerlm").rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        examples += _from_text(doc, str(path.relative_to(ROOT)), all_code=True)
    for path in sorted((ROOT / "src" / "steerlm" / "presets").rglob("*.yaml")):
        # a header line may end in a remark after two spaces: `# steerlm pipeline --preset quickstart   (what ...)`
        header = "\n".join(x[1:].strip().split("  (")[0] for x in path.read_text(encoding="utf-8").splitlines()
                           if x.startswith("#"))  # fmt: skip
        examples += _from_text(header, str(path.relative_to(ROOT)), all_code=True)
    # `steerlm <command> --help` and the usage line are templates, not commands
    return [e for e in examples if not re.search(r"<\w+>", e.text)]


EXAMPLES = collect()


def _argv(text: str) -> list[str]:
    """The arguments after `steerlm`: environment prefix, comments and `...` (the rest as above) removed."""
    words = shlex.split(text, comments=True)
    words = words[words.index("steerlm") + 1 :]
    return [w for w in words if w not in ("...", "…")]


def _module(command: str):
    import importlib

    assert command in cli.COMMANDS, f"unknown command {command!r}"
    return importlib.import_module(cli.COMMANDS[command][0])


def _setting_exists(cls, dotted: str) -> bool:
    """Whether `a.b.c` names a setting of config class `cls` (stage sections included)."""
    import typing

    head, _, rest = dotted.replace("-", "_").partition(".")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name != head:
            continue
        tp = hints[f.name]
        if not rest:
            return True
        if is_dataclass(tp):
            return _setting_exists(tp, rest)
        if "command" in f.metadata:
            return _setting_exists(config_lib.section_class(f.metadata["command"]), rest)
        return typing.get_origin(tp) is dict or tp is dict  # a free-form mapping (e.g. evaluate's sampling)
    return False


def load(argv: list[str]):
    """Parse `argv` with the CLI's own loader; required settings the example leaves out get placeholders."""
    command, rest = argv[0], argv[1:]
    module = _module(command)
    if "--help" in rest or "-h" in rest:
        return None  # the CLI prints the help whatever else is given
    lists, bools, multi = cli._fields_of(module.Config)
    cfg_path, preset, overrides, positional = cli.parse_args(rest, lists, bools, multi)
    positional_field = getattr(module, "POSITIONAL", None)
    if positional:
        assert positional_field, f"{command} takes no positional arguments, got {positional}"
        overrides[positional_field] = overrides.get(positional_field, []) + positional
    if cfg_path and not Path(cfg_path).exists():
        # the user's own file (`--config my.yaml`), which holds the rest: the flags given must still be settings
        for key in overrides:
            assert _setting_exists(module.Config, key), f"{command} has no setting {key!r}"
        return None
    filled: dict = {}
    for _ in range(12):
        try:
            return config_lib.load(module.Config, config=cfg_path, preset=preset,
                                   command=getattr(module, "PRESETS_FOR", command), overrides={**filled, **overrides})  # fmt: skip
        except UserError as e:
            if e.reason != "required setting is missing" or e.field in filled:
                raise
            filled[e.field] = "placeholder"
    raise AssertionError("too many required settings")


def _id(e: Example) -> str:
    return f"{e.source}:{e.text[:70]}"


def test_the_examples_are_found():
    # The extraction itself must keep working: a few lines known to be shown, from each kind of source.
    texts = {e.text for e in EXAMPLES}
    assert any(t.startswith("steerlm generate --model=runs/quickstart/sft/best") for t in texts)  # README block
    assert any(e.source == "src/steerlm/ppo.py" for e in EXAMPLES)  # a module docstring
    assert any(e.source.endswith("tiny.yaml") for e in EXAMPLES)  # a preset header
    assert sum(not e.inline for e in EXAMPLES) >= 50


@pytest.mark.parametrize("example", [e for e in EXAMPLES if not e.inline], ids=_id)
def test_command_line_parses_with_the_real_loader(example):
    try:
        load(_argv(example.text))
    except UserError as e:
        pytest.fail(f"{example.source}: `{example.text}` is rejected: {e}")


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.inline], ids=_id)
def test_command_named_in_prose_exists_with_its_flags(example):
    argv = _argv(example.text)
    module = _module(argv[0])
    for word in argv[1:]:
        if word.startswith("--"):
            key = word[2:].partition("=")[0]
            if key in ("config", "preset", "help"):
                continue
            assert _setting_exists(module.Config, key), f"{example.source}: `{example.text}`: no setting {key!r}"


def test_a_broken_example_fails():
    # The checks above can fail: an unknown flag, an ill-typed value and a wrong section path are all rejected.
    for argv in (
        ["ppo", "--policy", "p", "--lora.r=8"],
        ["sft", "--data", "d", "--train.max_steps=many"],
        ["generate", "--model", "m", "--temprature", "0.5"],
    ):
        with pytest.raises(UserError):
            load(argv)
    assert not _setting_exists(_module("ppo").Config, "lora.r")
    assert _setting_exists(_module("ppo").Config, "train.lora.r")


# ---------------------------------------------------------------- running the cheap ones on tiny models

#: Commands that run in seconds on tiny models and a slice of real data.
RUNNABLE = {"prepare", "generate", "annotate", "eval-apm", "sft", "train-apm"}
#: Settings that name an input that must exist for a line to run.
INPUTS = ("config", "model", "apm", "data", "input", "source", "val_data", "prompts", "attrs_file")


def _slice(path: Path, folder: Path, lines: int = 60) -> Path:
    """The first `lines` lines of a real data file, same name and compression, so that a line runs in seconds."""
    target = folder / path.relative_to(SHARED_DATA)
    if path.exists() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as src, opener(target, "wt", encoding="utf-8") as dst:
            dst.writelines(itertools.islice(src, lines))
    return target


def substitute(text: str, tiny: Path, out: Path) -> str:
    """Point a documented line at the tiny pipeline's outputs, at tiny models and at the first lines of the real
    data files; outputs go under `out`."""
    text = re.sub(
        r"(?<![\w/])runs/[\w.-]+/bootstrap/sft/best|(?<![\w/])runs/(?:[\w.-]+/)?sft/best", f"{tiny}/sft/best", text
    )
    text = re.sub(r"(?<![\w/])runs/(?:[\w.-]+/)?apm(?:/best)?(?=[\s/]|$)", f"{tiny}/apm/best", text)
    text = re.sub(r"(?<![\w/])runs/(?:[\w.-]+/)?(?:data|prepare|annotate)(?=[\s/]|$)", f"{tiny}/data", text)
    text = re.sub(r"\$STEERLM_DATA/(\S+)", lambda m: str(_slice(SHARED_DATA / m[1], tiny.parent / "slices")), text)
    text = text.replace("smollm2-135m-instruct", "tiny-lm").replace("minilm-l6", "tiny-encoder")
    text = re.sub(r"--out[= ](\S+)", lambda m: f"--out={out / Path(m.group(1)).name}", text)
    return text


def _runnable(argv: list[str]) -> bool:
    """A cheap command whose inputs all exist here (no hub download, no resume of a run that never started)."""
    if argv[0] not in RUNNABLE or "--resume" in argv:
        return False
    for word, nxt in zip(argv, argv[1:] + [""], strict=True):
        if not word.startswith("--"):
            continue
        key, eq, value = word[2:].partition("=")
        value = value if eq else nxt
        if key in INPUTS and value not in ("tiny-lm", "tiny-encoder") and not Path(value).exists():
            return False
    return True


#: Lines run per command (every line is parsed above; running more would only repeat the same code path).
PER_COMMAND = 2
#: Added to a training line so that it stays a smoke run (the documented line sets the real length).
SHORT = {
    "sft": ["--train.max_steps=2", "--model=tiny-lm", "--flip_gap=false"],
    "train-apm": ["--train.max_steps=2", "--model=tiny-encoder"],
    "generate": ["--max_new_tokens=4"],
    "eval-apm": ["--overwrite=true"],  # a second line writes its report beside the first one's, in the tiny APM
}


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="real data folder is absent")
def test_documented_commands_run_on_tiny_models(tmp_path, capsys):
    tiny = tmp_path / "tiny"
    assert cli.run(["pipeline", "--preset", "tiny", f"--out={tiny}"]) == 0, capsys.readouterr().err
    ran = []
    for i, example in enumerate(e for e in EXAMPLES if not e.inline):
        if "..." in example.text or "…" in example.text:
            continue  # an elided line (`steerlm ppo ... --resume`): parsed above, not a whole command
        argv = _argv(substitute(example.text, tiny, tmp_path / f"out{i}"))
        if not _runnable(argv) or ran.count(argv[0]) >= PER_COMMAND:
            continue
        given = {w[2:].partition("=")[0] for w in argv if w.startswith("--")}
        short = [a for a in SHORT.get(argv[0], []) if a[2:].partition("=")[0] not in given]
        rc = cli.run(argv + short)
        assert rc == 0, f"{example.source}: `{example.text}` -> {argv}: exit {rc}: {capsys.readouterr().err[-2000:]}"
        ran.append(argv[0])
    # the lines that ran cover every cheap command
    assert set(ran) >= {"prepare", "generate", "annotate", "eval-apm"}, ran
