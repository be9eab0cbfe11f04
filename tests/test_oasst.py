"""OASST loading: both layouts, flattening, skips, labels, the tree split, and located errors for bad input."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from steerlm.attributes import AttributeSchema
from steerlm.data import oasst
from steerlm.data.records import ASSISTANT, USER, record_from_json
from steerlm.errors import UserError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEV = DATA / "oasst1" / "oasst1-en-dev.jsonl"
needs_data = pytest.mark.skipif(not DEV.exists(), reason="../shared/data is absent")
SCHEMA = AttributeSchema()


def dev_rows() -> list[dict]:
    return [json.loads(line) for line in DEV.read_text(encoding="utf-8").splitlines()]


def row(mid, parent, role="assistant", text=None, tree="t1", **kw) -> dict:
    """A flat `oasst1` row; `labels` may be given as a plain {name: value} dict for brevity."""
    labels = kw.pop("labels", None)
    if isinstance(labels, dict) and "name" not in labels:
        labels = {"name": list(labels), "value": list(labels.values()), "count": [3] * len(labels)}
    ids = {"message_id": mid, "parent_id": parent, "message_tree_id": tree}
    fields = {"role": role, "text": text or f"text {mid}", "lang": "en", "deleted": False, "review_result": True}
    return {**ids, **fields, "rank": None, "labels": labels, **kw}


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def as_json(records) -> list[dict]:
    return [r.to_json() for r in records]


# ---------------------------------------------------------------- real data


@needs_data
def test_dev_file_counts_and_record_shape():
    stats = Counter()
    records = oasst.load_records(DEV, SCHEMA, stats=stats)
    assert stats["messages"] == 1624
    assert stats["trees"] == 157
    assert stats["conversations"] == len(records) > 700
    # three messages answer parents that are not in the (English-only) file: their trees have no first message
    assert stats["orphan"] == 3 and stats["trees_used"] == 154
    assert stats["deleted"] > 0 and stats["review_failed"] > 0
    assert stats["assistant_messages"] <= 1002 and stats["labelled_assistant_messages"] <= 997
    for r in records:
        again = record_from_json(r.to_json())  # every record is a valid SPEC §2 record
        assert len(again.conversations) >= 2 and r.extra["tree_id"]
        assert r.conversations[0].role == USER
        for t in r.conversations:
            assert t.extra["message_id"]
            if t.role == USER:
                assert t.label is None and "rank" not in t.extra
            else:
                assert "rank" in t.extra
                if t.label is not None:
                    assert SCHEMA.render(SCHEMA.parse(t.label)) == t.label


@needs_data
def test_flat_and_trees_layouts_give_identical_records(tmp_path):
    rows = dev_rows()
    trees_file = tmp_path / "dev.trees.jsonl.gz"
    n_trees, left_out = oasst.write_trees(trees_file, rows)
    assert (n_trees, left_out) == (154, 3)  # the three rootless messages cannot be nested
    tree = oasst.first_record(trees_file)
    assert set(tree) == {"message_tree_id", "tree_state", "prompt"} and isinstance(tree["prompt"]["replies"], list)
    assert all(isinstance(v, dict) and "value" in v for v in tree["prompt"]["labels"].values())
    assert oasst.detect_layout(tree) == "oasst-trees" and oasst.detect_layout(rows[0]) == "oasst"
    for kw in ({}, {"lang": None, "skip_deleted": False}):
        flat = oasst.load_records(DEV, SCHEMA, **kw)
        nested = oasst.load_records(trees_file, SCHEMA, **kw)
        assert as_json(flat) == as_json(nested)
        assert len(flat) > 700


@needs_data
def test_split_is_by_tree_and_seeded():
    records = oasst.load_records(DEV, SCHEMA)
    train, val = oasst.split_by_tree(records, 0.1, seed=7)
    assert len(train) + len(val) == len(records)
    train_trees = {r.extra["tree_id"] for r in train}
    val_trees = {r.extra["tree_id"] for r in val}
    assert not train_trees & val_trees
    assert len(val_trees) == round(0.1 * len(train_trees | val_trees))
    again = oasst.split_by_tree(records, 0.1, seed=7)
    assert as_json(again[1]) == as_json(val)
    other = {r.extra["tree_id"] for r in oasst.split_by_tree(records, 0.1, seed=8)[1]}
    assert other != val_trees
    # the split does not depend on the input order
    reversed_val = {r.extra["tree_id"] for r in oasst.split_by_tree(records[::-1], 0.1, seed=7)[1]}
    assert reversed_val == val_trees
    assert oasst.split_by_tree(records, 0.0, seed=7)[1] == []


# ---------------------------------------------------------------- flattening rules on small trees


def small_tree() -> list[dict]:
    return [
        row("p", None, "prompter", labels={"quality": 0.9}),
        row("a1", "p", labels={"quality": 0.5, "humor": 1.0, "spam": 0.0}, rank=0),  # 4.5 -> 4 (half to even)
        row("u1", "a1", "prompter"),
        row("a11", "u1", labels=None, rank=0),
        row("a12", "u1", deleted=True),  # cut together with its reply
        row("u12", "a12", "prompter"),
        row("a2", "p", labels={"quality": 0.0}, rank=1),
        row("a3", "p", review_result=False),
        row("a4", "p", lang="de"),
        row("a5", "p", lang="en-GB", labels={"toxicity": 0.25}),  # 2.25 -> 2
        row("q", None, "prompter", tree="t2"),  # a prompt with no answer: one turn, dropped
    ]


def test_paths_labels_and_skips():
    stats = Counter()
    messages = oasst.messages_from_rows(enumerate(small_tree(), 1), "mem", stats=stats)
    records = oasst.conversations(messages, SCHEMA, stats=stats)
    paths = [[t.extra["message_id"] for t in r.conversations] for r in records]
    assert paths == [["p", "a1", "u1", "a11"], ["p", "a2"], ["p", "a5"]]
    first = records[0]
    assert [t.role for t in first.conversations] == [USER, ASSISTANT, USER, ASSISTANT]
    assert first.conversations[0].label is None  # prompter labels are not used
    assert first.conversations[1].label == "quality:4,humor:9"  # canonical order; spam is not steerable
    assert first.conversations[3].label is None  # no labels: omitted, never invented
    assert records[1].conversations[1].label == "quality:0" and records[1].conversations[1].extra["rank"] == 1
    assert records[2].conversations[1].label == "toxicity:2"
    assert all(r.extra["tree_id"] == "t1" for r in records)
    assert stats["deleted"] == 1 and stats["cut"] == 1 and stats["review_failed"] == 1 and stats["lang"] == 1
    assert stats["one_turn"] == 1 and stats["trees"] == 2 and stats["trees_used"] == 1


def test_skips_are_configurable_and_levels_follow_schema():
    messages = oasst.messages_from_rows(enumerate(small_tree(), 1), "mem")
    everything = oasst.conversations(messages, AttributeSchema(("quality",), 5), lang=None, skip_deleted=False,
                                     skip_review_failed=False)  # fmt: skip
    paths = [[t.extra["message_id"] for t in r.conversations] for r in everything]
    assert ["p", "a1", "u1", "a12", "u12"] in paths and ["p", "a3"] in paths and ["p", "a4"] in paths
    assert everything[0].conversations[1].label == "quality:2"  # 0.5 * 4
    only_de = oasst.conversations(messages, SCHEMA, lang="de")
    assert only_de == []  # the German answer hangs below an English prompt


def test_orphans_and_duplicate_ids():
    rows = [row("p", None, "prompter"), row("a", "p"), row("x", "missing"), row("y", "x", "prompter")]
    stats = Counter()
    records = oasst.conversations(oasst.messages_from_rows(enumerate(rows, 1), "mem"), SCHEMA, stats=stats)
    assert len(records) == 1 and stats["orphan"] == 2
    dup = oasst.messages_from_rows(enumerate([*rows[:2], row("a", "p")], 1), "f.jsonl")
    with pytest.raises(UserError, match=r"f.jsonl:3: message_id: .*already used at f.jsonl:2"):
        oasst.conversations(dup, SCHEMA)
    stats = Counter()
    assert len(oasst.conversations(dup, SCHEMA, skip_invalid=True, stats=stats)) == 1 and stats["invalid"] == 1


def test_write_trees_round_trip_small(tmp_path):
    rows = small_tree()
    flat = write_rows(tmp_path / "flat.jsonl", rows)
    trees = tmp_path / "t.trees.jsonl"
    assert oasst.write_trees(trees, rows) == (2, 0)
    kw = {"lang": None, "skip_deleted": False}
    assert as_json(oasst.load_records(flat, SCHEMA, **kw)) == as_json(oasst.load_records(trees, SCHEMA, **kw))


# ---------------------------------------------------------------- bad input: located errors, or skipped and counted

GOOD = row("p", None, "prompter")
BAD_LINES = {
    "malformed JSON": ('{"message_id": "a", ', "malformed JSON", None),
    "missing field": ({k: v for k, v in row("a", "p").items() if k != "role"}, "missing", "role"),
    "unknown role": (row("a", "p", role="system"), "unknown role 'system'", "role"),
    "label out of range": (row("a", "p", labels={"quality": 1.5}), r"outside \[0, 1\]", "labels.quality"),
    "empty text": (row("a", "p", text="  \n"), "empty text", "text"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_flat_line_is_located_or_skipped(tmp_path, case):
    bad, message, field = BAD_LINES[case]
    path = write_rows(tmp_path / "bad.jsonl", [GOOD, bad, row("b", "p")])
    with pytest.raises(UserError, match=message) as info:
        oasst.read_flat(path)
    assert (info.value.file, info.value.line, info.value.field) == (str(path), 2, field)
    assert "bad.jsonl:2: " in str(info.value)
    stats = Counter()
    messages = oasst.read_flat(path, skip_invalid=True, stats=stats)
    assert stats["invalid"] == 1 and [m.message_id for m in messages] == ["p", "b"]


def test_non_utf8_is_located_or_skipped(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"text": "caf\xe9"}\n' + json.dumps(row("b", "p")).encode())
    with pytest.raises(UserError, match="not valid UTF-8") as info:
        oasst.read_flat(path)
    assert info.value.line == 2
    stats = Counter()
    assert len(oasst.read_flat(path, skip_invalid=True, stats=stats)) == 2 and stats["invalid"] == 1


def test_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        oasst.read_messages("no/such/file.jsonl")


def test_bad_trees_node_is_located_or_skipped(tmp_path):
    rows = small_tree()
    path = tmp_path / "t.trees.jsonl"
    oasst.write_trees(path, rows)
    lines = path.read_text().splitlines()
    tree = json.loads(lines[0])
    tree["prompt"]["replies"][0]["replies"][0]["labels"] = {"x": {"value": -0.5, "count": 1}}  # node u1
    path.write_text(json.dumps(tree) + "\n" + lines[1] + "\n")
    with pytest.raises(UserError, match=r"outside \[0, 1\]") as info:
        oasst.read_trees(path)
    assert info.value.line == 1 and info.value.field == "prompt.replies[0].replies[0].labels.x"
    stats = Counter()
    messages = oasst.read_trees(path, skip_invalid=True, stats=stats)
    assert stats["invalid"] == 1 and stats["cut"] == 3  # u1's replies a11, a12 and a12's reply u12
    assert "u1" not in {m.message_id for m in messages}
    missing_prompt = tmp_path / "m.trees.jsonl"
    missing_prompt.write_text(json.dumps({"message_tree_id": "t"}) + "\n")
    with pytest.raises(UserError, match="missing") as info:
        oasst.read_trees(missing_prompt)
    assert info.value.field == "prompt"


# ---------------------------------------------------------------- hub ids (no network here: `datasets` is faked)


def fake_datasets(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hub_failure_suggests_a_local_path(monkeypatch):
    def offline(name, *a, **kw):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(oasst.HubUnavailable, match="local path") as info:
        oasst.read_messages("hub:OpenAssistant/oasst1")
    assert "OpenAssistant/oasst1" in str(info.value) and isinstance(info.value, UserError)


def test_hub_rows_load_like_a_file(monkeypatch, tmp_path):
    rows = small_tree()
    fake_datasets(monkeypatch, lambda name: {"train": rows[:6], "validation": rows[6:]})
    from_hub = oasst.load_records("hub:OpenAssistant/oasst1", SCHEMA)
    from_file = oasst.load_records(write_rows(tmp_path / "f.jsonl", rows), SCHEMA)
    assert as_json(from_hub) == as_json(from_file)
    fake_datasets(monkeypatch, lambda name: {"train": [row("a", "p", role="bot")]})
    with pytest.raises(UserError, match=r"hub:X/y\[train\]:1: role: unknown role"):
        oasst.read_messages("hub:X/y")
