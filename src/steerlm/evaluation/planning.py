"""Planning `steerlm evaluate`: which answers are needed, without loading any weights.

It owns the prompts (`Prompt`, read from the prompt sets), what is known of each model from its folder
(`model_info`: attribute schema, template, training config, fingerprint), the checks that fail before anything is
generated, and the jobs: one per answer (model x prompt x attribute levels), each with its cache key. Steerability
steers each attribute of each conditioned model over the requested levels; quality asks every compared model once
at its defaults (docs/evaluate.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from steerlm import config as config_lib
from steerlm import models
from steerlm.attributes import AttributeSchema
from steerlm.data import formats
from steerlm.data.preferences import read_prompts
from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.errors import UserError
from steerlm.evaluation.cache import CACHE_VERSION, MODELS, key_of, path_fingerprint
from steerlm.generator import META as MODEL_META
from steerlm.generator import SamplingArgs, saved_guidance

if TYPE_CHECKING:  # the settings live in the stage module, which imports this one
    from steerlm.evaluate import Config, ModelSpec, PromptSet


@dataclass
class Prompt:
    set: str
    index: int
    conversation: Record | str
    json: Any
    """The conversation as JSON (a string, or a record's JSON): what keys are made of."""
    pid: str
    text: str
    """The question as a judge reads it: the prompt, or the conversation as `User: ...` blocks."""


def read_prompt_set(ps: PromptSet) -> list[Prompt]:
    """The prompts of one set (the formats of `data.preferences.read_prompts`; per-prompt attributes in the file
    are ignored; `$STEERLM_DATA` and other variables in the path expanded)."""
    items = read_prompts(formats.local_path(ps.path))
    if ps.limit:
        items = items[: ps.limit]
    if not items:
        raise UserError("no prompts in the file", file=ps.path)
    out = []
    for i, (conv, _attrs, _extra) in enumerate(items):
        as_json = conv if isinstance(conv, str) else conv.to_json()
        if isinstance(conv, str):
            text = conv
        elif len(conv.conversations) == 1:
            text = conv.conversations[0].value
        else:
            text = "\n\n".join(f"{t.role}: {t.value}" for t in conv.conversations)
        out.append(Prompt(ps.name, i, conv, as_json, key_of(as_json)[:16], text))
    return out


def scored_record(prompt: Prompt, answer: str) -> Record:
    """The prompt plus the answer as the last assistant turn: what APMs and reward models score."""
    conv = prompt.conversation
    base = Record([Turn(USER, conv)]) if isinstance(conv, str) else conv
    return Record(base.conversations + [Turn(ASSISTANT, answer or " ")], base.system)


def model_info(spec: ModelSpec) -> dict:
    """What planning needs from a model without loading it: its steerlm_model.json (attribute schema, template,
    conditioning), the training config beside it (for the report), and a fingerprint of its files."""
    folder = Path(spec.path).expanduser()
    meta = models.model_meta(folder)
    schema = None
    if meta and meta.get("attributes"):
        conditioning = meta.get("conditioning", "attributes")
        if conditioning == "attributes":
            try:
                schema = AttributeSchema.from_dict(meta["attributes"]).to_dict()
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"bad attributes entry: {e}", file=str(folder / MODEL_META)) from None
    config_file, config_text = "", ""
    if folder.is_dir():
        for cand in (folder / "config.yaml", folder.parent / "config.yaml"):
            if cand.is_file():
                config_file, config_text = str(cand), cand.read_text(encoding="utf-8")
                break
    return {"name": spec.name, "path": spec.path, "meta": meta, "schema": schema, "config_file": config_file,
            "config": config_text, "fingerprint": path_fingerprint(folder)}  # fmt: skip


def model_infos(cfg: Config, cache_dir: Path) -> dict[str, dict]:
    """Model infos: read from the folders, or with --from_cache from cache/models.json (so the model folders need
    not exist any more); a model missing there is read from its folder."""
    saved = {}
    if cfg.from_cache and (cache_dir / MODELS).is_file():
        saved = json.loads((cache_dir / MODELS).read_text(encoding="utf-8"))
    infos = {}
    for spec in cfg.models:
        info = saved.get(spec.name)
        infos[spec.name] = info if info and info.get("path") == spec.path else model_info(spec)
    return infos


def schema_of(info: dict) -> AttributeSchema | None:
    """The attribute schema of a model info; None for a model without attribute conditioning."""
    return AttributeSchema.from_dict(info["schema"]) if info.get("schema") else None


