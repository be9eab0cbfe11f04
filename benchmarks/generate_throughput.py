"""Generation throughput: `steerlm generate`'s decoder (`Generator.generate_ids`) against plain
`transformers` `model.generate`, on the same prompts, batch size and model, in fp32 and bf16 weights.

    OMP_NUM_THREADS=2 python benchmarks/generate_throughput.py --model=smollm2-135m-instruct --repeats=3
    OMP_NUM_THREADS=1 python benchmarks/generate_throughput.py --model=tiny-lm --repeats=3       # seconds

Prompts: the first `--prompts` of the OASST prompt lottery (shared data), through the model's chat template
(`Generator.generate_full`'s prompt building). Greedy decoding; every answer is exactly `--new_tokens` long
(`min_new_tokens` = `max_new_tokens` on both sides, so both decode the same number of tokens). The variants alternate
within each repeat; each ratio is taken within one repeat and summarised as min/median/max (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from local_data import lottery_prompts
from transformers import GenerationConfig

from steerlm import models
from steerlm.generator import Generator, SamplingArgs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-lm")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--out", default="runs/bench/generate_throughput")
    return p.parse_args(argv)


def prompt_ids(gen: Generator, n: int) -> list[list[int]]:
    return [gen.prompt_ids(t) for t in lottery_prompts(n)]


def steerlm_run(gen: Generator, prompts: list[list[int]], a) -> int:
    sampling = SamplingArgs(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, greedy=True, stop=[])
    return sum(len(g.token_ids) for g in gen.generate_ids(prompts, sampling, a.batch_size, raw=True))


def transformers_run(gen: Generator, prompts: list[list[int]], a) -> int:
    """Plain `model.generate` in batches of left-padded prompts, in the input order."""
    config = GenerationConfig(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False,
                              pad_token_id=gen.pad_id, eos_token_id=gen.end_ids)  # fmt: skip
    tokens = 0
    for start in range(0, len(prompts), a.batch_size):
        chunk = prompts[start : start + a.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[gen.pad_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = gen.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        tokens += (out.shape[1] - width) * len(chunk)  # min_new_tokens = max_new_tokens: every row decodes them all
    return tokens


def main(argv=None) -> dict:
    a = parse_args(argv)
    gens = {}
    for dtype in a.dtypes.split(","):
        model, tokenizer = models.load_causal_lm(a.model, dtype=dtype, device="cpu")
        gens[dtype] = Generator(model, tokenizer, template="chat")
    prompts = prompt_ids(next(iter(gens.values())), a.prompts)
    runners = {"steerlm": steerlm_run, "transformers": transformers_run}
    variants = [(who, dtype) for dtype in gens for who in runners]
    for who, dtype in variants:  # warm-up (first calls allocate and pick kernels)
        runners[who](gens[dtype], prompts[: a.batch_size], argparse.Namespace(**{**vars(a), "new_tokens": 2}))
    runs: dict[str, list[float]] = {f"{who}-{dtype}": [] for who, dtype in variants}
    for rep in range(a.repeats):
        for who, dtype in variants if rep % 2 == 0 else variants[::-1]:
            start = time.perf_counter()
            n = runners[who](gens[dtype], prompts, a)
            runs[f"{who}-{dtype}"].append(n / (time.perf_counter() - start))
            print(f"repeat {rep + 1}: {who}-{dtype}: {n} tokens, {runs[f'{who}-{dtype}'][-1]:.1f} tok/s", flush=True)
    ratios = {"steerlm / transformers, fp32": ("steerlm-fp32", "transformers-fp32"),
              "steerlm / transformers, bf16": ("steerlm-bf16", "transformers-bf16"),
              "steerlm bf16 / steerlm fp32": ("steerlm-bf16", "steerlm-fp32")}  # fmt: skip
    ratios = {k: [x / y for x, y in zip(runs[n], runs[d], strict=True)] for k, (n, d) in ratios.items()
              if n in runs and d in runs}  # fmt: skip
    settings = {**{k: getattr(a, k) for k in ("model", "prompts", "batch_size", "new_tokens", "repeats")},
                "threads": torch.get_num_threads()}  # fmt: skip
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": settings, "runs": runs, "ratios": ratios}, indent=1))
    print(f"\nsettings: {settings}\n\n| variant | tokens/s (min / median / max) |\n|---|---|")
    for k, xs in runs.items():
        print(f"| {k} | {min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g} |")
    print("\n| ratio of tokens/s | min / median / max |\n|---|---|")
    for k, xs in ratios.items():
        print(f"| {k} | {min(xs):.3g} / {statistics.median(xs):.3g} / {max(xs):.3g} |")
    return {"settings": settings, "runs": runs, "ratios": ratios}


if __name__ == "__main__":
    main()
