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

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steerlm import config as config_lib
from steerlm.errors import UserError
from steerlm.evaluation.answers import generate_missing, measure
from steerlm.evaluation.cache import CACHE, GENERATIONS, MODELS, SCORES, VERDICTS, Cache
from steerlm.evaluation.judging import judge_missing, load_judge
from steerlm.evaluation.planning import (
    check_measuring_apm,
    check_paths,
    guidance_note,
    model_infos,
    model_sampling,
    plan_quality,
    plan_steerability,
    read_prompt_set,
    sampling_key,
)
from steerlm.evaluation.report import build_report, print_summary, write_report
from steerlm.evaluation.statistics import ABLATION_ROWS, ablation_results, quality_results, steer_curves
from steerlm.generator import NO_GUIDANCE, CommandSampling, SamplingArgs, resolve_guidance
from steerlm.io import write_json

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


def _default_sampling() -> CommandSampling:
    return CommandSampling(max_new_tokens=128, temperature=0.7, top_p=0.9, seed=7)


@dataclass
class Config:
    models: list[ModelSpec] = field(default_factory=list)
    """Models to evaluate: a list of {name, path[, attributes, template]}."""
    prompts: list[PromptSet] = field(default_factory=list)
    """Prompt sets: a list of {name, path[, limit]}."""
    out: str = "runs/eval"
    """Output folder: report.md, report.html, results.json, plots/, cache/ (re-using it resumes)."""
    sampling: CommandSampling = field(default_factory=_default_sampling)
    """How every model samples its answers (part of the cache key). Guidance left unset is each model's own, the one
    it was saved with (`steerlm sft --guidance_scale`), as `steerlm generate` and `serve` apply it; `guidance_scale:
    1` evaluates every model unguided."""
    batch_size: int = 8
    """Prompts generated together."""
    dtype: str = "fp32"
    """Model dtype: 'fp32', 'bf16', 'fp16' or 'auto' (the checkpoint's own)."""
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
        self.dtype = config_lib.dtype_choice(self.dtype)
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
        # Checked here, not in QualityArgs: its defaults (an rm judge without a path) must construct, since
        # `steerlm evaluate --help` shows them.
        j = self.quality.judge
        if self.quality.enabled and j.kind in ("rm", "apm") and not j.path:
            raise ValueError(f"the quality judge (kind {j.kind}) needs quality.judge.path, a reward-model or APM "
                             "folder (or use kind: openai, or quality.enabled: false)")  # fmt: skip
        if self.quality.enabled and j.kind == "openai" and not (j.base_url and j.model):
            raise ValueError("an openai judge needs quality.judge.base_url and quality.judge.model")
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

    def sampling_for(self, name: str, saved: tuple[float, str] = NO_GUIDANCE) -> SamplingArgs:
        """The global sampling settings with model `name`'s own over them, the guidance both leave unset taken from
        `saved`, the model's (`generator.saved_guidance`)."""
        spec = next(m for m in self.models if m.name == name)
        values = {**config_lib.to_dict(self.sampling), **spec.sampling}
        return config_lib.build(SamplingArgs, {**values, **resolve_guidance(values, saved)})

    @property
    def reference(self) -> str:
        return self.quality.reference or self.models[0].name

    @property
    def ablation_reference(self) -> str:
        return self.ablation.reference or self.reference


# ---------------------------------------------------------------- loaders (tests replace them with scripted stand-ins)


def load_generator(spec: ModelSpec, cfg: Config):
    """A `generator.Generator` for a model (anything with `.generate(conversations, attributes, sampling,
    batch_size)` does)."""
    from steerlm.generator import Generator

    return Generator.load(spec.path, dtype=cfg.dtype, template=config_lib.unless_auto(spec.template))


def load_measurer(path: str):
    """The APM that measures steered answers (anything with `.predict(records, batch_size)` and `.schema`)."""
    from steerlm.apm_model import load_apm

    return load_apm(path)


@dataclass
class Loaders:
    """How models are loaded. `main` takes these so tests can run scripted models; `--from_cache` calls none."""

    generator: Callable[[ModelSpec, Config], Any] = load_generator
    measurer: Callable[[str], Any] = load_measurer
    judge: Callable[[JudgeArgs], Any] = load_judge


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
    notes: list[str] = [n for m in cfg.models if (n := guidance_note(cfg, m.name, infos[m.name]))]

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
                               "models": {n: {"path": i["path"], "schema": i["schema"], "fingerprint": i["fingerprint"],
                                              "sampling": sampling_key(model_sampling(cfg, n, i))}
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
