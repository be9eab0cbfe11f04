"""Training throughput: `steerlm sft` against TRL's `SFTTrainer`, fp32 against bf16, padded against packed, the LM
head on the answer positions against on every position.

    pip install -e '.[bench]'                                      # TRL, for this benchmark only
    OMP_NUM_THREADS=2 python benchmarks/train_throughput.py --model=smollm2-135m-instruct --steps=3 --repeats=3
    OMP_NUM_THREADS=1 python benchmarks/train_throughput.py --model=tiny-lm --steps=5 --repeats=3  # minutes

Every variant trains the same model on the same token ids (real OASST records, steerlm's chat template with the
attribute line, SPEC §4 labels: TRL gets them as its `labels` column), same max length, batch, LoRA, learning rate
and schedule, no validation, no checkpoint during the timed steps. Each run is a fresh process (its peak memory is that
process's max RSS, model loading included); the variants alternate within each repeat, and each ratio is taken
within one repeat, then summarised as min/median/max over repeats. The first `--warmup` steps of a run are not
timed. tokens/s counts all real (not padding) tokens, and answer tokens (the trained ones). Results go to
`--out`/results.json and a markdown table on stdout (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from local_data import DATA

OASST = DATA / "oasst1" / "oasst1-en-dev.jsonl"
#: name -> (trainer, precision, packed)
VARIANTS = {
    "steerlm-fp32-padded": ("steerlm", "fp32", False),
    "trl-fp32-padded": ("trl", "fp32", False),
    "steerlm-fp32-packed": ("steerlm", "fp32", True),
    "trl-fp32-packed": ("trl", "fp32", True),
    "steerlm-bf16-padded": ("steerlm", "bf16", False),
    "trl-bf16-padded": ("trl", "bf16", False),
    "steerlm-fp32-padded-all-logits": ("steerlm", "fp32", False),
}
#: steerlm variants run as before the LM head was limited to the trained positions (`conditioning.token_nll`)
ALL_LOGITS = {"steerlm-fp32-padded-all-logits"}
#: (label, numerator variant, denominator variant)
RATIOS = [
    ("steerlm / TRL, fp32 padded", "steerlm-fp32-padded", "trl-fp32-padded"),
    ("steerlm / TRL, fp32 packed", "steerlm-fp32-packed", "trl-fp32-packed"),
    ("steerlm packed / padded, fp32", "steerlm-fp32-packed", "steerlm-fp32-padded"),
    ("steerlm bf16 / fp32, padded", "steerlm-bf16-padded", "steerlm-fp32-padded"),
    ("TRL bf16 / fp32, padded", "trl-bf16-padded", "trl-fp32-padded"),
    ("steerlm answer-position logits / all, fp32", "steerlm-fp32-padded", "steerlm-fp32-padded-all-logits"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-lm")
    p.add_argument("--records", type=int, default=64, help="records trained on (the first N)")
    p.add_argument(
        "--source",
        default="",
        help="a records file made by `steerlm prepare` (default: the raw OASST "
        "slice, read with the default 10-level schema)",
    )
    p.add_argument("--levels", type=int, default=0, help="L of the source's labels (default: its stats.json, else 10)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--lora_r", type=int, default=8, help="0: full fine-tuning")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=3, help="timed optimiser steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default="runs/bench/train_throughput")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- the data both trainers see


def write_records_file(n: int, source: str, path: Path) -> Path:
    """The first `n` records of `source` (or of the raw OASST slice, default 10-level labels), once."""
    if path.exists():
        return path
    from steerlm.attributes import AttributeSchema
    from steerlm.data import oasst
    from steerlm.data.records import read_records, write_records

    records = read_records(Path(source))[:n] if source else oasst.load_records(OASST, AttributeSchema())[:n]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_records(path, records)
    return path


def sft_config(a, precision: str, packed: bool, out: str):
    from steerlm import config as config_lib
    from steerlm import sft

    return config_lib.build(sft.Config, {
        "model": a.model, "data": a.data, "out": out, "template": "chat", "val_fraction": 0.0, "levels": a.levels,
        "conditioning_loss": {"weight": 0.0}, "readout_examples": 0, "flip_gap": False,
        "train": {"max_steps": a.warmup + a.steps, "batch_size": a.batch_size, "max_length": a.max_length,
                  "lr": a.lr, "warmup_ratio": 0.0, "log_every": 1, "checkpoint_every": 10**9, "precision": precision,
                  "packing": packed, "lora": {"r": a.lora_r}},
    })  # fmt: skip


def encoded_examples(a, cfg, tokenizer) -> list[dict]:
    """The token ids and labels `steerlm sft` trains on for `cfg` (its own functions, same order)."""
    from collections import Counter

    from steerlm import sft
    from steerlm.data.records import read_records

    records = read_records(Path(a.data))
    data = sft.data_schema(records, a.levels, a.data)
    records = sft.condition(records, data=data, schema=data, min_quality=-1, file=a.data, stats=Counter())
    return sft.encode_records(records, tokenizer, "chat", a.max_length)[0]


# ---------------------------------------------------------------- one timed run (a child process)


def count(batch) -> tuple[int, int]:
    """(real tokens, trained tokens) of a collated batch, padded or packed (TRL's padding-free rows have none)."""
    from steerlm.data.collate import n_tokens

    real = n_tokens(batch) or int(batch["input_ids"].numel())
    return real, int((batch["labels"][:, 1:] != -100).sum())


def run_steerlm(a, precision: str, packed: bool, out: str, all_logits: bool = False) -> tuple[list, list]:
    from steerlm import conditioning, sft, train

    counts, steps = [], []
    collate, write = conditioning.collate_pairs, train.MetricsLog.write

    def counting_collate(examples, **kw):
        batch = collate(examples, **kw)
        counts.append(count(batch))
        return batch

    def timed_write(self, row):
        if "loss" in row:
            steps.append((time.perf_counter(), row["loss"]))
        write(self, row)

    conditioning.collate_pairs, train.MetricsLog.write = counting_collate, timed_write
    if all_logits:  # the model answers as one without a per-row `logits_to_keep`: logits at every position
        conditioning.supports_logits_to_keep = lambda model, per_row=False: False
    sft.run(sft_config(a, precision, packed, out))
    return counts, steps


def run_trl(a, precision: str, packed: bool, out: str) -> tuple[list, list]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from steerlm import models

    model, tokenizer = models.load_causal_lm(a.model, device="cpu")
    cfg = sft_config(a, precision, packed, out)
    examples = encoded_examples(a, cfg, tokenizer)
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
    lora = cfg.train.lora
    peft_config = (LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type="CAUSAL_LM",
                              target_modules="all-linear") if lora.enabled else None)  # fmt: skip
    args = SFTConfig(output_dir=out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1,
                     learning_rate=a.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.01,
                     max_grad_norm=1.0, max_steps=a.warmup + a.steps, logging_steps=1, save_strategy="no",
                     eval_strategy="no", report_to="none", use_cpu=True, bf16=precision == "bf16",
                     max_length=a.max_length, packing=packed, padding_free=packed, dataloader_num_workers=0,
                     seed=1234, disable_tqdm=True)  # fmt: skip
    steps, counts = [], []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                steps.append((time.perf_counter(), float(logs["loss"])))

    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Clock()])  # fmt: skip
    collate = trainer.data_collator

    def counting_collate(rows):
        batch = collate(rows)
        counts.append(count(batch))
        return batch

    trainer.data_collator = counting_collate
    trainer.train()
    return counts, steps