def training_apm(model_path: str) -> Path | None:
    """The APM that labelled a `steerlm pipeline` model's training data: `<run>/apm` when the model sits in a
    pipeline folder (`<run>/sft/best`, `<run>/bootstrap/sft/best`, beside `<run>/annotated`)."""
    from steerlm.apm_model import apm_folder

    p = Path(model_path).expanduser()
    if not p.exists():
        return None
    for parent in list(p.resolve().parents)[:3]:
        if (parent / "apm").is_dir() and (parent / "annotated").is_dir():
            return apm_folder(parent / "apm").resolve()
    return None


def check_paths(cfg: Config, steered: bool) -> None:
    """Fail before generating anything when a model, the APM or the judge folder is missing (not with --from_cache,
    which needs none of them)."""
    if cfg.from_cache:
        return

    def missing_local(path: str) -> bool:
        # Not a folder here and not a hub id either (those have at most one '/'); built-in names are never paths.
        looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith(".gguf")
        return path not in models.BUILTINS and not Path(path).expanduser().exists() and looks_local

    for m in cfg.models:
        if missing_local(m.path):
            raise UserError(f"model {m.name}: no such model folder (train it first, or fix the path)", file=m.path)
    if steered and cfg.steerability.apm and not Path(cfg.steerability.apm).exists():
        raise UserError("no such APM folder (docs/evaluate.md: train a second APM)", file=cfg.steerability.apm,
                        field="steerability.apm")  # fmt: skip
    j = cfg.quality.judge
    if cfg.quality.enabled and j.kind in ("rm", "apm") and not Path(j.path).exists():
        raise UserError(f"no such {j.kind} folder", file=j.path, field="quality.judge.path")


def check_measuring_apm(cfg: Config, specs: dict[str, ModelSpec], steer_jobs: list, notes: list[str]) -> None:
    """A note for every steered model whose training labels came from the APM that measures it."""
    if not steer_jobs or not Path(cfg.steerability.apm).exists():
        return
    from steerlm.apm_model import apm_folder

    measuring = apm_folder(cfg.steerability.apm).resolve()
    for name in dict.fromkeys(j.model for j in steer_jobs):
        if training_apm(specs[name].path) == measuring:
            notes.append(f"Steerability: `{name}` was trained on labels from the APM that measures it "
                         f"(`{cfg.steerability.apm}`): its curves overstate steering. Measure with a second APM "
                         "trained on a disjoint split (docs/evaluate.md).")  # fmt: skip


@dataclass
class Job:
    """One answer: a model, a prompt, the levels it is conditioned on (None: an unconditioned model)."""

    model: str
    prompt: Prompt
    attributes: dict[str, int] | None
    key: str
    attribute: str = ""
    """The steered attribute ('' for a quality answer)."""
    level: int = -1
    answer: str = ""
    named: dict[str, int] | None = None
    """The levels the evaluation asks for before the defaults fill in the rest: what guidance's 'middle' reference
    moves (None: all of `attributes`)."""


def sampling_key(sampling: SamplingArgs) -> dict:
    """The sampling settings that differ from SamplingArgs' defaults: a setting added to SamplingArgs later (with a
    default that keeps the old behaviour) does not invalidate cached answers."""
    defaults = config_lib.to_dict(SamplingArgs())
    return {k: v for k, v in config_lib.to_dict(sampling).items() if defaults.get(k, object()) != v}


def model_sampling(cfg: Config, name: str, info: dict) -> SamplingArgs:
    """How model `name` samples: the evaluation's settings over the guidance saved with the model (its info's meta),
    which fills in what they leave unset, as in `steerlm generate`."""
    return cfg.sampling_for(name, saved_guidance(info.get("meta"), f"{info['path']}/{MODEL_META}"))


def guidance_note(cfg: Config, name: str, info: dict) -> str | None:
    """A report note for a model that samples with attribute guidance, saying where its scale came from; None for a
    model sampled unguided."""
    used = model_sampling(cfg, name, info)
    if used.guidance_scale == 1.0:
        return None
    spec = next(m for m in cfg.models if m.name == name)
    configured = cfg.sampling.guidance_scale is not None or "guidance_scale" in spec.sampling
    against = f"`{used.guidance_reference}`" if used.guidance_reference else "the unconditional prompt"
    return (f"`{name}` samples with attribute guidance s = {used.guidance_scale:g} against {against} "
            f"({'set in this config' if configured else 'saved with the model'}; `sampling: {{guidance_scale: 1}}` "
            "evaluates it unguided).")  # fmt: skip


