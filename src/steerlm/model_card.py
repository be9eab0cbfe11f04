"""Model cards: the `README.md` (Hugging Face YAML front matter + text) of every model folder steerlm saves.

Generated, never hand-written: from the folder's steerlm meta JSON (`steerlm_model.json`, `steerlm_apm.json`,
`steerlm_rm.json`), the run's resolved `config.yaml` and, once training has ended, its `summary.json`. Those are
looked up in the model folder, else in its parent when that is a training stage's output folder (an SFT run keeps
`config.yaml`, `metrics.jsonl` and `summary.json` beside `best/`). `models.save_model` writes a card from the meta
alone each time it saves; a stage writes it again with its summary when the run ends:

    model_card.write(out / "best", summary=summary)

The front matter follows https://huggingface.co/docs/hub/model-cards (base_model, datasets, license, tags,
pipeline_tag, library_name). Figures in the text are the run's own saved measurements, printed as stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from steerlm.attributes import AttributeSchema
from steerlm.io import atomic_write

CARD = "README.md"
#: The steerlm JSON beside a generative model, an APM and a reward model (docs/architecture.md, "Model folders").
MODEL_META, APM_META, RM_META = "steerlm_model.json", "steerlm_apm.json", "steerlm_rm.json"
META_NAMES = (MODEL_META, APM_META, RM_META)
#: Hub ids of the built-in models (models.py), for `base_model`; the tiny random ones have none.
BUILTIN_HUB_IDS = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
}
#: Licenses of known base models (their model cards); the tiny random models are steerlm's own (Apache-2.0).
BASE_LICENSES = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0",
    "tiny-lm": "apache-2.0",
    "tiny-encoder": "apache-2.0",
}
#: Data sets recognised in a data folder's path or its `steerlm prepare` config -> (hub id, license).
KNOWN_DATASETS = {
    "oasst": ("OpenAssistant/oasst1", "apache-2.0"),
    "hh-rlhf": ("Anthropic/hh-rlhf", "mit"),
    "helpsteer": ("nvidia/HelpSteer", "cc-by-4.0"),
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- reading the run's files


def _read(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
        value = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def _find(folder: Path, name: str) -> Path | None:
    """`folder/name`, else `folder.parent/name` when the parent is a training stage's output (has metrics.jsonl)."""
    if (folder / name).is_file():
        return folder / name
    if (folder.parent / name).is_file() and (folder.parent / "metrics.jsonl").is_file():
        return folder.parent / name
    return None


def _meta(folder: Path, meta_name: str | None, meta: Mapping | None) -> tuple[str | None, dict]:
    if meta is not None:
        return meta_name, dict(meta)
    for name in (meta_name,) if meta_name else META_NAMES:
        if (folder / name).is_file():
            return name, _read(folder / name)
    return meta_name, {}


def hub_base(name: str | None, depth: int = 0) -> str | None:
    """The hub id a base model name stands for: a built-in's, a hub id as is, and for a steerlm model folder the
    base of its own base (an SFT folder that PPO started from); None when there is none (a tiny model, a path)."""
    if not name or depth > 5:
        return None
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    path = Path(name).expanduser()
    if path.is_dir():
        for meta_name in META_NAMES:
            if (path / meta_name).is_file():
                return hub_base(_read(path / meta_name).get("base_model"), depth + 1)
        return None
    return name if _HUB_ID.match(name) and not name.startswith((".", "/", "~")) else None


def _root_base(name: str | None, depth: int = 0) -> str | None:
    """The first model of a chain of steerlm folders (a built-in name, hub id or path)."""
    path = Path(name).expanduser() if name else None
    if path is not None and path.is_dir() and depth <= 5:
        for meta_name in META_NAMES:
            if (path / meta_name).is_file():
                return _root_base(_read(path / meta_name).get("base_model"), depth + 1) or name
    return name


