"""`steerlm eval-apm`: how well an attribute prediction model agrees with held-out human labels (SPEC §5.1).

    steerlm eval-apm --apm runs/apm --data runs/data            # the prepare folder's val.jsonl
    steerlm eval-apm --apm runs/apm --data held_out.jsonl --out runs/apm-eval

Per attribute: MAE (in levels, on the APM's float predictions), exact-level accuracy and ±1 accuracy (on rounded
levels) and Spearman's rank correlation, next to a baseline that always predicts the training mean (stored in the
APM folder at training time). A human label kept by `steerlm annotate` as `gt_label` is preferred over `label`.
Writes `eval_apm.json` and `eval_apm.png` (predicted vs human level, one panel per attribute) and prints the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from steerlm.apm_model import BEST, agreement, apm_folder, format_table, load_apm, read_examples
from steerlm.errors import UserError
from steerlm.io import write_json

REPORT, PLOT = "eval_apm.json", "eval_apm.png"


@dataclass
class Config:
    apm: str
    """APM folder: a `steerlm train-apm` output folder or its `best/` model folder."""
    data: str
    """Held-out records with human labels: a .jsonl file, or a `steerlm prepare` folder (its val.jsonl is used)."""
    out: str = ""
    """Folder for eval_apm.json and eval_apm.png; empty means `eval/` inside the train-apm output folder."""
    batch_size: int = 32
    """Conversations scored per batch."""
    max_examples: int = 0
    """Score at most this many labelled assistant turns; 0 means all."""
    overwrite: bool = False
    """Replace an existing report."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, not {self.max_examples}")


def data_file(data: str | Path) -> Path:
    """The records file to evaluate on: the file itself, or a prepare folder's validation file."""
    path = Path(data)
    if path.is_dir():
        for name in ("val.jsonl", "val_t2v.jsonl"):
            if (path / name).exists():
                return path / name
        raise UserError("folder has no val.jsonl to evaluate on", file=str(path))
    if not path.exists():
        raise UserError("file does not exist", file=str(path))
    return path


def plot(report: dict, levels: int, path: str | Path) -> None:
    """A grid of predicted-vs-human level count maps, one panel per attribute (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(report["attributes"])
    cols = min(4, max(1, len(names)))
    rows = max(1, -(-len(names) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        row = report["attributes"][name]
        grid = np.zeros((levels, levels))
        for gold, pred in row["pairs"]:
            grid[pred, gold] += 1
        ax.imshow(grid, origin="lower", cmap="Blues", aspect="equal")
        ax.plot([-0.5, levels - 0.5], [-0.5, levels - 0.5], color="grey", lw=0.8, ls="--")
        rho = row["apm"]["spearman"]
        ax.set_title(f"{name} (n={row['apm']['n']}, ρ={rho:.2f})" if rho is not None else f"{name} (n={row['apm']['n']})",
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("human level", fontsize=8)
        ax.set_ylabel("predicted level", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle("APM predictions vs held-out human labels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def default_out(apm: str | Path) -> Path:
    folder = apm_folder(apm)
    run = folder.parent if folder.name == BEST else folder
    return run / "eval"


def main(cfg: Config) -> dict:
    start = time.time()
    out = Path(cfg.out) if cfg.out else default_out(cfg.apm)
    if (out / REPORT).exists() and not cfg.overwrite:
        raise UserError(f"{REPORT} already exists; pass --overwrite to replace it", file=str(out))
    apm = load_apm(cfg.apm)
    source = data_file(cfg.data)
    examples = read_examples(source, apm.schema, human=True)
    if cfg.max_examples:
        examples = examples[: cfg.max_examples]
    if not examples:
        raise UserError(f"no assistant turn carries a human label for {', '.join(apm.schema.names)}", file=str(source))
    report = agreement(apm, examples, cfg.batch_size, progress=True)
    report.update({"apm": str(apm.path), "data": str(source), "kind": apm.kind, "levels": apm.schema.levels})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / REPORT, report)
    plot(report, apm.schema.levels, out / PLOT)
    print(format_table(report))
    print(f"eval-apm: {len(examples)} turns in {time.time() - start:.0f} s -> {out / REPORT}, {out / PLOT}")
    return report
