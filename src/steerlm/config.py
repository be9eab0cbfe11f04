"""Typed configs: YAML files plus dotted command-line overrides, checked against dataclasses.

Every stage declares a dataclass with a docstring per field; `load` builds it from a YAML file (or a built-in
preset) and `--a.b=value` overrides, rejecting unknown keys and wrong types with the key's name. `save` writes
the resolved config beside a stage's outputs.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
import warnings
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml

from steerlm.errors import UserError


@dataclasses.dataclass
class LoraArgs:
    r: int = 0
    """LoRA rank; 0 means full fine-tuning."""
    alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA path."""
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    """Modules to adapt; 'all-linear' adapts every linear layer but the output head (peft's shorthand)."""

    def __post_init__(self):
        if self.r < 0:
            raise ValueError(f"lora.r must be >= 0, not {self.r}")

    @property
    def enabled(self) -> bool:
        return self.r > 0


#: Accepted values of `TrainArgs.precision`.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass
class TrainArgs:
    """Optimisation settings shared by every training stage (APM, SFT, reward model, PPO)."""

    epochs: float = 1.0
    """Passes over the training data (fractions allowed)."""
    max_steps: int = 0
    """Stop after this many optimiser steps if > 0 (overrides epochs)."""
    lr: float = 5e-6
    """Peak learning rate (SteerLM paper: 5e-6 for full fine-tuning; LoRA wants ~1e-4 to 5e-4)."""
    head_lr: float = 0.0
    """Peak learning rate of a new output head (the APM's and reward model's `head`; an error for a model without
    one, e.g. SFT); 0: `lr`. A zero-initialised head learns slowly at a pretrained backbone's small lr. PPO's value
    head trains at `lr`."""
    weight_decay: float = 0.01
    """AdamW weight decay (SteerLM paper: 1e-2)."""
    warmup_ratio: float = 0.03
    """Fraction of steps of linear warm-up before cosine decay."""
    batch_size: int = 4
    """Sequences per device per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    max_length: int = 512
    """Tokens per sequence after truncation."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables."""
    seed: int = 1234
    """Seed for shuffling, dropout and initialisation."""
    eval_every: int = 0
    """Validate every N optimiser steps as well as at each epoch end (0: epoch ends only)."""
    log_every: int = 10
    """Write a metrics line every N optimiser steps."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every N optimiser steps (and at each epoch end)."""
    lora: LoraArgs = dataclasses.field(default_factory=LoraArgs)
    """LoRA settings (r = 0: full fine-tuning)."""
    report_to: str = "none"
    """Experiment trackers that also get the metrics.jsonl rows: 'none', 'tensorboard' (events under
    <out>/tensorboard), 'wandb' (set WANDB_MODE=offline to keep the run on disk) or 'tensorboard,wandb'; needs
    `pip install 'steerlm[tracking]'` (docs/sft.md)."""
    precision: str = "auto"
    """Mixed precision of training (accelerate's autocast; the weights stay fp32 masters): 'auto' (bf16 where it
    pays: CUDA with bf16, or a CPU with AVX512-BF16 or AMX; else fp32 — chosen, with the reason, in the log, and
    written in place of 'auto' in the saved config), 'fp32', 'bf16' or 'fp16' (CUDA only). docs/performance.md."""
    packing: bool = False
    """Pack several examples into each row (position ids restart per example, so attention stays inside each;
    labels and their SPEC §4 masks unchanged), instead of padding every row to the batch's longest. `batch_size`
    examples (and their corrupted twins) still make one micro-batch. SFT and the generative APM."""

    def __post_init__(self):
        from steerlm.tracking import parse

        parse(self.report_to)  # ValueError names the accepted values
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("one of epochs or max_steps must be positive")
        for name in ("batch_size", "grad_accum", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, not {self.lr}")
        if self.head_lr < 0:
            raise ValueError(f"head_lr must be >= 0, not {self.head_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), not {self.warmup_ratio}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


# ---------------------------------------------------------------- "auto": one spelling in every command

#: The value of a setting that lets steerlm choose (a template style from the model's steerlm_model.json, ...).
AUTO = "auto"


def auto_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """Check a setting that takes `AUTO` or one of `choices`. The old spelling of 'auto', '', is still accepted,
    with a deprecation warning. Raises ValueError (the loader names the section) for anything else."""
    if value == "":
        warnings.warn(f"{name}: '' is deprecated, write '{AUTO}'", FutureWarning, stacklevel=3)
        value = AUTO
    if value != AUTO and value not in choices:
        raise ValueError(f"{name} must be one of {', '.join((AUTO, *choices))}, not {value!r}")
    return value


#: The dtypes a command can load a model's weights in: 'fp32' (the default), 'bf16', 'fp16', or 'auto' (the
#: checkpoint's own, transformers' `dtype="auto"`).
DTYPES = ("fp32", "bf16", "fp16", AUTO)


def dtype_choice(value: str, name: str = "dtype") -> str:
    """Check a model dtype setting (`DTYPES`). The old spelling of the default, '' (which meant fp32), is still
    accepted, with a deprecation warning. Raises ValueError for anything else."""
    if value == "":
        warnings.warn(f"{name}: '' is deprecated, write 'fp32' (the default)", FutureWarning, stacklevel=3)
        value = "fp32"
    if value not in DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(DTYPES)}, not {value!r}")
    return value


def unless_auto(value: str) -> str | None:
    """None for `AUTO` (let the callee choose), else the value."""
    return None if value in (AUTO, "") else value


# ---------------------------------------------------------------- building dataclasses from plain values


def split_names(items) -> list[str]:
    """Names from a list whose items may themselves be comma-joined (`[quality, "humor,verbosity"]` from YAML, or
    the command line's `--x=a,b`), stripped, empty ones dropped, order kept."""
    return [n.strip() for item in items for n in str(item).split(",") if n.strip()]


def _type_name(tp) -> str:
    if get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, key: str):
    """Check/convert `value` to annotation `tp`; UserError names `key` on mismatch."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as e:
                errors.append(e)
        raise errors[0]
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"must be one of {list(args)}, not {value!r}", field=key)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UserError(f"expected a mapping of {tp.__name__} settings, not {value!r}", field=key)
        return build(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if isinstance(value, str):  # `--x=a,b` on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"expected a list, not {value!r}", field=key)
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise UserError(f"expected a mapping, not {value!r}", field=key)
        if args:
            return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"expected true or false, not {value!r}", field=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value)
        raise UserError(f"expected an integer, not {value!r}", field=key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"expected a number, not {value!r}", field=key)
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"expected a string, not {value!r}", field=key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise UserError(f"expected {_type_name(tp)}, not {value!r}", field=key)


def build(cls, values: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, checking keys and types; `__post_init__` errors name the section."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in fields:
            raise UserError(f"unknown setting; {cls.__name__} has: {', '.join(fields)}", field=prefix + key)
        default_factory = fields[norm].default_factory
        if (
            isinstance(value, dict)
            and dataclasses.is_dataclass(hints[norm])
            and default_factory not in (dataclasses.MISSING, hints[norm])  # the class itself: its defaults anyway
        ):
            # A section given in part keeps the rest of the field's own default (e.g. a stage's tuned TrainArgs),
            # not the section class's bare defaults.
            value = _merge(to_dict(default_factory()), value)
        kwargs[norm] = _coerce(value, hints[norm], prefix + norm)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise UserError("required setting is missing", field=prefix + missing[0])
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(str(e), field=prefix.rstrip(".") or cls.__name__) from None


def to_dict(cfg) -> dict:
    """A plain, YAML-ready dict of a config (tuples become lists)."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# ---------------------------------------------------------------- YAML, presets and overrides