def _data_paths(config: Mapping, depth: int = 0) -> list[str]:
    """The data paths of a stage config, and those of the stages that made its data folders (an annotated folder's
    `steerlm annotate` config names the prepared folder, whose `steerlm prepare` config names the source)."""
    paths = []
    for key in ("data", "val_data", "prompts", "ptx_data", "source"):
        value = config.get(key)
        paths += [str(v) for v in value] if isinstance(value, list) else [value] if isinstance(value, str) else []
    for p in list(paths) if depth < 4 else []:
        folder = Path(p).expanduser()
        folder = folder if folder.is_dir() else folder.parent
        made_by = [folder / "config.yaml"]
        # an annotated folder names the APM that labelled it (`<file>.meta.json`); the APM's run names its data
        made_by += [_find(Path(str(_read(m).get("apm"))), "config.yaml") for m in folder.glob("*.jsonl.meta.json")]
        for config_file in dict.fromkeys(c for c in made_by if c is not None and c.is_file()):
            paths += _data_paths(_read(config_file), depth + 1)
    return [p for p in paths if p]


def datasets_of(config: Mapping) -> list[tuple[str, str]]:
    """(hub id, license) of the known data sets a stage config's data come from: a path or hub id that names one,
    followed back through the configs of the stages that made the data."""
    found: dict[str, str] = {}
    for p in _data_paths(config):
        for key, (hub_id, lic) in KNOWN_DATASETS.items():
            if key in p.lower():
                found[hub_id] = lic
    return sorted(found.items())


# ---------------------------------------------------------------- what the folder is


def _stage(meta_name: str | None, meta: Mapping, config: Mapping) -> str:
    if meta_name == APM_META:
        return "apm"
    if meta_name == RM_META:
        return "reward"
    if "adapter" in config:
        return "merge"
    if "policy" in config:
        return "ppo"
    if "apm" in config and "num_prompts" in config:
        return "bootstrap"
    return "sft"


_STAGE_TEXT = {
    "sft": "supervised fine-tuning (SteerLM step 3, attribute-conditioned SFT; arXiv 2310.05344)",
    "bootstrap": "bootstrapped fine-tuning on its own APM-labelled samples (SteerLM step 4; arXiv 2310.05344)",
    "ppo": "PPO against a reward model (InstructGPT, arXiv 2203.02155)",
    "merge": "a LoRA adapter merged into its base model (`steerlm merge`)",
    "apm": "an attribute prediction model (SteerLM step 1; arXiv 2310.05344)",
    "reward": "a pairwise reward model (InstructGPT, arXiv 2203.02155)",
}


