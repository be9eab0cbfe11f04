"""SteerLM step 4, bootstrapping (SPEC §5.4): sample max-quality attribute combinations, generate, re-annotate with
the APM, and fine-tune again on what the model actually produced.

    steerlm bootstrap --model=runs/qs/sft/best --apm=runs/qs/apm/best --data=runs/qs/annotate --out=runs/qs/bootstrap

1. enumerate the attribute combinations present in the annotated training data; keep those whose quality is the
   maximum level;
2. pair uniformly sampled combinations with training prompts and sample k responses each with top-k = 50;
3. label the responses with the APM: the measured labels, not the requested ones, become the training labels;
4. fine-tune the SFT model again on the new records (a second `steerlm sft` round).
Generation is the slow part: it is written in chunks and resumes after a kill (`--resume`).
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from steerlm import config as config_lib
from steerlm import model_card
from steerlm.attributes import AttributeSchema
from steerlm.data.records import ASSISTANT, Record, Turn, read_records, training_prompts, write_records
from steerlm.errors import UserError
from steerlm.io import read_jsonl, write_json, write_jsonl

CHUNKS = "generations"


@dataclass
class Config:
    model: str
    """The SFT model to bootstrap (a `steerlm sft` output folder, e.g. runs/x/sft/best)."""
    apm: str
    """The attribute prediction model folder that labels the generations."""
    data: str
    """Annotated training records: a folder with train.jsonl (from `steerlm annotate`/`prepare`) or a .jsonl file."""
    out: str
    """Output folder: bootstrap.jsonl (new records), report.json, quality.png, and sft/ (the second round)."""
    num_prompts: int = 64
    """Training prompts to answer (sampled uniformly without replacement)."""
    samples_per_prompt: int = 1
    """k: responses per prompt, each with its own sampled attribute combination."""
    top_k: int = 50
    """Top-k sampling (the paper: 50)."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 128
    """Longest response."""
    batch_size: int = 8
    """Prompts generated together."""
    seed: int = 1234
    """Seed for prompt/combination sampling and generation."""
    finetune: bool = True
    """Run the second SFT round on the bootstrapped records."""
    sft: dict = field(default_factory=dict, metadata={"command": "sft", "filled": "model data out"})
    """Settings of the second SFT round, as for `steerlm sft` (e.g. {train: {epochs: 1, lr: 1e-4}})."""
    resume: bool = False
    """Continue an interrupted run (keeps generations already written)."""
    overwrite: bool = False
    """Replace an existing output folder."""

    def __post_init__(self):
        if self.num_prompts < 1 or self.samples_per_prompt < 1:
            raise ValueError("num_prompts and samples_per_prompt must be >= 1")
        if self.top_k < 0 or self.temperature <= 0:
            raise ValueError("top_k must be >= 0 and temperature > 0")


def train_file(data: str | Path) -> Path:
    data = Path(data)
    return data / "train.jsonl" if data.is_dir() else data


def max_quality_combinations(records: list[Record], schema: AttributeSchema) -> tuple[list[dict], int]:
    """Distinct attribute combinations of the data whose quality is the top level present (SPEC §5.4)."""
    if "quality" not in schema.names:
        raise UserError("bootstrapping needs 'quality' among the model's attributes", field="attributes")
    combos = Counter()
    for r in records:
        for t in r.assistant_turns:
            if t.label:
                levels = schema.parse(t.label, ignore_unknown=True)
                if "quality" in levels:
                    combos[tuple(levels.items())] += 1
    if not combos:
        raise UserError("no assistant turn in the data carries a quality label", field="data")
    top = max(dict(c)["quality"] for c in combos)
    if top < schema.max_level:
        print(f"note: no response has quality {schema.max_level}; using the highest present, {top}")
    return [dict(c) for c in sorted(combos) if dict(c)["quality"] == top], top


def plan(prompts: list[Record], combos: list[dict], cfg: Config) -> list[tuple[int, dict]]:
    """(prompt index, requested combination) pairs: prompts without replacement, combinations uniformly."""
    rng = random.Random(cfg.seed)
    chosen = rng.sample(range(len(prompts)), min(cfg.num_prompts, len(prompts)))
    return [(p, rng.choice(combos)) for p in chosen for _ in range(cfg.samples_per_prompt)]


def generate_resumable(generator, prompts, jobs, cfg: Config, out: Path) -> list[str]:
    """Answers for every job, written chunk by chunk (each chunk file atomically); a rerun continues after the last
    finished chunk, so nothing is generated twice and nothing is missing."""
    from steerlm.generator import SamplingArgs

    folder = out / CHUNKS
    folder.mkdir(exist_ok=True)
    chunk = cfg.batch_size * 2
    done: list[str] = []
    for path in sorted(folder.glob("*.jsonl")):
        done += [row["answer"] for _, row in read_jsonl(path)]
    bar = tqdm(total=len(jobs), initial=len(done), desc="bootstrap generate", unit="resp")
    while len(done) < len(jobs):
        start = len(done)
        part = jobs[start : start + chunk]
        # One seed per chunk: the same answers whether or not the run was interrupted before this chunk.
        sampling = SamplingArgs(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=1.0, seed=cfg.seed + start)  # fmt: skip
        answers = generator.generate([prompts[p] for p, _ in part], [c for _, c in part], sampling,
                                     batch_size=cfg.batch_size)  # fmt: skip
        write_jsonl(folder / f"{start:07d}.jsonl", ({"index": start + i, "answer": a} for i, a in enumerate(answers)))
        done += answers
        bar.update(len(answers))
    bar.close()
    return done


