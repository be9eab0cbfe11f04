"""The whole SteerLM recipe from one YAML file: prepare -> train-apm -> annotate -> sft -> bootstrap -> check.

    steerlm pipeline --preset quickstart            # SmolLM2-135M-Instruct + LoRA, MiniLM APM, OASST (~25 min CPU)
    steerlm pipeline --preset tiny --out=runs/tiny  # tiny random models: the whole chain in seconds

Each stage writes into its own folder under `out` and is skipped on a re-run when its config and inputs are
unchanged (runner.py). A section of the YAML holds the settings of one stage, exactly as that command takes them;
the pipeline fills in the paths that connect the stages. It ends with a summary table, the steerability check
(requested vs APM-measured levels) and a few answers to one prompt at different attribute settings.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

from steerlm import config as config_lib
from steerlm.attributes import (
    GUIDANCE_PLAUSIBILITY,
    GUIDANCE_REFERENCE_PLAUSIBILITY,
    check_guidance_reference,
    check_plausibility,
)
from steerlm.config import to_dict
from steerlm.errors import UserError
from steerlm.io import write_json
from steerlm.runner import run_stage, summary_table


@dataclass
class CheckArgs:
    attributes: list[str] = field(default_factory=lambda: ["quality", "humor", "creativity", "toxicity"])
    """Attributes to steer, one at a time (the others stay at their defaults)."""
    levels: list[int] = field(default_factory=list)
    """Requested levels; empty means low and high: 0 and the top level."""
    levels_for: dict = field(default_factory=dict)
    """Requested levels of particular attributes, overriding `levels` (e.g. {verbosity: [0, 1, 2, 3, 4]})."""
    max_new_tokens_for: dict = field(default_factory=dict)
    """Longest answer for particular attributes, overriding `max_new_tokens` (verbosity needs room to be long)."""
    num_prompts: int = 8
    """Held-out prompts (from the validation split) answered at each level."""
    max_new_tokens: int = 64
    """Longest answer."""
    temperature: float = 0.7
    """Sampling temperature of the check's answers."""
    batch_size: int = 16
    """Answers decoded together. The answers depend on it (the rows of a batch share one seeded sampler). Measured on
    the quickstart's model (2-core Xeon, docs/pipeline.md), its 40 verbosity answers took 162 s at 16 and 176 s at
    20 (two batches instead of three, but each runs to its longest answer): a larger batch did not pay here."""
    repetition_penalty: float = 1.0
    """CTRL's repetition penalty of the check's and the demo's answers (1: none). Measured on the quickstart's model
    (docs/pipeline.md): 1.3 stops its long answers looping but makes the short ones run on (verbosity Spearman +0.75
    at 1.0, +0.27 at 1.3)."""
    seed: int = 7
    """Seed of prompt choice and sampling."""
    guidance_scale: float | None = None
    """Attribute guidance of the check's and the demo's answers (1: plain SteerLM; docs/steering.md). Unset: the
    guidance the model was saved with (`sft.guidance_scale`), so the check measures what `steerlm generate` and
    `serve` do by default; else 1."""
    guidance_reference: str | None = None
    """Guidance's neutral condition (`SamplingArgs.guidance_reference`): '' (no attribute line), an attribute string,
    or 'middle' (the attributes each answer asks for at their middle level: in the check the measured one, in the
    demo those its setting names; guidance pushes them away from the middle). Unset: the model's saved one."""
    guidance_plausibility: float = GUIDANCE_PLAUSIBILITY
    """Plausibility constraint of guided steps under the requested condition (`SamplingArgs.guidance_plausibility`;
    0: off)."""
    guidance_reference_plausibility: float = GUIDANCE_REFERENCE_PLAUSIBILITY
    """The same under the neutral condition (`SamplingArgs.guidance_reference_plausibility`; 0: off)."""
    compare_guidance: list[float] = field(default_factory=list)
    """Further guidance scales to run the check at, reported beside the main one (e.g. [1.0] to see what guidance
    adds)."""
    demo_prompt: str = "Write a short note inviting my neighbours to a garden party."
    """The prompt answered at several attribute settings at the very end."""
    demo_settings: list[dict] = field(
        default_factory=lambda: [{}, {"humor": 9}, {"quality": 0}, {"creativity": 9, "humor": 9}]
    )
    """Attribute settings of the final demo (levels above the model's top are clipped to it)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        check_plausibility(guidance_plausibility=self.guidance_plausibility,
                           guidance_reference_plausibility=self.guidance_reference_plausibility)  # fmt: skip
        if self.guidance_reference is not None:  # caught here, not after the SFT stage
            check_guidance_reference(self.guidance_reference)


@dataclass
class Config:
    out: str = "runs/pipeline"
    """Root folder; each stage writes a subfolder (data, apm, annotated, sft, bootstrap, check)."""
    prepare: dict = field(default_factory=dict, metadata={"command": "prepare", "filled": "out overwrite"})
    """`steerlm prepare` settings (source, attributes, levels, ...); `out` is filled in."""
    apm: dict = field(default_factory=dict, metadata={"command": "train-apm", "filled": "data out overwrite"})
    """`steerlm train-apm` settings (kind, model, train, ...); `data` and `out` are filled in."""
    annotate: dict = field(default_factory=dict, metadata={"command": "annotate", "filled": "apm input out"})
    """`steerlm annotate` settings (batch size, ...); `apm`, `input` and `out` are filled in."""
    sft: dict = field(default_factory=dict, metadata={"command": "sft", "filled": "data out overwrite"})
    """`steerlm sft` settings (model, template, train, lora, ...); `data` and `out` are filled in."""
    bootstrap: dict = field(
        default_factory=dict, metadata={"command": "bootstrap", "filled": "model apm data out overwrite"}
    )
    """`steerlm bootstrap` settings (num_prompts, sft, ...); `model`, `apm`, `data` and `out` are filled in."""
    run_bootstrap: bool = True
    """Run step 4; without it the check uses the step-3 model."""
    hh_rlhf: list[str | list[str]] = field(default_factory=list)
    """The paper's "+ HH-RLHF" row: HH-RLHF transcript files whose chosen and rejected answers the APM labels (as
    `annotate` does) and that are added to the SFT training data; empty: the prepared data only. Each entry is a
    local .jsonl[.gz] file or `hub:ID` (e.g. hub:Anthropic/hh-rlhf), or a list of such candidates of which the first
    that exists or loads is used (as `prepare.source`)."""
    hh_rlhf_max_pairs: int = 0
    """Use at most this many pairs of each `hh_rlhf` file (the first ones); 0 uses all."""
    check: CheckArgs = field(default_factory=CheckArgs)
    """The steerability check and demo at the end."""

    def __post_init__(self):
        if self.hh_rlhf_max_pairs < 0:
            raise ValueError(f"hh_rlhf_max_pairs must be >= 0, not {self.hh_rlhf_max_pairs}")


def _build(module, section: dict, fixed: dict, name: str):
    return config_lib.build(module.Config, {**section, **fixed}, prefix=f"{name}.")


def main(cfg: Config) -> dict:
    # The pipeline is an orchestrator: it runs these stages (their Config and main), so it alone, with rlhf and
    # bootstrap, may import stage modules (tests/test_architecture.py); imported here so `--help` stays fast.
    from steerlm import annotate, apm, bootstrap, models, prepare, sft
    from steerlm.generator import saved_guidance

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out)
    results = []

    # 0. data: records split by tree (SPEC §2)
    data_dir = out / "data"
    prep_cfg = _build(prepare, cfg.prepare, {"out": str(data_dir), "overwrite": True}, "prepare")
    results.append(run_stage("prepare", data_dir, prep_cfg, lambda: prepare.main(prep_cfg),
                             metric=lambda r: f"{r.get('train', {}).get('records', '?')} train conversations"))  # fmt: skip

    # 1. attribute prediction model on the human labels
    apm_dir = out / "apm"
    apm_cfg = _build(apm, cfg.apm, {"data": str(data_dir), "out": str(apm_dir), "overwrite": True}, "apm")
    results.append(run_stage("train-apm", apm_dir, apm_cfg, lambda: apm.main(apm_cfg), inputs=[data_dir],
                             metric=_apm_metric))  # fmt: skip
    apm_model = str(apm_dir / "best")

    # 2. annotate train and validation records with the APM (human labels kept as gt_label)
    ann_dir = out / "annotated"

    def run_annotate():
        stats = {}
        for split in ("train", "val"):
            a_cfg = _build(annotate, cfg.annotate, {"apm": apm_model, "input": str(data_dir / f"{split}.jsonl"),
                                                    "out": str(ann_dir / f"{split}.jsonl"), "overwrite": True},
                           "annotate")  # fmt: skip
            stats[split] = annotate.main(a_cfg)
        return stats

    ann_cfg = _build(annotate, cfg.annotate, {"apm": apm_model, "input": str(data_dir / "train.jsonl"),
                                              "out": str(ann_dir / "train.jsonl")}, "annotate")  # fmt: skip
    results.append(run_stage("annotate", ann_dir, ann_cfg, run_annotate, inputs=[apm_dir, data_dir],
                             metric=_annotate_metric))  # fmt: skip

    # 2b. "+ HH-RLHF": APM-labelled HH-RLHF answers join the SFT training data (SteerLM paper, Table 2)
    sft_data = ann_dir
    if cfg.hh_rlhf:
        sft_data = out / "annotated_hh"
        hh_key = HHStage(cfg.hh_rlhf, cfg.hh_rlhf_max_pairs, to_dict(ann_cfg))
        results.append(run_stage("annotate-hh", sft_data, hh_key, lambda: add_hh_rlhf(cfg, apm_model, ann_dir, sft_data, ann_cfg),
                                 inputs=[apm_dir, ann_dir, *_local_files(cfg.hh_rlhf)], metric=_annotate_metric))  # fmt: skip

    # 3. attribute-conditioned SFT
    sft_dir = out / "sft"
    sft_cfg = _build(sft, cfg.sft, {"data": str(sft_data), "out": str(sft_dir), "overwrite": True}, "sft")
    results.append(run_stage("sft", sft_dir, sft_cfg, lambda: sft.main(sft_cfg), inputs=[sft_data],
                             metric=_val_metric))  # fmt: skip
    model = str(sft_dir / "best")

    # 4. bootstrap: generate at max quality, re-annotate, fine-tune again
    if cfg.run_bootstrap:
        boot_dir = out / "bootstrap"
        boot_cfg = _build(bootstrap, cfg.bootstrap, {"model": model, "apm": apm_model, "data": str(ann_dir),
                                                     "out": str(boot_dir), "overwrite": True}, "bootstrap")  # fmt: skip
        results.append(run_stage("bootstrap", boot_dir, boot_cfg, lambda: bootstrap.main(boot_cfg),
                                 inputs=[sft_dir, apm_dir, ann_dir], metric=_boot_metric))  # fmt: skip
        model = str(boot_dir / "sft" / "best")

    # 5. steerability check on held-out prompts, scored by the APM
    check_dir = out / "check"
    check = run_stage("check", check_dir, cfg.check, lambda: run_check(model, apm_model, data_dir, cfg.check, check_dir),
                      inputs=[Path(model).parent, apm_dir], metric=_check_metric)  # fmt: skip
    results.append(check)
    table = summary_table(results, "pipeline summary")
    print("\n" + table)
    print("\n" + check.details.get("table", ""))
    samples = show_samples(check.details)
    if samples:
        print("\nthe same prompt at the lowest and highest verbosity:\n" + samples)
    print(f"\n(plot: {check_dir / 'steerability.png'})")
    demo(model, cfg.check)
    print("\nserve it with the check's guidance (the playground at http://127.0.0.1:8000/):\n  "
          + serve_command(model, apm_model, cfg.check,
                          saved_guidance(models.model_meta(model), str(Path(model) / models.MODEL_META))))  # fmt: skip
    summary = {"model": model, "apm": apm_model, "stages": [r.__dict__ for r in results]}
    write_json(out / "summary.json", summary)
    return summary


def with_guidance(check: CheckArgs, saved: tuple[float, str]) -> CheckArgs:
    """`check` with the guidance it leaves unset (None) taken from the model's `saved` (scale, reference)."""
    from steerlm.generator import resolve_guidance

    return replace(check, **resolve_guidance(to_dict(check), saved))


