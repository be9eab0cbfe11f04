"""`steerlm train-apm`: the attribute prediction model, SteerLM step 1 (SPEC §5.1).

    steerlm train-apm --data runs/data --out runs/apm                       # regression head on MiniLM (default)
    steerlm train-apm --data runs/data --out runs/apm-gen --kind generative \\
        --model smollm2-135m-instruct --train.lora.r=8 --train.lr=2e-4       # the paper's generative APM

Every labelled assistant turn of the training records is one example: the conversation up to and including that
response, with its human levels as targets. Two kinds:
- `regression`: a backbone (an encoder, mean-pooled, or a causal LM read at its last token) plus one linear output
  per attribute, trained with a masked MSE over the labels present (a missing label is masked, never filled).
  Input is the conversation as plain text (`plain_text`), truncated from the left so the response is kept.
- `generative`: the causal LM learns the attribute string of TEXT_TO_VALUE records (SPEC §3, masks §4) and
  predicts by greedy decoding; a string that fails strict parsing is counted, never repaired.

The output folder loads back by path with `load_apm(path)`; `APM.predict` is what annotate, eval-apm, bootstrap,
the server and the evaluation use.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from steerlm import config as config_lib
from steerlm import models, train
from steerlm.attributes import HELPSTEER, NAMED_SETS, OASST_LABELS, STEERABLE, AttributeSchema
from steerlm.config import TrainArgs
from steerlm.data import templates
from steerlm.data.collate import collate_packed, model_inputs, pad
from steerlm.data.records import ASSISTANT, DEFAULT_SYSTEM, TEXT_TO_VALUE, Record, Turn, record_from_json
from steerlm.errors import UserError
from steerlm.io import read_jsonl

META = "steerlm_apm.json"
#: The model folder inside a train-apm output folder (beside config.yaml, metrics.jsonl and the checkpoint).
BEST = "best"
HEAD = "apm_head.safetensors"
KNOWN_ATTRIBUTES = tuple(dict.fromkeys(STEERABLE + OASST_LABELS + HELPSTEER))
#: Version tag of `plain_text` stored in the folder, so a changed rendering cannot silently mismatch old models.
TEXT_FORMAT = "plain-v1"


@dataclass
class APMTrainArgs(TrainArgs):
    """TrainArgs with the defaults measured best for a MiniLM regression APM on the OASST dev slice (docs/apm.md):
    validation loss bottoms out after about one epoch, and 1e-4 over-fits sooner than 3e-5."""

    epochs: float = 2.0
    """Passes over the training data (fractions allowed); the best epoch by validation loss is kept."""
    lr: float = 3e-5
    """Peak learning rate (MiniLM regression: 3e-5; LoRA on a causal LM wants ~2e-4)."""
    warmup_ratio: float = 0.1
    """Fraction of steps of linear warm-up before cosine decay."""
    batch_size: int = 16
    """Sequences per device per micro-batch."""
    max_length: int = 512
    """Tokens per example; longer conversations lose their beginning (the response is kept). 256 halves the cost."""


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
    pooling: Literal["auto", "mean", "response", "last"] = "auto"
    """Regression read-out: 'mean' over all tokens, 'response' = mean over the scored response's tokens (the
    conversation before it is context only), or the 'last' token; 'auto' = mean for encoders, last for causal LMs."""
    length_feature: bool = False
    """Regression: also feed the head the scored response's log token count. Mean pooling averages length away,
    and length is the strongest single cue of OASST quality (docs/apm.md); wants `train.head_lr`."""
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
        if self.overwrite and self.resume:
            raise ValueError("choose one of overwrite and resume")
        if self.kind == "generative" and self.length_feature:
            raise ValueError("length_feature is a regression APM input; a generative APM reads the text")
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


def plain_text(turns: Sequence[Turn]) -> str:
    """The conversation as the regression APM reads it: `User: ...` / `Assistant: ...` blocks separated by a blank
    line (the system prompt is left out: it is the same boilerplate in every record)."""
    return "\n\n".join(f"{t.role}: {t.value}" for t in turns)


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


def data_levels(folder: str | Path) -> int | None:
    """The number of levels recorded by `steerlm prepare` in the data folder's config.yaml, if any."""
    path = Path(folder) / "config.yaml"
    if not path.exists():
        return None
    cfg = config_lib.read_yaml(path)
    for node in (cfg, cfg.get("attributes") if isinstance(cfg.get("attributes"), dict) else {}):
        if isinstance(node.get("levels"), int):
            return node["levels"]
    return None