def child(a) -> dict:
    import torch

    trainer, precision, packed = VARIANTS[a.child]
    with tempfile.TemporaryDirectory() as out:
        if trainer == "steerlm":
            counts, steps = run_steerlm(a, precision, packed, out, all_logits=a.child in ALL_LOGITS)
        else:
            counts, steps = run_trl(a, precision, packed, out)
    w = a.warmup
    if len(steps) < w + a.steps or len(counts) < w + a.steps:
        raise SystemExit(f"{a.child}: {len(steps)} steps logged, {len(counts)} batches collated")
    seconds = steps[w + a.steps - 1][0] - steps[w - 1][0] if w > 0 else None
    timed = counts[w : w + a.steps]
    return {"variant": a.child, "seconds": seconds, "tokens": sum(c[0] for c in timed),
            "answer_tokens": sum(c[1] for c in timed), "losses": [s[1] for s in steps],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "threads": torch.get_num_threads()}  # fmt: skip


# ---------------------------------------------------------------- the comparison (parent)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g}"


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return {}
    if a.warmup < 1:
        raise SystemExit("--warmup must be >= 1 (the clock starts at the end of the last untimed step)")
    out = Path(a.out)
    data = write_records_file(a.records, a.source, out / f"{Path(a.source).stem or 'oasst'}-{a.records}.jsonl")
    if a.levels == 0:
        from steerlm.sft import data_levels

        a.levels = (data_levels(Path(a.source)) if a.source else 0) or 10
    variants = [v for v in a.variants.split(",") if v]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for rep in range(a.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]  # alternate, so drift in load hits both sides
        for v in order:
            cmd = [sys.executable, __file__, f"--child={v}", f"--data={data}",
                   *[f"--{k}={getattr(a, k)}" for k in ("model", "max_length", "batch_size", "lora_r", "lr", "steps",
                                                        "warmup", "levels")]]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                raise SystemExit(f"{v} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
            r = json.loads(line[7:])
            r["tok_s"], r["answer_tok_s"] = r["tokens"] / r["seconds"], r["answer_tokens"] / r["seconds"]
            runs[v].append(r)
            print(f"repeat {rep + 1}: {v}: {r['tok_s']:.1f} tok/s ({r['answer_tok_s']:.1f} answer), "
                  f"peak {r['peak_rss_mb']:.0f} MB, losses {[round(x, 3) for x in r['losses']]}", flush=True)  # fmt: skip
    ratios = {}
    for label, num, den in RATIOS:
        if num in runs and den in runs:
            ratios[label] = [n["tok_s"] / d["tok_s"] for n, d in zip(runs[num], runs[den], strict=True)]
    settings = {k: getattr(a, k) for k in ("model", "source", "records", "levels", "max_length", "batch_size",
                                           "lora_r", "lr", "steps", "warmup", "repeats")}  # fmt: skip
    settings["threads"] = next(iter(runs.values()))[0]["threads"]
    result = {"settings": settings, "runs": runs, "ratios": ratios}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(f"\nsettings: {settings}\n")
    print("| variant | tokens/s (min / median / max) | answer tokens/s | peak RSS MB (median) | mean loss (timed) |")
    print("|---|---|---|---|---|")
    for v, rs in runs.items():
        loss = statistics.median(statistics.mean(r["losses"][a.warmup :]) for r in rs)
        print(f"| {v} | {spread([r['tok_s'] for r in rs])} | {spread([r['answer_tok_s'] for r in rs])} | "
              f"{statistics.median(r['peak_rss_mb'] for r in rs):.0f} | {loss:.3f} |")  # fmt: skip
    print("\n| ratio of tokens/s | min / median / max |\n|---|---|")
    for label, xs in ratios.items():
        print(f"| {label} | {spread(xs)} |")
    return result


if __name__ == "__main__":
    main()