def serve_command(model: str, apm: str, check: CheckArgs, saved: tuple[float, str] | None = None) -> str:
    """The `steerlm serve` line for the pipeline's model with the check's guidance as the server default: flags only
    where it differs from the model's `saved` guidance (default: none), which the server uses by default."""
    from steerlm.generator import NO_GUIDANCE

    saved = saved or NO_GUIDANCE
    check = with_guidance(check, saved)
    words = ["steerlm", "serve", f"--model={model}", f"--apm={apm}"]
    if (check.guidance_scale, check.guidance_reference) != saved:
        words.append(f"--guidance_scale={check.guidance_scale:g}")
        words.append(f"--guidance_reference={check.guidance_reference}")
    if check.guidance_scale != 1.0:
        defaults = {"guidance_plausibility": GUIDANCE_PLAUSIBILITY,
                    "guidance_reference_plausibility": GUIDANCE_REFERENCE_PLAUSIBILITY}  # fmt: skip
        words += [f"--{k}={getattr(check, k):g}" for k, v in defaults.items() if getattr(check, k) != v]
    return shlex.join(words)


@dataclass
class HHStage:
    """What the "+ HH-RLHF" stage depends on (its skip fingerprint)."""

    files: list[str]
    max_pairs: int
    annotate: dict


def add_hh_rlhf(cfg: Config, apm_model: str, ann_dir: Path, out: Path, ann_cfg) -> dict:
    """Label the HH-RLHF answers of `cfg.hh_rlhf` with the APM (calibrated as `annotate` is configured) and write
    `out/train.jsonl` = the annotated training records + them, `out/val.jsonl` = the annotated validation records."""
    from steerlm import annotate  # orchestrator: annotate's labelling, as its stage runs it
    from steerlm.apm_model import load_apm
    from steerlm.data.records import read_records, write_records

    apm = load_apm(apm_model)
    calibrate = ann_cfg.calibrate and bool(apm.calibration)
    added, stats = [], {}
    for entry in cfg.hh_rlhf:
        path, records, invalid = _read_hh(entry)
        if cfg.hh_rlhf_max_pairs:
            records = records[: 2 * cfg.hh_rlhf_max_pairs]  # each pair gives its chosen then its rejected record
        annotate.annotate_records(apm, records, ann_cfg.batch_size, ann_cfg.keep_gt, calibrate, ann_cfg.human_labels)
        added += records
        stats[Path(path).name] = {"records": len(records), "invalid_skipped": invalid}
    out.mkdir(parents=True, exist_ok=True)
    train = read_records(ann_dir / "train.jsonl")
    write_records(out / "train.jsonl", train + added)
    write_records(out / "val.jsonl", read_records(ann_dir / "val.jsonl"))
    stats["train"] = {"records": len(train) + len(added), "hh_rlhf": len(added), "calibrated": calibrate}
    return stats


