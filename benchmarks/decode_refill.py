"""Refilling the batch as answers finish (`Engine.decode(rows, max_batch_size)`, what `Generator.generate_ids` does)
against fixed batches that each run to their longest answer (what it did before), on the steerability check's
shape of work: held-out prompts x five verbosity levels, each prompt's levels side by side, answers from a few tokens
to the cap, guided (each answer decodes a shadow row beside it).

    python benchmarks/decode_refill.py                                 # SmolLM2-135M-Instruct, 8 prompts x 5 lengths
    python benchmarks/decode_refill.py --tiny                          # the tiny random LM (seconds)

Each answer's length is fixed (min_new_tokens = max_new_tokens, cycling through `--lengths` per prompt, greedy), so
both schedules decode exactly the same tokens and the ratio is the scheduling alone; the lengths default to the
token counts of the quickstart check's answers at verbosity 0..4 (docs/pipeline.md: about 10 to 320). The schedules
alternate within each repeat so that machine load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from local_data import lottery_prompts

from steerlm import models
from steerlm.batching import Row
from steerlm.generator import Generator, SamplingArgs


def make_rows(ids: list[list[int]], lengths: list[int], scale: float) -> list[Row]:
    """One row per (prompt, length), a prompt's lengths side by side (as the check's levels of one prompt are).
    Guided rows are guided against the prompt without its first token: a neutral prompt equal to the row's own gets
    no shadow (`Row.guide`), and the speed does not depend on what the neutral prompt says."""
    rows = []
    for p in ids:
        for n in lengths:
            sampling = SamplingArgs(greedy=True, max_new_tokens=n, min_new_tokens=n, guidance_scale=scale)
            row = Row(p, sampling)
            rows.append(row.guide(p[1:]) if scale != 1 else row)
    return rows


def fixed(gen: Generator, rows: list[Row], batch_size: int) -> None:
    for start in range(0, len(rows), batch_size):
        for _ in gen.engine.decode(rows[start : start + batch_size]):
            pass


def refill(gen: Generator, rows: list[Row], batch_size: int) -> None:
    for _ in gen.engine.decode(rows, max_batch_size=batch_size):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.SMOLLM2, help="model name or folder (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random LM instead")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--lengths", default="10,35,70,210,320", help="answer lengths in tokens, cycled per prompt")
    parser.add_argument("--batch_size", type=int, default=16, help="answers at a time (the check's default)")
    parser.add_argument("--scale", type=float, default=2.0, help="guidance scale (1: no shadow rows)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    if args.tiny:
        model, tokenizer = models.tiny_causal_lm()
        gen = Generator(model, tokenizer, template="chat")
    else:
        gen = Generator.load(args.model)
    ids = [gen.prompt_ids(q) for q in lottery_prompts(args.prompts)]
    ids.sort(key=len, reverse=True)  # longest first, as generate_ids orders them
    lengths = [int(x) for x in args.lengths.split(",")]
    tokens = len(ids) * sum(lengths)
    schedules = {"fixed batches": fixed, "refill": refill}
    refill(gen, make_rows(ids[:2], [2], args.scale), args.batch_size)  # warm-up
    seconds: dict[str, list[float]] = {k: [] for k in schedules}
    for rep in range(args.repeats):
        for name in schedules if rep % 2 == 0 else list(schedules)[::-1]:
            rows = make_rows(ids, lengths, args.scale)
            assert all((r.shadow is not None) == (args.scale != 1) for r in rows)  # guided rows decode a shadow
            start = time.perf_counter()
            schedules[name](gen, rows, args.batch_size)
            seconds[name].append(time.perf_counter() - start)
            assert sum(len(r.tokens) for r in rows) == tokens  # the same work under both schedules
            print(f"repeat {rep + 1}: {name}: {seconds[name][-1]:.1f} s, {tokens / seconds[name][-1]:.1f} tok/s",
                  flush=True)  # fmt: skip
    ratios = [f / r for f, r in zip(seconds["fixed batches"], seconds["refill"], strict=True)]
    settings = {"model": "tiny-lm" if args.tiny else args.model, "prompts": len(ids), "lengths": lengths,
                "batch_size": args.batch_size, "guidance_scale": args.scale, "tokens": tokens,
                "threads": torch.get_num_threads()}  # fmt: skip
    print(f"\nsettings: {settings}\n\n| schedule | seconds (min / median / max) | tokens/s (median) |\n|---|---|---|")
    for name, xs in seconds.items():
        print(f"| {name} | {min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f} | "
              f"{tokens / statistics.median(xs):.1f} |")  # fmt: skip
    print(f"\nrefill speed-up (fixed seconds / refill seconds, per repeat): min {min(ratios):.2f} / median "
          f"{statistics.median(ratios):.2f} / max {max(ratios):.2f}")  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"settings": settings, "seconds": seconds, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
