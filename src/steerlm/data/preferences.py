"""Preference data for the RLHF baseline (SPEC §6): comparisons for reward models, demonstrations for SFT, prompts
for PPO.

- Comparisons: a prompt with its ranked responses and every ordered pair among them. OASST siblings (assistant
  replies to one message) ranked by `rank` give all K·(K-1)/2 pairs; an HH-RLHF pair gives one (chosen, rejected).
- Demonstrations: conversations whose every assistant turn is the best of its siblings (OASST rank 0, or the
  highest `quality` level), or the HH-RLHF chosen conversations; labels are dropped (plain SFT, SPEC §6).
- Prompts: conversations cut after a User turn, for PPO rollouts.

Any input file is recognised by its first line: HH-RLHF pairs, OASST flat rows or trees, or conversation records
(whose turns may carry the `message_id`/`rank` extras that OASST flattening writes).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerlm.attributes import AttributeSchema
from steerlm.data import formats, hh, oasst
from steerlm.data.records import ASSISTANT, USER, Record, Turn, read_records, record_from_json
from steerlm.errors import UserError
from steerlm.io import read_jsonl

SELECT_BY = ("rank", "quality")


@dataclass
class Comparisons:
    """One prompt, its responses (best first) and the comparisons among them."""

    prompt: Record
    """The conversation so far, ending with a User turn."""
    responses: list[str]
    """Candidate answers, best first."""
    pairs: list[tuple[int, int]]
    """(better, worse) indices into `responses`: all K·(K-1)/2 pairs of distinct ranks."""
    group: str
    """The unit of the train/validation split: an OASST tree (paths of one tree share text) or an HH pair."""
    source: str
    """'oasst', 'hh' or 'records': which kind of input it came from (metrics are reported per source)."""
    origin: str = ""
    """The input it was read from, as its counts are reported (e.g. the file name); set by the reader."""

    def conversation(self, i: int) -> Record:
        """The prompt answered with response `i`."""
        return with_answer(self.prompt, self.responses[i])


def with_answer(prompt: Record, answer: str) -> Record:
    """`prompt` (ending with a User turn) followed by an Assistant turn `answer`."""
    turns = [Turn(t.role, t.value, t.label, dict(t.extra)) for t in prompt.conversations]
    return Record(turns + [Turn(ASSISTANT, answer)], prompt.system, prompt.mask, prompt.type, dict(prompt.extra))


def _prefix(record: Record, n: int) -> Record:
    turns = [Turn(t.role, t.value, None, dict(t.extra)) for t in record.conversations[:n]]
    return Record(turns, record.system, record.mask, record.type, dict(record.extra))


# ---------------------------------------------------------------- sibling groups


@dataclass
class _Sibling:
    message_id: str
    text: str
    rank: int | None
    quality: int | None


def _quality(label: str | None) -> int | None:
    # Read `quality` from an attribute string without a schema: records may carry any attribute set (SPEC §1).
    for part in (label or "").split(","):
        key, _, value = part.partition(":")
        if key == "quality" and value.isdigit():
            return int(value)
    return None


def _parent_key(record: Record, i: int) -> str:
    """What identifies the message an assistant turn answers: its `message_id`, else a hash of the text so far."""
    parent = record.conversations[i - 1]
    if "message_id" in parent.extra:
        return str(parent.extra["message_id"])
    text = "\0".join(f"{t.role}\0{t.value}" for t in record.conversations[:i])
    return "text:" + hashlib.sha1((record.system + "\0" + text).encode()).hexdigest()


def sibling_groups(records: Iterable[Record]) -> dict[str, tuple[Record, list[_Sibling], str]]:
    """Parent key -> (prompt up to the parent, distinct assistant replies to it, split group).

    Paths of one tree repeat their shared prefixes; an assistant message is counted once (by `message_id`, else by
    text)."""
    groups: dict[str, tuple[Record, list[_Sibling], str]] = {}
    seen: dict[str, set] = defaultdict(set)
    for n, record in enumerate(records):
        for i, turn in enumerate(record.conversations):
            if turn.role != ASSISTANT or i == 0 or record.conversations[i - 1].role != USER:
                continue
            key = _parent_key(record, i)
            if key not in groups:
                group = str(record.extra.get("tree_id", f"record-{n}"))
                groups[key] = (_prefix(record, i), [], group)
            mid = str(turn.extra.get("message_id", turn.value))
            if mid in seen[key]:
                continue
            seen[key].add(mid)
            rank = turn.extra.get("rank")
            rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
            groups[key][1].append(_Sibling(mid, turn.value, rank, _quality(turn.label)))
    return groups


# ---------------------------------------------------------------- comparisons


def ranked_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """All (better, worse) index pairs of responses with these ranks (lower rank = better; equal ranks give no
    pair). Pairs are listed by the better response's rank, then the worse one's: K distinct ranks give K·(K-1)/2."""
    order = sorted(range(len(ranks)), key=lambda i: (ranks[i], i))
    return [(a, b) for x, a in enumerate(order) for b in order[x + 1 :] if ranks[a] < ranks[b]]


def comparisons_from_records(records: Iterable[Record], source: str = "oasst") -> list[Comparisons]:
    """Comparisons among ranked sibling replies (OASST `rank`, SPEC §6); unranked replies are left out, and a prompt
    with fewer than two ranked replies gives nothing."""
    out = []
    for prompt, siblings, group in sibling_groups(records).values():
        ranked = sorted((s for s in siblings if s.rank is not None), key=lambda s: s.rank)
        pairs = ranked_pairs([s.rank for s in ranked])
        if pairs:
            out.append(Comparisons(prompt, [s.text for s in ranked], pairs, group, source))
    return out


def comparisons_from_hh(pairs: Iterable[hh.Pair]) -> list[Comparisons]:
    """One comparison per HH-RLHF pair: chosen beats rejected; each pair is its own split group."""
    return [
        Comparisons(
            Record([Turn(t.role, t.value) for t in p.prompt], extra={"pair_id": p.pair_id}),
            [p.chosen, p.rejected],
            [(0, 1)],
            p.pair_id,
            "hh",
        )  # fmt: skip
        for p in pairs
    ]


def split(items: list, val_fraction: float, seed: int, key=lambda c: c.group) -> tuple[list, list]:
    """(train, validation) by group, as `oasst.split_by_tree` does: sorted groups shuffled with `seed`, at least one
    validation group when the fraction is positive; order kept within each part."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    groups = sorted({key(c) for c in items})
    n_val = round(val_fraction * len(groups))
    if val_fraction > 0 and len(groups) >= 2:
        n_val = min(max(n_val, 1), len(groups) - 1)
    random.Random(seed).shuffle(groups)
    val_groups = set(groups[:n_val])
    return [c for c in items if key(c) not in val_groups], [c for c in items if key(c) in val_groups]