def _local_files(entries: list[str | list[str]]) -> list[str]:
    """The local files among `hh_rlhf`'s candidates (a changed file re-runs the stage)."""
    flat = [c for e in entries for c in ([e] if isinstance(e, str) else e)]
    return [c for c in flat if not c.startswith("hub:") and Path(c).is_file()]


def _read_hh(entry: str | list[str]) -> tuple[str, list, int]:
    """(source used, records, invalid lines skipped) of the first candidate of an `hh_rlhf` entry that exists (a
    file) and reads, or loads (a hub id): `formats.first_usable`, any candidate's failure giving way to the next."""
    from steerlm import annotate  # orchestrator: annotate's reader, as its stage reads HH-RLHF
    from steerlm.data import formats

    candidates = [entry] if isinstance(entry, str) else entry
    source, (records, invalid) = formats.first_usable(
        candidates, lambda s: annotate.read_input(s, "hh", skip_invalid=True), what="HH-RLHF source",
        field="hh_rlhf", errors=(UserError, OSError))  # fmt: skip
    return source, records, invalid


def _apm_metric(r: dict) -> str:
    q = (r.get("val_metrics") or {}).get("quality") or {}
    return f"val quality spearman {q['spearman']:.3f}" if q.get("spearman") is not None else ""


def _annotate_metric(r: dict) -> str:
    return ", ".join(f"{split} {v.get('records', '?')} records" for split, v in r.items() if isinstance(v, dict))


