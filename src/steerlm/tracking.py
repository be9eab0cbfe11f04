"""Experiment tracking: every row a training stage writes to `metrics.jsonl` also goes to TensorBoard and/or W&B,
through accelerate's trackers (`accelerate.tracking`), chosen with `--train.report_to`.

    steerlm sft --data=runs/x/data --out=runs/x/sft --train.report_to=tensorboard   # then: tensorboard --logdir runs/x/sft/tensorboard
    WANDB_MODE=offline steerlm sft ... --train.report_to=wandb       # W&B run files under runs/x/sft/wandb

Scalars keep the names they have in `metrics.jsonl` (nested values, e.g. a per-attribute read-out, as
`outer/inner`); the row's `step` is the x axis. `metrics.jsonl` stays the record of the run; the trackers are views.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steerlm.errors import UserError

KINDS = ("tensorboard", "wandb")
#: Folder (under a stage's output folder) that holds the TensorBoard runs; each stage's events in `<dir>/<stage>`.
TENSORBOARD_DIR = "tensorboard"
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def parse(report_to: str) -> list[str]:
    """`'none'`, `'tensorboard'`, `'wandb'` or both joined by a comma -> the tracker names; ValueError otherwise."""
    names = [n.strip() for n in str(report_to).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    bad = [n for n in names if n not in KINDS]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"report_to must be 'none', {', '.join(repr(k) for k in KINDS)} or both joined by ',', "
                         f"not {report_to!r}")  # fmt: skip
    return names


def scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics row, nested mappings flattened to `outer/inner`; `step`, text, None and booleans are
    left out."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(scalars(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            out[name] = float(value)
    return out


def _hparams(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config flattened to `a.b` keys with the value types TensorBoard's hparams and W&B's config take."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_hparams(value, name))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


class Trackers:
    """The accelerate trackers of one training run; `log(row)` sends a metrics row to each."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, row: Mapping[str, Any]) -> None:
        values = scalars(row)
        if values:
            for tracker in self.trackers:
                tracker.log(values, step=int(row["step"]) if "step" in row else None)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def start(report_to: str, out: str | Path, run_name: str, config: Mapping[str, Any] | None = None) -> Trackers | None:
    """Open the trackers `report_to` names for a run writing to `out` (None for 'none'): TensorBoard events in
    `out/tensorboard/<run_name>/`, a W&B run in project `$WANDB_PROJECT` (default 'steerlm') named
    `<run_name>:<out folder>` with its files under `out/wandb` (`WANDB_MODE=offline` keeps it on disk). `config`
    (the stage's training settings) is logged as hyperparameters. A tracker whose package is missing, or a W&B run
    that cannot start (not logged in and not offline), is a UserError naming `train.report_to`."""
    try:
        names = parse(report_to)
    except ValueError as e:
        raise UserError(str(e), field="train.report_to") from None
    if not names:
        return None
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise UserError(f"report_to {name!r} needs the {_PACKAGES[name]} package: pip install "
                            f"'steerlm[tracking]' (pinned versions)", field="train.report_to")  # fmt: skip
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    out = Path(out)
    trackers = []
    for name in names:
        if name == "tensorboard":
            tracker = TensorBoardTracker(run_name, str(out / TENSORBOARD_DIR))
        else:
            (out / "wandb").mkdir(parents=True, exist_ok=True)
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "steerlm"), name=f"{run_name}:{out.name}",
                                   dir=str(out))  # fmt: skip
        try:
            tracker.start()
        except Exception as e:  # wandb raises its own error types (e.g. no API key without a TTY)
            for t in trackers:
                t.finish()
            raise UserError(f"cannot start the {name} tracker: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                            + (" (run `wandb login`, or set WANDB_MODE=offline)" if name == "wandb" else ""),
                            field="train.report_to") from None  # fmt: skip
        trackers.append(tracker)
    if config:
        for tracker in trackers:
            tracker.store_init_configuration(_hparams(config))
    return Trackers(trackers)
