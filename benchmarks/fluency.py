"""Is steering bought with fluency? Several models answer the same held-out prompts at maximum quality; each answer
is scored by the APM's quality and by a reference LM's perplexity (#12: "at maximum quality the answers' APM quality
is not lower than plain SFT's").

    python benchmarks/fluency.py --data runs/quickstart/data --apm runs/quickstart/apm/best \\
        --model plain=runs/plain-sft/best --model steerlm=runs/quickstart/sft/best \\
        --model steerlm-s2=runs/quickstart/sft/best --guided steerlm-s2=2:middle --out runs/fluency.json

Every model answers the same prompts (the validation split's, or `--prompts_file`) with the same sampling seed; an
attribute-conditioned model is asked for `--attr` (default: its top quality level; the others at their defaults,
so with the reference 'middle' guidance pushes quality alone). Per model: mean words, the APM's quality (float level;
mean and 95% bootstrap interval), the reference LM's perplexity of the answer given the prompt (its own chat
template, no attribute line; exp of the mean token NLL over all answers), the share of repeated 4-grams (low
perplexity can also mean a loop), and how many answers are empty or write an attribute line. Empty answers are left
out of the perplexity and repetition. Writes `--out` (JSON) with every answer and score.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from steerlm.apm_model import load_apm
from steerlm.data.preferences import read_prompts
from steerlm.data.records import ASSISTANT, Record, Turn
from steerlm.generator import Generator, SamplingArgs
from steerlm.steerability import draw_prompts, held_out_prompts, writes_attribute_line


def answer_nll(ref: Generator, prompts: list[Record], answers: list[str]) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens) of each answer after its prompt under the reference LM."""
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        head = ref.prompt_ids(prompt)
        tail = ref.tokenizer(answer, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([head + tail], device=ref.model.device)
        with torch.inference_mode():
            logits = ref.model(ids).logits[0, len(head) - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, len(head) :], reduction="sum")
        out.append((float(nll), len(tail)))
    return out


def repeated_4grams(text: str) -> float:
    words = text.split()
    grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def bootstrap_ci(values: list[float], seed: int = 0, rounds: int = 2000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    x = np.asarray(values)
    means = x[rng.integers(0, len(x), size=(rounds, len(x)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH, repeatable")
    parser.add_argument("--guided", action="append", default=[], help="NAME=SCALE:REFERENCE, e.g. s2=2:middle")
    parser.add_argument("--apm", required=True, help="APM folder that scores quality")
    parser.add_argument("--reference_lm", default="smollm2-135m-instruct", help="the LM whose perplexity is reported")
    parser.add_argument("--data", default="", help="folder with a validation split: held-out prompts")
    parser.add_argument("--prompts_file", default="", help="or a prompts file `steerlm generate` reads (MT-Bench...)")
    parser.add_argument("--attr", default="", help="levels asked of conditioned models, e.g. quality=4 (default: top)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=320)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", default="", help="write the report (JSON) here")
    args = parser.parse_args()

    models = dict(m.split("=", 1) for m in args.model)
    guided = {}
    for g in args.guided:
        name, spec = g.split("=", 1)
        scale, _, reference = spec.partition(":")
        guided[name] = (float(scale), reference)
    ref = Generator.load(args.reference_lm)
    if args.prompts_file:
        prompts = draw_prompts(
            [ref.as_record(c) for c, _, _ in read_prompts(args.prompts_file)], args.prompts, args.seed
        )
    else:
        prompts = held_out_prompts(Path(args.data), args.prompts, args.seed)
    apm = load_apm(args.apm)
    report: dict = {"prompts": len(prompts), "apm": args.apm, "reference_lm": args.reference_lm, "models": {}}
    answers: dict[str, list[str]] = {}
    for name, path in models.items():
        gen = Generator.load(path)
        scale, reference = guided.get(name, (1.0, ""))
        sampling = SamplingArgs(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                guidance_scale=scale, guidance_reference=reference)  # fmt: skip
        asked = None
        if gen.schema is not None:
            asked = {"quality": gen.schema.max_level} if not args.attr else {}
            for part in filter(None, args.attr.split(",")):
                key, value = part.split("=")
                asked[key] = int(value)
        start = time.time()
        answers[name] = gen.generate(prompts, asked, sampling, batch_size=args.batch_size)
        report["models"][name] = {"path": path, "guidance": [scale, reference], "asked": asked,
                                  "seconds": round(time.time() - start, 1)}  # fmt: skip
        print(f"{name}: {len(prompts)} answers in {time.time() - start:.0f} s", flush=True)
        del gen
    print(f"{'model':<16} {'words':>6} {'APM quality (95% CI)':>22} {'perplexity':>10} {'rep. 4-grams':>12} "
          f"{'empty':>5} {'attr line':>9}")  # fmt: skip
    for name, texts in answers.items():
        scored = [Record(p.conversations + [Turn(ASSISTANT, a or " ")], p.system) for p, a in zip(prompts, texts,
                                                                                                  strict=True)]  # fmt: skip
        quality = [p["quality"] for p in apm.predict(scored)]
        kept = [(p, a) for p, a in zip(prompts, texts, strict=True) if a.strip()]
        nll = answer_nll(ref, [p for p, _ in kept], [a for _, a in kept])
        tokens = sum(t for _, t in nll)
        ppl = math.exp(sum(n for n, _ in nll) / tokens) if tokens else float("nan")  # nan: every answer empty
        rep = float(np.mean([repeated_4grams(a) for _, a in kept])) if kept else 0.0
        words = float(np.mean([len(a.split()) for a in texts]))
        low, high = bootstrap_ci(quality)
        row = {"words": round(words, 1), "apm_quality": round(float(np.mean(quality)), 3),
               "apm_quality_ci": [round(low, 3), round(high, 3)], "perplexity": round(ppl, 2) if tokens else None,
               "repeated_4grams": round(rep, 3), "empty": len(texts) - len(kept),
               "attribute_line": sum(writes_attribute_line(a) for a in texts),
               "answers": [{"answer": a, "quality": round(q, 3)} for a, q in zip(texts, quality, strict=True)]}  # fmt: skip
        report["models"][name].update(row)
        print(f"{name:<16} {words:>6.1f} {row['apm_quality']:>8.2f} ({low:.2f}..{high:.2f})  {ppl:>10.2f} "
              f"{rep:>12.3f} {row['empty']:>5} {row['attribute_line']:>9}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
