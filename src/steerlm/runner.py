"""Multi-stage runs (`steerlm pipeline`, `steerlm rlhf`): each stage in its own folder, skipped when already done.

A stage is done when its folder holds `done.json` whose fingerprint matches the stage's resolved config and the
fingerprints of its inputs; change either and the stage (and so everything after it) runs again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from steerlm.config import to_dict
from steerlm.io import write_json

DONE = "done.json"


def fingerprint(cfg, inputs: list[str | Path] = ()) -> str:
    """Hash of a resolved config plus the size, mtime and done-fingerprint of each input path."""
    h = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode())
    for p in map(Path, inputs):
        done = p / DONE if p.is_dir() else None
        if done is not None and done.exists():
            h.update(json.loads(done.read_text())["fingerprint"].encode())
        elif p.exists():
            st = p.stat()
            h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            h.update(f"{p}:missing".encode())
    return h.hexdigest()[:16]


@dataclass
class StageResult:
    name: str
    seconds: float
    skipped: bool
    metric: str = ""
    details: dict = field(default_factory=dict)


def run_stage(name: str, folder: str | Path, cfg, run: Callable[[], dict | None], *, inputs=(),
              metric: Callable[[dict], str] = lambda d: "") -> StageResult:  # fmt: skip
    """Run `run()` unless `folder/done.json` matches; record its result and time in done.json."""
    folder = Path(folder)
    fp = fingerprint(cfg, inputs)
    done = folder / DONE
    if done.exists():
        prev = json.loads(done.read_text())
        if prev.get("fingerprint") == fp:
            print(f"[{name}] up to date, skipped ({folder})")
            result = prev.get("result") or {}
            return StageResult(name, prev.get("seconds", 0.0), True, metric(result), result)
        done.unlink()  # stale: the stage reruns, and its outputs are overwritten
    print(f"\n[{name}] running -> {folder}")
    start = time.time()
    result = run() or {}
    seconds = round(time.time() - start, 1)
    write_json(done, {"fingerprint": fp, "seconds": seconds, "result": result})
    return StageResult(name, seconds, False, metric(result), result)


def summary_table(results: list[StageResult], title: str = "summary") -> str:
    """Aligned table: stage, time, status, key metric."""
    rows = [("stage", "time", "status", "key metric")]
    rows += [(r.name, f"{r.seconds:.0f}s", "skipped" if r.skipped else "ran", r.metric) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{title}:"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    total = sum(r.seconds for r in results if not r.skipped)
    return "\n".join(lines + [f"  total {total:.0f}s"])
