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


def open_text(path: str | Path):
    """Open a text file for reading, transparently gunzipping `.gz`; a missing file is a UserError."""
    path = Path(path)
    if not path.exists():
        raise UserError("file does not exist", file=str(path))
    if path.is_dir():
        raise UserError("is a folder, expected a file", file=str(path))
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path, on_error: Callable[[UserError], None] | None = None) -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, value)` for each non-blank line.

    Malformed JSON or non-UTF-8 raise a located UserError; with `on_error`, the error is passed to it and the line
    skipped instead (for `--skip-invalid`).
    """

    def fail(error: UserError):
        if on_error is None:
            raise error
        on_error(error)

    path = Path(path)
    with open_text(path) as f:
        line_no = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                if on_error is None or path.suffix == ".gz":
                    raise UserError(f"not valid UTF-8 ({e.reason})", file=str(path), line=line_no + 1) from None
                # Re-read the rest in binary to skip just the bad line (only plain files can be re-positioned).
                yield from _skip_bad_utf8_lines(path, line_no, fail)
                return
            except (OSError, EOFError) as e:  # truncated or corrupt gzip
                raise UserError(f"cannot read: {e}", file=str(path), line=line_no + 1) from None
            if not line:
                return
            line_no += 1
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                fail(UserError(f"malformed JSON ({e.msg} at column {e.colno})", file=str(path), line=line_no))
                continue
            yield line_no, value


def _skip_bad_utf8_lines(path: Path, start: int, fail) -> Iterator[tuple[int, Any]]:
    """Continue reading `path` from line `start + 1` byte-wise, reporting undecodable or malformed lines to `fail`."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no <= start or not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                fail(UserError(f"not valid UTF-8 ({e.reason})", file=str(path), line=line_no))
                continue
            except json.JSONDecodeError as e:
                fail(UserError(f"malformed JSON ({e.msg} at column {e.colno})", file=str(path), line=line_no))
                continue
            yield line_no, value


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8"):
    """Write to a temporary file beside `path` and rename it into place only if the block finishes.

    An interrupted writer (exception, Ctrl-C, kill) therefore never leaves a half-written `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
