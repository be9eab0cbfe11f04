"""`steerlm <command>`: one entry point for every stage.

Stage modules are imported only when their command runs, so `steerlm --help` stays instant. A stage module
exposes `Config` (a dataclass) and `main(cfg)`; optionally `POSITIONAL` (the list field that takes positional
arguments) and `PRESETS_FOR` (the preset folder name, default the command).

    steerlm <command> [--config FILE.yaml] [--preset NAME] [--key=value | --key value | --flag] ... [positional ...]
"""

from __future__ import annotations

import sys

# command -> (module, one-line summary). Order is the pipeline's.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("steerlm.prepare", "Turn OASST / HH-RLHF / conversation files into train/val conversation records"),
    "train-apm": ("steerlm.apm", "Train an attribute prediction model (SteerLM step 1)"),
    "eval-apm": ("steerlm.apm_eval", "Evaluate an APM against held-out human labels"),
    "annotate": ("steerlm.annotate", "Label assistant turns of a conversation file with an APM (step 2)"),
    "sft": ("steerlm.sft", "Attribute-conditioned (or plain) supervised fine-tuning (step 3)"),
    "readout": ("steerlm.readout", "The model's own attribute read-out: does it read its attribute line?"),
    "merge": ("steerlm.merge", "Merge a LoRA adapter into a standalone model folder"),
    "bootstrap": ("steerlm.bootstrap", "Sample, re-annotate and fine-tune again (step 4)"),
    "generate": ("steerlm.generate", "Generate answers at chosen attribute values"),
    "chat": ("steerlm.chat", "Interactive steerable chat (/set humor=8 changes attributes)"),
    "pipeline": ("steerlm.pipeline", "Run prepare -> APM -> annotate -> SFT -> bootstrap -> check from one YAML"),
    "serve": ("steerlm.serve", "OpenAI- and NeMo-compatible steerable model server with a web playground"),
    "train-rm": ("steerlm.reward", "Train a pairwise reward model (RLHF baseline)"),
    "ppo": ("steerlm.ppo", "PPO / PPO-ptx against a reward model (RLHF baseline)"),
    "rlhf": ("steerlm.rlhf", "Run SFT -> reward model -> PPO from one YAML"),
    "evaluate": ("steerlm.evaluate", "Steerability, pairwise quality and ablation report over several models"),
}

USAGE = """usage: steerlm <command> [--config FILE.yaml] [--preset NAME] [--key=value ...] [args ...]

Steerable language models: SteerLM end to end, with an InstructGPT RLHF baseline.

commands:
{commands}

`steerlm <command> --help` lists a command's settings. Settings come from a YAML file (--config), a built-in
preset (--preset), and dotted overrides such as --train.lr=1e-4 (later wins).
"""


def _usage() -> str:
    width = max(len(c) for c in COMMANDS)
    return USAGE.format(commands="\n".join(f"  {c:<{width}}  {summary}" for c, (_, summary) in COMMANDS.items()))


def parse_args(argv: list[str], list_fields: set[str], bool_fields: set[str], multi_fields: frozenset = frozenset()):
    """Split argv into (config, preset, overrides, positional). Repeated list settings accumulate."""
    from steerlm.config import parse_scalar
    from steerlm.errors import UserError

    config = preset = None
    overrides: dict = {}
    positional: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            positional += argv[i + 1 :]
            break
        if not arg.startswith("--") or arg == "--":
            positional.append(arg)
            i += 1
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key in bool_fields and (nxt is None or nxt.startswith("--") or nxt.lower() not in ("true", "false")):
                value = "true"
            elif nxt is None:
                raise UserError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        i += 1
        if key == "config":
            config = value
        elif key == "preset":
            preset = value
        elif key in list_fields:
            # List items stay text: `--stop "User:"` must not become a YAML mapping; numbers are converted by type.
            overrides.setdefault(key, []).append(value)
        elif key in multi_fields and key in overrides:  # `str | list[str]`: a repeated flag makes a list
            previous = overrides[key]
            overrides[key] = (previous if isinstance(previous, list) else [previous]) + [parse_scalar(value)]
        else:
            overrides[key] = parse_scalar(value)
    return config, preset, overrides, positional


def _print_command_help(command: str, module) -> None:
    from steerlm.config import describe, preset_names

    doc = (module.__doc__ or "").strip()
    print(f"steerlm {command}: {COMMANDS[command][1]}\n")
    if doc:
        print(doc + "\n")
    presets = preset_names(getattr(module, "PRESETS_FOR", command))
    if presets:
        print("presets (--preset NAME; settings given after it override it):")
        width = max(len(name) for name, _ in presets)
        for name, summary in presets:
            print(f"  {name:<{width}}  {summary}")
        print()
    print("settings (YAML keys, or --key=value on the command line):")
    for key, typ, text in describe(module.Config):
        print(f"  --{key}  ({typ})")
        if text:
            print(f"      {text}")


def _fields_of(cls):
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)

    def is_list(tp) -> bool:
        return typing.get_origin(tp) in (list, tuple)

    lists = {f.name for f in dataclasses.fields(cls) if is_list(hints[f.name])}
    # A union that admits a list (e.g. `source: str | list[str]`) takes one value, or a list when repeated.
    multi = {f.name for f in dataclasses.fields(cls) if any(is_list(a) for a in typing.get_args(hints[f.name]))}
    bools = {f.name for f in dataclasses.fields(cls) if hints[f.name] is bool}
    return lists, bools, frozenset(multi)


def run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from steerlm import __version__

        print(f"steerlm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"steerlm: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    from steerlm.errors import UserError

    module = importlib.import_module(COMMANDS[command][0])
    if any(a in ("-h", "--help") for a in rest):
        _print_command_help(command, module)
        return 0
    try:
        from steerlm import config as config_lib

        lists, bools, multi = _fields_of(module.Config)
        cfg_path, preset, overrides, positional = parse_args(rest, lists, bools, multi)
        positional_field = getattr(module, "POSITIONAL", None)
        if positional:
            if positional_field is None:
                raise UserError(f"unexpected argument {positional[0]!r} (settings are given as --key=value)")
            overrides[positional_field] = overrides.get(positional_field, []) + positional
        cfg = config_lib.load(module.Config, config=cfg_path, preset=preset,
                              command=getattr(module, "PRESETS_FOR", command), overrides=overrides)  # fmt: skip
        result = module.main(cfg)
    except UserError as e:
        print(f"steerlm {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsteerlm {command}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