def label_with_apm(apm, prompts, jobs, answers, schema: AttributeSchema) -> tuple[list[Record], Counter]:
    """New training records whose labels are the APM's measurements (rounded levels) of what was generated."""
    keep = [(j, a) for j, a in zip(jobs, answers, strict=True) if a.strip()]
    dropped = Counter({"empty answer": len(jobs) - len(keep)})
    scored = [Record(prompts[p].conversations + [Turn(ASSISTANT, a)], prompts[p].system) for (p, _), a in keep]
    predictions = apm.predict(scored, batch_size=32) if scored else []
    records = []
    for rec, ((_, requested), pred) in zip(scored, zip([j for j, _ in keep], predictions, strict=True), strict=True):
        measured = {k: min(schema.max_level, max(0, round(v))) for k, v in pred.items() if k in schema.names}
        last = rec.conversations[-1]
        last.label = schema.render(measured)
        last.extra = {"requested": schema.render(requested), "measured": {k: round(v, 3) for k, v in pred.items()}}
        records.append(rec)
    return records, dropped


def quality_report(records: list[Record], schema: AttributeSchema, out: Path) -> dict:
    """Requested vs measured quality: a histogram of measured levels (requested is always the top level)."""
    requested = Counter(schema.parse(r.conversations[-1].extra["requested"])["quality"] for r in records)
    measured = Counter(schema.parse(r.conversations[-1].label).get("quality") for r in records)
    mean = sum(k * v for k, v in measured.items() if k is not None) / max(1, sum(measured.values()))
    report = {"n": len(records), "requested_quality": dict(requested), "measured_quality": dict(sorted(measured.items())),
              "measured_quality_mean": round(mean, 3)}  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    levels = list(range(schema.levels))
    ax.bar(levels, [measured.get(lv, 0) for lv in levels], label="measured by APM")
    ax.bar(levels, [requested.get(lv, 0) for lv in levels], alpha=0.35, label="requested")
    ax.set_xlabel("quality level")
    ax.set_ylabel("responses")
    ax.set_title("bootstrap: requested vs measured quality")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "quality.png", dpi=100)
    plt.close(fig)
    return report


def finetune(cfg: Config, records_file: Path, out: Path) -> dict:
    """The second SFT round: the SFT model trained further on the bootstrapped records."""
    # bootstrap is an orchestrator (sample, re-annotate, fine-tune): it runs the sft stage through its Config and main
    from steerlm import sft

    settings = {**cfg.sft, "model": cfg.model, "data": str(records_file), "out": str(out / "sft")}
    settings.setdefault("overwrite", True)
    sft_cfg = config_lib.build(sft.Config, settings, prefix="sft.")
    return sft.main(sft_cfg) or {}


def main(cfg: Config) -> dict:
    from steerlm.apm_model import load_apm
    from steerlm.generator import Generator

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise UserError("output folder exists; pass --resume to continue or --overwrite to replace", field="out")
    if cfg.overwrite and not cfg.resume and (out / CHUNKS).exists():
        shutil.rmtree(out / CHUNKS)
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out)

    generator = Generator.load(cfg.model)
    if generator.schema is None:
        raise UserError(
            f"{cfg.model} was trained without attributes; bootstrapping needs a SteerLM model", field="model"
        )
    schema = generator.schema
    records = read_records(train_file(cfg.data))
    combos, top = max_quality_combinations(records, schema)
    prompts = training_prompts(records)
    jobs = plan(prompts, combos, cfg)
    print(
        f"bootstrap: {len(combos)} attribute combinations at quality {top}, {len(prompts)} prompts, {len(jobs)} responses"
    )

    answers = generate_resumable(generator, prompts, jobs, cfg, out)
    del generator  # free the policy before loading the APM and training
    new_records, dropped = label_with_apm(load_apm(cfg.apm), prompts, jobs, answers, schema)
    records_file = out / "bootstrap.jsonl"
    write_records(records_file, new_records)
    report = quality_report(new_records, schema, out) | {"dropped": dict(dropped)}
    write_json(out / "report.json", report)
    print(f"bootstrap: {report['n']} records written; requested quality {top}, measured mean "
          f"{report['measured_quality_mean']} (histogram {report['measured_quality']})")  # fmt: skip
    if cfg.finetune:
        report["sft"] = finetune(cfg, records_file, out)
        write_json(out / "report.json", report)
        best = Path(report["sft"].get("best_dir") or out / "sft" / "best")
        if (best / model_card.MODEL_META).is_file():  # the card says the model was bootstrapped, with the report
            notes = {k: report[k] for k in ("n", "measured_quality_mean") if k in report}
            model_card.write(best, stage="bootstrap", notes={f"bootstrap {k}": v for k, v in notes.items()})
    return report
