"""File I/O shared by every stage: strict JSONL reading with located errors, and atomic writes."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from steerlm.errors import UserError


def _open_binary(path: Path):
    if not path.exists():
        raise UserError("file does not exist", file=str(path))
    if path.is_dir():
        raise UserError("is a folder, expected a file", file=str(path))
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_jsonl(path: str | Path, on_error: Callable[[UserError], None] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, value)` for each non-blank line of a `.jsonl` or `.jsonl.gz` file.

    Malformed JSON or non-UTF-8 raise a UserError naming file and line; with `on_error`, the error is passed to it
    and the line skipped instead (for `--skip_invalid`). Lines are decoded one by one so the line number is exact.
    """
    path = Path(path)
    with _open_binary(path) as f:
        line_no = 0
        while True:
            try:
                raw = f.readline()
            except (OSError, EOFError) as e:  # truncated or corrupt gzip
                raise UserError(f"cannot read: {e}", file=str(path), line=line_no + 1) from None
            if not raw:
                return
            line_no += 1
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                error = UserError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=str(path), line=line_no)
            except json.JSONDecodeError as e:
                error = UserError(f"malformed JSON ({e.msg} at column {e.colno})", file=str(path), line=line_no)
            else:
                continue
            if on_error is None:
                raise error
            on_error(error)


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside `path` and rename it into place only if the block finishes.

    An interrupted writer (exception, Ctrl-C, kill) therefore never leaves a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should get the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | Path, rows) -> int:
    """Atomically write an iterable of JSON-serialisable rows, one per line; returns the count."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, value: Any) -> None:
    """Atomically write one JSON document (indented, for people to read)."""
    with atomic_write(path) as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")