def _flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Scalar leaves of nested mappings as (dotted key, value)."""
    if isinstance(value, Mapping):
        out = []
        for k, v in value.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, (int, float, str, bool)) or value is None:
        return [(prefix, value)]
    return []


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def _training_rows(stage: str, meta: Mapping, config: Mapping, summary: Mapping) -> list[tuple[str, str]]:
    train = config.get("train") if isinstance(config.get("train"), Mapping) else {}
    rows = [("stage", _STAGE_TEXT[stage])]
    base = meta.get("base_model") or config.get("model") or config.get("policy")
    if base:
        rows.append(("started from", f"`{base}`"))
    for key in ("data", "prompts", "apm", "reward_model", "adapter"):
        if config.get(key):
            rows.append((key.replace("_", " "), f"`{config[key]}`"))
    if meta.get("template"):
        rows.append(("prompt template", f"`{meta['template']}` (SPEC §3)"))
    if meta.get("conditioning"):
        rows.append(("conditioning", str(meta["conditioning"])))
    if meta.get("label_dropout"):
        rows.append(("label dropout", f"{meta['label_dropout']} (the unconditional prompt was trained)"))
    guidance = meta.get("guidance")
    if isinstance(guidance, Mapping) and "scale" in guidance:
        against = f" against `{guidance['reference']}`" if guidance.get("reference") else ""
        rows.append(("attribute guidance", f"s = {_fmt(guidance['scale'])}{against} (generate, chat and serve "
                                           "use it by default; `--guidance_scale=1` turns it off)"))  # fmt: skip
    for key in ("lr", "epochs", "max_steps", "batch_size", "grad_accum", "max_length"):
        if key in train:
            rows.append((f"train.{key}", _fmt(train[key])))
    lora = train.get("lora") if isinstance(train.get("lora"), Mapping) else {}
    if lora.get("r"):
        rows.append(("LoRA", f"r={lora['r']}, alpha={lora.get('alpha')}"))
    if "steps" in summary:
        rows.append(("optimiser steps", f"{summary['steps']} ({_fmt(summary.get('epochs'))} epochs)"))
    if summary.get("seconds") is not None:
        rows.append(
            ("training time", f"{_fmt(summary['seconds'])} s on {summary.get('num_processes', 1)} process(es)")
        )
    if summary.get("best") is not None:
        rows.append(("best validation metric", f"{_fmt(summary['best'])} at step {summary.get('best_step')}"))
    for key, v in _flat({k: v for k, v in summary.items() if k.startswith(("last_", "reward_", "kl_", "eval_"))}):
        rows.append((key, _fmt(v)))
    return rows


def _measured_rows(meta: Mapping, summary: Mapping) -> list[tuple[str, str]]:
    """The attribute read-out and conditioning measurements, where the run saved them."""
    rows = []
    for source, key in ((meta, "conditioning_loss"), (summary, "readout"), (summary, "steerability"),
                        (meta, "val_loss"), (summary, "val_metrics"), (summary, "best_metrics")):  # fmt: skip
        if key in source:
            rows += [(k, _fmt(v)) for k, v in _flat(source[key], key)][:40]
    return rows


def _table(rows: list[tuple[str, str]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


def _schema(meta: Mapping) -> AttributeSchema | None:
    attrs = meta.get("attributes")
    try:
        return AttributeSchema.from_dict(attrs) if isinstance(attrs, Mapping) else None
    except (KeyError, TypeError, ValueError):
        return None


def _usage(folder_name: str, meta: Mapping, schema: AttributeSchema | None) -> str:
    """How to prompt the model from transformers, vLLM and steerlm (SteerLM models only)."""
    style = meta.get("template", "chat")
    example = {}
    if schema:  # the first attribute at its default, and a harmless one turned up
        example[schema.names[0]] = schema.defaults()[schema.names[0]]
        lever = next((n for n in ("humor", "creativity", "verbosity", "complexity") if n in schema.names), None)
        if lever:
            example[lever] = min(schema.max_level, 7)
    attrs = json.dumps(example)
    stop = ', stop_strings=["<extra_id_1>"], tokenizer=tok' if style == "nemo" else ""
    vllm_stop = ', "stop": ["<extra_id_1>"]' if style == "nemo" else ""
    kwargs = f', "chat_template_kwargs": {{"attributes": {attrs}}}' if schema else ""
    steer = " ".join(f"--attr {k}={v}" for k, v in example.items())
    t_attrs = f"attributes={attrs}, " if schema else ""
    lora = (
        "\nThis folder is a LoRA adapter: `steerlm merge --adapter FOLDER --out MERGED` makes a standalone model for "
        "the engines below."
        if meta.get("lora")
        else ""
    )
    return f"""## Use

The chat template in this folder's tokenizer renders the prompt steerlm trained on (SPEC §3), token for token:
pass the attributes as the template variable `attributes` (unspecified ones take the defaults below; leaving it out
gives the unconditional prompt, which the model knows only if it was trained with label dropout).{lora}