# ---------------------------------------------------------------- demonstrations (SFT on the best responses)


def _best(siblings: list[_Sibling], by: str) -> str:
    def score(s: _Sibling):
        rank = s.rank if s.rank is not None else 10**6
        quality = -(s.quality if s.quality is not None else -1)
        return (rank, quality) if by == "rank" else (quality, rank)

    return min(siblings, key=score).message_id


def demonstrations_from_records(records: list[Record], by: str = "rank") -> tuple[list[Record], Counter]:
    """Conversations whose every assistant turn is the best reply to its message: rank 0 (`by="rank"`; unranked
    siblings fall back to the higher quality level) or the highest quality level (`by="quality"`, ties by rank).
    Trailing user turns are cut and labels dropped. Returns (records, counts)."""
    if by not in SELECT_BY:
        raise UserError(f"must be one of {SELECT_BY}, not {by!r}", field="select_by")
    groups = sibling_groups(records)
    best = {key: _best(siblings, by) for key, (_, siblings, _) in groups.items()}
    stats: Counter = Counter()
    out, seen = [], set()
    for record in records:
        keep = True
        for i, turn in enumerate(record.conversations):
            if turn.role == ASSISTANT and i > 0 and record.conversations[i - 1].role == USER:
                if best[_parent_key(record, i)] != str(turn.extra.get("message_id", turn.value)):
                    keep = False
                    break
        if not keep:
            stats["not_best"] += 1
            continue
        last = max((i for i, t in enumerate(record.conversations) if t.role == ASSISTANT), default=-1)
        if last < 1:
            stats["no_answer"] += 1
            continue
        demo = _prefix(record, last + 1)
        text = tuple((t.role, t.value) for t in demo.conversations)
        if text in seen:  # a path cut at its last answer can repeat another path
            stats["duplicate"] += 1
            continue
        seen.add(text)
        out.append(demo)
    stats["demonstrations"] = len(out)
    return out, stats


