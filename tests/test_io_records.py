import json
import re
from collections import Counter

import pytest

from steerlm.data.records import Record, Turn, read_records, write_records
from steerlm.errors import UserError
from steerlm.io import atomic_write


def _write(path, lines):
    path.write_bytes(b"".join(x if isinstance(x, bytes) else (x + "\n").encode() for x in lines))
    return path


GOOD = json.dumps({"system": "s", "conversations": [{"from": "User", "value": "hi", "label": None}], "mask": "User"})


@pytest.mark.parametrize(
    "line,needle",
    [
        ("{not json", ":2: malformed JSON"),
        (json.dumps({"system": "s"}), ":2: conversations: missing"),
        (
            json.dumps({"conversations": [{"from": "Bot", "value": "x"}]}),
            ":2: conversations[0].from: unknown role 'Bot'",
        ),
        (json.dumps({"conversations": [{"from": "User", "value": "  "}]}), ":2: conversations[0].value: empty text"),
        (json.dumps({"conversations": [{"from": "User"}]}), ":2: conversations[0].value: missing"),
        (b"\xff\xfe bad bytes\n", ":2: not valid UTF-8"),
    ],
)
def test_bad_lines_name_file_line_field(tmp_path, line, needle):
    path = _write(tmp_path / "r.jsonl", [GOOD, line, GOOD])
    with pytest.raises(UserError, match=re.escape(needle)) as e:
        read_records(path)
    assert str(path) in str(e.value)
    stats = Counter()
    assert len(read_records(path, skip_invalid=True, stats=stats)) == 2
    assert stats["invalid"] == 1


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl")


def test_round_trip_keeps_extra_keys(tmp_path):
    rec = Record([Turn("User", "q"), Turn("Assistant", "a", "quality:3", {"gt_label": "quality:4"})], extra={"id": 7})
    write_records(tmp_path / "o.jsonl", [rec])
    assert read_records(tmp_path / "o.jsonl") == [rec]
    assert json.loads((tmp_path / "o.jsonl").read_text())["conversations"][1]["gt_label"] == "quality:4"


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
