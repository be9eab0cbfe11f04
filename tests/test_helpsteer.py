"""HelpSteer2 rows -> records: single- and multi-turn prompts, malformed rows with located errors, and `steerlm
prepare` on the real sample."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from steerlm import cli
from steerlm.attributes import AttributeSchema
from steerlm.data import helpsteer
from steerlm.data.records import ASSISTANT, USER, read_records
from steerlm.errors import UserError

L5 = AttributeSchema("helpsteer", 5)
ROW = {"helpfulness": 3, "correctness": 4, "coherence": 4, "complexity": 2, "verbosity": 1}


def sample(shared_data):
    return shared_data / "helpsteer2" / "helpsteer2-train-first100.jsonl"


def test_single_turn_row_is_one_labelled_answer():
    record = helpsteer.row_to_record({"prompt": "c#", "response": "C# is a language.", **ROW}, L5)
    assert [(t.role, t.value) for t in record.conversations] == [(USER, "c#"), (ASSISTANT, "C# is a language.")]
    assert record.conversations[-1].label == "helpfulness:3,correctness:4,coherence:4,complexity:2,verbosity:1"
    assert record.conversations[0].label is None
    assert record.extra["tree_id"].startswith("hs-")


def test_multi_turn_prompt_becomes_alternating_turns():
    prompt = "What is 2+2?\n<extra_id_1>Assistant\n4.\n<extra_id_1>User\nAnd 3+3?"
    record = helpsteer.row_to_record({"prompt": prompt, "response": "6.", **ROW}, L5)
    assert [(t.role, t.value) for t in record.conversations] == [
        (USER, "What is 2+2?"), (ASSISTANT, "4."), (USER, "And 3+3?"), (ASSISTANT, "6.")
    ]  # fmt: skip
    # only the scored response carries a label; the earlier answer was not rated
    assert [t.label is not None for t in record.conversations] == [False, False, False, True]
    # both answers to one prompt share the split group; another prompt does not
    twin = helpsteer.row_to_record({"prompt": prompt, "response": "Six.", **ROW}, L5)
    other = helpsteer.row_to_record({"prompt": "And 3+3?", "response": "6.", **ROW}, L5)
    assert twin.extra["tree_id"] == record.extra["tree_id"] != other.extra["tree_id"]


def test_levels_are_rescaled_to_the_schema():
    record = helpsteer.row_to_record({"prompt": "p", "response": "r", **ROW}, AttributeSchema("helpsteer", 9))
    # 0..4 onto 0..8: twice the level
    assert record.conversations[-1].label == "helpfulness:6,correctness:8,coherence:8,complexity:4,verbosity:2"


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"prompt": "a\n<extra_id_1>User\nb", "response": "r"}, "prompt", "two User turns in a row"),
        ({"prompt": "a\n<extra_id_1>Assistant\nb", "response": "r"}, "prompt", "ends with an Assistant turn"),
        ({"prompt": "a\n<extra_id_1>Bot\nb", "response": "r"}, "prompt", "unknown turn marker"),
        (
            {"prompt": "a\n<extra_id_1>Assistant\n\n<extra_id_1>User\nb", "response": "r"},
            "prompt",
            "turn 2 (Assistant) is empty",
        ),  # fmt: skip
        ({"prompt": "<extra_id_0>System\nx\n<extra_id_1>User\nb", "response": "r"}, "prompt", "system"),
        ({"prompt": "a", "response": ""}, "response", "non-empty string"),
        ({"prompt": "a", "response": "r", "helpfulness": 5}, "helpfulness", "outside 0..4"),
        ({"prompt": "a", "response": "r", "coherence": 2.5}, "coherence", "expected an integer"),
    ],
)
def test_malformed_rows_are_located_errors(tmp_path, row, field, reason):
    path = tmp_path / "hs.jsonl"
    good = {"prompt": "p", "response": "r", **ROW}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**ROW, **row}) + "\n")
    with pytest.raises(UserError) as e:
        helpsteer.to_records(helpsteer.read_rows(path), str(path), L5)
    assert (e.value.file, e.value.line, e.value.field) == (str(path), 2, field)
    assert reason in e.value.reason
    stats = Counter()
    records = helpsteer.to_records(helpsteer.read_rows(path), str(path), L5, skip_invalid=True, stats=stats)
    assert len(records) == 1 and stats["invalid"] == 1


def test_non_helpsteer_attributes_are_refused():
    with pytest.raises(UserError, match="not HelpSteer2 attributes"):
        helpsteer.to_records([(1, {"prompt": "p", "response": "r", **ROW})], "f", AttributeSchema("steerable"))


def test_prepare_reads_the_real_sample(shared_data, tmp_path, capsys):
    out = tmp_path / "hs"
    code = cli.run(["prepare", f"--source={sample(shared_data)}", "--attributes=helpsteer", "--levels=5",
                    f"--out={out}", "--val_fraction=0.2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    records = read_records(out / "train.jsonl") + read_records(out / "val.jsonl")
    assert len(records) == 100
    rows = [json.loads(x) for x in sample(shared_data).read_text().splitlines()]
    by_response = {r.conversations[-1].value: r for r in records}
    for row in rows:
        label = L5.parse(by_response[row["response"]].conversations[-1].label)
        assert label == {n: row[n] for n in L5.names}
    # the two answers of a prompt land on the same side of the split
    train_prompts = {r.conversations[0].value for r in read_records(out / "train.jsonl")}
    assert not train_prompts & {r.conversations[0].value for r in read_records(out / "val.jsonl")}