# ---------------------------------------------------------------- backbones and the regression model


def backbone_kind(name: str) -> str:
    """'encoder' or 'causal' for a model name (built-in, folder, adapter folder); hub ids default to causal."""
    if name in models.ENCODER_BUILTINS:
        return "encoder"
    if name in models.CAUSAL_BUILTINS or str(name).endswith(".gguf"):
        return "causal"
    folder = Path(name).expanduser()
    if (folder / "config.json").exists():
        arch = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        return "causal" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in arch) else "encoder"
    if (folder / "adapter_config.json").exists():
        return backbone_kind(models._adapter_base(folder))
    return "causal"


def _unwrap(backbone: nn.Module) -> nn.Module:
    return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone


def freeze_unused(backbone: nn.Module) -> None:
    """Parameters the read-out never touches get no gradient; freeze them so that 'every trainable parameter
    changed' holds (BERT's pooler, an untied LM head)."""
    m = _unwrap(backbone)
    if getattr(m, "pooler", None) is not None:
        m.pooler.requires_grad_(False)
    out, inp = getattr(m, "get_output_embeddings", lambda: None)(), m.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        out.requires_grad_(False)


class RegressionAPM(nn.Module):
    """Backbone + one linear output per attribute; outputs are levels divided by L-1 (targets normalised)."""

    def __init__(self, backbone: nn.Module, n_attributes: int, pooling: str, length_feature: bool = False):
        super().__init__()
        self.backbone, self.pooling, self.length_feature = backbone, pooling, length_feature
        hidden = _unwrap(backbone).config.hidden_size
        self.head = nn.Linear(hidden + int(length_feature), n_attributes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        # `base_model` is the bare transformer (itself for AutoModel backbones), so no vocabulary logits are built.
        trunk = _unwrap(self.backbone).base_model
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.pooling in ("mean", "response"):
            use = response_mask if self.pooling == "response" and response_mask is not None else attention_mask
            mask = use.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        else:  # last real token (right padding)
            last = attention_mask.sum(1).long() - 1
            pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last]
        if self.length_feature:
            # log(1 + response tokens), centred on ~100 tokens so the zero-initialised weight starts neutral
            n = (response_mask if response_mask is not None else attention_mask).sum(1, keepdim=True).float()
            pooled = torch.cat([pooled, torch.log1p(n) - 4.6], dim=-1)
        return self.head(pooled)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labels present only (SPEC §5.1): missing labels are masked, never filled."""
    return (((pred - target) ** 2) * present).sum() / present.sum().clamp(min=1.0)


def _tokenize_texts(tokenizer, texts: list[str], max_length: int, offsets: bool = False):
    # Left truncation keeps the response (the end of the text) and drops the oldest context.
    tokenizer.truncation_side = "left"
    enc = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=offsets)
    return (enc["input_ids"], enc["offset_mapping"]) if offsets else enc["input_ids"]


def regression_inputs(examples: Sequence[Example], backbone: str, tokenizer, max_length: int):
    """(token ids, response masks): each example's `plain_text` (a causal backbone gets a final EOS, so the
    read-out token is fixed), truncated from the left, and a 0/1 mask of the tokens of the scored response (found
    through the fast tokenizer's character offsets; every token when the tokenizer is not a fast one)."""
    eos = tokenizer.eos_token if backbone == "causal" and tokenizer.eos_token else ""
    texts = [plain_text(e.turns) + eos for e in examples]
    if not getattr(tokenizer, "is_fast", False):
        ids = _tokenize_texts(tokenizer, texts, max_length)
        return ids, [[1] * len(x) for x in ids]
    ids, offsets = _tokenize_texts(tokenizer, texts, max_length, offsets=True)
    masks = []
    for e, text, spans in zip(examples, texts, offsets, strict=True):
        start = len(text) - len(eos) - len(e.turns[-1].value)
        # special tokens have empty (0, 0) spans and stay out; a token overlapping the response counts
        masks.append([1 if end > start and end > begin else 0 for begin, end in spans])
    return ids, masks


def _regression_rows(examples, schema, backbone, tokenizer, max_length) -> list[dict]:
    ids, masks = regression_inputs(examples, backbone, tokenizer, max_length)
    rows = []
    for e, x, m in zip(examples, ids, masks, strict=True):
        target = [e.levels.get(n, 0) / schema.max_level for n in schema.names]
        present = [1.0 if n in e.levels else 0.0 for n in schema.names]
        rows.append({"input_ids": x, "response_mask": m, "target": target, "present": present})
    return rows


def _collate_regression(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [r["input_ids"] for r in rows]
    batch = {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(x) for x in ids], 0),
        "response_mask": pad([r["response_mask"] for r in rows], 0),
    }
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


