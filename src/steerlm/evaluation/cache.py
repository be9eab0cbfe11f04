"""The evaluation cache: every answer, measurement and verdict, appended to JSONL files under `out/cache` and keyed
by what determines it, so an interrupted run resumes and `--from_cache` rebuilds the report without loading a model.

It owns the file names, the keys (`key_of`, `CACHE_VERSION`), the model fingerprints that retire rows of a retrained
model, and `fill`: compute only the rows the cache lacks, loading the model once (docs/evaluate.md, "Cache").
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from steerlm.errors import UserError
from steerlm.io import atomic_write

CACHE = "cache"
GENERATIONS, SCORES, VERDICTS, MODELS = "generations.jsonl", "scores.jsonl", "verdicts.jsonl", "models.json"
#: Bumped when what a cached row means changes, so old rows stop matching.
CACHE_VERSION = 1


def key_of(obj: Any) -> str:
    """A stable key for a JSON-able description of what determines a cached value."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:32]


class Cache:
    """Rows `{"key": ..., ...}` in a JSONL file; the last row of a key wins. Each batch of rows is appended with one
    write and fsync'd, so an interruption loses at most the batch being written; a torn last line (a write cut
    short) is dropped on reading and the file rewritten atomically without it. A bad line elsewhere is an error."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if not self.path.exists():
            return
        lines = self.path.read_bytes().split(b"\n")
        torn = False
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                if not isinstance(row, dict) or "key" not in row:
                    raise ValueError("not a cache row")
            except (ValueError, UnicodeDecodeError) as e:
                if i == len(lines) - 1:  # no newline after it: the last write was cut short
                    torn = True
                    continue
                raise UserError(f"corrupt cache row ({e}); delete the file to start afresh", file=str(self.path),
                                line=i + 1) from None  # fmt: skip
            self.rows[row["key"]] = row
        if torn or (lines and lines[-1].strip()):
            with atomic_write(self.path) as f:
                for row in self.rows.values():
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, rows: Sequence[dict]) -> None:
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        for r in rows:
            self.rows[r["key"]] = r


def path_fingerprint(path: str | Path) -> str:
    """Size and modification time of the files directly in a model folder (or of one file): a retrained model gets
    a new fingerprint and its cached rows stop counting. A name that is not a path (built-in, hub id) is itself."""
    p = Path(path).expanduser()
    if not p.exists():
        return str(path)
    files = [p] if p.is_file() else sorted(x for x in p.iterdir() if x.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def fresh(row: dict | None, fingerprint: str, from_cache: bool) -> bool:
    """Whether a cached row still counts: it was made by the model with this fingerprint (any row with
    `--from_cache`, which loads no model to fingerprint)."""
    return row is not None and (from_cache or row.get("fp") == fingerprint)


def missing_error(what: str, counts: dict[str, int]) -> UserError:
    listed = ", ".join(f"{k}: {v}" for k, v in counts.items())
    return UserError(f"--from_cache: {what} missing from the cache ({listed}); run without --from_cache first")


def free_memory() -> None:
    """Release a model that has filled its rows before the next one loads."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fill(cache: Cache, missing: Sequence[str], *, from_cache: bool, what: str, source: str, announce: str,
         load: Callable[[], Any], rows: Callable[[Any, list[str]], list[dict]], step: int,
         desc: str) -> None:  # fmt: skip
    """Append the rows of the keys in `missing` (those the cache lacks): `load()` loads the model once, then
    `rows(model, keys)` makes the rows of `step` keys at a time, each chunk appended as soon as it is made. With
    `from_cache` nothing may be missing: a UserError counts the missing `what` (e.g. "judge scores") of `source`."""
    if missing and from_cache:
        raise missing_error(what, {source: len(missing)})
    if not missing:
        return
    print(announce, flush=True)
    model = load()
    for start in tqdm(range(0, len(missing), step), desc=desc, leave=False):
        cache.add(rows(model, list(missing[start : start + step])))
    del model
    free_memory()
