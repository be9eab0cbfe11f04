"""`steerlm train-apm`: the attribute prediction model, SteerLM step 1 (SPEC §5.1).

    steerlm train-apm --data runs/data --out runs/apm                       # regression head on MiniLM (default)
    steerlm train-apm --data runs/data --out runs/apm-gen --kind generative \\
        --model smollm2-135m-instruct --train.lora.r=8 --train.lr=2e-4       # the paper's generative APM

Every labelled assistant turn of the training records is one example: the conversation up to and including that
response, with its human levels as targets. Two kinds:
- `regression`: a backbone (an encoder, mean-pooled, or a causal LM read at its last token) plus one linear output
  per attribute, trained with a masked MSE over the labels present (a missing label is masked, never filled).
  Input is the conversation as plain text (`heads.plain_text`), truncated from the left so the response is kept.
- `generative`: the causal LM learns the attribute string of TEXT_TO_VALUE records (SPEC §3, masks §4) and
  predicts by greedy decoding; a string that fails strict parsing is counted, never repaired.

The output folder loads back by path with `load_apm(path)`; `APM.predict` is what annotate, eval-apm, bootstrap,
the server and the evaluation use.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from steerlm import conditioning, heads, metrics, models, train
from steerlm import config as config_lib
from steerlm.attributes import HELPSTEER, NAMED_SETS, OASST_LABELS, STEERABLE, AttributeSchema, word_count
from steerlm.config import TrainArgs
from steerlm.data import templates
from steerlm.data.collate import collate_lm, collate_packed, pad
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, TEXT_TO_VALUE, Record, Turn, data_levels, record_from_json
from steerlm.errors import UserError
from steerlm.io import read_jsonl, write_json

META = "steerlm_apm.json"
#: The model folder inside a train-apm output folder (beside config.yaml, metrics.jsonl and the checkpoint).
BEST = "best"
#: The regression head's file in the backbone + head layout (`heads.save`).
HEAD = "apm_head.safetensors"
#: Fewest held-out predictions a calibration map is made from (fewer leave that attribute rounded).
MIN_REFERENCE = 5
KNOWN_ATTRIBUTES = tuple(dict.fromkeys(STEERABLE + OASST_LABELS + HELPSTEER))


@dataclass
class APMTrainArgs(TrainArgs):
    """TrainArgs with the defaults of the measured recipe for a MiniLM regression APM on OASST (docs/apm.md): levels
    predicted directly, the head at its own learning rate, 256 tokens of `[CLS] context [SEP] response [SEP]`."""

    epochs: float = 2.0
    """Passes over the training data (fractions allowed); the best epoch by validation loss is kept."""
    lr: float = 5e-5
    """Peak learning rate of the backbone (MiniLM regression: 5e-5; LoRA on a causal LM wants ~2e-4)."""
    head_lr: float = 1e-3
    """Learning rate of the new regression head (0: the backbone's `lr`; a generative APM has no head)."""
    warmup_ratio: float = 0.1
    """Fraction of steps of linear warm-up before cosine decay."""
    batch_size: int = 16
    """Sequences per device per micro-batch."""
    max_length: int = 256
    """Tokens per example: the response's first `response_tokens` and as much of the context as fits."""


@dataclass
class Config:
    data: str
    """Folder made by `steerlm prepare`: train.jsonl/val.jsonl (VALUE_TO_TEXT) and/or train_t2v.jsonl/val_t2v.jsonl."""
    out: str = "runs/apm"
    """Output folder: a model folder that `load_apm` / `--apm` read back."""
    attributes: list[str] = field(default_factory=lambda: ["steerable"])
    """Attributes to predict: names and/or named sets (steerable, paper, helpsteer), e.g. quality,humor."""
    levels: int = 0
    """Levels per attribute L (labels run 0..L-1); 0 reads it from the data folder's config.yaml, else 10."""
    kind: Literal["regression", "generative"] = "regression"
    """'regression' (a head per attribute, masked MSE) or 'generative' (the LM decodes the attribute string)."""
    model: str = "minilm-l6"
    """Backbone: a built-in (minilm-l6, tiny-encoder, smollm2-135m-instruct, tiny-lm), a folder or a hub id."""
    backbone: Literal["auto", "encoder", "causal"] = "auto"
    """Kind of backbone; 'auto' decides from the model (built-in name or the folder's config.json)."""
    pooling: Literal["auto", "cls", "mean", "response", "last"] = "auto"
    """Regression read-out: 'cls' = the encoder's pooler on its first token (what transformers'
    `BertForSequenceClassification` computes), 'mean' over all tokens, 'response' = mean over the scored
    response's tokens, or the 'last' token; 'auto' = cls for encoders with a pooler (else mean), last for causal
    LMs (docs/apm.md)."""
    input: Literal["auto", "pair", "plain"] = "auto"
    """Regression input: 'pair' = `[CLS] context [SEP] response [SEP]` with segment ids (encoders with [CLS]/[SEP]:
    the response's first `response_tokens` kept, the context cut from the left), 'plain' = `heads.plain_text` cut from
    the left; 'auto' = pair where the tokenizer has [CLS]/[SEP], else plain."""
    response_tokens: int = 200
    """'pair' input: tokens of the scored response kept (its beginning); the context gets what remains."""
    length_feature: bool = True
    """Regression (a generative APM reads the text and ignores it): also feed the head the scored response's log token count, its weight started at the least-squares
    fit of the training levels on it (the APM starts as the length baseline and learns what length does not say).
    Length is the strongest single cue of OASST quality (docs/apm.md). Without it, an encoder read through 'cls'
    is saved as a standard transformers sequence-classification folder."""
    template: Literal["nemo", "chat"] = "nemo"
    """Prompt template style of the generative APM (SPEC §3)."""
    max_examples: int = 0
    """Use at most this many training (and validation) examples; 0 means all."""
    batch_size_eval: int = 32
    """Batch size for validation."""
    overwrite: bool = False
    """Replace an existing output folder."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint."""
    train: APMTrainArgs = field(default_factory=APMTrainArgs)
    """Optimisation settings (train.lora.r > 0 trains LoRA adapters; causal LMs only)."""

    def __post_init__(self):
        resolve_attributes(self.attributes)
        if self.levels != 0 and not 2 <= self.levels <= 100:
            raise ValueError(f"levels must be 0 (from the data) or between 2 and 100, not {self.levels}")
        if self.max_examples < 0:
            raise ValueError(f"max_examples must be >= 0, not {self.max_examples}")
        if self.response_tokens < 1:
            raise ValueError(f"response_tokens must be >= 1, not {self.response_tokens}")
        if self.overwrite and self.resume:
            raise ValueError("choose one of overwrite and resume")
        if self.kind == "generative" and self.backbone == "encoder":
            raise ValueError("a generative APM needs a causal LM backbone, not an encoder")
        if self.kind == "regression" and self.train.packing:
            raise ValueError("train.packing is for the generative APM; a regression APM pools each row")


def resolve_attributes(items: Sequence[str]) -> tuple[str, ...]:
    """Attribute names from a list of names and named sets, in canonical order; unknown names are an error."""
    names: list[str] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            if part in NAMED_SETS:
                names += NAMED_SETS[part]
            elif part in KNOWN_ATTRIBUTES:
                names.append(part)
            else:
                raise ValueError(
                    f"unknown attribute {part!r}; known: {', '.join(KNOWN_ATTRIBUTES)} "
                    f"or a named set ({', '.join(NAMED_SETS)})"
                )
    if not names:
        raise ValueError("no attributes given")
    return AttributeSchema(tuple(names)).names


def explicit_attributes(items: Sequence[str]) -> set[str]:
    """The attributes named one by one (not through a named set): these must have training labels."""
    return {p.strip() for item in items for p in str(item).split(",") if p.strip() and p.strip() not in NAMED_SETS}


# ---------------------------------------------------------------- examples: one per labelled assistant turn


@dataclass
class Example:
    """One scored response: the conversation up to and including it, and its human levels (may be empty)."""

    system: str
    turns: list[Turn]
    """Turns up to the scored assistant turn; every label is dropped (they are not part of the input)."""
    levels: dict[str, int] = field(default_factory=dict)


def _bare(turns: Sequence[Turn]) -> list[Turn]:
    return [Turn(t.role, t.value) for t in turns]


def as_example(item: Any) -> Example:
    """What `APM.predict` accepts, as an Example: a Record or a JSON record (scored at its last assistant turn),
    a list of Turns ending with the response, a `(prompt, response)` pair of strings, or an Example."""
    if isinstance(item, Example):
        return item
    if isinstance(item, dict):
        item = record_from_json(item)
    if isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item):
        return Example(DEFAULT_SYSTEM, [Turn("User", item[0]), Turn(ASSISTANT, item[1])])
    system = DEFAULT_SYSTEM
    if isinstance(item, Record):
        system, turns = item.system, item.conversations
    elif isinstance(item, list) and all(isinstance(t, Turn) for t in item):
        turns = item
    else:
        raise TypeError(
            f"cannot score {type(item).__name__}; expected a Record, a list of Turns or (prompt, response)"
        )
    last = max((i for i, t in enumerate(turns) if t.role == ASSISTANT), default=None)
    if last is None:
        raise UserError("the conversation has no Assistant turn to score", field="conversations")
    return Example(system, _bare(turns[: last + 1]))


