"""Held-out quality of a train-apm recipe over several tree splits of the OASST dev slice (issue #13).

    python benchmarks/apm_splits.py --name default-ridge                            # the defaults (~3 min a split)
    python benchmarks/apm_splits.py --name last-layer --set hidden_layers=-1        # an ablation
    python benchmarks/apm_splits.py --name minilm-ft --set model=minilm-l6 --set head_fit=gradient   # the old default
    python benchmarks/apm_splits.py --name quick --splits 1 --set model=tiny-encoder

For each split seed: `steerlm prepare` holds out 20% of the trees as the test set (`test/val.jsonl`, never seen in
training or checkpoint choice); the other trees are split again by tree (10% validation, for the best epoch); then
`steerlm train-apm` with the recipe, and `apm_model.agreement` on the test trees: per attribute MAE / ±1 / Spearman,
the training-mean baseline and the response word count's Spearman. Writes `<out>/<name>/summary.json` (per split
and mean ± sd over splits) and prints one line per attribute. Run it alone: timing is part of the result.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from local_data import DATA

from steerlm import apm, apm_model, config, prepare

ROOT = Path(__file__).resolve().parents[1]
OASST = DATA / "oasst1" / "oasst1-en-dev.jsonl"
FOCUS = ("quality", "helpfulness", "humor", "creativity")


def split_data(seed: int, work: Path) -> tuple[Path, Path]:
    """(train-apm data folder, test records file) for one split seed; made once and reused."""
    test, inner = work / f"split{seed}" / "test", work / f"split{seed}" / "data"
    if not (test / "val.jsonl").exists():
        prepare.main(config.build(prepare.Config, {"source": str(OASST), "out": str(test), "val_fraction": 0.2,
                                                   "seed": seed, "overwrite": True}))  # fmt: skip
    if not (inner / "val.jsonl").exists():
        prepare.main(config.build(prepare.Config, {"source": str(test / "train.jsonl"), "format": "records",
                                                   "out": str(inner), "val_fraction": 0.1, "seed": seed,
                                                   "overwrite": True}))  # fmt: skip
    return inner, test / "val.jsonl"


def run_split(seed: int, overrides: dict, work: Path, out: Path) -> dict:
    data, test = split_data(seed, work)
    values = {"data": str(data), "out": str(out / f"split{seed}"), "overwrite": True}
    for key, value in overrides.items():
        config.set_dotted(values, key, value)
    cfg = config.build(apm.Config, values)
    start = time.time()
    summary = apm.main(cfg)
    seconds = time.time() - start
    model = apm_model.load_apm(cfg.out)
    report = apm_model.agreement(model, apm_model.read_examples(test, model.schema), 32)
    print(apm_model.format_table(report))
    rows = {
        n: {"mae": r["apm"]["mae"], "mean_mae": (r["baseline"] or {}).get("mae"), "within1": r["apm"]["within1"],
            "mean_within1": (r["baseline"] or {}).get("within1"), "spearman": r["apm"]["spearman"],
            "words_spearman": r["words_spearman"], "n": r["apm"]["n"]}
        for n, r in report["attributes"].items()
    }  # fmt: skip
    return {"seed": seed, "train_seconds": round(seconds, 1), "steps": summary.get("steps"),
            "best_step": summary.get("best_step"), "attributes": rows}  # fmt: skip


def aggregate(splits: list[dict]) -> dict:
    out = {}
    for name in splits[0]["attributes"]:
        out[name] = {}
        for key in ("mae", "mean_mae", "within1", "mean_within1", "spearman", "words_spearman"):
            vals = [s["attributes"][name][key] for s in splits if s["attributes"].get(name, {}).get(key) is not None]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                out[name][key] = {"mean": round(statistics.mean(vals), 3), "sd": round(sd, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="recipe name (output subfolder)")
    ap.add_argument("--set", action="append", default=[], help="train-apm setting key=value (dotted keys)")
    ap.add_argument("--splits", default="1,2,3", help="split seeds")
    ap.add_argument("--out", default=str(ROOT / "runs" / "apm-bench"))
    args = ap.parse_args()
    overrides = {k: config.parse_scalar(v) for k, v in (s.split("=", 1) for s in args.set)}
    work = Path(args.out)
    out = work / args.name
    splits = [run_split(int(s), overrides, work, out) for s in args.splits.split(",")]
    result = {"name": args.name, "settings": overrides, "threads": os.environ.get("OMP_NUM_THREADS"),
              "load_before": os.getloadavg(), "splits": splits, "summary": aggregate(splits)}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    secs = [s["train_seconds"] for s in splits]
    print(f"{args.name}: train-apm {statistics.mean(secs):.0f} s per split ({', '.join(f'{s:.0f}' for s in secs)})")
    for name in FOCUS:
        r = result["summary"].get(name)
        if r:
            cells = {k: f"{r[k]['mean']:.3f}±{r[k]['sd']:.3f}" if k in r else "-" for k in ("spearman", "words_spearman", "mae", "mean_mae")}  # fmt: skip
            print(f"  {name:<12} rho {cells['spearman']}  words {cells['words_spearman']}  MAE {cells['mae']} "
                  f"(mean {cells['mean_mae']})")  # fmt: skip


if __name__ == "__main__":
    main()
