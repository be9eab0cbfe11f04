"""How much of a steering result is the recipe and how much one batch order: an SFT recipe over several seeds (#12).

    python benchmarks/sft_seeds.py --config runs/quickstart/sft/config.yaml --name end --seeds 2,3,4
    python benchmarks/sft_seeds.py --config runs/quickstart/sft/config.yaml --name early --seeds 2,3 \\
        --set truncation=early_turns
    python benchmarks/sft_seeds.py --config C --name quick --seeds 1,2 --set model=tiny-lm --set train.max_steps=2

For each seed: `steerlm sft` with the config (a resolved `config.yaml` that an SFT run saved beside its output, e.g.
the quickstart's), the `--set` overrides and `train.seed=<seed>`, into `<out>/<name>/seed<seed>`; then the
verbosity check of the pipeline at guidance scale 1 (`steerability.measure_attribute`: held-out prompts of the
data folder's val.jsonl, or `--prompts_file`, answered at every level, sampled with one seed). The seed changes the
batch order, the corrupted lines, label dropout and the LoRA initialisation; the data, the steps and the check stay
the same. A seed whose model is already there is checked again, not retrained (kill and rerun: nothing is lost).
Writes `<out>/<name>/summary.json` (per seed, and mean ± sd over seeds) and prints one line per seed. Run it alone:
the SFT time is part of the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from steerlm import config, sft
from steerlm.generator import Generator, SamplingArgs
from steerlm.io import write_json
from steerlm.steerability import (
    attribute_line_answers,
    file_prompts,
    held_out_prompts,
    mean_words,
    measure_attribute,
    scorer_for,
)


def train_seed(args, seed: int, out: Path) -> dict:
    """The SFT summary of one seed, training it unless a finished model is in `out`."""
    done = out / "summary.json"
    if done.is_file() and (out / sft.BEST).is_dir():
        return json.loads(done.read_text(encoding="utf-8"))
    overrides = {key: config.parse_scalar(value) for key, value in (s.split("=", 1) for s in args.set)}
    overrides.update({"train.seed": seed, "out": str(out), "overwrite": True, "resume": False})
    return sft.main(config.load(sft.Config, config=args.config, overrides=overrides))


def check(args, model: Path) -> dict:
    """Requested vs measured verbosity level on the held-out prompts (the pipeline's check at guidance scale 1)."""
    gen = Generator.load(str(model), dtype="fp32")  # as the pipeline check generates
    if args.prompts_file:
        prompts = file_prompts(gen, args.prompts_file, args.prompts, args.check_seed)
    else:
        data = Path(args.data or config.load(sft.Config, config=args.config).data)
        prompts = held_out_prompts(data, args.prompts, args.check_seed)
    levels = list(range(gen.schema.levels))
    sampling = SamplingArgs(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.check_seed)
    result = measure_attribute(gen, scorer_for(args.attribute, None, gen.computed), prompts, args.attribute, levels,
                               sampling, batch_size=args.batch_size)  # fmt: skip
    return {"spearman": result.spearman, "measured_mean": result.measured_mean, "words": mean_words(result),
            "monotone_steps": result.monotone_steps, "attribute_line_answers": attribute_line_answers(result),
            "prompts": len(prompts),
            "answers": {str(k): v for k, v in result.answers.items()}}  # fmt: skip


def _num(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="an SFT config.yaml (e.g. runs/quickstart/sft/config.yaml)")
    parser.add_argument("--name", required=True, help="the recipe's name: results go to <out>/<name>")
    parser.add_argument("--seeds", default="2,3,4", help="training seeds (train.seed)")
    parser.add_argument("--set", action="append", default=[], help="an SFT override key=value (repeatable)")
    parser.add_argument("--out", default="runs/sft-seeds")
    parser.add_argument("--attribute", default="verbosity", help="a computed attribute of the model")
    parser.add_argument("--data", default="", help="held-out prompts: a folder with val.jsonl (default: the config's)")
    parser.add_argument("--prompts_file", default="", help="or a prompts file `steerlm generate` reads (MT-Bench...)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=320)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--check_seed", type=int, default=7)
    args = parser.parse_args()

    root = Path(args.out) / args.name
    runs = {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = root / f"seed{seed}"
        summary = train_seed(args, seed, out)
        result = check(args, out / sft.BEST)
        readout = summary.get("readout") or {}
        runs[str(seed)] = {"sft_seconds": summary.get("seconds"), "precision": summary.get("precision"),
                           "val_loss": summary.get("best"), "flip_gap": summary.get("last_flip_gap"),
                           "readout_spearman": {k: v["spearman"] for k, v in readout.items()}, **result}  # fmt: skip
        words = " / ".join(f"{w:.0f}" for w in result["words"])
        rho = _num(result["spearman"], "+.3f")
        print(f"seed {seed}: sft {summary.get('seconds')} s, val loss {_num(summary.get('best'), '.4f')}, flip gap "
              f"{_num(summary.get('last_flip_gap'), '+.4f')}, words at {args.attribute} 0..{len(result['words']) - 1}: "
              f"{words}, Spearman {rho}, answers that write an attribute line "
              f"{' / '.join(map(str, result['attribute_line_answers']))}", flush=True)  # fmt: skip
        write_json(root / "summary.json", {"config": args.config, "overrides": args.set, "runs": runs})
    rhos = [r["spearman"] for r in runs.values() if r["spearman"] is not None]
    overall = {
        "spearman": mean_sd(rhos) if rhos else None,
        "words": [mean_sd([r["words"][i] for r in runs.values()]) for i in range(len(result["words"]))],
    }
    write_json(
        root / "summary.json", {"config": args.config, "overrides": args.set, "runs": runs, "over_seeds": overall}
    )
    spread = (f"{overall['spearman']['mean']:+.3f} ± {overall['spearman']['sd']:.3f} ("
              + ", ".join(f"{x:+.3f}" for x in rhos) + ")") if rhos else "undefined (constant measurements)"  # fmt: skip
    print(f"{args.name}: {args.attribute} Spearman over seeds {spread}; {len(runs)} seeds -> {root / 'summary.json'}")


if __name__ == "__main__":
    main()