def assistant_prefixes(record: Record) -> list[tuple[int, Example]]:
    """(turn index, Example) for every assistant turn of a record, without labels (what annotate scores)."""
    return [
        (i, Example(record.system, _bare(record.conversations[: i + 1])))
        for i, t in enumerate(record.conversations)
        if t.role == ASSISTANT
    ]


def read_examples(path: str | Path, schema: AttributeSchema, *, human: bool = False) -> list[Example]:
    """Every labelled assistant turn of a records file, once: OASST paths of one tree share prefixes, so a turn seen
    in several records (same message id, or same text up to it) is kept once. With `human`, a turn's `gt_label`
    (the human label kept by annotate) is preferred over its `label`. A record without an assistant turn, or a
    label that does not parse, is a UserError naming file and line."""
    out, seen = [], set()
    for line, obj in read_jsonl(path):
        record = record_from_json(obj, file=str(path), line=line)
        if not record.assistant_turns:
            raise UserError("the conversation has no Assistant turn", file=str(path), line=line, field="conversations")
        for i, turn in enumerate(record.conversations):
            label = turn.extra.get("gt_label", turn.label) if human else turn.label
            if turn.role != ASSISTANT or label is None:
                continue
            key = turn.extra.get("message_id") or (record.system, tuple((t.role, t.value) for t in record.conversations[: i + 1]))  # fmt: skip
            if key in seen:
                continue
            seen.add(key)
            try:
                levels = schema.parse(label, ignore_unknown=True)
            except UserError as e:
                raise UserError(e.reason, file=str(path), line=line, field=f"conversations[{i}].label") from None
            if levels:
                out.append(Example(record.system, _bare(record.conversations[: i + 1]), levels))
    return out


