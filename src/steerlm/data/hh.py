"""Anthropic HH-RLHF loader: `{"chosen", "rejected"}` transcripts -> preference pairs and records (SPEC §2).

A transcript reads `"\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant: ..."`; it is split into turns
on those markers. Chosen and rejected share every turn but the last Assistant answer: that shared prefix is the
prompt. The pairs feed reward models (SPEC §6); as records (labels null) they feed SFT on chosen responses.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlm.data.records import ASSISTANT, USER, Record, Turn
from steerlm.errors import UserError
from steerlm.io import read_jsonl

HUMAN_MARKER, ASSISTANT_MARKER = "\n\nHuman: ", "\n\nAssistant: "
_MARKERS = {HUMAN_MARKER: USER, ASSISTANT_MARKER: ASSISTANT}
_SPLIT = re.compile(r"(\n\nHuman: |\n\nAssistant: )")
SIDES = ("chosen", "rejected")


@dataclass
class Pair:
    """One HH-RLHF comparison: the shared prompt turns and the two answers to it."""

    pair_id: str
    prompt: list[Turn]
    """The shared turns, ending with a User turn."""
    chosen: str
    rejected: str

    def record(self, side: str) -> Record:
        """The chosen or rejected conversation as a record (labels null; extras `pair_id`, `side`)."""
        answer = self.chosen if side == "chosen" else self.rejected
        turns = [Turn(t.role, t.value) for t in self.prompt] + [Turn(ASSISTANT, answer)]
        return Record(turns, extra={"pair_id": self.pair_id, "side": side})


def split_transcript(text: str) -> list[Turn]:
    """Split one transcript into turns (raises ValueError with the reason when it does not parse).

    A marker repeated for the same speaker (e.g. `\\n\\nAssistant: ` inside an answer, which happens in the real data)
    does not start a new turn: the text between real changes of speaker is kept verbatim, markers included, so
    nothing is lost or invented.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a string, not {type(text).__name__}")
    if text.startswith(("Human: ", "Assistant: ")):  # tolerate a transcript without the leading blank line
        text = "\n\n" + text
    parts = _SPLIT.split(text)
    if len(parts) < 3:
        raise ValueError("no '\\n\\nHuman: ' / '\\n\\nAssistant: ' markers")
    if parts[0].strip():
        raise ValueError(f"text before the first '\\n\\nHuman: ' marker: {parts[0][:40]!r}")
    turns: list[Turn] = []
    for marker, value in zip(parts[1::2], parts[2::2], strict=True):
        role = _MARKERS[marker]
        if turns and turns[-1].role == role:
            turns[-1].value += marker + value
        else:
            turns.append(Turn(role, value))
    for i, t in enumerate(turns):
        if not t.value.strip():
            raise ValueError(f"turn {i + 1} ({t.role}) is empty")
    if turns[0].role != USER:
        raise ValueError("the first turn must be a Human turn")
    if turns[-1].role != ASSISTANT:
        raise ValueError("the last turn must be an Assistant turn")
    return turns


def pair_from_json(obj: Any, pair_id: str, *, file: str | None = None, line: int | None = None) -> Pair:
    """Validate one `{"chosen", "rejected"}` object; errors name file, line and field."""
    if not isinstance(obj, dict):
        raise UserError(f"expected a JSON object, got {type(obj).__name__}", file=file, line=line, field="pair")
    sides = {}
    for side in SIDES:
        if side not in obj:
            raise UserError("missing", file=file, line=line, field=side)
        try:
            sides[side] = split_transcript(obj[side])
        except ValueError as e:
            raise UserError(str(e), file=file, line=line, field=side) from None
    chosen, rejected = sides["chosen"], sides["rejected"]
    if [(t.role, t.value) for t in chosen[:-1]] != [(t.role, t.value) for t in rejected[:-1]]:
        raise UserError("chosen and rejected differ before their last Assistant turn (no shared prompt)",
                        file=file, line=line, field="rejected")  # fmt: skip
    return Pair(pair_id, [Turn(t.role, t.value) for t in chosen[:-1]], chosen[-1].value, rejected[-1].value)


def pairs_from_rows(rows: Iterable[tuple[int, Any]], file: str, *, skip_invalid: bool = False,
                    stats: Counter | None = None) -> Iterator[Pair]:  # fmt: skip
    """Pairs from `(line, object)` rows; `file` names the source in errors and pair ids (`NAME:LINE`).

    `stats` gets `pairs`, `invalid` (skipped with `skip_invalid`) and `identical` (chosen == rejected: no preference,
    left out).
    """
    stats = Counter() if stats is None else stats
    name = file if file.startswith("hub:") else Path(file).name
    for line, obj in rows:
        try:
            pair = pair_from_json(obj, f"{name}:{line}", file=file, line=line)
        except UserError as e:
            if not skip_invalid:
                raise UserError(e.reason + " (--skip_invalid skips and counts such pairs)", file=e.file,
                                line=e.line, field=e.field) from None  # fmt: skip
            stats["invalid"] += 1
            continue
        if pair.chosen == pair.rejected:
            stats["identical"] += 1
            continue
        stats["pairs"] += 1
        yield pair


def read_pairs(source: str | Path, *, rows: Iterable[tuple[str, int, dict]] | None = None, skip_invalid: bool = False,
               stats: Counter | None = None) -> list[Pair]:  # fmt: skip
    """Pairs of a local `.jsonl[.gz]` file or `hub:ID` (e.g. `hub:Anthropic/hh-rlhf`, every split; `rows`: already
    loaded `oasst.load_hub_rows(ID)`)."""
    stats = Counter() if stats is None else stats
    source = str(source)
    if source.startswith("hub:"):
        from steerlm.data.oasst import load_hub_rows

        out = []
        for split, i, row in load_hub_rows(source[4:]) if rows is None else rows:
            out += pairs_from_rows([(i, row)], f"{source}[{split}]", skip_invalid=skip_invalid, stats=stats)
        return out

    def count(_error: UserError) -> None:
        stats["invalid"] += 1

    rows = read_jsonl(source, on_error=count if skip_invalid else None)
    return list(pairs_from_rows(rows, source, skip_invalid=skip_invalid, stats=stats))


def to_records(pairs: Iterable[Pair], sides: Iterable[str] = SIDES) -> list[Record]:
    """Records of each pair's chosen and/or rejected conversation, pair by pair."""
    sides = list(sides)
    for side in sides:
        if side not in SIDES:
            raise ValueError(f"side must be 'chosen' or 'rejected', not {side!r}")
    return [pair.record(side) for pair in pairs for side in sides]


def detect(obj: Any) -> bool:
    """Whether one JSON object looks like an HH-RLHF pair."""
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj
