"""OpenAssistant (OASST1) loader: flat message rows or nested trees -> conversation records (SPEC §2).

Two layouts of the same messages are accepted:
- flat rows, as in the Hugging Face `oasst1` dataset (a local `.jsonl[.gz]` or a hub id such as
  `OpenAssistant/oasst1`): `message_id, parent_id, message_tree_id, role, text, lang, deleted, review_result, rank,
  labels: {name: [...], value: [...], count: [...]} | null`;
- the nested trees dump (`*.trees.jsonl[.gz]`): `{message_tree_id, tree_state, prompt: {message_id, role, text,
  lang, labels: {name: {value, count}}, replies: [...]}}`.

Both are read into the same `Message` list, so both give identical records. Every root-to-leaf path of a tree is one
conversation; a skipped message (deleted, failed review, other language, invalid) cuts its whole subtree, since a
reply makes no sense without the message it answers. Assistant turns carry the bucketed attribute string (SPEC §1).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steerlm.attributes import AttributeSchema
from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.errors import UserError
from steerlm.io import atomic_write, read_jsonl

ROLES = {"prompter": USER, "assistant": ASSISTANT}
HUB_PREFIX = "hub:"

#: Reasons a message is left out, in the order they are checked and reported.
SKIP_REASONS = ("invalid", "deleted", "review_failed", "lang", "cut", "orphan")


@dataclass
class Message:
    """One validated OASST message, whichever layout it came from."""

    message_id: str
    parent_id: str | None
    tree_id: str
    role: str
    """'prompter' or 'assistant' (OASST's names)."""
    text: str
    lang: str | None
    deleted: bool = False
    review_result: bool | None = None
    """False means the message failed review; None means it was not reviewed."""
    rank: int | None = None
    labels: dict[str, float] | None = None
    """Label name -> mean value in [0, 1]; None when the message has no labels."""
    file: str = field(default="", compare=False, repr=False)
    """Source file (or `hub:ID[split]`) and line, for errors found after reading."""
    line: int | None = field(default=None, compare=False, repr=False)


# ---------------------------------------------------------------- validation (shared by both layouts)


class _Where:
    """Where a message sits in its source, for located errors."""

    def __init__(self, file: str, line: int | None, prefix: str = ""):
        self.file, self.line, self.prefix = file, line, prefix

    def error(self, message: str, fld: str) -> UserError:
        return UserError(message, file=self.file, line=self.line, field=self.prefix + fld)


def _check_labels_flat(labels: Any, where: _Where) -> dict[str, float] | None:
    """Hugging Face rows: `{name: [...], value: [...], count: [...]}` (parallel lists) or null."""
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise where.error("must be an object {name: [...], value: [...], count: [...]} or null", "labels")
    names, values = labels.get("name"), labels.get("value")
    for key, seq in (("name", names), ("value", values)):
        if not isinstance(seq, list):
            raise where.error("missing or not a list", f"labels.{key}")
    if len(names) != len(values):
        raise where.error(f"{len(names)} names but {len(values)} values", "labels")
    out = {}
    for i, (name, value) in enumerate(zip(names, values, strict=True)):
        if not isinstance(name, str) or not name:
            raise where.error("must be a non-empty string", f"labels.name[{i}]")
        out[name] = _check_value(value, where, f"labels.{name}")
    return out


def _check_labels_tree(labels: Any, where: _Where) -> dict[str, float] | None:
    """Trees dump: `{name: {"value": v, "count": c}}`, absent or null when the message has none."""
    if labels is None:
        return None
    if not isinstance(labels, dict):
        raise where.error('must be an object {name: {"value": v, "count": c}}', "labels")
    out = {}
    for name, entry in labels.items():
        if not isinstance(entry, dict) or "value" not in entry:
            raise where.error('must be an object {"value": v, "count": c}', f"labels.{name}")
        out[name] = _check_value(entry["value"], where, f"labels.{name}")
    return out


def _check_value(value: Any, where: _Where, fld: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(f"label value must be a number, not {value!r}", fld)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise where.error(f"label value {value} is outside [0, 1]", fld)
    return float(value)


def _check_node(obj: Any, where: _Where, *, tree_id: str | None, parent_id: str | None, nested: bool) -> Message:
    """Validate one message (a flat row, or a node of a tree with its `replies` handled by the caller)."""
    if not isinstance(obj, dict):
        raise where.error(f"expected a JSON object, got {type(obj).__name__}", "message")
    required = (
        ("message_id", "role", "text") if nested else ("message_id", "parent_id", "message_tree_id", "role", "text")
    )
    for key in required:
        if key not in obj:
            raise where.error("missing", key)
    message_id = obj["message_id"]
    if not isinstance(message_id, str) or not message_id:
        raise where.error("must be a non-empty string", "message_id")
    if not nested:
        parent_id, tree_id = obj["parent_id"], obj["message_tree_id"]
        if parent_id is not None and (not isinstance(parent_id, str) or not parent_id):
            raise where.error("must be a non-empty string or null", "parent_id")
        if not isinstance(tree_id, str) or not tree_id:
            raise where.error("must be a non-empty string", "message_tree_id")
    role = obj["role"]
    if role not in ROLES:
        raise where.error(f"unknown role {role!r}; expected 'prompter' or 'assistant'", "role")
    if parent_id is None and role != "prompter":
        raise where.error("the first message of a tree must have role 'prompter'", "role")
    text = obj["text"]
    if not isinstance(text, str):
        raise where.error("must be a string", "text")
    if not text.strip():
        raise where.error("empty text", "text")
    lang = obj.get("lang")
    if lang is not None and not isinstance(lang, str):
        raise where.error("must be a string or null", "lang")
    deleted = obj.get("deleted", False)
    if deleted is None:
        deleted = False
    if not isinstance(deleted, bool):
        raise where.error("must be true or false", "deleted")
    review = obj.get("review_result")
    if review is not None and not isinstance(review, bool):
        raise where.error("must be true, false or null", "review_result")
    rank = obj.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise where.error("must be an integer or null", "rank")
    labels = (_check_labels_tree if nested else _check_labels_flat)(obj.get("labels"), where)
    return Message(
        message_id, parent_id, tree_id, role, text, lang, deleted, review, rank, labels, where.file, where.line
    )


# ---------------------------------------------------------------- reading the two layouts


def _fail_or_count(error: UserError, skip_invalid: bool, stats: Counter) -> None:
    if not skip_invalid:
        raise UserError(error.reason + " (--skip_invalid skips and counts such messages)", file=error.file,
                        line=error.line, field=error.field)  # fmt: skip
    stats["invalid"] += 1


def messages_from_rows(rows: Iterable[tuple[int, Any]], file: str, *, skip_invalid: bool = False,
                       stats: Counter | None = None) -> list[Message]:  # fmt: skip
    """Validate flat rows given as `(line, row)` pairs; `file` names the source in errors."""
    stats = Counter() if stats is None else stats
    out = []
    for line, row in rows:
        stats["messages"] += 1
        try:
            out.append(_check_node(row, _Where(file, line), tree_id=None, parent_id=None, nested=False))
        except UserError as e:
            _fail_or_count(e, skip_invalid, stats)
    return out


def read_flat(path: str | Path, *, skip_invalid: bool = False, stats: Counter | None = None) -> list[Message]:
    """Messages of a flat `.jsonl[.gz]` file (Hugging Face `oasst1` rows)."""
    stats = Counter() if stats is None else stats
    return messages_from_rows(_lines(path, skip_invalid, stats), str(path), skip_invalid=skip_invalid, stats=stats)


def read_trees(path: str | Path, *, skip_invalid: bool = False, stats: Counter | None = None) -> list[Message]:
    """Messages of a nested trees dump (`*.trees.jsonl[.gz]`), parents before their replies."""
    stats = Counter() if stats is None else stats
    out: list[Message] = []
    for line, tree in _lines(path, skip_invalid, stats):
        where = _Where(str(path), line)
        try:
            if not isinstance(tree, dict):
                raise where.error(f"expected a JSON object, got {type(tree).__name__}", "tree")
            for key in ("message_tree_id", "prompt"):
                if key not in tree:
                    raise where.error("missing", key)
            tree_id = tree["message_tree_id"]
            if not isinstance(tree_id, str) or not tree_id:
                raise where.error("must be a non-empty string", "message_tree_id")
        except UserError as e:
            _fail_or_count(e, skip_invalid, stats)
            continue
        # Walk the tree iteratively (no recursion limit on deep trees); an invalid node cuts its subtree.
        stack = [(tree["prompt"], None, "prompt.")]
        while stack:
            node, parent_id, prefix = stack.pop()
            stats["messages"] += 1
            where = _Where(str(path), line, prefix)
            try:
                message = _check_node(node, where, tree_id=tree_id, parent_id=parent_id, nested=True)
                replies = node.get("replies", [])
                if replies is None:
                    replies = []
                if not isinstance(replies, list):
                    raise where.error("must be a list", "replies")
            except UserError as e:
                _fail_or_count(e, skip_invalid, stats)
                stats["cut"] += _count_nodes(node.get("replies") if isinstance(node, dict) else None)
                continue
            out.append(message)
            stack += [(r, message.message_id, f"{prefix}replies[{i}].") for i, r in reversed(list(enumerate(replies)))]
    return out


def _count_nodes(replies: Any) -> int:
    """How many message nodes hang below a skipped invalid node (best effort: the data is malformed)."""
    n, stack = 0, [replies]
    while stack:
        items = stack.pop()
        if isinstance(items, list):
            for r in items:
                if isinstance(r, dict):
                    n += 1
                    stack.append(r.get("replies"))
    return n


def _lines(path: str | Path, skip_invalid: bool, stats: Counter) -> Iterator[tuple[int, Any]]:
    def count(_error: UserError) -> None:
        stats["invalid"] += 1

    return read_jsonl(path, on_error=count if skip_invalid else None)


class HubUnavailable(UserError):
    """A hub dataset could not be loaded at all (no network, unknown id, `datasets` missing): a caller with other
    candidate sources may try the next one."""


def load_hub_rows(hub_id: str) -> Iterator[tuple[str, int, dict]]:
    """Yield `(split, row_number, row)` of every split of a Hugging Face dataset (through `datasets`, imported
    only here). Any failure (no network, unknown id, not cached) becomes a HubUnavailable error suggesting a local
    file."""
    try:
        import datasets
    except ImportError:
        message = "loading from the hub needs the `datasets` package; give a local file instead"
        raise HubUnavailable(message, field="source") from None
    try:
        loaded = datasets.load_dataset(hub_id)
    except Exception as e:  # network, auth, missing dataset: all mean "use a local file"
        reason = str(e).splitlines()[0] if str(e) else ""
        raise HubUnavailable(
            f"cannot load {hub_id!r} from the Hugging Face hub ({type(e).__name__}: {reason}); "
            "without network access, download the data elsewhere and give a local path, e.g. "
            "--source=path/to/oasst1.jsonl (flat rows) or path/to/2023-04-12_oasst_ready.trees.jsonl.gz",
            field="source",
        ) from None
    splits = loaded.items() if hasattr(loaded, "items") else [("train", loaded)]
    for split, rows in splits:
        for i, row in enumerate(rows, 1):
            yield split, i, row


def read_hub(hub_id: str, *, rows: Iterable[tuple[str, int, dict]] | None = None, skip_invalid: bool = False,
             stats: Counter | None = None) -> list[Message]:  # fmt: skip
    """Messages of every split of a hub dataset of flat rows (e.g. `OpenAssistant/oasst1`); the splits are
    concatenated so that `split_by_tree` decides train/validation itself. `rows`: already loaded
    `load_hub_rows(hub_id)`."""
    stats = Counter() if stats is None else stats
    out = []
    for split, i, row in load_hub_rows(hub_id) if rows is None else rows:
        out += messages_from_rows([(i, row)], f"{HUB_PREFIX}{hub_id}[{split}]", skip_invalid=skip_invalid, stats=stats)
    return out


def first_record(path: str | Path) -> Any:
    """The first parseable JSON value of a JSONL file (None if there is none), for format detection."""
    with contextlib.closing(read_jsonl(path, on_error=lambda e: None)) as lines:
        return next(lines, (None, None))[1]


def detect_layout(obj: Any) -> str | None:
    """'oasst' (flat rows) or 'oasst-trees' from one record, or None when it is neither."""
    if isinstance(obj, dict):
        if "prompt" in obj and "message_tree_id" in obj:
            return "oasst-trees"
        if "message_id" in obj and "role" in obj:
            return "oasst"
    return None


def read_messages(source: str | Path, *, layout: str = "auto", skip_invalid: bool = False,
                  stats: Counter | None = None) -> list[Message]:  # fmt: skip
    """Messages from a local flat or trees file (layout 'oasst', 'oasst-trees' or 'auto') or `hub:ID`."""
    stats = Counter() if stats is None else stats
    source = str(source)
    if source.startswith(HUB_PREFIX):
        return read_hub(source[len(HUB_PREFIX) :], skip_invalid=skip_invalid, stats=stats)
    if layout == "auto":
        layout = detect_layout(first_record(source)) or "oasst"
    if layout == "oasst-trees":
        return read_trees(source, skip_invalid=skip_invalid, stats=stats)
    if layout == "oasst":
        return read_flat(source, skip_invalid=skip_invalid, stats=stats)
    raise ValueError(f"unknown OASST layout {layout!r}")


# ---------------------------------------------------------------- messages -> conversations


def _lang_ok(lang: str | None, wanted: set[str] | None) -> bool:
    """'en' matches 'en' and regional variants such as 'en-GB'; 'pt-BR' matches only itself. A message without a
    language passes only when no filter is set."""
    if wanted is None:
        return True
    return lang is not None and (lang in wanted or lang.split("-")[0] in wanted)


def parse_lang(lang: str | Iterable[str] | None) -> set[str] | None:
    """A language filter: None, '' or 'all' keep every language; 'en' or 'en,de' (or a list) keep those."""
    if lang is None:
        return None
    items = lang.split(",") if isinstance(lang, str) else list(lang)
    items = {x.strip() for x in items if x.strip()}
    return None if not items or "all" in items else items


def conversations(messages: list[Message], schema: AttributeSchema, *, lang: str | Iterable[str] | None = "en",
                  skip_deleted: bool = True, skip_review_failed: bool = True, skip_invalid: bool = False,
                  stats: Counter | None = None) -> list[Record]:  # fmt: skip
    """Every root-to-leaf path of kept messages as one record (SPEC §2), trees in input order.

    `stats` gets: `trees` (distinct tree ids), `trees_used` (trees giving a conversation), `conversations`,
    skipped messages by reason (`deleted`, `review_failed`, `lang`, `cut` = below a skipped message, `orphan` =
    not reachable from its tree's first message), `one_turn` (dropped one-turn conversations), and assistant turn
    counts (`assistant_turns`, `labelled_assistant_turns`, `assistant_messages`, `labelled_assistant_messages`).
    """
    stats = Counter() if stats is None else stats
    wanted = parse_lang(lang)
    by_id: dict[str, Message] = {}
    children: dict[str, list[Message]] = defaultdict(list)
    roots, tree_ids = [], {}
    unique = []
    for m in messages:
        if m.message_id in by_id:  # a repeated id would silently graft one subtree onto another
            first = by_id[m.message_id]
            error = UserError(f"message_id {m.message_id!r} already used at {first.file}:{first.line}", file=m.file,
                              line=m.line, field="message_id")  # fmt: skip
            _fail_or_count(error, skip_invalid, stats)
            continue
        tree_ids.setdefault(m.tree_id, None)
        by_id[m.message_id] = m
        unique.append(m)
    messages = unique
    for m in messages:
        if m.parent_id is None:
            roots.append(m)
        elif m.parent_id in by_id:
            children[m.parent_id].append(m)
    stats["trees"] += len(tree_ids)

    def skip_reason(m: Message) -> str | None:
        if skip_deleted and m.deleted:
            return "deleted"
        if skip_review_failed and m.review_result is False:
            return "review_failed"
        if not _lang_ok(m.lang, wanted):
            return "lang"
        return None

    labels: dict[str, str | None] = {}  # message_id -> rendered attribute string, computed once

    def turn(m: Message) -> Turn:
        if m.role == "prompter":
            return Turn(USER, m.text, None, {"message_id": m.message_id})
        if m.message_id not in labels:
            levels = {k: schema.bucket(v) for k, v in (m.labels or {}).items() if k in schema.names}
            labels[m.message_id] = schema.render(levels) or None  # missing labels are omitted, never invented
        return Turn(ASSISTANT, m.text, labels[m.message_id], {"message_id": m.message_id, "rank": m.rank})

    out: list[Record] = []
    visited = 0
    used_trees, assistant_ids = set(), set()
    for root in roots:
        # Iterative depth-first walk in reply order; `path` holds the turns from the root to the current node.
        stack: list[tuple[Message, int]] = [(root, 0)]
        path: list[Turn] = []
        while stack:
            m, depth = stack.pop()
            visited += 1
            reason = skip_reason(m)
            if reason:
                below = _descendants(m, children)
                stats[reason] += 1
                stats["cut"] += below
                visited += below
                continue
            del path[depth:]
            path.append(turn(m))
            kids = children.get(m.message_id, [])
            stack += [(k, depth + 1) for k in reversed(kids)]  # skipped ones are popped only to be counted
            if any(skip_reason(k) is None for k in kids):
                continue
            if len(path) < 2:  # a leaf: the path ends here
                stats["one_turn"] += 1
                continue
            record = Record(
                [Turn(t.role, t.value, t.label, dict(t.extra)) for t in path], extra={"tree_id": m.tree_id}
            )
            out.append(record)
            used_trees.add(m.tree_id)
            for t in record.assistant_turns:
                stats["assistant_turns"] += 1
                stats["labelled_assistant_turns"] += t.label is not None
                if t.extra["message_id"] not in assistant_ids:
                    assistant_ids.add(t.extra["message_id"])
                    stats["assistant_messages"] += 1
                    stats["labelled_assistant_messages"] += t.label is not None
    stats["orphan"] += len(messages) - visited
    stats["trees_used"] += len(used_trees)
    stats["conversations"] += len(out)
    return out


def _descendants(m: Message, children: dict[str, list[Message]]) -> int:
    n, stack = 0, list(children.get(m.message_id, []))
    while stack:
        k = stack.pop()
        n += 1
        stack += children.get(k.message_id, [])
    return n


def load_records(source: str | Path, schema: AttributeSchema, *, layout: str = "auto",
                 lang: str | Iterable[str] | None = "en", skip_deleted: bool = True,
                 skip_invalid: bool = False, stats: Counter | None = None) -> list[Record]:  # fmt: skip
    """Read OASST (flat file, trees file or `hub:ID`) and flatten it to records in one call."""
    stats = Counter() if stats is None else stats
    messages = read_messages(source, layout=layout, skip_invalid=skip_invalid, stats=stats)
    return conversations(messages, schema, lang=lang, skip_deleted=skip_deleted, skip_review_failed=skip_deleted,
                         skip_invalid=skip_invalid, stats=stats)  # fmt: skip


# ---------------------------------------------------------------- train/validation split by tree


def split_by_tree(records: list[Record], val_fraction: float, seed: int, key: str = "tree_id") -> tuple[list, list]:
    """Split records into (train, validation) by the group in `record.extra[key]` (a tree for OASST, a pair for
    HH-RLHF): paths of one tree share prefixes, so splitting by path would leak validation text into training
    (SPEC §2). Groups are sorted then shuffled with `seed`, so the split does not depend on input order; the
    validation set gets `round(val_fraction * groups)` groups (at least one when the fraction is positive and there
    are two or more groups). Records without the key form a group each. Record order is kept within each part."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")

    def group(i: int, r: Record) -> str:
        value = r.extra.get(key)
        return f"\0record-{i}" if value is None else str(value)

    groups = sorted({group(i, r) for i, r in enumerate(records)})
    n_val = round(val_fraction * len(groups))
    if val_fraction > 0 and len(groups) >= 2:
        n_val = min(max(n_val, 1), len(groups) - 1)
    random.Random(seed).shuffle(groups)
    val_groups = set(groups[:n_val])
    train, val = [], []
    for i, r in enumerate(records):
        (val if group(i, r) in val_groups else train).append(r)
    return train, val


# ---------------------------------------------------------------- flat rows -> trees dump


def rows_to_trees(rows: Iterable[dict]) -> tuple[list[dict], int]:
    """Nest flat `oasst1` rows as the official trees dump does; returns (trees, rows left out).

    Labels and emojis become the dump's dicts (`{name: {"value", "count"}}`, `{name: count}`); replies keep the
    rows' order; trees come in the order of their first message. Rows whose tree has no first message in the
    data, or whose parent is missing, cannot be placed in a tree and are left out (counted).
    """
    rows = list(rows)
    nodes: dict[str, dict] = {}
    for row in rows:
        node = {k: v for k, v in row.items() if k not in ("message_tree_id", "tree_state", "labels", "emojis")}
        if isinstance(row.get("emojis"), dict) and "name" in row["emojis"]:
            node["emojis"] = dict(zip(row["emojis"]["name"], row["emojis"].get("count", []), strict=False))
        labels = row.get("labels")
        if isinstance(labels, dict) and "name" in labels:
            counts = labels.get("count") or [None] * len(labels["name"])
            triples = zip(labels["name"], labels["value"], counts, strict=False)
            node["labels"] = {n: {"value": v, "count": c} for n, v, c in triples}
        node["replies"] = []
        nodes[row["message_id"]] = node
    trees, placed = [], 0
    for row in rows:
        parent = row.get("parent_id")
        if parent is None:
            state = row.get("tree_state", "ready_for_export")
            trees.append(
                {"message_tree_id": row["message_tree_id"], "tree_state": state, "prompt": nodes[row["message_id"]]}
            )
        elif parent in nodes:
            nodes[parent]["replies"].append(nodes[row["message_id"]])
    # Count what hangs below the tree roots: anything else is unreachable (its first message is not in the data).
    stack = [t["prompt"] for t in trees]
    while stack:
        node = stack.pop()
        placed += 1
        stack += node["replies"]
    return trees, len(rows) - placed


def write_trees(path: str | Path, rows: Iterable[dict]) -> tuple[int, int]:
    """Write flat `oasst1` rows as a nested trees file (`.gz` compresses), atomically; returns (trees written,
    rows left out). Handy for users and proves both layouts give identical records (tests)."""
    trees, left_out = rows_to_trees(rows)
    path = Path(path)
    if path.suffix == ".gz":
        with atomic_write(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
            for tree in trees:
                f.write((json.dumps(tree, ensure_ascii=False) + "\n").encode("utf-8"))
    else:
        with atomic_write(path) as f:
            for tree in trees:
                f.write(json.dumps(tree, ensure_ascii=False) + "\n")
    return len(trees), left_out