def _collate_lm(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    ids = [r["input_ids"] for r in rows]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(x) for x in ids], 0),
        "labels": pad([r["labels"] for r in rows], templates.IGNORE_INDEX),
    }


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

    def label(self, pred: dict[str, float]) -> str | None:
        """The attribute string of rounded predictions (None when there are none, e.g. a failed parse)."""
        return self.schema.render(self.round(pred)) or None

    def _batches(self, ids: list[list[int]], batch_size: int, progress: bool):
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        bar = tqdm(total=len(ids), desc="score", unit="turn", disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk
            bar.update(len(chunk))
        bar.close()

    def _predict_regression(self, examples: list[Example], batch_size: int, progress: bool) -> list[dict]:
        ids, masks = regression_inputs(examples, self.backbone, self.tokenizer, self.max_length)
        out: list[dict] = [{}] * len(ids)
        top = self.schema.max_level
        for chunk in self._batches(ids, batch_size, progress):
            batch = _collate_regression([{"input_ids": ids[i], "response_mask": masks[i]} for i in chunk],
                                        self.tokenizer.pad_token_id)  # fmt: skip
            batch = {k: v.to(self.device) for k, v in batch.items()}
            y = (self.model(**batch) * top).clamp(0, top).cpu().tolist()
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
    if meta["kind"] == "regression":
        backbone, tokenizer = models.load_encoder(str(path), device=dev)
        schema = AttributeSchema.from_dict(meta["attributes"])
        model = RegressionAPM(
            backbone, len(schema.names), meta.get("pooling") or "mean", bool(meta.get("length_feature"))
        )
        head_file = path / (meta.get("head") or HEAD)
        if not head_file.exists():
            raise UserError(f"missing the regression head {head_file.name}", file=str(path))
        model.head.load_state_dict(load_file(str(head_file)))
        model.to(dev)
    elif meta["kind"] == "generative":
        model, tokenizer = models.load_causal_lm(str(path), device=dev)
    else:
        raise UserError(f"unknown APM kind {meta['kind']!r}", file=str(path / META), field="kind")
    model.eval()
    return APM(model, tokenizer, meta, str(path))


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
    backbone = cfg.backbone if cfg.backbone != "auto" else backbone_kind(cfg.model)
    if cfg.kind == "generative" and backbone != "causal":
        raise UserError(f"a generative APM needs a causal LM; {cfg.model!r} is an encoder", field="model")
    if backbone == "encoder" and cfg.train.lora.enabled:
        raise UserError("LoRA is offered for causal LM backbones; fine-tune an encoder fully (lora.r=0)", field="train.lora.r")  # fmt: skip
    pooling = cfg.pooling if cfg.pooling != "auto" else ("mean" if backbone == "encoder" else "last")

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
    if cfg.kind == "regression":
        base, tokenizer = models.load_encoder(cfg.model, device=torch.device("cpu"))
        freeze_unused(base)
        base = models.apply_lora(base, cfg.train.lora)
        torch.manual_seed(cfg.train.seed)
        model = RegressionAPM(base, len(schema.names), pooling, cfg.length_feature)
        # Start exactly at the predict-the-mean baseline: zero weights, bias at the training means (random weights
        # would start from noisy predictions that the backbone first has to learn away).
        nn.init.zeros_(model.head.weight)
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([means[n] / schema.max_level for n in schema.names]))
        train_rows = _regression_rows(train_ex, schema, backbone, tokenizer, max_length)
        val_rows = _regression_rows(val_ex, schema, backbone, tokenizer, max_length)

        def collate(rows):
            return _collate_regression(rows, tokenizer.pad_token_id)

        def loss_fn(m, batch):
            pred = m(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
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
            return _collate_lm(rows, tokenizer.pad_token_id)

        def loss_fn(m, batch):
            return m(**model_inputs(batch), labels=batch["labels"]).loss, {}

    print(f"train-apm: {cfg.kind} APM on {cfg.model} ({backbone}, {pooling if cfg.kind == 'regression' else cfg.template}); "
          f"{len(train_rows)} train / {len(val_rows)} val examples; attributes {','.join(schema.names)} (L={levels})"
          + (f"; dropped {dropped}" if dropped else ""), flush=True)  # fmt: skip

    meta = {
        "kind": cfg.kind, "attributes": schema.to_dict(), "template": cfg.template if cfg.kind == "generative" else None,
        "backbone": backbone, "pooling": pooling if cfg.kind == "regression" else None, "max_length": max_length,
        "base_model": cfg.model, "lora": cfg.train.lora.enabled, "text_format": TEXT_FORMAT,
        "head": HEAD if cfg.kind == "regression" else None, "train_means": means,
        "length_feature": cfg.length_feature,  # Config rejects it for a generative APM
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
        backbone_module = m.backbone if cfg.kind == "regression" else m
        models.save_model(backbone_module, tokenizer, staging, META, {**meta, "val_loss": metrics["val_loss"]})
        if cfg.kind == "regression":
            save_file({k: v.detach().cpu().contiguous() for k, v in m.head.state_dict().items()}, str(staging / HEAD))
        _publish(staging, out / BEST)

    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out)
    summary = train.fit(model, train_rows, collate, loss_fn, cfg.train, out, evaluate=evaluate, save_best=save_best,
                        resume=cfg.resume, desc="train-apm")  # fmt: skip
    # 4. the best model against the validation labels (eval-apm's metrics), then drop the resumable checkpoint
    from steerlm import apm_eval

    report = apm_eval.evaluate(load_apm(out / BEST), val_ex, cfg.batch_size_eval)
    summary["val_metrics"] = {
        n: {**r["apm"], "baseline_mae": (r["baseline"] or {}).get("mae")} for n, r in report["attributes"].items()
    }
    summary["val_parse_failures"] = report["parse_failures"]
    print(apm_eval.format_table(report))
    shutil.rmtree(out / train.CHECKPOINT, ignore_errors=True)
    shutil.rmtree(out / f".{train.CHECKPOINT}.old", ignore_errors=True)
    print(f"train-apm: {summary['steps']} steps in {time.time() - start:.0f} s; best val_loss {summary['best']:.4f} "
          f"at step {summary['best_step']} -> {out / BEST}")  # fmt: skip
    sys.stdout.flush()
    return summary