def parse_scalar(text: str):
    """Interpret a command-line value as YAML does (`5` -> int, `true` -> bool, `a,b` stays a string)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.replace("-", "_").split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError("config file does not exist", file=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"malformed YAML: {getattr(e, 'problem', e)}", file=str(path),
                        line=mark.line + 1 if mark else None) from None  # fmt: skip
    except UnicodeDecodeError as e:
        raise UserError(f"not valid UTF-8 ({e.reason})", file=str(path)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError("a config file must be a mapping of settings", file=str(path))
    return data


def preset_path(command: str, name: str) -> Path:
    """A built-in preset shipped in the package: `steerlm/presets/<command>/<name>.yaml`."""
    path = Path(str(resources.files("steerlm") / "presets" / command / f"{name}.yaml"))
    if not path.exists():
        known = [n for n, _ in preset_names(command)]
        raise UserError(f"no preset {name!r} for {command}; known: {', '.join(known) or 'none'}", field="--preset")
    return path


def load(cls, *, config: str | None = None, preset: str | None = None, command: str = "",
         overrides: dict[str, Any] | None = None):  # fmt: skip
    """Resolve a config: preset, then YAML file, then dotted overrides (later wins)."""
    values: dict = {}
    for path in ([preset_path(command, preset)] if preset else []) + ([Path(config)] if config else []):
        _merge(values, read_yaml(path))
    for key, value in (overrides or {}).items():
        set_dotted(values, key, value)
    return build(cls, values)


def _merge(base: dict, new: dict) -> dict:
    """`base` updated in place with `new`, nested mappings merged key by key (`a-b` updates an existing `a_b`)."""
    for k, v in new.items():
        k = k.replace("-", "_") if k.replace("-", "_") in base else k
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
    return base


def save(cfg, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config beside a stage's outputs (atomically)."""
    from steerlm.io import atomic_write

    path = Path(folder) / name
    with atomic_write(path) as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)
    return path


