"""Prompt templates (SPEC §3) and loss masks (SPEC §4): the one place that turns a record into text and labels.

A record is rendered as a list of segments, each either trained on or masked; the text of a record is the segments
joined, and `encode` tokenizes segment by segment so that the mask boundaries are exact for any tokenizer. The
same segments (minus the answer) build the inference prompt, so training and inference see identical tokens.

Two styles:
- `nemo`: NeMo's byte-exact format with `<extra_id_0/1/2>`, so NVIDIA's SteerLM checkpoints and data work as is.
- `chat`: the base model's own chat template, with the attribute string at the start of each assistant turn
  behind `ATTR_MARKER` (VALUE_TO_TEXT), or after the response behind it (TEXT_TO_VALUE).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from steerlm.data import invariants
from steerlm.data.records import ASSISTANT, TEXT_TO_VALUE, USER, VALUE_TO_TEXT, Record, Turn
from steerlm.errors import UserError

S, T, L = "<extra_id_0>", "<extra_id_1>", "<extra_id_2>"
STYLES = ("nemo", "chat")
#: Marker in front of the attribute string inside an assistant message (chat style).
ATTR_MARKER = "<attributes>"
IGNORE_INDEX = invariants.IGNORE_INDEX
#: A turn whose `extra` has `no_loss: true` stays in the context but is masked like a user turn (SFT's
#: `min_quality` filter keeps low-quality answers as history without learning them).
NO_LOSS = "no_loss"


@dataclass(frozen=True)
class Segment:
    text: str
    trainable: bool


def is_trained(record: Record, i: int) -> bool:
    """Whether turn `i` of `record` carries loss (SPEC §4): not the first turn, not a masked role or a user turn,
    not a `no_loss` answer (context only)."""
    turn = record.conversations[i]
    return not (i == 0 or turn.role == record.mask or turn.role == USER or turn.extra.get(NO_LOSS))


# ---------------------------------------------------------------- NeMo style (SPEC §3, masks §4)


def _nemo_segments(record: Record) -> list[Segment]:
    segs = [Segment(S + "System\n" + record.system + "\n", False)]
    prev_trained = False  # the T that opens a turn is trained when it closes a trained turn (SPEC §4)
    for i, turn in enumerate(record.conversations):
        segs.append(Segment(T, prev_trained))
        masked = not is_trained(record, i)
        head = turn.role + "\n"
        label_line = (L + turn.label + "\n") if turn.label is not None else ""
        if masked:
            body = head + (
                label_line + turn.value + "\n" if record.type == VALUE_TO_TEXT else turn.value + "\n" + label_line
            )
            segs.append(Segment(body, False))
            prev_trained = False
        elif record.type == VALUE_TO_TEXT:
            segs += [Segment(head + label_line, False), Segment(turn.value + "\n", True)]
            prev_trained = True
        elif turn.label is not None:  # TEXT_TO_VALUE: only the label is learned (generative APM)
            segs += [Segment(head + turn.value + "\n" + L, False), Segment(turn.label + "\n", True)]
            prev_trained = True
        else:
            segs.append(Segment(head + turn.value + "\n", False))
            prev_trained = False
    if record.conversations[-1].role != record.mask:
        segs.append(Segment(T, prev_trained))
    return segs


# ---------------------------------------------------------------- chat style (base model's own template)


def _chat_messages(record: Record, values: list[str]) -> list[dict]:
    msgs = [{"role": "system", "content": record.system}] if record.system else []
    for turn, value in zip(record.conversations, values, strict=True):
        msgs.append({"role": "user" if turn.role == USER else "assistant", "content": value})
    return msgs


def _apply(tokenizer, messages, add_generation_prompt=False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; use template style 'nemo'", field="template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _assistant_content(turn: Turn, type_: str) -> tuple[str, str, str]:
    """(masked prefix, trainable middle, masked suffix) of an assistant message's content in chat style."""
    if type_ == VALUE_TO_TEXT:
        prefix = ATTR_MARKER + turn.label + "\n" if turn.label is not None else ""
        return prefix, turn.value, ""
    if turn.label is None:
        return turn.value, "", ""
    return turn.value + "\n" + ATTR_MARKER, turn.label, ""