def _val_metric(r: dict) -> str:
    return f"best val loss {r['best']:.4f}" if isinstance(r.get("best"), float) else ""


def _boot_metric(r: dict) -> str:
    return f"{r.get('n', '?')} responses, measured quality {r.get('measured_quality_mean', '?')}"


def _check_metric(r: dict) -> str:
    rhos = {a: v["spearman"] for a, v in (r.get("attributes") or {}).items()}
    return ", ".join(f"{a} {v:+.2f}" if v is not None else f"{a} n/a" for a, v in rhos.items())


def run_check(model: str, apm_model: str, data_dir: Path, check: CheckArgs, out: Path) -> dict:
    """Answer held-out prompts at several levels of each attribute (one at a time, the others at their defaults) and
    measure the answers: computed attributes (verbosity) with their own measure and the model's bucket edges, the
    others with the APM. Writes steerability.json and steerability.png; the report also holds the words per level,
    one prompt's answers at the lowest and highest verbosity, and the model's own read-out from its SFT summary."""
    import json

    from steerlm.apm_model import load_apm
    from steerlm.conditioning import format_readout
    from steerlm.generator import Generator, SamplingArgs
    from steerlm.steerability import (
        attribute_line_answers,
        empty_answers,
        format_table,
        held_out_prompts,
        mean_words,
        measure_attribute,
        plot_results,
        scorer_for,
    )

    generator = Generator.load(model)
    if generator.schema is None:
        raise UserError(f"{model} has no attribute schema to steer", field="model")
    check = with_guidance(check, generator.guidance)
    scorer = load_apm(apm_model)
    prompts = held_out_prompts(data_dir, check.num_prompts, check.seed)
    top = generator.schema.max_level
    measurable = [(a, scorer_for(a, scorer, generator.computed)) for a in check.attributes
                  if a in generator.schema.names]  # fmt: skip
    measurable = [(a, s) for a, s in measurable if s is not None]

    def at(scale: float) -> list:
        results = []
        for a, s in measurable:
            levels = [min(lv, top) for lv in check.levels_for.get(a, check.levels)] or [0, top]
            sampling = SamplingArgs(max_new_tokens=int(check.max_new_tokens_for.get(a, check.max_new_tokens)),
                                    temperature=check.temperature, seed=check.seed, guidance_scale=scale,
                                    guidance_reference=check.guidance_reference,
                                    guidance_plausibility=check.guidance_plausibility,
                                    guidance_reference_plausibility=check.guidance_reference_plausibility,
                                    repetition_penalty=check.repetition_penalty)  # fmt: skip
            results.append(
                measure_attribute(generator, s, prompts, a, sorted(set(levels)), sampling, batch_size=check.batch_size)
            )
        return results

    results = at(check.guidance_scale)

    def guided_at(scale: float) -> str:
        against = f" against {check.guidance_reference!r}" if check.guidance_reference and scale != 1 else ""
        return f"guidance scale {scale:g}{against}, "

    table = f"{len(prompts)} held-out prompts; " + format_table(results)
    if check.guidance_scale != 1.0:
        table = guided_at(check.guidance_scale) + table
    words = {r.attribute: mean_words(r) for r in results}
    if "verbosity" in words:
        r = next(r for r in results if r.attribute == "verbosity")
        table += "\n  mean words   " + "  ".join(f"{lv}->{w:g}" for lv, w in zip(r.requested, words["verbosity"],
                                                                                   strict=True))  # fmt: skip
        # the failures to look for first: a slider that is flat, or one that scores well by not answering
        for what, counts in (("write an attribute line instead of answering", attribute_line_answers(r)),
                             ("are empty", empty_answers(r))):  # fmt: skip
            if any(counts):
                table += (f"\n  answers that {what} (of {len(prompts)}): "
                          + "  ".join(f"{lv}->{n}" for lv, n in zip(r.requested, counts, strict=True)))  # fmt: skip
    report = {"table": table, "guidance_scale": check.guidance_scale, "guidance_reference": check.guidance_reference,
              "guidance_plausibility": check.guidance_plausibility,
              "guidance_reference_plausibility": check.guidance_reference_plausibility,
              "prompts": len(prompts), "words": words,
              "attributes": {r.attribute: r.to_json() for r in results}}  # fmt: skip
    verb = next((r for r in results if r.attribute == "verbosity"), None)
    if verb is not None and len(verb.requested) > 1:  # one prompt, lowest and highest verbosity
        lo, hi = verb.requested[0], verb.requested[-1]
        report["samples"] = {"prompt": prompts[0].conversations[-1].value,
                             "lowest": {"level": lo, "answer": verb.answers[lo][0]},
                             "highest": {"level": hi, "answer": verb.answers[hi][0]}}  # fmt: skip
    others = [s for s in dict.fromkeys(check.compare_guidance) if s != check.guidance_scale]
    if others:
        report["by_guidance"] = {}
        for scale in others:
            extra = at(scale)
            report["by_guidance"][f"{scale:g}"] = {r.attribute: r.to_json() for r in extra}
            report["table"] += "\n\n" + guided_at(scale) + format_table(extra)
    sft_summary = Path(model).parent / "summary.json"
    readout = json.loads(sft_summary.read_text()).get("readout") if sft_summary.is_file() else None
    if readout:
        report["readout"] = readout
        report["table"] += ("\n\nthe model's own read-out of held-out answers (levels from their labels; chance = 1/L):\n"
                            + format_readout(readout))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "steerability.json", report)
    plot_results(results, out / "steerability.png", f"{Path(model).parent.name}: requested vs measured level")
    return report


