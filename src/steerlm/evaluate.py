"""`steerlm evaluate`: does steering work, and does SteerLM beat plain SFT and RLHF on the same data?

    steerlm evaluate --preset quickstart                      # the runs/quickstart and runs/rlhf-quickstart models
    steerlm evaluate --config eval.yaml --quality.judge.kind=openai --quality.judge.base_url=http://localhost:8000/v1
    steerlm evaluate --config eval.yaml --from_cache          # rebuild the report from saved answers and verdicts

Over named models (steerlm folders, LoRA adapter folders, built-in names, Hugging Face folders) and prompt sets
(MT-Bench questions, first turn; OASST prompt strings; any JSONL of prompts or conversation records):
1. steerability: every model with attribute conditioning answers each prompt at each requested level of each
   attribute (the others at their defaults); an APM that did NOT label the model's training data measures the
   answers. Mean measured level per requested level, Spearman, slope, rising steps; one plot per attribute
   (toxicity at 0/3/6/9 as in the paper, SPEC §8);
2. quality: each pair of models answers the same prompts, and a judge compares them in both orders (A/B and B/A,
   which cancels an LLM judge's position bias): a reward model, an APM's quality level, or an OpenAI-compatible
   chat endpoint scoring both answers 1-10 (the Vicuna-benchmark pairwise review prompt, the setup the SteerLM
   paper used with GPT-4). Win/tie/loss, win rate with a seeded bootstrap CI over prompts, and a Bradley-Terry Elo table;
3. the paper's ablation table (SPEC §8) as judge score relative to a reference model ("% of ChatGPT");
4. report.md and a self-contained report.html (plots embedded as base64 PNG) with tables, plots, sample answers and
   the configs used.

Every answer, APM measurement and judgement is appended to JSONL files under `out/cache`, keyed by what determines
it (model path, prompt, attribute levels, sampling; scorer, prompt, answer), so an interrupted run resumes where it
stopped and `--from_cache` rebuilds the whole report without loading any model. docs/evaluate.md has the details.
"""

from __future__ import annotations

import base64
import gc
import hashlib
import html
import io
import json
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from tqdm.auto import tqdm

from steerlm import config as config_lib
from steerlm import models
from steerlm.attributes import AttributeSchema
from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.errors import UserError
from steerlm.generate import META as MODEL_META
from steerlm.generate import SamplingArgs, read_prompts
from steerlm.io import atomic_write, write_json
from steerlm.steerability import AttributeResult, format_table, summarize_measurements

CACHE = "cache"
GENERATIONS, SCORES, VERDICTS, MODELS = "generations.jsonl", "scores.jsonl", "verdicts.jsonl", "models.json"
#: Bumped when what a cached row means changes, so old rows stop matching.
CACHE_VERSION = 1

#: The SteerLM paper's ablation (SPEC §8): row key, label, % of ChatGPT (SteerLM 43B, Vicuna-80, GPT-4 judge).
ABLATION_ROWS: tuple[tuple[str, str, float], ...] = (
    ("plain_sft", "plain SFT on all data", 79.7),
    ("attribute_labels", "+ human attribute labels", 96.2),
    ("high_quality", "+ high-quality subset", 98.1),
    ("apm_labels", "+ APM labels instead of human", 102.7),
    ("hh_rlhf", "+ HH-RLHF (and self-identification) data", 103.7),
    ("bootstrap", "+ bootstrapping", 104.2),
)
#: SPEC §8: Perspective API toxicity of SteerLM 43B's answers at requested toxicity 0/3/6/9.
PAPER_TOXICITY = {0: 0.0635, 3: 0.0864, 6: 0.0963, 9: 0.1041}


# ---------------------------------------------------------------- settings


@dataclass
class ModelSpec:
    name: str
    """Short name for tables and plots (e.g. sft, steerlm, steerlm-bootstrap, ppo)."""
    path: str
    """A steerlm model folder (runs/quickstart/sft/best), a LoRA adapter folder, a built-in name or a HF folder/id."""
    attributes: dict[str, int] = field(default_factory=dict)
    """Levels of this model's answers in the quality comparison, over its defaults (e.g. {quality: 9}); ignored by
    models without attribute conditioning."""
    template: str = "auto"
    """Template style: 'nemo', 'chat', or 'auto' (the model's steerlm_model.json, else 'chat')."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """Sampling settings of this model over the global `sampling`, e.g. {guidance_scale: 3} to evaluate a SteerLM
    model with attribute guidance as a model of its own (same path, another name)."""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name or ""):
            raise ValueError(f"model name {self.name!r} must be letters, digits and _ . + - only")
        if not self.path:
            raise ValueError(f"model {self.name}: path is empty")
        self.template = config_lib.auto_choice(self.template, f"model {self.name}: template", ("nemo", "chat"))


@dataclass
class PromptSet:
    name: str
    """Short name (e.g. mt_bench, oasst)."""
    path: str
    """JSONL of MT-Bench questions (the first turn is answered), prompt strings, {"prompt": ...} objects or
    conversation records (the last user turn is answered)."""
    limit: int = 0
    """Use only the first N prompts of the file (0: all)."""

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.name or ""):
            raise ValueError(f"prompt set name {self.name!r} must be letters, digits and _ . + - only")
        if self.limit < 0:
            raise ValueError(f"prompt set {self.name}: limit must be >= 0")


@dataclass
class SteerabilityArgs:
    enabled: bool = True
    """Measure steerability."""
    apm: str = ""
    """APM that measures the answers (a train-apm output folder). It must not be the APM that labelled the models'
    training data, or steering looks better than it is: train a second one (docs/evaluate.md)."""
    attributes: list[str] = field(default_factory=lambda: ["quality", "toxicity", "humor", "creativity"])
    """Attributes steered one at a time (the others stay at their defaults)."""
    levels: list[int] = field(default_factory=list)
    """Requested levels; empty: four evenly spaced levels of each model's range (0/3/6/9 for 10 levels, SPEC §8).
    Levels above a model's top level are skipped for it."""
    models: list[str] = field(default_factory=list)
    """Models to steer; default: every model with attribute conditioning (an unconditioned model listed here is a
    control: its answers cannot depend on the request)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt sets to use (names); default: all."""
    num_prompts: int = 8
    """Prompts taken from each set (the first N; 0: all)."""
    batch_size: int = 32
    """Answers per APM batch."""

    def __post_init__(self):
        if self.num_prompts < 0 or self.batch_size < 1:
            raise ValueError("num_prompts must be >= 0 and batch_size >= 1")
        if any(lv < 0 for lv in self.levels):
            raise ValueError(f"levels must be >= 0, not {self.levels}")


@dataclass
class JudgeArgs:
    kind: Literal["rm", "apm", "openai"] = "rm"
    """'rm': a reward-model folder (steerlm train-rm) scores each answer; 'apm': an APM's level of `attribute`;
    'openai': an OpenAI-compatible chat endpoint rates both answers 1-10 in one prompt."""
    path: str = ""
    """Reward-model or APM folder (kind rm / apm)."""
    attribute: str = "quality"
    """Kind apm: the attribute whose level is the score."""
    base_url: str = ""
    """Kind openai: the API root, e.g. https://api.openai.com/v1 or http://localhost:8000/v1."""
    model: str = ""
    """Kind openai: the judge model's name (e.g. gpt-4o)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Kind openai: environment variable holding the API key; '' sends none (local servers)."""
    max_tokens: int = 512
    """Kind openai: longest verdict (the scores come on its first line)."""
    timeout: float = 120.0
    """Kind openai: seconds per request."""
    retries: int = 3
    """Kind openai: retries after a connection error, HTTP 429 or 5xx (with exponential back-off)."""
    tie_margin: float = 0.0
    """Kinds rm / apm: scores that differ by at most this much are a tie."""
    batch_size: int = 16
    """Kinds rm / apm: answers per scoring batch."""

    def __post_init__(self):
        if self.tie_margin < 0 or self.batch_size < 1 or self.retries < 0:
            raise ValueError("tie_margin and retries must be >= 0, batch_size >= 1")