def demonstrations_from_hh(pairs: Iterable[hh.Pair]) -> list[Record]:
    """The chosen conversation of each HH-RLHF pair (labels null)."""
    return hh.to_records(pairs, sides=["chosen"])


# ---------------------------------------------------------------- prompts


def prompt_of(record: Record) -> Record | None:
    """The conversation up to and including its last User turn (None if it has none)."""
    last = max((i for i, t in enumerate(record.conversations) if t.role == USER), default=-1)
    return _prefix(record, last + 1) if last >= 0 else None


#: One prompt of a prompts file: the conversation to answer (a plain string stays a string, so that the caller's
#: system prompt applies), its own attribute levels (a mapping or an attribute string; {} when none) and the line's
#: other keys (e.g. MT-Bench's `question_id`), which `steerlm generate --out` writes back beside the answer.
PromptItem = tuple[Record | str, dict | str, dict]


def prompt_from_json(obj: Any, *, file: str | None = None, line: int | None = None) -> PromptItem:
    """A prompt from one JSON line (SPEC §2): a string, `{"prompt": str, "attributes": ...}`, MT-Bench's
    `{"turns": [...]}` (the first turn), or a conversation record (cut after its last User turn; its `attributes`
    key, if any, gives its levels). The one parser of a prompt line (generate, evaluate, ppo)."""
    attrs: Any = {}
    extra: dict = {}
    if isinstance(obj, dict) and "conversations" not in obj:
        if isinstance(obj.get("prompt"), str):
            attrs = obj.get("attributes") or {}
            extra = {k: v for k, v in obj.items() if k not in ("prompt", "attributes")}
            obj = obj["prompt"]
        elif isinstance(obj.get("turns"), list) and obj["turns"] and isinstance(obj["turns"][0], str):
            extra = {k: v for k, v in obj.items() if k != "turns"}
            obj = obj["turns"][0]
        else:
            raise UserError('expected a string, {"prompt": ...}, {"turns": [...]} or a conversation record',
                            file=file, line=line)  # fmt: skip
    if not isinstance(attrs, (dict, str)):
        raise UserError("must be a mapping of attribute levels", file=file, line=line, field="attributes")
    if isinstance(obj, str):
        if not obj.strip():
            raise UserError("empty prompt", file=file, line=line, field="prompt")
        return obj, attrs, extra
    record = record_from_json(obj, file=file, line=line)
    prompt = prompt_of(record)
    if prompt is None:
        raise UserError("the conversation has no User turn to answer", file=file, line=line, field="conversations")
    attrs = obj.get("attributes") or {}
    if not isinstance(attrs, (dict, str)):
        raise UserError("must be a mapping of attribute levels", file=file, line=line, field="attributes")
    return prompt, attrs, extra


def prompt_record(conversation: Record | str) -> Record:
    """A prompt as a record (a plain string becomes one User turn under the default system prompt)."""
    return Record([Turn(USER, conversation)]) if isinstance(conversation, str) else conversation


# ---------------------------------------------------------------- reading any supported file


def read_source(path: str | Path, schema: AttributeSchema | None = None, *, lang: str | None = "en",
                skip_invalid: bool = False, stats: Counter | None = None) -> tuple[str, list]:  # fmt: skip
    """(kind, items): HH-RLHF pairs (`kind='hh'`) or conversation records (OASST flattened, or records as written)."""
    stats = Counter() if stats is None else stats
    kind = formats.detect_file(path)
    if kind == "hh":
        return kind, hh.read_pairs(path, skip_invalid=skip_invalid, stats=stats)
    if kind in ("oasst", "oasst-trees"):
        schema = schema or AttributeSchema()
        return "oasst", oasst.load_records(path, schema, lang=lang, skip_invalid=skip_invalid, stats=stats)
    return "records", read_records(path, skip_invalid=skip_invalid, stats=stats)


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Prompts of any supported file, the one prompt reader: HH pairs and OASST give their prompts (each distinct
    one once, no attributes), JSONL of strings / `{"prompt"}` / `{"turns"}` / records give one each
    (`prompt_from_json`)."""
    kind = formats.detect_file(path)
    if kind == "hh":
        return [(Record([Turn(t.role, t.value) for t in p.prompt]), {}, {}) for p in hh.read_pairs(path)]
    if kind in ("oasst", "oasst-trees"):
        _, records = read_source(path)
        return [(prompt, {}, {}) for prompt, _, _ in sibling_groups(records).values()]
    return [prompt_from_json(obj, file=str(path), line=line) for line, obj in read_jsonl(path)]
