"""NeMo-compatible conversation records (SPEC §2): the one in-memory form every stage reads and writes.

    {"system": str, "conversations": [{"from": "User"|"Assistant", "value": str, "label": str|null}, ...],
     "mask": "User", "type": "VALUE_TO_TEXT"|"TEXT_TO_VALUE"}

Keys beyond these (e.g. `tree_id`, a turn's `message_id`, `rank` or `gt_label`) are kept as they are, so a file
read and written again loses nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlm.config import read_yaml
from steerlm.errors import UserError
from steerlm.io import read_jsonl, write_jsonl

USER, ASSISTANT = "User", "Assistant"
ROLES = (USER, ASSISTANT)
VALUE_TO_TEXT, TEXT_TO_VALUE = "VALUE_TO_TEXT", "TEXT_TO_VALUE"
TYPES = (VALUE_TO_TEXT, TEXT_TO_VALUE)

#: Default system text of NeMo-Aligner's SteerLM scripts and docs (SPEC §3), no trailing newline.
DEFAULT_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


#: What `steerlm prepare`/`annotate` name a folder's splits (the first existing name is used).
TRAIN_NAMES = ("train.jsonl", "train.jsonl.gz")
VAL_NAMES = ("val.jsonl", "val.jsonl.gz", "validation.jsonl", "validation.jsonl.gz")


def find_split(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of `names` (TRAIN_NAMES or VAL_NAMES) that is a file in `folder`, or None."""
    return next((folder / n for n in names if (folder / n).is_file()), None)


def val_records_file(data: str | Path) -> Path:
    """The held-out records of `data`: the file itself, or a folder's validation split (the first of VAL_NAMES).
    Raises UserError naming the path when neither exists."""
    path = Path(data)
    if path.is_dir():
        found = find_split(path, VAL_NAMES)
        if found is None:
            raise UserError(f"no {' or '.join(VAL_NAMES)} in the data folder", file=str(path))
        return found
    if not path.is_file():
        raise UserError("no such records file or folder", file=str(path))
    return path


@dataclass
class Turn:
    role: str
    """'User' or 'Assistant' (the JSON key is `from`)."""
    value: str
    """The text of the turn."""
    label: str | None = None
    """Attribute string of an assistant turn (SPEC §1), or None."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other keys of the turn, kept verbatim (e.g. `gt_label`, `message_id`, `rank`)."""

    def to_json(self) -> dict:
        return {"from": self.role, "value": self.value, "label": self.label, **self.extra}


@dataclass
class Record:
    conversations: list[Turn]
    system: str = DEFAULT_SYSTEM
    mask: str = USER
    type: str = VALUE_TO_TEXT
    extra: dict[str, Any] = field(default_factory=dict)
    """Other top-level keys, kept verbatim (e.g. `tree_id`, `source`)."""

    def to_json(self) -> dict:
        return {
            "system": self.system,
            "conversations": [t.to_json() for t in self.conversations],
            "mask": self.mask,
            "type": self.type,
            **self.extra,
        }

    def with_type(self, type_: str) -> Record:
        return Record([Turn(t.role, t.value, t.label, dict(t.extra)) for t in self.conversations], self.system,
                      self.mask, type_, dict(self.extra))  # fmt: skip

    @property
    def assistant_turns(self) -> list[Turn]:
        return [t for t in self.conversations if t.role == ASSISTANT]