def data_files(folder: str | Path, kind: str) -> tuple[Path, Path]:
    """(train, validation) files of a `steerlm prepare` folder; the generative APM prefers the TEXT_TO_VALUE files
    (the labels are the same in both, only the record type differs)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("expected a folder made by `steerlm prepare` (train.jsonl, val.jsonl)", file=str(folder))

    def pick(split: str) -> Path:
        names = [f"{split}_t2v.jsonl", f"{split}.jsonl"] if kind == "generative" else [f"{split}.jsonl", f"{split}_t2v.jsonl"]  # fmt: skip
        for name in names:
            if (folder / name).exists():
                return folder / name
        raise UserError(f"missing {names[0]} (or {names[1]})", file=str(folder))

    return pick("train"), pick("val")


# ---------------------------------------------------------------- regression APM: inputs and loss


def masked_mse(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labels present only (SPEC §5.1): missing labels are masked, never filled."""
    return (((pred - target) ** 2) * present).sum() / present.sum().clamp(min=1.0)


def has_pair_tokens(tokenizer) -> bool:
    """Whether the tokenizer has the [CLS]/[SEP] tokens of the 'pair' input."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def pair_inputs(examples: Sequence[Example], tokenizer, max_length: int, response_tokens: int):
    """(token ids, response masks, segment ids, response lengths) of `[CLS] context [SEP] response [SEP]`: the
    context is `heads.plain_text` of the turns before the response, cut from the left; the response keeps its first
    `response_tokens` tokens (its opening says most about it; its whole length in tokens is returned beside).
    Segment id 1 and the response mask mark the response and its [SEP]."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    contexts = tokenizer([heads.plain_text(e.turns[:-1]) for e in examples], add_special_tokens=False, verbose=False)[
        "input_ids"
    ]
    responses = tokenizer([e.turns[-1].value for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
    ids, masks, types, lengths = [], [], [], []
    for ctx, resp in zip(contexts, responses, strict=True):
        lengths.append(len(resp))
        resp = resp[: max(1, min(response_tokens, max_length - 3))]
        room = max_length - 3 - len(resp)
        ctx = ctx[len(ctx) - room :] if room > 0 else []
        ids.append([cls, *ctx, sep, *resp, sep])
        types.append([0] * (len(ctx) + 2) + [1] * (len(resp) + 1))
        masks.append(types[-1])
    return ids, masks, types, lengths


def regression_inputs(examples: Sequence[Example], backbone: str, tokenizer, max_length: int,
                      input_format: str = "plain", response_tokens: int = 200):  # fmt: skip
    """(token ids, response masks, segment ids, response lengths) of the examples in `input_format`: 'pair' (see
    `pair_inputs`) or 'plain': each example's `heads.plain_text` and `heads.text_end` (a causal backbone's EOS),
    truncated from the left, with a 0/1 mask of the tokens of the scored response (found through
    the fast tokenizer's character offsets; every token when the tokenizer is not a fast one), and None for
    the segment ids and lengths."""
    if input_format == "pair":
        return pair_inputs(examples, tokenizer, max_length, response_tokens)
    eos = heads.text_end(backbone, tokenizer)
    texts = [heads.plain_text(e.turns) + eos for e in examples]
    if not getattr(tokenizer, "is_fast", False):
        ids = heads.tokenize_left(tokenizer, texts, max_length)
        return ids, [[1] * len(x) for x in ids], None, None
    ids, offsets = heads.tokenize_left(tokenizer, texts, max_length, offsets=True)
    masks = []
    for e, text, spans in zip(examples, texts, offsets, strict=True):
        start = len(text) - len(eos) - len(e.turns[-1].value)
        # special tokens have empty (0, 0) spans and stay out; a token overlapping the response counts
        masks.append([1 if end > start and end > begin else 0 for begin, end in spans])
    return ids, masks, None, None


def _input_rows(ids, masks, types, lengths) -> list[dict]:
    rows = [{"input_ids": x, "response_mask": m} for x, m in zip(ids, masks, strict=True)]
    for row, t in zip(rows, types or [], strict=False):
        row["token_type_ids"] = t
    for row, n in zip(rows, lengths or [], strict=False):
        row["response_length"] = n
    return rows


def _regression_rows(examples, schema, backbone, tokenizer, max_length, input_format, response_tokens) -> list[dict]:
    rows = _input_rows(*regression_inputs(examples, backbone, tokenizer, max_length, input_format, response_tokens))
    for e, row in zip(examples, rows, strict=True):
        # targets in levels: the head starts at the training means and learns at the scale of the labels
        row["target"] = [float(e.levels.get(n, 0)) for n in schema.names]
        row["present"] = [1.0 if n in e.levels else 0.0 for n in schema.names]
    return rows


def length_fit(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(slope, intercept) per attribute of the least-squares line of level on `heads.length_input` over the training
    rows that carry the label."""
    x = heads.length_input(
        torch.tensor(
            [float(r["response_length"] if "response_length" in r else sum(r["response_mask"])) for r in rows]
        )
    )
    y, present = torch.tensor([r["target"] for r in rows]), torch.tensor([r["present"] for r in rows])
    slopes, intercepts = [], []
    for j in range(y.shape[1]):
        keep = present[:, j] > 0
        xs, ys = x[keep], y[keep, j]
        if len(xs) < 2 or float(xs.var()) == 0.0:
            slopes.append(0.0)
            intercepts.append(float(ys.mean()) if len(ys) else 0.0)
            continue
        slope = float(((xs - xs.mean()) * (ys - ys.mean())).mean() / ((xs - xs.mean()) ** 2).mean())
        slopes.append(slope)
        intercepts.append(float(ys.mean()) - slope * float(xs.mean()))
    return torch.tensor(slopes), torch.tensor(intercepts)


def _collate_regression(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [r["input_ids"] for r in rows]
    batch = {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(x) for x in ids], 0),
        "response_mask": pad([r["response_mask"] for r in rows], 0),
    }
    if "token_type_ids" in rows[0]:
        batch["token_type_ids"] = pad([r["token_type_ids"] for r in rows], 0)
    if "response_length" in rows[0]:
        batch["response_length"] = torch.tensor([r["response_length"] for r in rows], dtype=torch.float32)
    if "target" in rows[0]:
        batch["target"] = torch.tensor([r["target"] for r in rows], dtype=torch.float32)
        batch["present"] = torch.tensor([r["present"] for r in rows], dtype=torch.float32)
    return batch


# ---------------------------------------------------------------- generative APM (TEXT_TO_VALUE, SPEC §3-§4)


def _t2v_record(e: Example, schema: AttributeSchema) -> Record:
    """The example as a TEXT_TO_VALUE record whose only label is the scored turn's: one trained string per example,
    and the prompt matches `value_prompt_segments` at prediction time (earlier labels are not shown there either)."""
    turns = [Turn(t.role, t.value) for t in e.turns]
    turns[-1] = Turn(ASSISTANT, turns[-1].value, schema.render(e.levels))
    return Record(turns, e.system, type=TEXT_TO_VALUE)


def _add_bos(tokenizer) -> bool:
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


def _generative_rows(examples, schema, tokenizer, template, max_length, dropped) -> list[dict]:
    rows = []
    for e in examples:
        enc = templates.encode(_t2v_record(e, schema), tokenizer, template, None, _add_bos(tokenizer))
        if enc is None:
            dropped["no trainable tokens"] += 1
            continue
        # Truncate from the left: the trained label sits at the end of the text.
        rows.append({"input_ids": enc["input_ids"][-max_length:], "labels": enc["labels"][-max_length:]})
    return rows


def max_label_tokens(schema: AttributeSchema, tokenizer) -> int:
    """Tokens the longest attribute string (+ its newline and stop string) can take: the decoding budget."""
    longest = schema.render({n: schema.max_level for n in schema.names}) + "\n" + templates.T
    return len(tokenizer(longest, add_special_tokens=False)["input_ids"]) + 4


# ---------------------------------------------------------------- the loaded model: what other stages use


class APM:
    """A trained attribute prediction model. `predict` returns float levels per attribute for each item."""

    def __init__(self, model: nn.Module, tokenizer, meta: dict, path: str | None = None):
        self.model, self.tokenizer, self.meta, self.path = model, tokenizer, meta, path
        self.schema = AttributeSchema.from_dict(meta["attributes"])
        self.kind, self.backbone = meta["kind"], meta["backbone"]
        self.template, self.max_length = meta.get("template") or "nemo", int(meta["max_length"])
        self.input_format, self.response_tokens = meta.get("input") or "plain", int(meta.get("response_tokens") or 200)
        self.train_means: dict[str, float] = meta.get("train_means", {})
        self.parse_failures = 0
        """Generated strings that failed strict parsing, over this object's lifetime (generative only)."""
        self.failed_outputs: list[str] = []
        """The first few such strings, for reports."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def predict(self, items: Sequence[Any], batch_size: int = 32, progress: bool = False) -> list[dict[str, float]]:
        """Float levels in [0, L-1] per attribute for each item (see `as_example` for what an item may be).

        Items are scored in length-sorted batches (little padding) and identical conversations once; results come
        back in input order. A generative APM gives integer levels, and an empty dict where its output failed
        strict parsing (counted in `parse_failures`)."""
        examples = [as_example(x) for x in items]
        keys = [(e.system if self.kind == "generative" else "", tuple((t.role, t.value) for t in e.turns)) for e in examples]  # fmt: skip
        unique: dict = {}
        for k, e in zip(keys, examples, strict=True):
            unique.setdefault(k, e)
        uniq = list(unique.values())
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                if self.kind == "regression":
                    preds = self._predict_regression(uniq, batch_size, progress)
                else:
                    preds = self._predict_generative(uniq, batch_size, progress)
        finally:
            self.model.train(was_training)
        by_key = dict(zip(unique, preds, strict=True))
        return [dict(by_key[k]) for k in keys]

    def predict_levels(self, items: Sequence[Any], batch_size: int = 32) -> list[dict[str, int]]:
        """`predict` rounded to integer levels."""
        return [self.round(p) for p in self.predict(items, batch_size)]

    def round(self, pred: dict[str, float]) -> dict[str, int]:
        return {k: min(self.schema.max_level, max(0, round(v))) for k, v in pred.items()}

    @property
    def calibration(self) -> dict[str, QuantileMap]:
        """Per attribute, the quantile map stored at training time (empty for older or generative APMs)."""
        stored = self.meta.get("calibration") or {}
        return {n: QuantileMap(c["reference"], c["label_counts"]) for n, c in (stored.get("attributes") or {}).items()}

    def calibrate(self, pred: dict[str, float]) -> dict[str, int]:
        """Levels by quantile mapping (`QuantileMap`) where the APM has a map for the attribute, else rounded."""
        maps = self.calibration
        return {k: maps[k](v) if k in maps else min(self.schema.max_level, max(0, round(v))) for k, v in pred.items()}

    def label(self, pred: dict[str, float], calibrated: bool = False) -> str | None:
        """The attribute string of rounded (or, with `calibrated`, quantile-mapped) predictions; None when there
        are none, e.g. a failed parse."""
        return self.schema.render(self.calibrate(pred) if calibrated else self.round(pred)) or None

    def _batches(self, ids: list[list[int]], batch_size: int, progress: bool):
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        bar = tqdm(total=len(ids), desc="score", unit="turn", disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk
            bar.update(len(chunk))
        bar.close()

    def _predict_regression(self, examples: list[Example], batch_size: int, progress: bool) -> list[dict]:
        rows = _input_rows(*regression_inputs(examples, self.backbone, self.tokenizer, self.max_length,
                                              self.input_format, self.response_tokens))  # fmt: skip
        out: list[dict] = [{}] * len(rows)
        top = self.schema.max_level
        for chunk in self._batches([r["input_ids"] for r in rows], batch_size, progress):
            batch = _collate_regression([rows[i] for i in chunk], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            y = self.model(**batch).clamp(0, top).cpu().tolist()
            for i, row in zip(chunk, y, strict=True):
                out[i] = {n: float(v) for n, v in zip(self.schema.names, row, strict=True)}
        return out

    def _predict_generative(self, examples: list[Example], batch_size: int, progress: bool) -> list[dict]:
        tok = self.tokenizer
        budget = max_label_tokens(self.schema, tok)
        ids = []
        for e in examples:
            record = Record(_bare(e.turns), e.system, type=TEXT_TO_VALUE)
            segs = templates.value_prompt_segments(record, self.template, tok)
            ids.append(templates.encode_text_segments(segs, tok, _add_bos(tok))[-(self.max_length - budget) :])
        out: list[dict] = [{}] * len(ids)
        for chunk in self._batches(ids, batch_size, progress):
            rows = [ids[i] for i in chunk]
            x = pad(rows, tok.pad_token_id, side="left").to(self.device)
            mask = pad([[1] * len(r) for r in rows], 0, side="left").to(self.device)
            gen = self.model.generate(input_ids=x, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      stop_strings=["\n", templates.T], tokenizer=tok)  # fmt: skip
            for i, new in zip(chunk, gen[:, x.shape[1] :].tolist(), strict=True):
                out[i] = self._parse(tok.decode(new, skip_special_tokens=False))
        return out

    def _parse(self, generated: str) -> dict[str, float]:
        # The label is the text up to its newline (SPEC §3 TEXT_TO_VALUE: L + label + "\n"); nothing else is fixed.
        text = generated.split("\n", 1)[0] if "\n" in generated else generated.split(templates.T, 1)[0]
        try:
            levels = self.schema.parse(text)
            if not levels:
                raise UserError("empty attribute string")
            return {k: float(v) for k, v in levels.items()}
        except UserError:
            self.parse_failures += 1
            if len(self.failed_outputs) < 20:
                self.failed_outputs.append(generated)
            return {}


@dataclass
class QuantileMap:
    """Quantile mapping of one attribute's float predictions onto the training label distribution.

    A regression APM trained with MSE predicts close to the mean, so rounding gives nearly one level for every
    answer. This map sends a prediction at quantile q of `reference` (the APM's predictions on held-out examples,
    which resemble its predictions on new data) to the level at quantile q of the training labels. It is monotone
    (never reverses the APM's order), shifts with the data (answers predicted above every reference answer get the
    top levels), and maps a sample equal to the training labels onto itself."""

    reference: list[float]
    """Sorted predictions of the reference examples."""
    label_counts: list[int]
    """Training labels per level 0..L-1."""

    def __post_init__(self):
        self.reference = sorted(float(x) for x in self.reference)
        total = sum(self.label_counts)
        if not self.reference or total <= 0:
            raise ValueError("a quantile map needs reference predictions and training labels")
        acc, self._cdf = 0, []
        for c in self.label_counts:
            acc += c
            self._cdf.append(acc / total)

    def quantile(self, x: float) -> float:
        """Mid-rank quantile of x in the reference, in [0, 1]."""
        return (bisect.bisect_left(self.reference, x) + bisect.bisect_right(self.reference, x)) / (2 * len(self.reference))  # fmt: skip

    def __call__(self, x: float) -> int:
        q = self.quantile(x)
        # the lowest level whose cumulative share reaches q (the lowest labelled level at q = 0)
        level = bisect.bisect_left(self._cdf, q - 1e-12)
        return min(level, len(self._cdf) - 1)


def fit_calibration(preds: list[dict[str, float]], train_ex: Sequence[Example], schema: AttributeSchema) -> dict:
    """The `calibration` entry of steerlm_apm.json: per attribute, the reference predictions `preds` (held-out
    examples) and the training label counts; attributes with fewer than `MIN_REFERENCE` reference predictions are
    left out (rounded when annotated)."""
    out = {}
    for n in schema.names:
        ref = sorted(round(p[n], 4) for p in preds if n in p)
        counts = [0] * schema.levels
        for e in train_ex:
            if n in e.levels:
                counts[e.levels[n]] += 1
        if len(ref) >= MIN_REFERENCE and sum(counts):
            out[n] = {"reference": ref, "label_counts": counts}
    return {"method": "quantile mapping of held-out predictions onto the training labels", "attributes": out}


def apm_folder(path: str | Path) -> Path:
    """The model folder of an APM path: the folder itself, or the `best/` folder of a train-apm output folder."""
    path = Path(path)
    if not (path / META).exists() and (path / BEST / META).exists():
        return path / BEST
    return path


def load_apm(path: str | Path, *, device: torch.device | None = None) -> APM:
    """Load an APM written by `steerlm train-apm`, given its output folder or the `best/` model folder in it; a
    folder without steerlm_apm.json is a UserError."""
    path = apm_folder(path)
    meta = models.read_meta(path, META)
    for key in ("kind", "attributes", "backbone", "max_length"):
        if key not in meta:
            raise UserError(f"missing key {key!r}", file=str(path / META))
    dev = device or models.device()
    if meta["kind"] == "regression":  # either layout (heads.py)
        # before `scale: levels`, the head predicted levels / (L-1)
        top = AttributeSchema.from_dict(meta["attributes"]).max_level
        scale = 1.0 if meta.get("scale") == "levels" else float(top)
        model, tokenizer = heads.load(path, meta, HEAD, dev, length_feature=bool(meta.get("length_feature")),
                                      scale=scale)  # fmt: skip
    elif meta["kind"] == "generative":
        model, tokenizer = models.load_causal_lm(str(path), device=dev)
        model.eval()
    else:
        raise UserError(f"unknown APM kind {meta['kind']!r}", file=str(path / META), field="kind")
    return APM(model, tokenizer, meta, str(path))


# ---------------------------------------------------------------- agreement with human labels (eval-apm, train-apm)


def agreement(apm: APM, examples: list[Example], batch_size: int = 32, progress: bool = False) -> dict:
    """Per-attribute agreement of `apm` with the human levels of `examples`, and of two baselines: always the
    training mean (MAE, accuracies) and the response's word count (Spearman only: `words_spearman`), which an APM
    must beat to label anything a length rule could not.

    A generative APM's failed parses are counted (`parse_failures`) and their examples left out of every attribute
    (each attribute's `n` says how many pairs it was computed on)."""
    failures_before = getattr(apm, "parse_failures", 0)
    preds = apm.predict(examples, batch_size=batch_size, progress=progress)
    report: dict = {
        "examples": len(examples),
        "parse_failures": apm.parse_failures - failures_before,
        "attributes": {},
    }
    for name in apm.schema.names:
        pairs = [(p[name], e.levels[name]) for p, e in zip(preds, examples, strict=True) if name in e.levels and name in p]  # fmt: skip
        if not pairs:
            continue
        pred, gold = [p for p, _ in pairs], [g for _, g in pairs]
        words = [word_count(e.turns[-1].value) for p, e in zip(preds, examples, strict=True) if name in e.levels and name in p]  # fmt: skip
        mean = apm.train_means.get(name)
        row = {"apm": metrics.summarize(pred, gold), "baseline": None, "train_mean": mean,
               "words_spearman": metrics.spearman(words, gold)}  # fmt: skip
        if mean is not None:
            row["baseline"] = metrics.summarize([mean] * len(gold), gold)
        # Kept for the plot: rounded predicted level against the human level.
        row["pairs"] = [[int(g), round(p)] for p, g in pairs]
        report["attributes"][name] = row
    return report


def _fmt(x: float | None, width: int = 6, digits: int = 2) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def format_table(report: dict) -> str:
    """The report as an aligned text table: APM next to the mean baseline for each metric, and its Spearman next
    to the word-count baseline's."""
    head = (
        f"{'attribute':<16}{'n':>5}  {'MAE':>6}{'mean':>6}  {'exact':>6}{'mean':>6}  {'±1':>6}{'mean':>6}  "
        f"{'spearman':>8}{'words':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, row in report["attributes"].items():
        a, b = row["apm"], row["baseline"] or {}
        lines.append(
            f"{name:<16}{a['n']:>5}  {_fmt(a['mae'])}{_fmt(b.get('mae'))}  {_fmt(a['exact'])}{_fmt(b.get('exact'))}  "
            f"{_fmt(a['within1'])}{_fmt(b.get('within1'))}  {_fmt(a['spearman'], 8, 3)}{_fmt(row.get('words_spearman'), 7, 3)}"
        )
    lines.append(f"({report['examples']} labelled assistant turns; 'mean' = always predict the training mean; "
                 "'words' = Spearman of the response's word count"
                 + (f"; {report['parse_failures']} unparseable outputs" if report.get("parse_failures") else "") + ")")  # fmt: skip
    return "\n".join(lines)


# ---------------------------------------------------------------- training


def _publish(staging: Path, best: Path) -> None:
    """Replace `best` with the complete folder `staging` (a folder cannot be renamed over a non-empty one, so the
    old one is moved aside first and dropped after)."""
    old = best.with_name(f".{best.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        os.replace(best, old)
    os.replace(staging, best)
    shutil.rmtree(old, ignore_errors=True)


def _means(examples: list[Example], schema: AttributeSchema) -> dict[str, float]:
    out = {}
    for n in schema.names:
        vals = [e.levels[n] for e in examples if n in e.levels]
        if vals:
            out[n] = sum(vals) / len(vals)
    return out


def main(cfg: Config) -> dict:
    start = time.time()
    out = Path(cfg.out)
    if train.prepare_output(
        cfg.out,
        resume=cfg.resume,
        overwrite=cfg.overwrite,
        meta_name=f"{BEST}/{META}",
        what="train-apm",
        owned=(BEST,),
    ):
        print(f"train-apm: {out} is already complete (nothing to resume)")
        return {}
    levels = cfg.levels or data_levels(cfg.data) or 10
    schema = AttributeSchema(resolve_attributes(cfg.attributes), levels)
    backbone = cfg.backbone if cfg.backbone != "auto" else heads.backbone_kind(cfg.model)
    if cfg.kind == "generative" and backbone != "causal":
        raise UserError(f"a generative APM needs a causal LM; {cfg.model!r} is an encoder", field="model")
    if backbone == "encoder" and cfg.train.lora.enabled:
        raise UserError("LoRA is offered for causal LM backbones; fine-tune an encoder fully (lora.r=0)", field="train.lora.r")  # fmt: skip
    pooling = "last" if cfg.pooling == "auto" and backbone == "causal" else cfg.pooling  # encoders: below

    # 1. examples: one per labelled assistant turn, deduplicated across the paths of a tree
    train_file, val_file = data_files(cfg.data, cfg.kind)
    train_ex, val_ex = read_examples(train_file, schema), read_examples(val_file, schema)
    if cfg.max_examples:
        train_ex, val_ex = train_ex[: cfg.max_examples], val_ex[: cfg.max_examples]
    if not train_ex:
        raise UserError(f"no assistant turn carries a label for {', '.join(schema.names)}", file=str(train_file))
    if not val_ex:
        raise UserError("no labelled assistant turn to validate on", file=str(val_file))
    means = _means(train_ex, schema)
    unlabelled = [n for n in schema.names if n not in means]
    named = explicit_attributes(cfg.attributes)
    if any(n in named for n in unlabelled):
        raise UserError(f"no training labels for {', '.join(n for n in unlabelled if n in named)}; choose "
                        "--attributes among the data's", file=str(train_file))  # fmt: skip
    if unlabelled:  # members of a named set that this data does not label (OASST1 has no political_content...)
        print(f"train-apm: leaving out {', '.join(unlabelled)}: no training labels", flush=True)
        schema = AttributeSchema(tuple(n for n in schema.names if n in means), levels)
        train_ex = [Example(e.system, e.turns, schema.restrict(e.levels)) for e in train_ex]
        val_ex = [e for e in (Example(e.system, e.turns, schema.restrict(e.levels)) for e in val_ex) if e.levels]

    # 2. model and tokenized examples
    max_length = cfg.train.max_length
    dropped: dict[str, int] = {}
    input_format = "plain"
    if cfg.kind == "regression":
        base, tokenizer = models.load_encoder(cfg.model, device=torch.device("cpu"))
        input_format = cfg.input if cfg.input != "auto" else ("pair" if has_pair_tokens(tokenizer) else "plain")
        if input_format == "pair" and (backbone != "encoder" or not has_pair_tokens(tokenizer)):
            raise UserError("the 'pair' input needs an encoder whose tokenizer has [CLS] and [SEP]", field="input")
        if pooling == "auto":
            pooling = "cls" if getattr(models.unwrap(base), "pooler", None) is not None else "mean"
        if pooling == "cls" and getattr(models.unwrap(base), "pooler", None) is None:
            raise UserError(f"{cfg.model!r} has no pooler for the 'cls' read-out; use mean or last", field="pooling")
        heads.freeze_unused(base, pooler_used=pooling == "cls")
        base = models.apply_lora(base, cfg.train.lora)
        torch.manual_seed(cfg.train.seed)
        model = heads.HeadModel(base, len(schema.names), pooling, cfg.length_feature)
        # Start exactly at the predict-the-mean baseline: zero weights, bias at the training means in levels
        # (random weights would start from noisy predictions that the backbone first has to learn away).
        nn.init.zeros_(model.head.weight)
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([means[n] for n in schema.names]))
        train_rows = _regression_rows(train_ex, schema, backbone, tokenizer, max_length, input_format, cfg.response_tokens)  # fmt: skip
        if cfg.length_feature:
            # ... or, with the length input, at the least-squares line of level on log length (the length
            # baseline): the backbone then learns what the length does not say
            weight, bias = length_fit(train_rows)
            with torch.no_grad():
                model.head.weight[:, -1] = weight
                model.head.bias.copy_(bias)
        val_rows = _regression_rows(val_ex, schema, backbone, tokenizer, max_length, input_format, cfg.response_tokens)  # fmt: skip

        def collate(rows):
            return _collate_regression(rows, tokenizer.pad_token_id)

        def loss_fn(m, batch):
            pred = m(batch["input_ids"], batch["attention_mask"], batch["response_mask"], batch.get("token_type_ids"),
                     batch.get("response_length"))  # fmt: skip
            return masked_mse(pred, batch["target"], batch["present"]), {}
    else:
        model, tokenizer = models.load_causal_lm(cfg.model, device=torch.device("cpu"))
        model = models.apply_lora(model, cfg.train.lora)
        counts: dict = {}
        train_rows = _generative_rows(train_ex, schema, tokenizer, cfg.template, max_length, counts)
        val_rows = _generative_rows(val_ex, schema, tokenizer, cfg.template, max_length, counts)
        dropped = dict(counts)

        def collate(rows):
            if cfg.train.packing:  # several examples per row, attention kept inside each (data/collate.py)
                return collate_packed(rows, tokenizer.pad_token_id, max_length)
            return collate_lm(rows, tokenizer.pad_token_id)

        def loss_fn(m, batch):
            return conditioning.conditioned_lm_loss(m, batch)[0], {}  # the one LM loss: SFT's, without twins

    print(f"train-apm: {cfg.kind} APM on {cfg.model} ({backbone}, {pooling if cfg.kind == 'regression' else cfg.template}); "
          f"{len(train_rows)} train / {len(val_rows)} val examples; attributes {','.join(schema.names)} (L={levels})"
          + (f"; dropped {dropped}" if dropped else ""), flush=True)  # fmt: skip

    meta = {
        "kind": cfg.kind, "attributes": schema.to_dict(), "template": cfg.template if cfg.kind == "generative" else None,
        "backbone": backbone, "pooling": pooling if cfg.kind == "regression" else None, "max_length": max_length,
        "base_model": cfg.model, "lora": cfg.train.lora.enabled, "text_format": heads.TEXT_FORMAT,
        "head": HEAD if cfg.kind == "regression" else None, "train_means": means,
        "length_feature": cfg.length_feature and cfg.kind == "regression",
        "input": input_format if cfg.kind == "regression" else None, "response_tokens": cfg.response_tokens,
        "scale": "levels" if cfg.kind == "regression" else None,
        "train_examples": len(train_rows), "val_examples": len(val_rows),
    }  # fmt: skip

    # 3. validation loss (the best-checkpoint criterion) and saving the best model as a loadable folder
    def evaluate(m) -> dict:
        dev = next(m.parameters()).device
        total, weight = 0.0, 0.0
        for s in range(0, len(val_rows), cfg.batch_size_eval):
            batch = {k: v.to(dev) for k, v in collate(val_rows[s : s + cfg.batch_size_eval]).items()}
            if cfg.kind == "regression":
                n = float(batch["present"].sum())
                total += float(loss_fn(m, batch)[0]) * n
            else:
                n = float((batch["labels"][:, 1:] != templates.IGNORE_INDEX).sum())
                total += float(loss_fn(m, batch)[0]) * n
            weight += n
        return {"val_loss": total / max(weight, 1.0)}

    def save_best(m, metrics: dict) -> None:
        staging = out / f".{BEST}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        info = {**meta, "val_loss": metrics["val_loss"]}
        if cfg.kind == "regression":
            heads.save(m, tokenizer, staging, META, info, backbone=backbone, labels=schema.names, head_file=HEAD)
        else:
            models.save_model(m, tokenizer, staging, META, info)
        _publish(staging, out / BEST)

    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out)
    # head_lr is the regression head's; a generative APM has no head (fit refuses a head_lr that applies to nothing)
    args = cfg.train if cfg.kind == "regression" else dataclasses.replace(cfg.train, head_lr=0.0)
    summary = train.fit(model, train_rows, collate, loss_fn, args, out, evaluate=evaluate, save_best=save_best,
                        resume=cfg.resume, desc="train-apm")  # fmt: skip
    # 4. the best model against the validation labels (eval-apm's metrics) and the calibration map from its
    # validation predictions; then drop the resumable checkpoint
    best = load_apm(out / BEST)
    report = agreement(best, val_ex, cfg.batch_size_eval)
    if cfg.kind == "regression":
        best.meta["calibration"] = fit_calibration(best.predict(val_ex, cfg.batch_size_eval), train_ex, schema)
        write_json(out / BEST / META, best.meta)
    summary["val_metrics"] = {
        n: {**r["apm"], "baseline_mae": (r["baseline"] or {}).get("mae")} for n, r in report["attributes"].items()
    }
    summary["val_parse_failures"] = report["parse_failures"]
    print(format_table(report))
    shutil.rmtree(out / train.CHECKPOINT, ignore_errors=True)
    shutil.rmtree(out / f".{train.CHECKPOINT}.old", ignore_errors=True)
    print(f"train-apm: {summary['steps']} steps in {time.time() - start:.0f} s; best val_loss {summary['best']:.4f} "
          f"at step {summary['best_step']} -> {out / BEST}")  # fmt: skip
    sys.stdout.flush()
    return summary
