"""The one check that the tokens a stage actually uses still mean something.

Text that passes every check as text can lose its meaning once it is tokenized and cut to a maximum length:
- an SFT or generative-APM example whose trainable tokens were all cut off: nothing left to learn (SPEC §4, NeMo's
  data_clean step);
- a comparison whose two sides became the same tokens (an uncased or whitespace-normalising tokenizer such as
  MiniLM's, or truncation that kept only a shared part): its label says nothing, and float noise decides whether a
  held-out accuracy counts it right or wrong;
- a prompt that leaves no room for an answer in the length it is allowed (PPO rollouts, the server).

Every stage that turns text into training or evaluation rows (SFT, APM, reward model, PPO prompts, evaluation pairs)
asks the same three questions here, on the token ids it will feed the model, and answers them the same way through
`Rows`: drop the row and count it under the reason's name, or (`refuse=True`) stop with a `UserError` that names
the file, line and field.

Comparisons are truncated by one rule, `truncate_comparison`: the part that decides the pair (the answers) is kept
and the context every side shares is cut first, from the left (docs/rlhf.md, "Truncation of comparisons").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from steerlm.errors import UserError

#: Label of a token the loss ignores (SPEC §4; `templates.IGNORE_INDEX`, PyTorch's cross-entropy default).
IGNORE_INDEX = -100

#: The reasons, as the names rows are counted under (summaries, `summary.json`, meta files).
NOTHING_TO_LEARN = "no trainable tokens after truncation"
IDENTICAL = "identical after tokenization"
NO_ROOM = "no room for an answer"

_EXPLAIN = {
    NOTHING_TO_LEARN: "no trainable token is left after tokenization and truncation (nothing to learn)",
    IDENTICAL: "the two sides are the same tokens after tokenization and truncation (the comparison says nothing)",
    NO_ROOM: "the prompt leaves no room for an answer",
}


# ---------------------------------------------------------------- the three questions


def nothing_to_learn(labels: Sequence[int]) -> str | None:
    """`NOTHING_TO_LEARN` when every label is IGNORE_INDEX (or there are none), else None."""
    return NOTHING_TO_LEARN if all(x == IGNORE_INDEX for x in labels) else None


def identical(a: Sequence[int], b: Sequence[int]) -> str | None:
    """`IDENTICAL` when the two token sequences a model reads for the two sides of a comparison are equal."""
    return IDENTICAL if list(a) == list(b) else None


def no_room(prompt_tokens: int, limit: int | None, answer_tokens: int = 1) -> str | None:
    """`NO_ROOM` when a prompt of `prompt_tokens` plus `answer_tokens` (at least one) exceeds `limit` (None or 0:
    no limit known)."""
    if not limit:
        return None
    return NO_ROOM if prompt_tokens + max(1, answer_tokens) > limit else None


def room_left(prompt_tokens: int, limit: int | None) -> int | None:
    """Tokens an answer may still use after a prompt of `prompt_tokens` (None when no limit is known)."""
    return None if not limit else max(0, limit - prompt_tokens)


# ---------------------------------------------------------------- acting on the answer, the same way everywhere


class Rows:
    """Drop-and-count or refuse: `keep(problem, ...)` is True when `problem` is None; otherwise the row is counted in
    `counts[problem]` and dropped (False), or, with `refuse`, a `UserError` names where it is."""

    def __init__(self, counts: Counter | None = None, *, refuse: bool = False, hint: str = ""):
        self.counts: Counter = Counter() if counts is None else counts
        self.refuse = refuse
        self.hint = hint
        """Appended to a refusal: how to let such rows be dropped instead (e.g. a flag)."""

    def keep(self, problem: str | None, *, file: str | None = None, line: int | None = None,
             field: str | None = None, detail: str = "") -> bool:  # fmt: skip
        if problem is None:
            return True
        if self.refuse:
            message = _EXPLAIN.get(problem, problem) + (f" ({detail})" if detail else "") + self.hint
            raise UserError(message, file=file, line=line, field=field)
        self.counts[problem] += 1
        return False

    def dropped(self) -> dict[str, int]:
        """The counts of dropped rows by reason (only reasons that occurred)."""
        return {k: v for k, v in self.counts.items() if v}


def distinct_pairs(ids: Sequence[Sequence[int]], pairs: Iterable[tuple[int, int]], rows: Rows, **where) -> list:
    """The (better, worse) index pairs whose two sides differ as tokens; the others go through `rows` (`where`:
    file/line/field of the comparison, for a refusal)."""
    return [(a, b) for a, b in pairs if rows.keep(identical(ids[a], ids[b]), **where)]


# ---------------------------------------------------------------- truncation of comparisons


def truncate_comparison(seqs: Sequence[Sequence[int]], max_length: int, special_ids: Iterable[int] = ()) -> list:
    """Cut the token sequences of one comparison (the same context with different answers) to `max_length` each,
    keeping the part that decides it.

    Each sequence is `head + body + tail`, where head and tail are the special tokens every sequence starts and ends
    with (e.g. [CLS] ... [SEP], or a final EOS a causal reward model reads its score at); they are kept. The bodies
    share a prefix (the context, and whatever the answers start with alike) and may share a suffix (an ending the
    answers have in common). What has to go is cut in this order, the same amount from every sequence so that all
    sides keep seeing the same context:
    1. the shared prefix, from the left (the oldest context first);
    2. the shared suffix, from the right;
    3. only then the differing parts, each from its right (their first tokens, where they differ, stay).
    Sequences that fit are returned unchanged. Two sides that differ before truncation still differ after it
    (whenever `max_length` leaves room for one body token); equal sides stay equal (the caller drops them).
    """
    seqs = [list(s) for s in seqs]
    if not seqs or all(len(s) <= max_length for s in seqs):
        return seqs
    special = set(special_ids)
    head = _common_edge(seqs, special, from_end=False)
    tail = _common_edge(seqs, special, from_end=True)
    bodies = [s[head : len(s) - tail] for s in seqs]
    prefix = _common_prefix(bodies)
    shortest = min(len(b) for b in bodies)
    suffix = _common_prefix([b[::-1] for b in bodies], limit=shortest - prefix)
    need = max(len(s) for s in seqs) - max_length
    cut_prefix = min(need, prefix)
    cut_suffix = min(need - cut_prefix, suffix)
    budget = max(0, max_length - head - tail)
    out = []
    for s, b in zip(seqs, bodies, strict=True):
        kept = b[cut_prefix : len(b) - cut_suffix]
        out.append((s[:head] + kept[:budget] + s[len(s) - tail :])[:max_length] if max_length > 0 else [])
    return out


def _common_prefix(seqs: Sequence[Sequence[int]], limit: int | None = None) -> int:
    n = min(len(s) for s in seqs)
    if limit is not None:
        n = min(n, limit)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_edge(seqs: list[list[int]], special: set[int], from_end: bool) -> int:
    """How many special tokens every sequence starts (or ends) with, the same ones (at most half of the shortest)."""
    views = [s[::-1] if from_end else s for s in seqs]
    n = 0
    limit = min(len(s) for s in seqs) // 2
    while n < limit and views[0][n] in special and all(v[n] == views[0][n] for v in views[1:]):
        n += 1
    return n