def generation_key(cfg: Config, spec: ModelSpec, prompt: Prompt, attributes: dict | None,
                   sampling: SamplingArgs) -> str:  # fmt: skip
    """The cache key of one answer; `sampling` is the model's (`model_sampling`), resolved once per model."""
    # fp32, the default, keys as '' (its old spelling), so that caches written before stay valid.
    dtype = "" if cfg.dtype == "fp32" else cfg.dtype
    return key_of({"v": CACHE_VERSION, "path": spec.path, "template": config_lib.unless_auto(spec.template) or "", "dtype": dtype,
                   "prompt": prompt.json, "attributes": attributes,
                   "sampling": sampling_key(sampling)})  # fmt: skip


def score_key(scorer: str, prompt: Prompt, answer: str) -> str:
    """The cache key of one answer's score by a scorer that reads answers one at a time (an APM, a score judge)."""
    return key_of({"v": CACHE_VERSION, "scorer": scorer, "prompt": prompt.json, "answer": answer})


def default_levels(levels: int) -> list[int]:
    """Four evenly spaced levels of 0..L-1: 0/3/6/9 for L = 10 (SPEC §8's toxicity grid), 0/1/3/4 for L = 5."""
    return sorted({round(i * (levels - 1) / 3) for i in range(4)})


def _take(prompts: dict[str, list[Prompt]], names: list[str], n: int) -> list[Prompt]:
    return [p for name in (names or list(prompts)) for p in prompts[name][: n or None]]


def plan_steerability(cfg: Config, specs: dict[str, ModelSpec], infos: dict[str, dict],
                      prompts: dict[str, list[Prompt]], notes: list[str]) -> list[Job]:  # fmt: skip
    s = cfg.steerability
    if not s.enabled:
        return []
    names = s.models or [m.name for m in cfg.models if infos[m.name]["schema"]]
    if not names:
        notes.append("Steerability: no model has attribute conditioning, so none was steered.")
        return []
    chosen = _take(prompts, s.prompts, s.num_prompts)
    jobs = []
    for name in names:
        schema, sampling = schema_of(infos[name]), model_sampling(cfg, name, infos[name])
        if schema is None:
            notes.append(f"Steerability: `{name}` has no attribute conditioning; it is steered as a control (its "
                         "answers cannot depend on the requested level).")  # fmt: skip
        top = schema.max_level if schema else 9
        for attr in s.attributes:
            if schema is not None and attr not in schema.names:
                notes.append(f"Steerability: `{name}` has no attribute `{attr}`; skipped.")
                continue
            wanted = s.levels or default_levels(top + 1)
            levels = [lv for lv in wanted if lv <= top]
            if len(levels) < len(wanted):
                notes.append(f"Steerability: `{name}` has levels 0..{top}; requested levels above it were skipped.")
            for lv in levels:
                attrs = schema.with_defaults({attr: lv}) if schema else None
                for p in chosen:
                    jobs.append(Job(name, p, attrs, generation_key(cfg, specs[name], p, attrs, sampling), attr, lv,
                                    named={attr: lv}))  # fmt: skip
    return jobs


def quality_pairs(cfg: Config) -> list[tuple[str, str]]:
    """The pairs to judge: the configured ones (default: all), each model in them against the reference, and each
    ablation model against the ablation reference; unordered duplicates removed."""
    names = [m.name for m in cfg.models]
    pairs = [(a, b) for a, b in cfg.quality.pairs] or [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    involved = list(dict.fromkeys(n for pair in pairs for n in pair)) or names
    pairs += [(m, cfg.reference) for m in involved if m != cfg.reference]
    pairs += [(m, cfg.ablation_reference) for m in cfg.ablation.rows.values() if m != cfg.ablation_reference]
    seen, out = set(), []
    for a, b in pairs:
        if frozenset((a, b)) not in seen:
            seen.add(frozenset((a, b)))
            out.append((a, b))
    return out


def plan_quality(cfg: Config, specs: dict[str, ModelSpec], infos: dict[str, dict],
                 prompts: dict[str, list[Prompt]]) -> tuple[list[Job], list[tuple[str, str]], list[Prompt]]:  # fmt: skip
    if not cfg.quality.enabled:
        return [], [], []
    pairs = quality_pairs(cfg)
    chosen = _take(prompts, cfg.quality.prompts, cfg.quality.num_prompts)
    jobs = []
    for name in dict.fromkeys(n for pair in pairs for n in pair):
        schema = schema_of(infos[name])
        attrs = schema.with_defaults(specs[name].attributes) if schema else None
        named = dict(specs[name].attributes or {})
        sampling = model_sampling(cfg, name, infos[name])
        jobs += [
            Job(name, p, attrs, generation_key(cfg, specs[name], p, attrs, sampling), named=named) for p in chosen
        ]
    return jobs, pairs, chosen