def show_samples(report: dict, width: int = 600) -> str:
    """One prompt's answers at the lowest and highest verbosity, as the check recorded them."""
    s = report.get("samples")
    if not s:
        return ""

    def clip(text: str) -> str:
        text = text.strip()
        return text if len(text) <= width else text[:width].rstrip() + " [...]"

    return (
        f"prompt: {s['prompt']}\n\n[verbosity={s['lowest']['level']}]\n{clip(s['lowest']['answer'])}\n\n"
        f"[verbosity={s['highest']['level']}]\n{clip(s['highest']['answer'])}"
    )


def demo(model: str, check: CheckArgs) -> None:
    """A few answers to one prompt at different attribute settings."""
    from steerlm.data.records import Record, Turn
    from steerlm.generator import Generator, SamplingArgs

    generator = Generator.load(model)
    check = with_guidance(check, generator.guidance)
    top = generator.schema.max_level
    settings = [{k: min(v, top) for k, v in s.items() if k in generator.schema.names} for s in check.demo_settings]
    prompt = Record([Turn("User", check.demo_prompt)])
    sampling = SamplingArgs(max_new_tokens=check.max_new_tokens, temperature=check.temperature, seed=check.seed,
                            guidance_scale=check.guidance_scale, guidance_reference=check.guidance_reference,
                            guidance_plausibility=check.guidance_plausibility,
                            guidance_reference_plausibility=check.guidance_reference_plausibility,
                            repetition_penalty=check.repetition_penalty)  # fmt: skip
    answers = generator.generate([prompt] * len(settings), settings, sampling)
    print(f"\nprompt: {check.demo_prompt}")
    for s, a in zip(settings, answers, strict=True):
        shown = ",".join(f"{k}={v}" for k, v in s.items()) or "defaults"
        print(f"\n[{shown}]\n{a.strip()}")