# ---------------------------------------------------------------- help text from field docstrings


@cache
def field_docs(cls) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def describe(cls, prefix: str = "", default=None) -> list[tuple[str, str, str]]:
    """(dotted key, type/default, doc) for every setting of a config class, nested ones included.

    Defaults are each field's own: a section made by a default factory shows the factory's values (PPO's
    `sampling` shows its rollout temperature 1.0, not `SamplingArgs`' 0.7); `default` is the instance whose values
    to show. A `dict` section declared with `metadata={"command": ...}` (pipeline, bootstrap and rlhf pass such a
    section to another stage) is expanded into that command's settings, less the ones named in
    `metadata["filled"]` (space-separated), which the outer stage fills in."""
    rows = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, key = hints[f.name], prefix + f.name
        if default is not None:
            value = getattr(default, f.name)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            value = dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".", None if value is dataclasses.MISSING else value)
            continue
        command = f.metadata.get("command")
        if command:
            filled = set(f.metadata.get("filled", "").split())
            rows.append((key, f"section: `steerlm {command}` settings", docs.get(f.name, "")))
            rows += [row for row in describe(section_class(command), key + ".")
                     if row[0].split(".")[len(key.split("."))] not in filled]  # fmt: skip
            continue
        shown = "required" if value is dataclasses.MISSING else repr(value)
        rows.append((key, f"{_type_name(tp)} = {shown}", docs.get(f.name, "")))
    return rows


def section_class(command: str):
    """The `Config` class of a steerlm command (imports its stage module)."""
    import importlib

    from steerlm.cli import COMMANDS

    return importlib.import_module(COMMANDS[command][0]).Config


def preset_names(command: str) -> list[tuple[str, str]]:
    """(name, summary) of the presets shipped for a command; the summary is the first sentence of the file's
    leading comment, after the line that shows the command."""
    folder = Path(str(resources.files("steerlm") / "presets" / command))
    out = []
    for path in sorted(folder.glob("*.yaml")) if folder.exists() else []:
        lines = path.read_text(encoding="utf-8").splitlines()
        comment = [x[1:].strip() for x in itertools.takewhile(lambda x: x.startswith("#"), lines)]
        if comment and comment[0].startswith("steerlm "):
            comment = comment[1:]
        first = " ".join(comment).split(". ")[0].rstrip(".")
        out.append((path.stem, first if len(first) <= 110 else first[:109].rsplit(" ", 1)[0] + " …"))
    return out
