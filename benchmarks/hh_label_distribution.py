"""Label distributions of APM-annotated HH-RLHF answers, rounded vs quantile-mapped (issue #13), as JSON and PNG.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/hh_label_distribution.py --apm runs/apm --pairs 500 \\
        --out docs/img/hh_label_distribution.png

Scores the last answer of the first `--pairs` chosen and rejected conversations of the HH-RLHF helpful-base and
harmless-base dev files once, then labels them both ways `steerlm annotate` can (`APM.label` with and without
`calibrated`), and counts each attribute's levels. Also reports how often the chosen answer's calibrated level is
above / equal to / below the rejected one's (a rough check that the spread carries signal: HH-RLHF's chosen
answers are the preferred ones).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from local_data import DATA

from steerlm import annotate, apm_model

HH = DATA / "hh-rlhf"
FILES = ("helpful-base-dev.jsonl.gz", "harmless-base-dev.jsonl.gz")
SHOWN = ("quality", "helpfulness", "humor", "creativity", "toxicity", "violence")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apm", required=True)
    ap.add_argument("--pairs", type=int, default=500, help="pairs per file")
    ap.add_argument("--out", default="hh_label_distribution.png")
    ap.add_argument("--data", default="", help="prepare folder: fit the map from its val.jsonl predictions and "
                    "train.jsonl labels, as train-apm does, for an APM that stores none")  # fmt: skip
    args = ap.parse_args()
    model = apm_model.load_apm(args.apm)
    if args.data and not model.calibration:
        val = apm_model.read_examples(Path(args.data) / "val.jsonl", model.schema)
        train = apm_model.read_examples(Path(args.data) / "train.jsonl", model.schema)
        model.meta["calibration"] = apm_model.fit_calibration(model.predict(val), train, model.schema)
    if not model.calibration:
        raise SystemExit(f"{args.apm} has no calibration map (trained before issue #13); pass --data")
    records = []
    for name in FILES:
        recs, _ = annotate.read_input(HH / name, "hh", skip_invalid=True)
        records += recs[: 2 * args.pairs]
    start = time.time()
    preds = model.predict(records, batch_size=32)
    seconds = time.time() - start
    names = [n for n in SHOWN if n in model.schema.names]
    levels = model.schema.levels
    rounded = [model.round(p) for p in preds]
    mapped = [model.calibrate(p) for p in preds]
    counts = {
        kind: {n: [sum(1 for x in labels if x[n] == lv) for lv in range(levels)] for n in names}
        for kind, labels in (("rounded", rounded), ("calibrated", mapped))
    }
    train = {n: model.calibration[n].label_counts for n in names if n in model.calibration}
    order = {}
    for n in names:
        above = equal = below = 0
        for i in range(0, len(records) - 1, 2):  # chosen, rejected of one pair
            a, b = mapped[i][n], mapped[i + 1][n]
            above, equal, below = above + (a > b), equal + (a == b), below + (a < b)
        order[n] = {"chosen_higher": above, "equal": equal, "chosen_lower": below}
    result = {"apm": args.apm, "answers": len(records), "score_seconds": round(seconds, 1), "counts": counts,
              "training_labels": train, "chosen_vs_rejected_calibrated": order}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, names, levels, out)
    for n in names:
        print(f"{n:<12} rounded {counts['rounded'][n]}  calibrated {counts['calibrated'][n]}  {order[n]}")
    print(f"{len(records)} answers scored in {seconds:.0f} s -> {out}, {out.with_suffix('.json')}")


def plot(result: dict, names: list[str], levels: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    x = np.arange(levels)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, n in zip(axes.flat, names, strict=False):
        total = result["answers"]
        ax.bar(x - 0.27, np.array(result["counts"]["rounded"][n]) / total, 0.27, label="rounded")
        ax.bar(x, np.array(result["counts"]["calibrated"][n]) / total, 0.27, label="quantile-mapped")
        train = result["training_labels"].get(n)
        if train:
            ax.bar(x + 0.27, np.array(train) / sum(train), 0.27, label="OASST training labels")
        ax.set_title(n, fontsize=10)
        ax.set_xticks(x)
        ax.set_xlabel("level", fontsize=8)
        ax.set_ylabel("share of answers", fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"APM labels of {result['answers']} HH-RLHF answers: rounded vs calibrated")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
