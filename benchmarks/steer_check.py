"""Steerability at several guidance scales: requested vs measured level per attribute (Spearman, means per level).

    python benchmarks/steer_check.py --model runs/steer/sft/best --apm runs/steer/apm/best --data runs/steer/data
    python benchmarks/steer_check.py --model runs/steer/sft/best --attributes verbosity --scales 1,2,3
    python benchmarks/steer_check.py --model runs/steer/sft/best --data runs/steer/data --attributes verbosity --scales 2 \
        --reference middle --plausibility 0   # guidance without its plausibility constraint

Held-out prompts (the validation split's) are answered at each requested level of one attribute at a time (the others
at their defaults), at every guidance scale, with the same seeds. Computed attributes (verbosity) are measured by
their own measure with the model's bucket edges; the others by the APM (`--apm`), which is skipped when absent.
Writes `--out` (JSON) with every answer.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from steerlm.attributes import GUIDANCE_PLAUSIBILITY, GUIDANCE_REFERENCE_PLAUSIBILITY, parse_assignment
from steerlm.generator import Generator, SamplingArgs
from steerlm.steerability import (
    file_prompts,
    format_table,
    held_out_prompts,
    mean_words,
    measure_attribute,
    plot_results,
    scorer_for,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a steerlm model folder")
    parser.add_argument("--apm", default="", help="APM folder for non-computed attributes")
    parser.add_argument("--data", default="", help="folder with val.jsonl (or a records file): held-out prompts")
    parser.add_argument("--prompts_file", default="", help="or a prompts file `steerlm generate` reads (MT-Bench...)")
    parser.add_argument("--attributes", default="verbosity,quality")
    parser.add_argument("--levels", default="0,9", help="requested levels")
    parser.add_argument("--scales", default="1,3", help="guidance scales")
    parser.add_argument("--reference", default="", help="neutral attribute string of guidance ('' = unconditional)")
    parser.add_argument(
        "--plausibility",
        type=float,
        default=GUIDANCE_PLAUSIBILITY,
        help="guidance's plausibility constraint under the requested condition (0: off)",
    )
    parser.add_argument(
        "--reference_plausibility",
        type=float,
        default=GUIDANCE_REFERENCE_PLAUSIBILITY,
        help="the same under the neutral condition (0: off)",
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dtype", default="fp32", help="weights for generation: fp32 (the pipeline check's), bf16")
    parser.add_argument("--fixed", default="", help="levels held fixed while one attribute moves, e.g. quality=4")
    parser.add_argument("--png", default="", help="plot requested vs measured level per attribute (first scale)")
    parser.add_argument("--out", default="", help="write the report (JSON) here")
    args = parser.parse_args()

    gen = Generator.load(args.model, dtype=args.dtype)
    apm = None
    if args.apm:
        from steerlm.apm_model import load_apm

        apm = load_apm(args.apm)
    if args.prompts_file:
        prompts = file_prompts(gen, args.prompts_file, args.prompts, args.seed)
    else:
        data = Path(args.data)
        prompts = held_out_prompts(data, args.prompts, args.seed)
    levels = [int(x) for x in args.levels.split(",")]
    report: dict = {"model": args.model, "apm": args.apm, "levels": levels, "prompts": len(prompts),
                    "reference": args.reference, "plausibility": args.plausibility,
                    "reference_plausibility": args.reference_plausibility, "dtype": args.dtype,
                    "batch_size": args.batch_size,
                    "scales": {}}  # fmt: skip
    for scale in [float(x) for x in args.scales.split(",")]:
        sampling = SamplingArgs(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                guidance_scale=scale, guidance_reference=args.reference,
                                guidance_plausibility=args.plausibility,
                                guidance_reference_plausibility=args.reference_plausibility)  # fmt: skip
        results = []
        start = time.time()
        fixed = dict(parse_assignment(a) for a in args.fixed.split(",") if a)
        for name in args.attributes.split(","):
            scorer = scorer_for(name, apm, gen.computed)
            if name not in gen.schema.names or scorer is None:
                print(f"skipping {name}: not in the model's schema, or nothing measures it")
                continue
            results.append(
                measure_attribute(
                    gen, scorer, prompts, name, levels, sampling, batch_size=args.batch_size, fixed=fixed
                )
            )
            words = mean_words(results[-1])
            print(f"  {name}: mean words per level " + "  ".join(f"{lv}->{w:g}" for lv, w in zip(levels, words,
                                                                                         strict=True)))  # fmt: skip
        print(f"\nguidance scale {scale:g} ({time.time() - start:.0f} s), " + format_table(results), flush=True)
        report["scales"][f"{scale:g}"] = {r.attribute: r.to_json() for r in results}
        report.setdefault("seconds", {})[f"{scale:g}"] = round(time.time() - start, 1)
        if args.png and len(report["scales"]) == 1:
            plot_results(results, args.png, f"{args.model}, guidance scale {scale:g}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
