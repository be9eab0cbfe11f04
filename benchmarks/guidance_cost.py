"""What attribute guidance costs: generated tokens/s at guidance scale 1 (plain SteerLM) and s > 1, same prompts,
same model, same run, alternating so that machine load hits both alike.

    python benchmarks/guidance_cost.py                                # SmolLM2-135M-Instruct, 8 prompts x 64 tokens
    python benchmarks/guidance_cost.py --model runs/steer/sft/best     # a trained steerlm model
    python benchmarks/guidance_cost.py --tiny                          # the tiny random LM (seconds)

Every answer is forced to exactly `--tokens` tokens (min_new_tokens = max_new_tokens), so both settings do the same
number of decoding steps; guidance runs the requested and the neutral prompt of each answer in one batched forward
pass, so it doubles the rows of every step, not the number of steps. Speed does not depend on the weights, so a base
model is given an attribute schema to steer with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from local_data import lottery_prompts

from steerlm import models
from steerlm.attributes import AttributeSchema
from steerlm.generator import Generator, SamplingArgs


def load(args) -> Generator:
    if args.tiny:
        model, tokenizer = models.tiny_causal_lm()
        return Generator(model, tokenizer, schema=AttributeSchema(("quality", "verbosity")), template="chat",
                         conditioning="attributes")  # fmt: skip
    gen = Generator.load(args.model)
    if gen.schema is None:  # a base model: give it a schema (speed does not depend on what the weights learned)
        gen = Generator(gen.model, gen.tokenizer, schema=AttributeSchema(("quality", "verbosity")),
                        template=gen.template, conditioning="attributes")  # fmt: skip
    return gen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.SMOLLM2, help="model name or folder (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random LM instead")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per run (answered together, one batch)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per answer")
    parser.add_argument("--scale", type=float, default=3.0, help="the guidance scale compared with 1")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each setting")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = load(args)
    questions = lottery_prompts(args.prompts)
    attrs = {"quality": gen.schema.max_level}
    base = SamplingArgs(greedy=True, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    settings = {
        "s=1": replace(base, guidance_scale=1.0),
        f"s={args.scale:g}": replace(base, guidance_scale=args.scale),
    }
    gen.generate(questions[:2], attrs, replace(base, max_new_tokens=2, min_new_tokens=0))  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in settings}
    for _ in range(args.repeats):
        for name, sampling in settings.items():
            start = time.perf_counter()
            out = gen.generate_full(questions, attrs, sampling, batch_size=len(questions))
            seconds = time.perf_counter() - start
            rates[name].append(sum(len(g.token_ids) for g in out) / seconds)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    plain, guided = medians["s=1"], medians[f"s={args.scale:g}"]
    device = next(gen.model.parameters()).device
    print(f"guidance cost on {device} ({torch.get_num_threads()} threads), {len(questions)} prompts x {args.tokens} "
          f"tokens, batch {len(questions)}, median of {args.repeats}:")  # fmt: skip
    for name, value in medians.items():
        print(f"  {name:<6} {value:8.1f} tokens/s   (runs: {', '.join(f'{r:.1f}' for r in rates[name])})")
    print(f"  guided / plain throughput: {guided / plain:.2f}  (cost factor {plain / guided:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rates": rates, "median": medians, "ratio": guided / plain}, indent=1))


if __name__ == "__main__":
    main()
