"""HH-RLHF: transcripts split into turns, the shared prefix as the prompt, records, and located errors."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from steerlm.data import hh
from steerlm.data.records import ASSISTANT, USER, record_from_json
from steerlm.errors import UserError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEV = DATA / "hh-rlhf" / "harmless-base-dev.jsonl.gz"
needs_data = pytest.mark.skipif(not DEV.exists(), reason="../shared/data is absent")

PROMPT = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."


def pair(chosen=" Why did the chicken cross the road?", rejected=" No.", prompt=PROMPT) -> dict:
    return {"chosen": prompt + "\n\nAssistant:" + chosen, "rejected": prompt + "\n\nAssistant:" + rejected}


def test_split_transcript():
    turns = hh.split_transcript(pair()["chosen"])
    assert [(t.role, t.value) for t in turns] == [
        (USER, "Hi there"),
        (ASSISTANT, "Hello! How can I help?"),
        (USER, "Tell me a joke."),
        (ASSISTANT, "Why did the chicken cross the road?"),
    ]
    # a marker repeated for the same speaker stays inside the turn, verbatim
    turns = hh.split_transcript("\n\nHuman: Q\n\nAssistant: A1\n\nAssistant: A2")
    assert [(t.role, t.value) for t in turns] == [(USER, "Q"), (ASSISTANT, "A1\n\nAssistant: A2")]
    assert len(hh.split_transcript("Human: Q\n\nAssistant: A")) == 2  # no leading blank line


@pytest.mark.parametrize(
    "text, reason",
    [
        ("just text", "no '"),
        ("Preamble\n\nHuman: Q\n\nAssistant: A", "text before the first"),
        ("\n\nAssistant: A\n\nHuman: Q\n\nAssistant: A", "first turn must be a Human"),
        ("\n\nHuman: Q\n\nAssistant: A\n\nHuman: more?", "last turn must be an Assistant"),
        ("\n\nHuman: Q\n\nAssistant: ", "turn 2 .Assistant. is empty"),
        (None, "must be a string"),
    ],
)
def test_transcripts_that_do_not_parse(text, reason):
    with pytest.raises(ValueError, match=reason):
        hh.split_transcript(text)


def test_pair_prompt_is_the_shared_prefix():
    p = hh.pair_from_json(pair(), "x:1")
    assert [t.role for t in p.prompt] == [USER, ASSISTANT, USER] and p.prompt[-1].value == "Tell me a joke."
    assert (p.chosen, p.rejected) == ("Why did the chicken cross the road?", "No.")
    chosen, rejected = hh.to_records([p])
    assert chosen.extra == {"pair_id": "x:1", "side": "chosen"} and rejected.extra["side"] == "rejected"
    assert all(t.label is None for t in chosen.conversations + rejected.conversations)
    assert chosen.conversations[:-1] == rejected.conversations[:-1]
    assert chosen.conversations[-1].value == p.chosen and rejected.conversations[-1].value == p.rejected
    assert [r.to_json() for r in hh.to_records([p], sides=["chosen"])] == [chosen.to_json()]


def test_bad_pairs_are_located_or_skipped(tmp_path):
    diverging = pair()
    diverging["rejected"] = diverging["rejected"].replace("Tell me a joke.", "Tell me a story.")
    lines = [
        json.dumps(pair()),
        json.dumps({"chosen": pair()["chosen"]}),  # 2: rejected missing
        json.dumps(diverging),  # 3: no shared prompt
        json.dumps(pair(rejected=" ")),  # 4: empty answer
        "[1, 2",  # 5: malformed JSON
        json.dumps(pair(rejected=" Why did the chicken cross the road?")),  # 6: identical, no preference
        json.dumps(pair()),
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected = {2: ("rejected", "missing"), 3: ("rejected", "differ before"), 4: ("rejected", "is empty")}
    for line, (field, reason) in expected.items():
        one = tmp_path / f"one{line}.jsonl"
        one.write_text(lines[line - 1] + "\n")
        with pytest.raises(UserError, match=reason) as info:
            hh.read_pairs(one)
        assert (info.value.file, info.value.line, info.value.field) == (str(one), 1, field)
    with pytest.raises(UserError, match="hh.jsonl:2: rejected: missing"):
        hh.read_pairs(path)
    stats = Counter()
    pairs = hh.read_pairs(path, skip_invalid=True, stats=stats)
    assert [p.pair_id for p in pairs] == ["hh.jsonl:1", "hh.jsonl:7"]
    assert stats == Counter({"invalid": 4, "identical": 1, "pairs": 2})


@needs_data
def test_real_file():
    with pytest.raises(UserError, match="harmless-base-dev.jsonl.gz:76: chosen: turn 4 .Assistant. is empty"):
        hh.read_pairs(DEV)
    stats = Counter()
    pairs = hh.read_pairs(DEV, skip_invalid=True, stats=stats)
    assert len(pairs) == stats["pairs"] == 2019 and stats["invalid"] == 4
    records = hh.to_records(pairs)
    assert len(records) == 2 * len(pairs)
    for r in records[:200]:
        again = record_from_json(r.to_json())
        assert again.conversations[0].role == USER and again.conversations[-1].role == ASSISTANT
    roles_alternate = all(
        a.role != b.role for r in records for a, b in zip(r.conversations, r.conversations[1:], strict=False)
    )
    assert roles_alternate


def test_hub_rows(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name: {"test": [pair()]}))
    (p,) = hh.read_pairs("hub:Anthropic/hh-rlhf")
    assert p.pair_id == "hub:Anthropic/hh-rlhf[test]:1" and p.rejected == "No."