def _chat_segments(record: Record, tokenizer) -> list[Segment]:
    # Render once with unique placeholders, then cut the template's text around them: this works for any
    # Jinja chat template without knowing its markup.
    holes = [f"\x00{i}\x00" for i in range(len(record.conversations))]
    text = _apply(tokenizer, _chat_messages(record, holes))
    segs: list[Segment] = []
    cursor = 0
    eos = tokenizer.eos_token or ""
    for i, (turn, hole) in enumerate(zip(record.conversations, holes, strict=True)):
        at = text.index(hole, cursor)
        segs.append(Segment(text[cursor:at], False))
        trained = is_trained(record, i)
        if turn.role == ASSISTANT:
            prefix, middle, suffix = _assistant_content(turn, record.type)
        else:
            prefix, middle, suffix = turn.value, "", ""
        segs.append(Segment(prefix, False))
        cursor = at + len(hole)
        if trained and middle:
            # The end-of-turn marker right after the answer is learned too, so the model knows when to stop.
            end = _end_of_turn(text, cursor, eos)
            segs.append(Segment(middle + suffix + text[cursor : cursor + end], True))
            cursor += end
        else:
            segs.append(Segment(middle + suffix, False))
    segs.append(Segment(text[cursor:], False))
    return [s for s in segs if s.text]


def _end_of_turn(text: str, start: int, eos: str) -> int:
    """Length of the end-of-turn marker that follows an answer at `start` (the tokenizer's EOS, or up to newline)."""
    rest = text[start:]
    if eos and rest.startswith(eos):
        return len(eos)
    stripped = rest.split("\n", 1)[0]
    return len(stripped)


# ---------------------------------------------------------------- public API


def segments(record: Record, style: str = "nemo", tokenizer=None) -> list[Segment]:
    """The record as masked/trainable text segments (SPEC §3 text, SPEC §4 masks)."""
    if style == "nemo":
        return _nemo_segments(record)
    if style == "chat":
        return _chat_segments(record, tokenizer)
    raise UserError(f"unknown template style {style!r}; expected one of {STYLES}", field="template")


def render(record: Record, style: str = "nemo", tokenizer=None) -> str:
    """The full training text of a record."""
    return "".join(s.text for s in segments(record, style, tokenizer))


_HOLE = "\x00"


def _segments_before_hole(record: Record, style: str, tokenizer) -> list[str]:
    # The prompt is the training rendering cut where the trained text would start, so the prompt's tokens are
    # exactly those the model saw in training (segment-wise tokenization included).
    # Cut at the hole itself, not at the first trainable segment: in a multi-turn conversation the earlier
    # assistant answers are trainable too and belong to the prompt.
    segs = segments(record, style, tokenizer)
    at = next(i for i, s in enumerate(segs) if _HOLE in s.text)
    head = segs[at].text[: segs[at].text.index(_HOLE)]
    return [s.text for s in segs[:at]] + ([head] if head else [])


def inference_segments(record: Record, attributes: str | None, style: str = "nemo", tokenizer=None) -> list[str]:
    """Prompt for the next assistant turn of `record` (whose last turn is the user's), as text segments.

    SPEC §3: the conversation so far, then `T + "Assistant\\n" + L + attributes + "\\n"`; `attributes=None` omits
    the label line (the unconditional prompt, used by attribute guidance)."""
    if not record.conversations or record.conversations[-1].role != USER:
        raise UserError("the conversation to answer must end with a User turn", field="conversations")
    probe = Record(
        record.conversations + [Turn(ASSISTANT, _HOLE, attributes)], record.system, record.mask, VALUE_TO_TEXT
    )
    return _segments_before_hole(probe, style, tokenizer)


def inference_prompt(record: Record, attributes: str | None, style: str = "nemo", tokenizer=None) -> str:
    """`inference_segments` joined into one string."""
    return "".join(inference_segments(record, attributes, style, tokenizer))


def value_prompt_segments(record: Record, style: str = "nemo", tokenizer=None) -> list[str]:
    """Prompt for a generative APM: the conversation up to its last (assistant) turn, rendered TEXT_TO_VALUE and
    cut where the label would start; the model then decodes the attribute string (SPEC §5.1)."""
    if not record.conversations or record.conversations[-1].role != ASSISTANT:
        raise UserError("a conversation to score must end with an Assistant turn", field="conversations")
    last = record.conversations[-1]
    probe = Record(record.conversations[:-1] + [Turn(ASSISTANT, last.value, _HOLE)], record.system, record.mask,
                   TEXT_TO_VALUE)  # fmt: skip
    return _segments_before_hole(probe, style, tokenizer)


