"""Records/s of `steerlm annotate`'s batched path against scoring one record at a time, same model, same run.

    python benchmarks/annotate_throughput.py                       # MiniLM regression APM (untrained head)
    python benchmarks/annotate_throughput.py --apm runs/apm        # a trained APM folder
    python benchmarks/annotate_throughput.py --tiny                # the tiny random encoder (seconds)

Both paths call `annotate.annotate_records`, the function `steerlm annotate` runs per chunk: the batched path with
a whole chunk of records (length-sorted batches, shared prefixes scored once), the other with one record per call
and batch size 1. Speed does not depend on the weights, so without --apm an untrained head on the backbone is used.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from local_data import DATA

from steerlm import annotate, apm_model, heads, models
from steerlm.attributes import AttributeSchema

DEFAULT_INPUT = DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz"


def untrained_apm(backbone_name: str) -> apm_model.APM:
    """A regression APM on `backbone_name` with a random head: the same computation as a trained one."""
    backbone, tokenizer = models.load_encoder(backbone_name)
    schema = AttributeSchema("steerable")
    model = heads.HeadModel(backbone, len(schema.names), "mean").to(models.device())
    meta = {"kind": "regression", "attributes": schema.to_dict(), "backbone": "encoder", "pooling": "mean",
            "max_length": 512}  # fmt: skip
    return apm_model.APM(model.eval(), tokenizer, meta)


def rate(fn, records) -> tuple[float, float]:
    start = time.perf_counter()
    fn(records)
    seconds = time.perf_counter() - start
    return len(records) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apm", help="a trained APM folder (default: untrained head on minilm-l6)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny random encoder instead of MiniLM")
    parser.add_argument("--input", default=str(DEFAULT_INPUT), help="records or HH-RLHF file (default: HH harmless)")
    parser.add_argument("--records", type=int, default=256, help="records annotated by each path")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    scorer = apm_model.load_apm(args.apm) if args.apm else untrained_apm("tiny-encoder" if args.tiny else "minilm-l6")
    records, _ = annotate.read_input(args.input, "auto", skip_invalid=True)
    records = records[: args.records]
    turns = sum(len(r.assistant_turns) for r in records)
    name = args.apm or ("tiny-encoder" if args.tiny else "minilm-l6")
    print(f"{name}: {len(records)} records, {turns} assistant turns from {args.input}; {torch.get_num_threads()} "
          f"threads, device {scorer.device}")  # fmt: skip

    def batched(rs):
        annotate.annotate_records(scorer, copy.deepcopy(rs), args.batch_size)

    def one_at_a_time(rs):
        for r in copy.deepcopy(rs):
            annotate.annotate_records(scorer, [r], batch_size=1)

    one_at_a_time(records[:2])  # warm-up (first-call allocations)
    batched(records[:2])
    fast, fast_s = rate(batched, records)
    slow, slow_s = rate(one_at_a_time, records)
    print(f"batched (batch {args.batch_size}, length-sorted): {fast:8.1f} records/s ({fast_s:.1f} s)")
    print(f"one record at a time:              {slow:8.1f} records/s ({slow_s:.1f} s)")
    print(f"ratio: {fast / slow:.1f}x")


if __name__ == "__main__":
    main()