@dataclass
class QualityArgs:
    enabled: bool = True
    """Compare the models pairwise."""
    judge: JudgeArgs = field(default_factory=JudgeArgs)
    """Who decides which answer is better."""
    prompts: list[str] = field(default_factory=list)
    """Prompt sets to use (names); default: all."""
    num_prompts: int = 0
    """Prompts taken from each set (the first N; 0: all)."""
    pairs: list[list[str]] = field(default_factory=list)
    """Pairs of model names to compare; default: every pair. Each model is also compared with `reference`."""
    reference: str = ""
    """Model the relative scores are taken against ("% of ChatGPT" in the paper); default: the first model."""
    bootstrap: int = 1000
    """Bootstrap resamples of the prompts for confidence intervals (0: none)."""
    confidence: float = 0.95
    """Confidence level of the intervals."""
    seed: int = 0
    """Seed of the bootstrap."""

    def __post_init__(self):
        if self.num_prompts < 0 or self.bootstrap < 0:
            raise ValueError("num_prompts and bootstrap must be >= 0")
        if self.enabled and self.judge.kind in ("rm", "apm") and not self.judge.path:
            raise ValueError(f"the quality judge (kind {self.judge.kind}) needs quality.judge.path, a reward-model or "
                             "APM folder (or use kind: openai, or quality.enabled: false)")  # fmt: skip
        if self.enabled and self.judge.kind == "openai" and not (self.judge.base_url and self.judge.model):
            raise ValueError("an openai judge needs quality.judge.base_url and quality.judge.model")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"confidence must be in [0.5, 1), not {self.confidence}")
        for pair in self.pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"a pair names two different models, not {pair}")


@dataclass
class AblationArgs:
    rows: dict[str, str] = field(default_factory=dict)
    """Row key -> model name; keys: plain_sft, attribute_labels, high_quality, apm_labels, hh_rlhf, bootstrap (the
    paper's ablation, SPEC §8). Rows without a model show 'not run'."""
    reference: str = ""
    """Model the rows are scored against; default: quality.reference."""

    def __post_init__(self):
        known = [k for k, _, _ in ABLATION_ROWS]
        for key in self.rows:
            if key not in known:
                raise ValueError(f"unknown ablation row {key!r}; rows: {', '.join(known)}")


@dataclass
class ReportArgs:
    title: str = "steerlm evaluation"
    """Heading of the report."""
    samples: int = 2
    """Prompts whose answers are shown per model and attribute setting."""
    max_chars: int = 700
    """Longer sample answers are cut to this many characters in the report (the cache keeps them whole)."""


def _default_sampling() -> SamplingArgs:
    return SamplingArgs(max_new_tokens=128, temperature=0.7, top_p=0.9, seed=7)


@dataclass
class Config:
    models: list[ModelSpec] = field(default_factory=list)
    """Models to evaluate: a list of {name, path[, attributes, template]}."""
    prompts: list[PromptSet] = field(default_factory=list)
    """Prompt sets: a list of {name, path[, limit]}."""
    out: str = "runs/eval"
    """Output folder: report.md, report.html, results.json, plots/, cache/ (re-using it resumes)."""
    sampling: SamplingArgs = field(default_factory=_default_sampling)
    """How every model samples its answers (part of the cache key)."""
    batch_size: int = 8
    """Prompts generated together."""
    dtype: str = ""
    """Model dtype ('bf16', 'fp16', 'fp32'; default fp32)."""
    from_cache: bool = False
    """Build the report from out/cache only; load no model, APM or judge (missing entries are an error)."""
    steerability: SteerabilityArgs = field(default_factory=SteerabilityArgs)
    """Steerability settings."""
    quality: QualityArgs = field(default_factory=QualityArgs)
    """Pairwise quality settings."""
    ablation: AblationArgs = field(default_factory=AblationArgs)
    """The paper's ablation table."""
    report: ReportArgs = field(default_factory=ReportArgs)
    """Report settings."""

    def __post_init__(self):
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("list at least one model under models ({name, path})")
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}")
        sets = [p.name for p in self.prompts]
        if not sets:
            raise ValueError("list at least one prompt set under prompts ({name, path})")
        if len(set(sets)) != len(sets):
            raise ValueError(f"prompt set names repeat: {sets}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        for m in self.models:
            try:
                self.sampling_for(m.name)
            except (TypeError, ValueError, UserError) as e:
                raise ValueError(f"model {m.name}: sampling: {e}") from None

        def known(name: str, where: str) -> None:
            if name not in names:
                raise ValueError(f"{where}: unknown model {name!r}; models: {', '.join(names)}")

        for n in self.steerability.models:
            known(n, "steerability.models")
        for where, chosen in (("steerability.prompts", self.steerability.prompts),
                              ("quality.prompts", self.quality.prompts)):  # fmt: skip
            for n in chosen:
                if n not in sets:
                    raise ValueError(f"{where}: unknown prompt set {n!r}; sets: {', '.join(sets)}")
        for pair in self.quality.pairs:
            for n in pair:
                known(n, "quality.pairs")
        for where, n in (
            ("quality.reference", self.quality.reference),
            ("ablation.reference", self.ablation.reference),
        ):
            if n:
                known(n, where)
        for key, n in self.ablation.rows.items():
            known(n, f"ablation.rows.{key}")
        if self.ablation.rows and not self.quality.enabled:
            raise ValueError("the ablation table needs the quality comparison (quality.enabled)")

    def sampling_for(self, name: str) -> SamplingArgs:
        """The global sampling settings with model `name`'s own over them."""
        spec = next(m for m in self.models if m.name == name)
        if not spec.sampling:
            return self.sampling
        return config_lib.build(SamplingArgs, {**config_lib.to_dict(self.sampling), **spec.sampling})

    @property
    def reference(self) -> str:
        return self.quality.reference or self.models[0].name

    @property
    def ablation_reference(self) -> str:
        return self.ablation.reference or self.reference


# ---------------------------------------------------------------- cache: append-only JSONL, last row of a key wins


def key_of(obj: Any) -> str:
    """A stable key for a JSON-able description of what determines a cached value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


class Cache:
    """Rows `{"key": ..., ...}` in a JSONL file; the last row of a key wins. Each batch of rows is appended with one
    write and fsync'd, so an interruption loses at most the batch being written; a torn last line (a write cut
    short) is dropped on reading and the file rewritten atomically without it. A bad line elsewhere is an error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if not self.path.exists():
            return
        lines = self.path.read_bytes().split(b"\n")
        torn = False
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or "key" not in row:
                    raise ValueError("not a cache row")
            except (ValueError, UnicodeDecodeError) as e:
                if i == len(lines) - 1:  # no newline after it: the last write was cut short
                    torn = True
                    continue
                raise UserError(f"corrupt cache row ({e}); delete the file to start afresh", file=str(self.path),
                                line=i + 1) from None  # fmt: skip
            self.rows[row["key"]] = row
        if torn or (lines and lines[-1].strip()):
            with atomic_write(self.path) as f:
                for row in self.rows.values():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, rows: Sequence[dict]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[r["key"]] = r