def encode_text_segments(texts: list[str], tokenizer, add_bos: bool = False) -> list[int]:
    """Token ids of text segments tokenized one by one, as `encode` does for training."""
    ids = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


def stop_strings(style: str, tokenizer=None, conditioned: bool = False) -> list[str]:
    """Strings that end an answer: `T` for NeMo style (SPEC §3), the tokenizer's EOS for chat style, and for an
    attribute-conditioned chat model also `ATTR_MARKER`: an answer never holds one (training puts it only at the
    start of an assistant turn), so a model that writes one has begun another turn's attribute line. Measured on
    the quickstart's model, short answers often went on with `<attributes>quality:3,...` and a repeat of
    themselves (docs/steering.md)."""
    if style == "nemo":
        return [T]
    own = [tokenizer.eos_token] if tokenizer is not None and tokenizer.eos_token else []
    return own + [ATTR_MARKER] if conditioned else own


def find_stop(text: str, stops, ends_after: int = 0) -> tuple[int, str] | None:
    """(start, stop string) of the earliest stop string in `text` that ends after its first `ends_after` characters
    (the text already checked, or generated before `min_new_tokens`); at equal starts the longest wins. None when
    there is none. The one stop-string search (`batching.Engine`)."""
    best = None
    for stop in stops:
        at = text.find(stop, max(0, ends_after - len(stop) + 1))
        if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(stop) > len(best[1]))):
            best = (at, stop)
    return best


def encode(record: Record, tokenizer, style: str = "nemo", max_length: int | None = None, add_bos: bool = False):
    """`{"input_ids", "labels"}` for a record: labels are -100 on masked tokens (SPEC §4). Each segment is
    tokenized alone so mask boundaries are exact. Truncates on the right to `max_length`; returns None when
    nothing trainable is left (NeMo's data_clean step drops such records)."""
    input_ids: list[int] = []
    labels: list[int] = []
    if add_bos and tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for seg in segments(record, style, tokenizer):
        ids = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if seg.trainable else [IGNORE_INDEX] * len(ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    if invariants.nothing_to_learn(labels):  # the check every stage shares
        return None
    return {"input_ids": input_ids, "labels": labels}


def drop_early_turns(record: Record, tokenizer, style: str, max_length: int) -> Record:
    """`record` without its earliest exchanges, so that its last answer ends inside `max_length` tokens.

    Cutting on the right (`encode`) keeps a long conversation's beginning and loses its last answers' ends; an
    answer whose end is cut never shows where an answer of its length stops, and verbosity's top levels are mostly
    such answers (docs/steering.md: at 256 tokens 3 % of the quickstart's level-4 answers and 55 % of its level-3
    answers ended inside the window). This drops whole leading turns instead, up to the earliest User turn from which
    the rest fits (the system prompt is kept); when nothing fits, up to the last User turn if its exchange keeps a
    trained token inside the window (`encode` then cuts it on the right). Returns `record` itself when it fits, has
    no later User turn to start from, or would keep nothing to learn; a cut copy otherwise (same system prompt, mask,
    type and extra keys). Trained turns stay trained: the kept conversation starts with a User turn."""

    def length(r: Record) -> int:
        return len(encode_text_segments([s.text for s in segments(r, style, tokenizer)], tokenizer))

    if length(record) <= max_length:
        return record
    turns = record.conversations
    starts = [k for k in range(1, len(turns))
              if turns[k].role == USER and any(is_trained(record, j) for j in range(k + 1, len(turns)))]  # fmt: skip
    cut = record
    for k in starts:
        cut = Record(turns[k:], record.system, record.mask, record.type, dict(record.extra))
        if length(cut) <= max_length:
            return cut
    return cut if cut is not record and encode(cut, tokenizer, style, max_length) is not None else record


def encode_all(records, tokenizer, style: str = "nemo", max_length: int | None = None, add_bos: bool = False):
    """Encode many records; returns (examples, Counter of dropped records by reason)."""
    out, dropped = [], Counter()
    for r in records:
        ex = encode(r, tokenizer, style, max_length, add_bos)
        if ex is None:
            dropped[invariants.NOTHING_TO_LEARN] += 1
        else:
            out.append(ex)
    return out, dropped