def record_from_json(obj: Any, *, file: str | None = None, line: int | None = None) -> Record:
    """Validate one JSON object as a record; errors name file, line and field."""

    def err(msg: str, fld: str) -> UserError:
        return UserError(msg, file=file, line=line, field=fld)

    if not isinstance(obj, dict):
        raise err(f"expected a JSON object, got {type(obj).__name__}", "record")
    extra = {k: v for k, v in obj.items() if k not in ("system", "conversations", "mask", "type")}
    system = obj.get("system", DEFAULT_SYSTEM)
    if not isinstance(system, str):
        raise err("must be a string", "system")
    mask = obj.get("mask", USER)
    if mask not in ROLES:
        raise err(f"must be one of {ROLES}, not {mask!r}", "mask")
    type_ = obj.get("type", VALUE_TO_TEXT)
    if type_ not in TYPES:
        raise err(f"must be one of {TYPES}, not {type_!r}", "type")
    convs = obj.get("conversations")
    if convs is None:
        raise err("missing", "conversations")
    if not isinstance(convs, list) or not convs:
        raise err("must be a non-empty list of turns", "conversations")
    turns = []
    for i, t in enumerate(convs):
        where = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise err("must be an object", where)
        for key in ("from", "value"):
            if key not in t:
                raise err("missing", f"{where}.{key}")
        if t["from"] not in ROLES:
            raise err(f"unknown role {t['from']!r}; expected one of {ROLES}", f"{where}.from")
        if not isinstance(t["value"], str):
            raise err("must be a string", f"{where}.value")
        if not t["value"].strip():
            raise err("empty text", f"{where}.value")
        label = t.get("label")
        if label is not None and not isinstance(label, str):
            raise err("must be a string or null", f"{where}.label")
        turns.append(
            Turn(t["from"], t["value"], label, {k: v for k, v in t.items() if k not in ("from", "value", "label")})
        )
    return Record(turns, system, mask, type_, extra)


def read_records(path: str | Path, *, skip_invalid: bool = False, stats: Counter | None = None) -> list[Record]:
    """Read a conversation JSONL file. Bad lines raise a located UserError, or with `skip_invalid` are counted in
    `stats['invalid']` and skipped."""
    stats = Counter() if stats is None else stats

    def count(_error: UserError) -> None:
        stats["invalid"] += 1

    out = []
    for line, obj in read_jsonl(path, on_error=count if skip_invalid else None):
        try:
            out.append(record_from_json(obj, file=str(path), line=line))
        except UserError:
            if not skip_invalid:
                raise
            stats["invalid"] += 1
    return out


def training_prompts(records: list[Record]) -> list[Record]:
    """Every distinct conversation prefix that ends in a user turn followed by an assistant answer."""
    seen, prompts = set(), []
    for r in records:
        for i in range(1, len(r.conversations)):
            if r.conversations[i].role == ASSISTANT and r.conversations[i - 1].role == USER:
                prefix = [Turn(t.role, t.value) for t in r.conversations[:i]]
                key = (r.system, tuple((t.role, t.value) for t in prefix))
                if key not in seen:
                    seen.add(key)
                    prompts.append(Record(prefix, r.system))
    return prompts


def write_records(path: str | Path, records) -> int:
    """Atomically write records as JSONL; returns how many."""
    return write_jsonl(path, (r.to_json() for r in records))


def data_levels(path: str | Path) -> int:
    """L, the number of label levels of a data folder or records file, as the stage that wrote it recorded it; 0
    when nothing says (the caller then falls back to its own default, SPEC §1's 10).

    Looked up in order: `steerlm prepare`'s stats.json and config.yaml beside the records (`levels`, at the top or
    under `attributes`), then `steerlm annotate`'s `<file>.meta.json` (`levels`). Labels prepared with
    `--levels=5` must never be read on a 10-level scale. Unreadable files count as saying nothing."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    files = [path / n for n in TRAIN_NAMES] if path.is_dir() else [path]
    candidates = [folder / "stats.json", folder / "config.yaml"] + [f.with_name(f.name + ".meta.json") for f in files]
    for file in candidates:
        if not file.is_file():
            continue
        try:
            doc = read_yaml(file) if file.suffix == ".yaml" else json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError, UserError):
            continue
        if not isinstance(doc, dict):
            continue
        for node in (doc, doc.get("attributes")):
            if isinstance(node, dict) and isinstance(node.get("levels"), int) and node["levels"] > 0:
                return node["levels"]
    return 0