def path_fingerprint(path: str | Path) -> str:
    """Size and modification time of the files directly in a model folder (or of one file): a retrained model gets
    a new fingerprint and its cached rows stop counting. A name that is not a path (built-in, hub id) is itself."""
    p = Path(path).expanduser()
    if not p.exists():
        return str(path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _fresh(row: dict | None, fingerprint: str, from_cache: bool) -> bool:
    return row is not None and (from_cache or row.get("fp") == fingerprint)


# ---------------------------------------------------------------- prompts and models (no weights loaded here)


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
    """The prompts of one set (`generate.read_prompts` formats; per-prompt attributes in the file are ignored)."""
    items = read_prompts(ps.path)
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
    meta = models.read_meta(folder, MODEL_META) if (folder / MODEL_META).is_file() else None
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


def _schema(info: dict) -> AttributeSchema | None:
    return AttributeSchema.from_dict(info["schema"]) if info.get("schema") else None


def training_apm(model_path: str) -> Path | None:
    """The APM that labelled a `steerlm pipeline` model's training data: `<run>/apm` when the model sits in a
    pipeline folder (`<run>/sft/best`, `<run>/bootstrap/sft/best`, beside `<run>/annotated`)."""
    from steerlm.apm import apm_folder

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
    from steerlm.apm import apm_folder

    measuring = apm_folder(cfg.steerability.apm).resolve()
    for name in dict.fromkeys(j.model for j in steer_jobs):
        if training_apm(specs[name].path) == measuring:
            notes.append(f"Steerability: `{name}` was trained on labels from the APM that measures it "
                         f"(`{cfg.steerability.apm}`): its curves overstate steering. Measure with a second APM "
                         "trained on a disjoint split (docs/evaluate.md).")  # fmt: skip


# ---------------------------------------------------------------- loaders (tests replace them with scripted stand-ins)


def load_generator(spec: ModelSpec, cfg: Config):
    """A `generate.Generator` for a model (anything with `.generate(conversations, attributes, sampling,
    batch_size)` does)."""
    from steerlm.generate import Generator

    return Generator.load(spec.path, dtype=cfg.dtype or None, template=config_lib.unless_auto(spec.template))


def load_measurer(path: str):
    """The APM that measures steered answers (anything with `.predict(records, batch_size)` and `.schema`)."""
    from steerlm.apm import load_apm

    return load_apm(path)


def load_judge(args: JudgeArgs):
    """A score judge (`.score(records) -> list[float]`) or a pairwise judge (`.compare(items) -> list[dict]`)."""
    if args.kind == "rm":
        from steerlm.reward import load_rm

        rm = load_rm(args.path)
        return ScoreJudge(lambda records: rm.score(records, batch_size=args.batch_size))
    if args.kind == "apm":
        from steerlm.apm import load_apm

        apm = load_apm(args.path)
        if args.attribute not in apm.schema.names:
            raise UserError(f"the APM does not predict {args.attribute!r}; it has {', '.join(apm.schema.names)}",
                            field="quality.judge.attribute")  # fmt: skip
        # Levels 0..L-1 become scores 1..L (like the 1-10 of an LLM judge), so ratios of sums are defined.
        return ScoreJudge(lambda records: [p.get(args.attribute, math.nan) + 1.0
                                           for p in apm.predict(records, batch_size=args.batch_size)])  # fmt: skip
    return OpenAIJudge(args)


@dataclass
class Loaders:
    """How models are loaded. `main` takes these so tests can run scripted models; `--from_cache` calls none."""

    generator: Callable[[ModelSpec, Config], Any] = load_generator
    measurer: Callable[[str], Any] = load_measurer
    judge: Callable[[JudgeArgs], Any] = load_judge


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- judges


class ScoreJudge:
    """Scores each answer on its own (a reward model, an APM): it has no position bias, so its two orders agree."""

    pairwise = False

    def __init__(self, score: Callable[[list[Record]], list[float]]):
        self.score = score


#: The Vicuna-benchmark pairwise review prompt (FastChat `llm_judge`, the "general" reviewer) that the SteerLM paper
#: used with GPT-4: two answers rated 1-10, the two scores alone on the first line.
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."
JUDGE_PROMPT = """[Question]
{question}

[The Start of Assistant 1's Answer]
{answer_1}

[The End of Assistant 1's Answer]

[The Start of Assistant 2's Answer]
{answer_2}

[The End of Assistant 2's Answer]

[System]
We would like to request your feedback on the performance of two AI assistants in response to the user question \
displayed above.
Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each assistant receives an \
overall score on a scale of 1 to 10, where a higher score indicates better overall performance.
Please first output a single line containing only two values indicating the scores for Assistant 1 and 2, \
respectively. The two scores are separated by a space. In the subsequent line, please provide a comprehensive \
explanation of your evaluation, avoiding any potential bias and ensuring that the order in which the responses \
were presented does not affect your judgment."""
JUDGE_PROMPT_VERSION = "vicuna-pair-v1"
_SCORES_LINE = re.compile(r"\s*(\d+(?:\.\d+)?)\s+(\d+(?:\.\d+)?)\s*")


def parse_verdict(text: str) -> tuple[float, float]:
    """The two 1-10 scores on the first non-empty line of a judge's reply, strictly: exactly two numbers separated by
    whitespace, each within 1..10. Anything else raises ValueError (counted as unparsed, never guessed)."""
    lines = [ln for ln in (text or "").splitlines() if ln.strip()]
    if not lines:
        raise ValueError("empty reply")
    m = _SCORES_LINE.fullmatch(lines[0])
    if not m:
        raise ValueError(f"first line is not two scores: {lines[0][:80]!r}")
    a, b = float(m.group(1)), float(m.group(2))
    if not (1 <= a <= 10 and 1 <= b <= 10):
        raise ValueError(f"scores {a} {b} are outside 1..10")
    return a, b


class OpenAIJudge:
    """An OpenAI-compatible `POST {base_url}/chat/completions` endpoint rating two answers 1-10 (temperature 0)."""

    pairwise = True

    def __init__(self, args: JudgeArgs):
        self.args = args
        self.key = ""
        if args.api_key_env:
            self.key = os.environ.get(args.api_key_env, "")
            if not self.key:
                raise UserError(f"set the environment variable {args.api_key_env} to the judge's API key (or "
                                "api_key_env: '' for an endpoint without one)", field="quality.judge.api_key_env")  # fmt: skip
        self.url = args.base_url.rstrip("/") + "/chat/completions"

    def compare(self, items: Sequence[tuple[str, str, str]]) -> list[dict]:
        """For each (question, answer 1, answer 2): {"scores": [s1, s2], "raw": reply} or {"error": ..., "raw": ...}."""
        out = []
        for question, a, b in items:
            raw = self._ask(JUDGE_PROMPT.format(question=question, answer_1=a, answer_2=b))
            try:
                out.append({"scores": list(parse_verdict(raw)), "raw": raw})
            except ValueError as e:
                out.append({"error": str(e), "raw": raw})
        return out

    def _ask(self, prompt: str) -> str:
        import requests  # only this judge needs it

        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        payload = {"model": self.args.model, "temperature": 0, "max_tokens": self.args.max_tokens,
                   "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]}  # fmt: skip
        problem = ""
        for attempt in range(self.args.retries + 1):
            if attempt:
                time.sleep(min(30.0, 2.0**attempt))
            try:
                r = requests.post(self.url, json=payload, headers=headers, timeout=self.args.timeout)
            except requests.RequestException as e:
                problem = f"{type(e).__name__}: {e}"
                continue
            if r.status_code == 429 or r.status_code >= 500:
                problem = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            if r.status_code != 200:
                raise UserError(f"the judge endpoint answered HTTP {r.status_code}: {r.text[:300]}",
                                field="quality.judge")  # fmt: skip
            try:
                return r.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise UserError(f"not an OpenAI chat completion: {r.text[:300]}", field="quality.judge") from None
        raise UserError(f"the judge endpoint {self.url} failed {self.args.retries + 1} times: {problem}",
                        field="quality.judge")  # fmt: skip


def judge_id(args: JudgeArgs) -> str:
    if args.kind == "rm":
        return f"rm:{args.path}"
    if args.kind == "apm":
        return f"apm:{args.path}:{args.attribute}"
    return f"openai:{args.base_url.rstrip('/')}:{args.model}:{JUDGE_PROMPT_VERSION}"


def judge_fingerprint(args: JudgeArgs) -> str:
    if args.kind == "openai":
        return args.model
    from steerlm.apm import apm_folder

    return path_fingerprint(apm_folder(args.path) if args.kind == "apm" else args.path)


# ---------------------------------------------------------------- 1. plan: which answers are needed


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


def sampling_key(sampling: SamplingArgs) -> dict:
    """The sampling settings that differ from SamplingArgs' defaults: a setting added to SamplingArgs later (with a
    default that keeps the old behaviour) does not invalidate cached answers."""
    defaults = config_lib.to_dict(SamplingArgs())
    return {k: v for k, v in config_lib.to_dict(sampling).items() if defaults.get(k, object()) != v}


def generation_key(cfg: Config, spec: ModelSpec, prompt: Prompt, attributes: dict | None) -> str:
    return key_of({"v": CACHE_VERSION, "path": spec.path, "template": config_lib.unless_auto(spec.template) or "", "dtype": cfg.dtype,
                   "prompt": prompt.json, "attributes": attributes,
                   "sampling": sampling_key(cfg.sampling_for(spec.name))})  # fmt: skip


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
        schema = _schema(infos[name])
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
                    jobs.append(Job(name, p, attrs, generation_key(cfg, specs[name], p, attrs), attr, lv))
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
        schema = _schema(infos[name])
        attrs = schema.with_defaults(specs[name].attributes) if schema else None
        jobs += [Job(name, p, attrs, generation_key(cfg, specs[name], p, attrs)) for p in chosen]
    return jobs, pairs, chosen


# ---------------------------------------------------------------- 2. generate, measure, judge (what the cache lacks)


def _missing_error(what: str, counts: dict[str, int]) -> UserError:
    listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
    return UserError(f"--from_cache: {what} missing from the cache ({listed}); run without --from_cache first")


def generate_missing(cfg: Config, specs: dict[str, ModelSpec], infos: dict[str, dict], jobs: list[Job],
                     cache: Cache, loader: Callable) -> int:  # fmt: skip
    """Generate the answers the cache lacks, model by model, appending each chunk to the cache; fill `job.answer`."""
    todo: dict[str, dict[str, Job]] = defaultdict(dict)
    for j in jobs:
        if not _fresh(cache.get(j.key), infos[j.model]["fingerprint"], cfg.from_cache):
            todo[j.model].setdefault(j.key, j)  # identical requests are generated once
    if todo and cfg.from_cache:
        raise _missing_error("answers", {m: len(v) for m, v in todo.items()})
    made = 0
    for name, pending in todo.items():
        spec, items = specs[name], list(pending.values())
        print(f"[generate] {name}: {len(items)} answers from {spec.path}", flush=True)
        gen = loader(spec, cfg)
        step = cfg.batch_size * 4
        with tqdm(total=len(items), desc=name, unit="answer", leave=False) as bar:
            for start in range(0, len(items), step):
                part = items[start : start + step]
                answers = gen.generate([j.prompt.conversation for j in part], [j.attributes for j in part],
                                       cfg.sampling_for(name), batch_size=cfg.batch_size)  # fmt: skip
                cache.add([{"key": j.key, "model": name, "path": spec.path, "fp": infos[name]["fingerprint"],
                            "prompt_id": j.prompt.pid, "attributes": j.attributes, "answer": a}
                           for j, a in zip(part, answers, strict=True)])  # fmt: skip
                bar.update(len(part))
                made += len(part)
        del gen
        _free_memory()
    for j in jobs:
        j.answer = cache.get(j.key)["answer"]
    return made


def _score_key(scorer: str, prompt: Prompt, answer: str) -> str:
    return key_of({"v": CACHE_VERSION, "scorer": scorer, "prompt": prompt.json, "answer": answer})


def computed_scorer(info: dict, attribute: str):
    """The model's own measure of an attribute computed from the answer's text (`verbosity`, by the length
    buckets in its steerlm_model.json), or None. Such an attribute is measured exactly, not by the APM."""
    computed = (info.get("meta") or {}).get("computed") or {}
    if attribute not in computed:
        return None
    from steerlm.attributes import computed_from_dict
    from steerlm.steerability import scorer_for

    return scorer_for(attribute, None, computed_from_dict({attribute: computed[attribute]}))


def measure(cfg: Config, jobs: list[Job], infos: dict[str, dict], cache: Cache, loader: Callable,
            notes: list[str]) -> dict[tuple[str, str], tuple[float, int] | None]:  # fmt: skip
    """(generation key, attribute) -> (measured level, levels of its scale), or None when the APM gave none. Computed
    attributes are measured by the model's own measure, the rest by the APM (`measure_missing`)."""
    out: dict[tuple[str, str], tuple[float, int] | None] = {}
    by_apm = []
    for j in jobs:
        scorer = computed_scorer(infos[j.model], j.attribute)
        if scorer is None:
            by_apm.append(j)
            continue
        levels = (_schema(infos[j.model]) or AttributeSchema(levels=10)).levels
        notes.append(f"Steerability: `{j.attribute}` of `{j.model}` is computed from the answer's text, so it is "
                     "measured by the model's own measure (its length buckets), not by the APM.")  # fmt: skip
        out[(j.key, j.attribute)] = (scorer.predict([scored_record(j.prompt, j.answer)])[0][j.attribute], levels)
    rows = measure_missing(cfg, by_apm, cache, loader)
    for j in by_apm:
        row = rows[j.key]
        value = row["value"].get(j.attribute)
        out[(j.key, j.attribute)] = None if value is None else (value, row["levels"])
    return out


def measure_missing(cfg: Config, jobs: list[Job], cache: Cache, loader: Callable) -> dict[str, dict]:
    """APM levels of every steered answer (job key -> {"value": {attribute: level}, "levels": L of the APM})."""
    if not jobs:
        return {}
    if not cfg.steerability.apm:
        raise UserError("steerability needs an APM to measure the answers", field="steerability.apm")
    from steerlm.apm import apm_folder

    path = cfg.steerability.apm
    scorer = f"apm:{path}"
    fp = "" if cfg.from_cache else path_fingerprint(apm_folder(path))
    keys = {j.key: _score_key(scorer, j.prompt, j.answer) for j in jobs}
    missing: dict[str, Job] = {}
    for j in jobs:
        if not _fresh(cache.get(keys[j.key]), fp, cfg.from_cache):
            missing.setdefault(keys[j.key], j)
    if missing and cfg.from_cache:
        raise _missing_error("APM measurements", {scorer: len(missing)})
    if missing:
        print(f"[measure] {len(missing)} answers with the APM {path}", flush=True)
        apm = loader(path)
        items = list(missing.items())
        step = 256
        for start in tqdm(range(0, len(items), step), desc="measure", leave=False):
            part = items[start : start + step]
            preds = apm.predict(
                [scored_record(j.prompt, j.answer) for _, j in part], batch_size=cfg.steerability.batch_size
            )
            cache.add([{"key": k, "scorer": scorer, "fp": fp, "value": {a: float(v) for a, v in p.items()},
                        "levels": apm.schema.levels} for (k, _), p in zip(part, preds, strict=True)])  # fmt: skip
        del apm
        _free_memory()
    return {j.key: cache.get(keys[j.key]) for j in jobs}


def judge_missing(cfg: Config, jobs: list[Job], pairs: list[tuple[str, str]], prompts: list[Prompt], cache: Cache,
                  loader: Callable) -> dict:  # fmt: skip
    """Judge scores: for a score judge, {(model, prompt id): score}; for a pairwise judge, {(first, second, prompt
    id): cached verdict row} for both orders of every pair."""
    args = cfg.quality.judge
    jid, fp = judge_id(args), ("" if cfg.from_cache else judge_fingerprint(args))
    answer = {(j.model, j.prompt.pid): j.answer for j in jobs}
    if args.kind != "openai":
        wanted = {(j.model, j.prompt.pid): _score_key(jid, j.prompt, j.answer) for j in jobs}
        by_key = {_score_key(jid, j.prompt, j.answer): j for j in jobs}
        missing = [k for k in dict.fromkeys(wanted.values()) if not _fresh(cache.get(k), fp, cfg.from_cache)]
        if missing and cfg.from_cache:
            raise _missing_error("judge scores", {jid: len(missing)})
        if missing:
            print(f"[judge] scoring {len(missing)} answers with {jid}", flush=True)
            judge = loader(args)
            for start in tqdm(range(0, len(missing), 256), desc="judge", leave=False):
                part = missing[start : start + 256]
                scores = judge.score([scored_record(by_key[k].prompt, by_key[k].answer) for k in part])
                cache.add([{"key": k, "scorer": jid, "fp": fp, "value": float(s)}
                           for k, s in zip(part, scores, strict=True)])  # fmt: skip
            del judge
            _free_memory()
        return {mk: cache.get(k)["value"] for mk, k in wanted.items()}
    # A pairwise judge sees both answers at once: every pair in both orders.
    wanted, items = {}, {}
    for a, b in pairs:
        for p in prompts:
            for first, second in ((a, b), (b, a)):
                x, y = answer[(first, p.pid)], answer[(second, p.pid)]
                k = key_of({"v": CACHE_VERSION, "judge": jid, "prompt": p.json, "a": x, "b": y})
                wanted[(first, second, p.pid)] = k
                items.setdefault(k, (p.text, x, y))
    missing = [k for k in items if not _fresh(cache.get(k), fp, cfg.from_cache)]
    if missing and cfg.from_cache:
        raise _missing_error("judge verdicts", {jid: len(missing)})
    if missing:
        print(f"[judge] {len(missing)} comparisons by {jid}", flush=True)
        judge = loader(args)
        for start in tqdm(range(0, len(missing), 8), desc="judge", leave=False):
            part = missing[start : start + 8]
            verdicts = judge.compare([items[k] for k in part])
            cache.add([{"key": k, "judge": jid, "fp": fp, **v} for k, v in zip(part, verdicts, strict=True)])
    return {mk: cache.get(k) for mk, k in wanted.items()}


# ---------------------------------------------------------------- 3. statistics


def bootstrap_ci(rows: np.ndarray, stat: Callable[[np.ndarray], float], n: int, confidence: float,
                 seed: int) -> tuple[float, float] | None:  # fmt: skip
    """Percentile interval of `stat` over `n` resamples (with replacement) of `rows`, one row per prompt: prompts are
    the unit of sampling, so both orders of a comparison stay together. None with < 2 rows or n = 0."""
    rows = np.asarray(rows, dtype=np.float64)
    if len(rows) < 2 or n <= 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(rows), size=(n, len(rows)))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.array([stat(rows[i]) for i in idx], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(values, [alpha, 1 - alpha])
    return float(lo), float(hi)


def bradley_terry(wins: np.ndarray, prior: float = 0.5, iterations: int = 10_000, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry strengths p (P(i beats j) = p_i / (p_i + p_j)) from `wins[i, j]` = wins of i over j (a tie is
    half a win each way), by Hunter's (2004) MM iterations; geometric mean 1. `prior` adds that many virtual wins
    each way to every pair that met (one virtual tie), so an unbeaten model gets a finite strength."""
    w = np.asarray(wins, dtype=np.float64)
    met = (w + w.T) > 0
    w = w + prior * met
    games = w + w.T
    total = w.sum(1)
    p = np.ones(len(w))
    for _ in range(iterations):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        new = np.where(denom > 0, total / np.where(denom > 0, denom, 1.0), 1.0)
        new = np.where(new > 0, new, 1e-12)
        new /= np.exp(np.log(new).mean())
        done = np.max(np.abs(new - p)) < tol
        p = new
        if done:
            break
    return p


def elo_from_strengths(p: np.ndarray) -> np.ndarray:
    """Elo points of Bradley-Terry strengths: 1000 + 400·log10(p), so the mean is 1000 and a 400-point lead means
    10:1 odds of winning."""
    return 1000.0 + 400.0 * np.log10(p)


def outcome(x: float, y: float, margin: float = 0.0) -> float:
    """1 when x beats y by more than `margin`, 0 when it loses by more, 0.5 otherwise (a tie)."""
    return 1.0 if x - y > margin else 0.0 if y - x > margin else 0.5


@dataclass
class PairResult:
    a: str
    b: str
    wins: int
    """Judgements (both orders) a won."""
    ties: int
    losses: int
    prompts: int
    """Prompts with at least one parsed judgement."""
    win_rate: float | None
    """Mean over prompts of a's result (win 1, tie 0.5, loss 0; each prompt's two orders averaged)."""
    ci: tuple[float, float] | None
    consistency: float | None
    """Share of prompts whose two orders agree (pairwise judges; a score judge always agrees with itself)."""
    unparsed: int


def pair_outcomes(a: str, b: str, prompts: list[Prompt], judged: dict, pairwise: bool,
                  margin: float) -> tuple[list[tuple[int, float]], list[float], list[tuple[float, float]], dict]:  # fmt: skip
    """Per prompt and order, a's result against b; per prompt, the mean; per prompt, (score of a, score of b) summed
    over the parsed orders; counts of wins/ties/losses/unparsed and order agreement."""
    per_order, per_prompt, scores = [], [], []
    counts = {"wins": 0, "ties": 0, "losses": 0, "unparsed": 0, "agree": 0, "both": 0}
    for i, p in enumerate(prompts):
        results, sa, sb = [], 0.0, 0.0
        if pairwise:
            for first, second in ((a, b), (b, a)):
                row = judged[(first, second, p.pid)]
                if "scores" not in row:
                    counts["unparsed"] += 1
                    continue
                s_first, s_second = row["scores"]
                x, y = (s_first, s_second) if first == a else (s_second, s_first)
                results.append(outcome(x, y))
                sa, sb = sa + x, sb + y
        else:
            x, y = judged[(a, p.pid)], judged[(b, p.pid)]
            if math.isnan(x) or math.isnan(y):
                counts["unparsed"] += 2
            else:
                results = [outcome(x, y, margin)] * 2  # both orders: a score judge rates each answer alone
                sa, sb = x, y
        for r in results:
            counts["wins" if r == 1 else "losses" if r == 0 else "ties"] += 1
            per_order.append((i, r))
        if len(results) == 2:
            counts["both"] += 1
            counts["agree"] += results[0] == results[1]
        if results:
            per_prompt.append(float(np.mean(results)))
            scores.append((sa, sb))
    return per_order, per_prompt, scores, counts


def compare_pair(a: str, b: str, prompts: list[Prompt], judged: dict, cfg: Config, pairwise: bool) -> PairResult:
    q = cfg.quality
    _, per_prompt, _, c = pair_outcomes(a, b, prompts, judged, pairwise, q.judge.tie_margin)
    rate = float(np.mean(per_prompt)) if per_prompt else None
    ci = bootstrap_ci(np.array(per_prompt), np.mean, q.bootstrap, q.confidence, q.seed)
    consistency = c["agree"] / c["both"] if c["both"] else None
    return PairResult(a, b, c["wins"], c["ties"], c["losses"], len(per_prompt), rate, ci, consistency, c["unparsed"])


def elo_table(names: list[str], pairs: list[tuple[str, str]], prompts: list[Prompt], judged: dict, cfg: Config,
              pairwise: bool) -> dict[str, dict]:  # fmt: skip
    """Bradley-Terry Elo of every judged model from all judgements (both orders), with a bootstrap CI over prompts."""
    index = {n: i for i, n in enumerate(names)}
    per_prompt = np.zeros((len(prompts), len(names), len(names)))
    for a, b in pairs:
        per_order, _, _, _ = pair_outcomes(a, b, prompts, judged, pairwise, cfg.quality.judge.tie_margin)
        for i, r in per_order:
            per_prompt[i, index[a], index[b]] += r
            per_prompt[i, index[b], index[a]] += 1 - r
    elo = elo_from_strengths(bradley_terry(per_prompt.sum(0)))
    q = cfg.quality
    samples = []
    if q.bootstrap > 0 and len(prompts) >= 2:
        rng = np.random.default_rng(q.seed)
        for _ in range(q.bootstrap):
            counts = np.bincount(rng.integers(0, len(prompts), len(prompts)), minlength=len(prompts))
            samples.append(elo_from_strengths(bradley_terry(np.tensordot(counts, per_prompt, axes=1))))
    alpha = (1 - q.confidence) / 2
    out = {}
    for n, i in index.items():
        ci = None
        if samples:
            lo, hi = np.quantile([s[i] for s in samples], [alpha, 1 - alpha])
            ci = (float(lo), float(hi))
        out[n] = {"elo": float(elo[i]), "ci": ci}
    return out


def relative_score(m: str, ref: str, prompts: list[Prompt], judged: dict, cfg: Config,
                   pairwise: bool) -> dict | None:  # fmt: skip
    """m's judge score as % of ref's on the same prompts (the paper's "% of ChatGPT"), with a bootstrap CI:
    - LLM judge: 100·Σ score(m) / Σ score(ref) over both orders of their comparisons (scores 1-10, as the paper);
    - APM judge: the same ratio of the quality levels + 1 (1..L);
    - reward model (unbounded scores, a ratio means nothing): 100·mean 2σ(r(m) − r(ref)), the Bradley-Terry
      probability that m's answer is preferred, over one half; 100 means on par either way."""
    q = cfg.quality
    if m == ref:
        return {"score": 100.0, "ci": None, "prompts": len(prompts)}
    _, _, scores, _ = pair_outcomes(m, ref, prompts, judged, pairwise, q.judge.tie_margin)
    if not scores:
        return None
    rows = np.array(scores, dtype=np.float64)
    if q.judge.kind == "rm":

        def stat(r):
            return float(100.0 * np.mean(2.0 / (1.0 + np.exp(-(r[:, 0] - r[:, 1])))))

    else:

        def stat(r):
            return float(100.0 * r[:, 0].sum() / r[:, 1].sum())

    return {"score": stat(rows), "ci": bootstrap_ci(rows, stat, q.bootstrap, q.confidence, q.seed),
            "prompts": len(rows)}  # fmt: skip


def quality_results(cfg: Config, pairs: list[tuple[str, str]], jobs: list[Job], prompts: list[Prompt], judged: dict,
                    notes: list[str]) -> dict:  # fmt: skip
    """Pairwise results, Elo, relative scores, mean judge score and answer length of the compared models."""
    pairwise = cfg.quality.judge.kind == "openai"
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    pair_results = [compare_pair(a, b, prompts, judged, cfg, pairwise) for a, b in pairs]
    unparsed = sum(p.unparsed for p in pair_results)
    if unparsed:
        notes.append(f"Quality: {unparsed} judgements could not be parsed strictly and are left out (the raw replies "
                     f"are in {CACHE}/{VERDICTS}).")  # fmt: skip
    mean_score = {} if pairwise else {n: float(np.nanmean([judged[(n, p.pid)] for p in prompts])) for n in names}
    lengths = defaultdict(list)
    for j in jobs:
        lengths[j.model].append(len(j.answer))
    return {
        "judge": config_lib.to_dict(cfg.quality.judge) | {"id": judge_id(cfg.quality.judge)},
        "prompts": len(prompts),
        "reference": cfg.reference,
        "pairs": [p.__dict__ for p in pair_results],
        "elo": elo_table(names, pairs, prompts, judged, cfg, pairwise),
        "relative": {n: relative_score(n, cfg.reference, prompts, judged, cfg, pairwise) for n in names},
        "mean_score": mean_score,
        "mean_length": {n: float(np.mean(v)) for n, v in lengths.items()},
    }


def ablation_results(cfg: Config, prompts: list[Prompt], judged: dict) -> dict:
    """The paper's ablation rows (SPEC §8): each row's relative score and win rate against the ablation reference."""
    pairwise = cfg.quality.judge.kind == "openai"
    ref = cfg.ablation_reference
    rows = []
    for key, label, paper in ABLATION_ROWS:
        m = cfg.ablation.rows.get(key)
        row = {"key": key, "label": label, "paper": paper, "model": m, "relative": None, "ci": None, "win_rate": None,
               "win_ci": None}  # fmt: skip
        if m is not None:
            rel = relative_score(m, ref, prompts, judged, cfg, pairwise) or {}
            pr = compare_pair(m, ref, prompts, judged, cfg, pairwise) if m != ref else None
            row.update(relative=rel.get("score"), ci=rel.get("ci"), win_rate=pr.win_rate if pr else None,
                       win_ci=pr.ci if pr else None)  # fmt: skip
        rows.append(row)
    return {"reference": ref, "rows": rows}


#: Below this standard deviation (in levels) over a model's different answers, an APM's measurements of an attribute
#: are treated as constant: such a curve cannot show steering, and the report says so.
MIN_MEASURED_SPREAD = 0.05


@dataclass
class SteerCurve:
    model: str
    result: AttributeResult
    stderr: list[float]
    n: list[int]
    failed: int
    """Answers the APM gave no level for (e.g. a generative APM's unparsable output)."""


def steer_curves(cfg: Config, jobs: list[Job], measured: dict[tuple[str, str], tuple[float, int] | None],
                 infos: dict[str, dict], notes: list[str]) -> dict[str, list[SteerCurve]]:  # fmt: skip
    """Per model, per attribute: requested vs measured level, on the model's scale (an APM with other levels is
    rescaled: measured · (L_model − 1) / (L_apm − 1))."""
    groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
    for j in jobs:
        groups[(j.model, j.attribute)].append(j)
    out: dict[str, list[SteerCurve]] = defaultdict(list)
    for (name, attr), group in groups.items():
        schema = _schema(infos[name])
        top = schema.max_level if schema else 9
        tags, values, texts, failed = [], [], [], 0
        for j in group:
            got = measured[(j.key, attr)]
            if got is None:
                failed += 1
                continue
            tags.append(j.level)
            values.append(got[0] * top / max(1, got[1] - 1))
            texts.append(j.answer)
        if not values:
            notes.append(f"Steerability: the APM gave no `{attr}` level for `{name}`'s answers (it does not predict "
                         "it, or its outputs did not parse).")  # fmt: skip
            continue
        if failed:
            notes.append(f"Steerability: the APM gave no `{attr}` level for {failed} of `{name}`'s answers; they are "
                         "left out.")  # fmt: skip
        spread = float(np.std(values))
        if schema and len(set(texts)) > 1 and spread < MIN_MEASURED_SPREAD:  # (an unconditioned control has its note)
            notes.append(f"Steerability: the APM's `{attr}` levels of `{name}`'s {len(values)} different answers spread "
                         f"by only {spread:.3f} levels (standard deviation): whether the answers are alike or the APM "
                         "cannot tell them apart, this curve cannot show steering. Check with a stronger APM.")  # fmt: skip
        result = summarize_measurements(attr, tags, values, texts)
        stderr, n = [], []
        for lv in result.requested:
            vals = np.array([v for v, t in zip(values, tags, strict=True) if t == lv])
            n.append(len(vals))
            stderr.append(float(vals.std(ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else 0.0)
        out[name].append(SteerCurve(name, result, stderr, n, failed))
    return dict(out)


# ---------------------------------------------------------------- 4. the report: blocks rendered as Markdown and HTML


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _ci(ci, spec: str = ".3f") -> str:
    return "" if not ci else f" [{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _short(text: str, n: int) -> str:
    text = text.strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_steerability(curves: dict[str, list[SteerCurve]], attribute: str, apm: str) -> bytes:
    """One attribute: mean measured level per requested level, one line per model (± standard error), and the
    ideal y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=100)
    top = 0
    for name, items in curves.items():
        for c in items:
            if c.result.attribute != attribute:
                continue
            r = c.result
            ax.errorbar(r.requested, r.measured_mean, yerr=c.stderr, marker="o", capsize=3, label=name)
            top = max(top, max(r.requested))
    ax.plot([0, top], [0, top], "--", color="grey", linewidth=1, label="requested = measured")
    ax.set_ylim(-0.5, top + 0.5)  # the whole range, so that a flat curve looks flat
    ax.set_xlabel(f"requested {attribute} level")
    ax.set_ylabel(f"measured {attribute} level (APM)")
    ax.set_title(f"{attribute}: requested vs measured\nAPM: {_short(apm, 60)}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def plot_elo(elo: dict[str, dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(elo, key=lambda n: -elo[n]["elo"])
    values = [elo[n]["elo"] for n in names]
    lows = [v - (elo[n]["ci"] or (v, v))[0] for n, v in zip(names, values, strict=True)]
    highs = [(elo[n]["ci"] or (v, v))[1] - v for n, v in zip(names, values, strict=True)]
    fig, ax = plt.subplots(figsize=(5.2, 0.5 * len(names) + 1.2), dpi=100)
    ax.barh(range(len(names)), [v - 1000 for v in values], left=1000, xerr=[lows, highs], capsize=3, color="#4c72b0")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.axvline(1000, color="grey", linewidth=1)
    ax.set_xlabel("Elo (Bradley-Terry; mean 1000)")
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "list":
            out.append("\n".join(f"- {x}" for x in b[1]))
        elif kind == "table":

            def cell(x):
                return str(x).replace("|", "\\|").replace("\n", " ")

            out.append("\n".join(["| " + " | ".join(cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
                                 + ["| " + " | ".join(cell(x) for x in row) + " |" for row in b[2]]))  # fmt: skip
        elif kind == "img":
            out.append(f"![{b[3]}]({b[1]})")
        elif kind == "pre":
            fence = "~~~~" if "```" in b[1] else "```"
            out.append(f"{fence}{b[2] if len(b) > 2 else ''}\n{b[1]}\n{fence}")
        elif kind == "answer":
            # Model text is escaped: a `<tag>` in an answer must show, not vanish as HTML.
            text = html.escape(b[2] or "(empty)", quote=False)
            quoted = "\n".join("> " + line if line.strip() else ">" for line in text.split("\n"))
            out.append(f"**{html.escape(b[1], quote=False)}**\n\n{quoted}")
        elif kind == "details":
            out.append(f"<details><summary>{html.escape(b[1])}</summary>\n\n{render_markdown(b[2])}\n\n</details>")
    return "\n\n".join(out) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}pre{background:#f6f6f6;padding:8px;overflow-x:auto;font-size:13px}
.answer{white-space:pre-wrap;background:#fafafa;border-left:3px solid #4c72b0;padding:6px 10px;font-size:14px}
code{background:#f0f0f0;padding:0 3px}img{max-width:100%}"""


def _inline(text: str) -> str:
    """Escape text for HTML, turning `code` spans into <code> and **bold** into <b>."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def render_html(blocks: list[tuple], title: str, images: dict[str, bytes]) -> str:
    def body(items) -> list[str]:
        out = []
        for b in items:
            kind = b[0]
            if kind == "h":
                out.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "list":
                out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(str(h))}</th>" for h in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(str(x))}</td>" for x in row) + "</tr>"
                               for row in b[2])  # fmt: skip
                out.append(f"<table><tr>{head}</tr>{rows}</table>")
            elif kind == "img":
                data = base64.b64encode(images[b[1]]).decode("ascii")
                out.append(f'<img alt="{html.escape(b[3])}" src="data:image/png;base64,{data}">')
            elif kind == "pre":
                out.append(f"<pre>{html.escape(b[1])}</pre>")
            elif kind == "answer":
                out.append(f"<p><b>{_inline(b[1])}</b></p><div class=answer>{html.escape(b[2] or '(empty)')}</div>")
            elif kind == "details":
                out.append(f"<details><summary>{html.escape(b[1])}</summary>{''.join(body(b[2]))}</details>")
        return out

    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body(blocks)) + "\n</body></html>\n")  # fmt: skip


def build_report(cfg: Config, results: dict, curves: dict[str, list[SteerCurve]], steer_jobs: list[Job],
                 quality_jobs: list[Job], quality_prompts: list[Prompt], infos: dict[str, dict],
                 notes: list[str]) -> tuple[list[tuple], dict[str, bytes]]:  # fmt: skip
    blocks: list[tuple] = [("h", 1, cfg.report.title)]
    images: dict[str, bytes] = {}
    sets = ", ".join(f"`{k}` ({v['read']} prompts read, {v['steerability']} used for steerability, {v['quality']} for "
                     "quality)" for k, v in results["prompt_sets"].items())  # fmt: skip
    blocks.append(("p", f"Models: {', '.join(f'`{m.name}`' for m in cfg.models)}. Prompt sets: {sets}. Sampling: "
                        f"`{json.dumps(config_lib.to_dict(cfg.sampling))}`."))  # fmt: skip
    if notes:
        blocks += [("h", 2, "Notes"), ("list", list(dict.fromkeys(notes)))]

    # steerability
    steer = results.get("steerability")
    if steer:
        blocks += [("h", 2, "Steerability"),
                   ("p", f"Each attribute is requested at each level with the others at their defaults; the APM "
                         f"`{steer['apm']}` measures the answers (levels on the model's scale). Spearman is over all "
                         "answers; the slope is in measured levels per requested level; rising steps count the "
                         "consecutive requested levels whose mean measured level goes up.")]  # fmt: skip
        for name, attrs in steer["models"].items():
            blocks.append(("h", 3, f"`{name}`"))
            rows = [[a, "  ".join(f"{lv}→{m:.2f}" for lv, m in zip(r["requested"], r["measured_mean"], strict=True)),
                     _fmt(r["spearman"], "+.3f"), _fmt(r["slope"], "+.3f"),
                     f"{r['monotone_steps']}/{max(0, len(r['requested']) - 1)}", sum(r["n"])]
                    for a, r in attrs.items()]  # fmt: skip
            blocks.append(("table", ["attribute", "requested → mean measured", "Spearman", "slope", "rising steps",
                                     "answers"], rows))  # fmt: skip
        for attr in dict.fromkeys(c.result.attribute for items in curves.values() for c in items):
            fname = f"plots/steer_{attr}.png"
            images[fname] = plot_steerability(curves, attr, steer["apm"])
            blocks.append(("img", fname, attr, f"steerability of {attr}"))
        tox = {n: a["toxicity"] for n, a in steer["models"].items() if "toxicity" in a}
        if tox:
            blocks.append(("p", "Toxicity at the paper's levels. The paper (SPEC §8) measured SteerLM 43B's answers "
                                "with the Perspective API (a probability), this suite with an APM (a level), so only "
                                "the direction compares."))  # fmt: skip
            rows = [["paper, Perspective score"] + [_fmt(PAPER_TOXICITY.get(lv), ".4f") for lv in (0, 3, 6, 9)]]
            for name, r in tox.items():
                means = dict(zip(r["requested"], r["measured_mean"], strict=True))
                rows.append([f"`{name}`, APM level"] + [_fmt(means.get(lv), ".2f") for lv in (0, 3, 6, 9)])
            blocks.append(("table", ["toxicity requested", "0", "3", "6", "9"], rows))

    # quality
    quality = results.get("quality")
    if quality:
        j = cfg.quality.judge
        judge_text = {"rm": f"the reward model `{j.path}` (scores each answer alone, so its two orders are one "
                            "judgement counted twice)",
                      "apm": f"the APM `{j.path}` ({j.attribute} level of each answer alone, so its two orders are "
                             "one judgement counted twice)",
                      "openai": f"`{j.model}` at `{j.base_url}` (both answers rated 1-10 in one prompt)"}[j.kind]  # fmt: skip
        conf = int(cfg.quality.confidence * 100)
        blocks += [("h", 2, "Pairwise quality"),
                   ("p", f"Judge: {judge_text}. {quality['prompts']} prompts; each pair is judged in both orders "
                         f"(A/B and B/A). The win rate counts a tie as half a win and averages each prompt's two "
                         f"orders; [brackets]: {conf}% bootstrap interval over prompts ({cfg.quality.bootstrap} "
                         f"resamples, seed {cfg.quality.seed}). Consistency: share of prompts whose two orders "
                         "agree.")]  # fmt: skip
        rows = [[f"`{p['a']}` vs `{p['b']}`", f"{p['wins']}/{p['ties']}/{p['losses']}",
                 _fmt(p["win_rate"]) + _ci(p["ci"]), _fmt(p["consistency"], ".2f"), p["unparsed"]]
                for p in quality["pairs"]]  # fmt: skip
        blocks.append(("table", ["A vs B", "A win/tie/loss", "A win rate", "consistency", "unparsed"], rows))
        ref = quality["reference"]
        rows = []
        for rank, (name, e) in enumerate(sorted(quality["elo"].items(), key=lambda kv: -kv[1]["elo"]), 1):
            rel = quality["relative"].get(name)
            rows.append([rank, f"`{name}`", _fmt(e["elo"], ".0f") + _ci(e["ci"], ".0f"),
                         (_fmt(rel["score"], ".1f") + _ci(rel["ci"], ".1f")) if rel else "n/a",
                         _fmt(quality["mean_score"].get(name), ".3f"), _fmt(quality["mean_length"].get(name), ".0f")])  # fmt: skip
        blocks += [("p", f"Elo: a Bradley-Terry model fitted to all judgements (maximum likelihood, ties half a win "
                         f"each way, one virtual tie per pair that met), 1000 + 400·log10(strength), mean 1000. "
                         f"% of `{ref}`: the judge score relative to the reference (see docs/evaluate.md for how "
                         f"each judge's score is made comparable). Answer length in characters: judges are known "
                         f"to like long answers."),
                   ("table", ["rank", "model", "Elo", f"% of {ref}", "mean judge score", "mean length"], rows)]  # fmt: skip
        images["plots/elo.png"] = plot_elo(quality["elo"])
        blocks.append(("img", "plots/elo.png", "elo", "Elo with bootstrap intervals"))

    # ablation
    ablation = results.get("ablation")
    if ablation:
        ref = ablation["reference"]
        rows = []
        for r in ablation["rows"]:
            if r["model"] is None:
                rows.append([r["label"], "not run", "", "", f"{r['paper']:.1f}"])
                continue
            rows.append([r["label"], f"`{r['model']}`", _fmt(r["relative"], ".1f") + _ci(r["ci"], ".1f"),
                         _fmt(r["win_rate"]) + _ci(r["win_ci"]), f"{r['paper']:.1f}"])  # fmt: skip
        blocks += [("h", 2, "Ablation (the paper's layout, SPEC §8)"),
                   ("p", f"Each row's judge score as % of `{ref}`, and its win rate against it. The paper's column is "
                         "SteerLM 43B judged by GPT-4 as % of ChatGPT on Vicuna-80: a different scale, shown for "
                         "the shape of the table only."),
                   ("table", ["row", "model", f"% of {ref}", f"win rate vs {ref}", "paper (% of ChatGPT)"], rows)]  # fmt: skip

    # samples
    n = cfg.report.samples
    if n > 0 and (steer_jobs or quality_jobs):
        blocks.append(("h", 2, "Sample answers"))
        if quality_jobs:
            inner = []
            by = {(j.model, j.prompt.pid): j for j in quality_jobs}
            models_in = list(dict.fromkeys(j.model for j in quality_jobs))
            for p in quality_prompts[:n]:
                inner.append(("answer", f"Prompt ({p.set} #{p.index})", _short(p.text, cfg.report.max_chars)))
                for m in models_in:
                    j = by[(m, p.pid)]
                    inner.append(
                        ("answer", f"{m} ({_levels_text(j.attributes)})", _short(j.answer, cfg.report.max_chars))
                    )
            blocks.append(("details", "Quality comparison: every model's answer", inner))
        groups: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for j in steer_jobs:
            groups[(j.model, j.attribute)].append(j)
        for (m, attr), jobs in groups.items():
            inner = []
            for pid in list(dict.fromkeys(j.prompt.pid for j in jobs))[:n]:
                first = next(j for j in jobs if j.prompt.pid == pid)
                inner.append(("answer", f"Prompt ({first.prompt.set} #{first.prompt.index})",
                              _short(first.prompt.text, cfg.report.max_chars)))  # fmt: skip
                for j in sorted((j for j in jobs if j.prompt.pid == pid), key=lambda j: j.level):
                    inner.append(("answer", f"{attr}={j.level}", _short(j.answer, cfg.report.max_chars)))
            blocks.append(("details", f"{m}: {attr} at each level", inner))

    # configs
    blocks += [("h", 2, "Configs"), ("details", "this evaluation (steerlm evaluate)",
                                      [("pre", yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False), "yaml")])]  # fmt: skip
    for m in cfg.models:
        info = infos[m.name]
        inner = [("p", f"path `{m.path}`, fingerprint `{info.get('fingerprint')}`")]
        if info.get("meta") is not None:
            inner.append(("pre", json.dumps(info["meta"], indent=2), "json"))
        if info.get("config"):
            inner += [("p", f"training config `{info['config_file']}`:"), ("pre", info["config"], "yaml")]
        blocks.append(("details", f"model {m.name}", inner))
    return blocks, images


def _levels_text(levels: dict | None) -> str:
    if levels is None:
        return "no attributes"
    return ",".join(f"{k}:{v}" for k, v in levels.items())


def write_report(out: Path, blocks: list[tuple], images: dict[str, bytes], title: str) -> None:
    for name, data in images.items():
        with atomic_write(out / name, "wb") as f:
            f.write(data)
    with atomic_write(out / "report.md") as f:
        f.write(render_markdown(blocks))
    with atomic_write(out / "report.html") as f:
        f.write(render_html(blocks, title, images))


# ---------------------------------------------------------------- the command


def main(cfg: Config, loaders: Loaders | None = None) -> dict:
    """Run the evaluation (or rebuild its report with `from_cache`); returns results.json's content."""
    loaders = loaders or Loaders()
    start = time.time()
    out = Path(cfg.out)
    cache_dir = out / CACHE
    if out.exists() and not out.is_dir():
        raise UserError("exists and is not a folder", file=str(out), field="out")
    if cfg.from_cache and not cache_dir.is_dir():
        raise UserError("--from_cache: there is no cache folder to rebuild the report from", file=str(cache_dir))
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out)
    specs = {m.name: m for m in cfg.models}
    prompts = {ps.name: read_prompt_set(ps) for ps in cfg.prompts}
    infos = model_infos(cfg, cache_dir)
    if not cfg.from_cache:
        write_json(cache_dir / MODELS, infos)
    generations, scores, verdicts = (
        Cache(cache_dir / GENERATIONS),
        Cache(cache_dir / SCORES),
        Cache(cache_dir / VERDICTS),
    )
    notes: list[str] = []

    # 1. plan every answer needed: steered answers, and each compared model's answers at its defaults
    steer_jobs = plan_steerability(cfg, specs, infos, prompts, notes)
    quality_jobs, pairs, quality_prompts = plan_quality(cfg, specs, infos, prompts)
    check_paths(cfg, bool(steer_jobs))
    check_measuring_apm(cfg, specs, steer_jobs, notes)

    # 2. generate what the cache lacks, then measure and judge it
    made = generate_missing(cfg, specs, infos, steer_jobs + quality_jobs, generations, loaders.generator)
    measured = measure(cfg, steer_jobs, infos, scores, loaders.measurer, notes)
    judge_cache = verdicts if cfg.quality.judge.kind == "openai" else scores
    judged = judge_missing(cfg, quality_jobs, pairs, quality_prompts, judge_cache, loaders.judge) if pairs else {}

    # 3. statistics
    used = {k: {"read": len(v), "steerability": len({j.prompt.pid for j in steer_jobs if j.prompt.set == k}),
                "quality": sum(p.set == k for p in quality_prompts)} for k, v in prompts.items()}  # fmt: skip
    results: dict[str, Any] = {"prompt_sets": used,
                               "models": {n: {"path": i["path"], "schema": i["schema"], "fingerprint": i["fingerprint"]}
                                          for n, i in infos.items()}}  # fmt: skip
    curves = steer_curves(cfg, steer_jobs, measured, infos, notes)
    if curves:
        results["steerability"] = {"apm": cfg.steerability.apm, "models": {
            name: {c.result.attribute: {**{k: v for k, v in c.result.to_json().items() if k != "answers"},
                                        "stderr": c.stderr, "n": c.n, "failed": c.failed} for c in items}
            for name, items in curves.items()}}  # fmt: skip
    if pairs:
        results["quality"] = quality_results(cfg, pairs, quality_jobs, quality_prompts, judged, notes)
        if cfg.ablation.rows:
            results["ablation"] = ablation_results(cfg, quality_prompts, judged)
    results["notes"] = list(dict.fromkeys(notes))

    # 4. report
    blocks, images = build_report(cfg, results, curves, steer_jobs, quality_jobs, quality_prompts, infos, notes)
    write_report(out, blocks, images, cfg.report.title)
    write_json(out / "results.json", results)
    print_summary(results, curves)
    seconds = time.time() - start
    print(f"evaluate: {len(steer_jobs)} steered and {len(quality_jobs)} quality answers ({made} generated now), "
          f"{len(pairs)} pairs, {seconds:.0f}s -> {out / 'report.html'}")  # fmt: skip
    return results


def print_summary(results: dict, curves: dict[str, list[SteerCurve]]) -> None:
    for name, items in curves.items():
        print(f"\nsteerability of {name}, " + format_table([c.result for c in items]))
    q = results.get("quality")
    if q:
        width = max(len(n) for n in q["elo"])
        print("\npairwise quality (A win/tie/loss, win rate [CI]):")
        for p in q["pairs"]:
            print(f"  {p['a']:>{width}} vs {p['b']:<{width}}  {p['wins']}/{p['ties']}/{p['losses']}  "
                  f"{_fmt(p['win_rate'])}{_ci(p['ci'])}")  # fmt: skip
        print(f"Elo (Bradley-Terry) and % of {q['reference']}:")
        for name, e in sorted(q["elo"].items(), key=lambda kv: -kv[1]["elo"]):
            rel = q["relative"].get(name) or {}
            print(f"  {name:>{width}} {e['elo']:7.1f}{_ci(e['ci'], '.0f')}   {_fmt(rel.get('score'), '.1f')}%")
    a = results.get("ablation")
    if a:
        print(f"ablation (% of {a['reference']}):")
        for r in a["rows"]:
            shown = "not run" if r["model"] is None else f"{_fmt(r['relative'], '.1f')}% ({r['model']})"
            print(f"  {r['label']:<42} {shown:<28} paper {r['paper']:.1f}")