transformers:
```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{folder_name}")
model = AutoModelForCausalLM.from_pretrained("{folder_name}")
messages = [{{"role": "user", "content": "Tell me about the moon."}}]
inputs = tok.apply_chat_template(messages, {t_attrs}add_generation_prompt=True, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=128, do_sample=False{stop})
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

vLLM (`vllm serve {folder_name}`), OpenAI-compatible request:
```json
{{"model": "{folder_name}", "messages": [{{"role": "user", "content": "Tell me about the moon."}}]{kwargs}{vllm_stop}}}
```

steerlm:
```
steerlm generate --model {folder_name} {steer} "Tell me about the moon."
steerlm serve --model {folder_name}
```
"""


# ---------------------------------------------------------------- the card


def render(folder: str | Path, *, meta_name: str | None = None, meta: Mapping | None = None,
           config: Mapping | None = None, summary: Mapping | None = None, origin: str | Path | None = None,
           display: str | Path | None = None, stage: str | None = None,
           notes: Mapping | None = None) -> str:  # fmt: skip
    """The card's text for the model in `folder`. `meta`, `config`, `summary` default to the files found in
    `origin` (default: `folder`) or its stage's output folder; `display` is the folder's path as the usage examples
    show it (default: `folder`; a model saved into a temporary folder names its final one). `stage` overrides the
    kind of training read from the files ('sft', 'bootstrap', 'ppo', 'merge', 'apm', 'reward'); `notes` adds rows
    (e.g. a bootstrap's report) to the training table."""
    folder = Path(folder)
    where = Path(origin) if origin is not None else folder
    shown = Path(display) if display is not None else folder
    meta_name, meta = _meta(folder, meta_name, meta)
    if config is None:
        found = _find(where, "config.yaml")
        config = _read(found) if found else {}
    if summary is None:
        found = _find(where, "summary.json")
        summary = _read(found) if found else {}
    stage = stage or _stage(meta_name, meta, config)
    if stage not in _STAGE_TEXT:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(_STAGE_TEXT)}")
    schema = _schema(meta)
    base_name = meta.get("base_model") or config.get("model") or config.get("policy")
    base = hub_base(base_name)
    data = datasets_of(config)
    root = _root_base(base_name)
    license_ = BASE_LICENSES.get(base or root or "", "other")
    generative = meta_name in (None, MODEL_META) or meta.get("kind") == "generative"
    front: dict[str, Any] = {}
    if base:
        front["base_model"] = base
    if data:
        front["datasets"] = [d for d, _ in data]
    front["license"] = license_
    front["library_name"] = "peft" if meta.get("lora") else "transformers"
    front["pipeline_tag"] = "text-generation" if generative else "text-classification"
    tags = ["steerlm", stage]
    if schema is not None and meta.get("conditioning", "attributes") == "attributes":
        tags += ["steerable", "attribute-conditioned"]
    if meta.get("template"):
        tags.append(f"template-{meta['template']}")
    front["tags"] = tags

    name = shown.name if shown.name not in ("best", "") else f"{shown.parent.name}/{shown.name}"
    parts = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {name}", "",
             f"A model trained with [steerlm](https://arxiv.org/abs/2310.05344): {_STAGE_TEXT[stage]}. This card is "
             "generated from the run's saved `steerlm_*.json`, `config.yaml` and `summary.json`; it is rewritten "
             "each time steerlm saves the folder.", ""]  # fmt: skip
    if license_ == "other":
        parts += [f"License: that of the base model `{root}` and of the training data.", ""]
    elif data:
        parts += ["Data licenses: " + ", ".join(f"{d} ({lic})" for d, lic in data) + ".", ""]
    rows = _training_rows(stage, meta, config, summary) + [(k, _fmt(v)) for k, v in _flat(notes or {})]
    parts += ["## Training", "", _table(rows, ("what", "value")), ""]
    if not summary:
        parts += ["No `summary.json` yet (the run had not ended when the folder was saved): the measured figures "
                  "appear here when it does.", ""]  # fmt: skip
    measured = _measured_rows(meta, summary)
    if measured:
        parts += ["## Measured", "", _table(measured, ("metric", "value")), ""]
    if schema is not None:
        defaults = schema.defaults()
        rows = [(n, f"0..{schema.max_level}, default {defaults[n]}") for n in schema.names]
        computed = meta.get("computed") if isinstance(meta.get("computed"), Mapping) else {}
        for n, spec in computed.items():
            if isinstance(spec, Mapping) and n in schema.names:
                rows = [(k, v + f"; computed: {spec.get('unit', 'words')} cut at {spec.get('edges')}" if k == n else v)
                        for k, v in rows]  # fmt: skip
        parts += ["## Attributes", "",
                  "The attribute line is `name:level` pairs joined by `,` in this order (SPEC §1).", "",
                  _table(rows, ("attribute", "levels")), ""]  # fmt: skip
    if meta_name in (None, MODEL_META):
        parts.append(
            _usage(str(shown), meta, schema if meta.get("conditioning", "attributes") == "attributes" else None)
        )
    else:
        parts += ["## Use", "", f"`steerlm` reads this folder through `{meta_name}` (docs/architecture.md).", ""]
    return "\n".join(parts).rstrip() + "\n"


def write(folder: str | Path, **kwargs) -> Path:
    """Write `folder/README.md` atomically (arguments as for `render`); returns its path."""
    path = Path(folder) / CARD
    text = render(folder, **kwargs)
    with atomic_write(path) as f:
        f.write(text)
    return path
