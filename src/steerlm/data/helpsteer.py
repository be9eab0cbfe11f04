"""NVIDIA HelpSteer2 loader: `{prompt, response, helpfulness, correctness, coherence, complexity, verbosity}` rows
-> conversation records (SPEC §2) labelled with the `helpsteer` attributes.

HelpSteer2 (Wang et al. 2024, the data of NVIDIA's later SteerLM models) rates each response 0-4 on five
attributes. There is no conversation tree: a multi-turn prompt carries its earlier turns inline, in NeMo's markers,

    first user turn\\n<extra_id_1>Assistant\\nearlier answer\\n<extra_id_1>User\\nlast user turn

so `parse_prompt` splits it into alternating User/Assistant turns; a prompt whose markers do not alternate, start
with an Assistant turn, leave a turn empty or name another role is rejected with a located error. Both responses to
one prompt share a group key (`tree_id` = a hash of the prompt), so the train/validation split never separates them.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from steerlm.attributes import HELPSTEER, AttributeSchema
from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.errors import UserError

HUB_ID = "nvidia/HelpSteer2"
#: HelpSteer2's scale: every attribute is an integer 0..4.
LEVELS = 5
_MARKER = re.compile(r"\n?<extra_id_1>([^\n]*)\n")


def detect(obj: Any) -> bool:
    """Whether a first row looks like HelpSteer2 (prompt, response and its attribute columns)."""
    return isinstance(obj, dict) and {"prompt", "response"} <= obj.keys() and any(k in obj for k in HELPSTEER)


def parse_prompt(prompt: str) -> list[Turn]:
    """The turns of a HelpSteer2 prompt, ending with the User turn the response answers (ValueError with the
    reason when the markers are malformed)."""
    if not isinstance(prompt, str):
        raise ValueError(f"must be a string, not {type(prompt).__name__}")
    if "<extra_id_0>" in prompt or "<extra_id_2>" in prompt:
        raise ValueError("holds a system (<extra_id_0>) or label (<extra_id_2>) marker; only <extra_id_1> turns")
    parts = _MARKER.split(prompt)
    turns, role = [Turn(USER, parts[0])], USER
    for name, text in zip(parts[1::2], parts[2::2], strict=True):
        if name not in (USER, ASSISTANT):
            raise ValueError(f"unknown turn marker <extra_id_1>{name!r}; expected User or Assistant")
        if name == role:
            raise ValueError(f"two {name} turns in a row (turn {len(turns) + 1})")
        role = name
        turns.append(Turn(name, text))
    if "<extra_id_1>" in "".join(t.value for t in turns):
        raise ValueError("a <extra_id_1> marker not followed by a role name and a newline")
    empty = next((i for i, t in enumerate(turns) if not t.value.strip()), None)
    if empty is not None:
        raise ValueError(f"turn {empty + 1} ({turns[empty].role}) is empty")
    if turns[-1].role != USER:
        raise ValueError("ends with an Assistant turn; the last turn must be the User's that the response answers")
    return turns


def _levels(row: dict, schema: AttributeSchema) -> dict[str, int]:
    out = {}
    for name in schema.names:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise ValueError(f"{name}: expected an integer 0..{LEVELS - 1}, not {value!r}")
        if not 0 <= value <= LEVELS - 1:
            raise ValueError(f"{name}: {value} is outside 0..{LEVELS - 1}")
        # HelpSteer2's 0..4 onto the schema's 0..L-1 (the identity at L = 5)
        out[name] = schema.bucket(int(value) / (LEVELS - 1))
    return out


def row_to_record(row: Any, schema: AttributeSchema) -> Record:
    """One HelpSteer2 row as a record: the prompt's turns, then the response labelled with the schema's HelpSteer2
    attributes (ValueError naming the column when the row is malformed)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, not {type(row).__name__}")
    try:
        turns = parse_prompt(row.get("prompt"))
    except ValueError as e:
        raise ValueError(f"prompt: {e}") from None
    response = row.get("response")
    if not isinstance(response, str) or not response.strip():
        raise ValueError("response: expected a non-empty string")
    levels = _levels(row, schema)
    label = schema.render(levels) or None
    tree = "hs-" + hashlib.sha1(row["prompt"].encode("utf-8")).hexdigest()[:16]
    return Record([*turns, Turn(ASSISTANT, response, label)], extra={"tree_id": tree})


def to_records(rows: Iterable[tuple[int, Any]], file: str, schema: AttributeSchema, *, skip_invalid: bool = False,
               stats: Counter | None = None) -> list[Record]:  # fmt: skip
    """Records from `(line, row)` pairs; a malformed row is a UserError naming file, line and column, or, with
    `skip_invalid`, counted in `stats['invalid']`. Only HelpSteer2 attributes may be in the schema."""
    stats = Counter() if stats is None else stats
    others = [n for n in schema.names if n not in HELPSTEER]
    if others:
        raise UserError(f"{', '.join(others)} are not HelpSteer2 attributes; it has {', '.join(HELPSTEER)} "
                        "(--attributes=helpsteer --levels=5)",
                        field="attributes")  # fmt: skip
    out = []
    for line, row in rows:
        try:
            out.append(row_to_record(row, schema))
        except ValueError as e:
            column, _, reason = str(e).partition(": ")
            if not skip_invalid:
                raise UserError(reason or column, file=file, line=line, field=column if reason else None) from None
            stats["invalid"] += 1
    stats["conversations"] += len(out)
    return out


def read_rows(path: str | Path, *, skip_invalid: bool = False, stats: Counter | None = None) -> Iterator[tuple[int, Any]]:  # fmt: skip
    """`(line, row)` of a HelpSteer2 JSONL file (.jsonl or .jsonl.gz)."""
    from steerlm.io import read_jsonl

    stats = Counter() if stats is None else stats
    return read_jsonl(path, on_error=(lambda e: stats.update(invalid=1)) if skip_invalid else None)
