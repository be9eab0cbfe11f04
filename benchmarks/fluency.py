"""Is steering bought with fluency? Several models answer the same held-out prompts at maximum quality; each answer
is scored by the APM's quality and by a reference LM's perplexity (#12: "at maximum quality the answers' APM quality
is not lower than plain SFT's").

    python benchmarks/fluency.py --data runs/quickstart/data --apm runs/quickstart/apm/best \\
        --model plain=runs/plain-sft/best --model steerlm=runs/quickstart/sft/best \\
        --model steerlm-s2=runs/quickstart/sft/best --guided steerlm-s2=2:middle --attr quality=4 --attr verbosity=4 \\
        --out runs/fluency.json

Every model answers the same prompts (the validation split's, or `--prompts_file`) with the same sampling seed; an
attribute-conditioned model is asked for the `--attr` levels (default: its top quality level; the others at their
defaults, so with the reference 'middle' guidance pushes only what is asked). Per model: mean words; the APM's
quality (float level; mean and 95% bootstrap interval); the reference LM's perplexity of the answer given the prompt
(its own chat template, no attribute line; exp of the mean token NLL over all answers); the share of repeated
4-grams (low perplexity can also mean a loop); how many answers are empty or write an attribute line (empty answers
are left out of the perplexity and repetition). Over all answers, the APM quality's Spearman with log length, and
each model's mean residual from one line of quality on log length: an APM that only measures length cannot tell
fluency. Writes `--out` (JSON) with every answer and score.
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
from steerlm.attributes import parse_assignment, word_count
from steerlm.data.records import ASSISTANT, Record, Turn
from steerlm.errors import UserError
from steerlm.generator import Generator, SamplingArgs
from steerlm.metrics import spearman
from steerlm.steerability import file_prompts, held_out_prompts, writes_attribute_line


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
    parser.add_argument(
        "--attr",
        action="append",
        default=[],
        help="name=level asked of conditioned models, repeatable (default: quality at its top level)",
    )
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
        if name not in models:
            parser.error(f"--guided {g}: no --model is named {name!r}")
        scale, _, reference = spec.partition(":")
        guided[name] = (float(scale), reference)
    try:
        fixed = dict(parse_assignment(a) for a in args.attr)
    except UserError as e:
        parser.error(f"--attr: {e}")
    ref = Generator.load(args.reference_lm)
    if args.prompts_file:
        prompts = file_prompts(ref, args.prompts_file, args.prompts, args.seed)
    else:
        prompts = held_out_prompts(Path(args.data), args.prompts, args.seed)
    apm = load_apm(args.apm)
    report: dict = {"prompts": len(prompts), "apm": args.apm, "reference_lm": args.reference_lm, "models": {},
                    "prompt_texts": [p.conversations[-1].value for p in prompts]}  # fmt: skip
    answers: dict[str, list[str]] = {}
    for name, path in models.items():
        gen = Generator.load(path)
        if name in guided and gen.schema is None:
            parser.error(f"--guided {name}: {path} takes no attributes, so there is nothing to guide")
        scale, reference = guided.get(name, (1.0, ""))
        sampling = SamplingArgs(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                guidance_scale=scale, guidance_reference=reference)  # fmt: skip
        asked = None
        if gen.schema is not None:
            asked = gen.schema.validate(fixed or {"quality": gen.schema.max_level})
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
        words = float(np.mean([word_count(a) for a in texts]))
        low, high = bootstrap_ci(quality)
        row = {"words": round(words, 1), "apm_quality": round(float(np.mean(quality)), 3),
               "apm_quality_ci": [round(low, 3), round(high, 3)], "perplexity": round(ppl, 2) if tokens else None,
               "repeated_4grams": round(rep, 3), "empty": len(texts) - len(kept),
               "attribute_line": sum(writes_attribute_line(a) for a in texts),
               "answers": [{"answer": a, "quality": round(q, 3)} for a, q in zip(texts, quality, strict=True)]}  # fmt: skip
        report["models"][name].update(row)
        print(f"{name:<16} {words:>6.1f} {row['apm_quality']:>8.2f} ({low:.2f}..{high:.2f})  {ppl:>10.2f} "
              f"{rep:>12.3f} {row['empty']:>5} {row['attribute_line']:>9}")  # fmt: skip
    # How much of the APM's quality is length: Spearman with log(1 + words) over every answer, and each model's mean
    # residual from one least-squares line of quality on log length fitted over all of them.
    pairs = [
        (math.log1p(word_count(a["answer"])), a["quality"]) for m in report["models"].values() for a in m["answers"]
    ]
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    slope, intercept = np.polyfit(x, y, 1) if len(set(x.tolist())) > 1 else (0.0, float(y.mean()))
    report["length"] = {"spearman": spearman(x.tolist(), y.tolist()), "slope": round(float(slope), 4)}
    print(f"APM quality against log(1 + words) over all {len(pairs)} answers: Spearman {report['length']['spearman']}; "
          "mean residual from one line fitted on all:")  # fmt: skip
    for name, m in report["models"].items():
        q = np.array([a["quality"] for a in m["answers"]])
        w = np.array([math.log1p(word_count(a["answer"])) for a in m["answers"]])
        m["length_residual"] = round(float((q - (intercept + slope * w)).mean()), 3)
        print(f"  {name:<16} {m['length_residual']:+.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")


if __name__ == "__main__":
    main()
