"""The attribute prediction model as the stages that use it see it (SPEC §5.1): `load_apm` reads back a folder
written by `steerlm train-apm` (`steerlm/apm.py`), and `APM.predict` gives float levels per attribute for each
scored response; annotate, eval-apm, bootstrap, the pipeline, the server and the evaluation use it, and train-apm
itself for its validation report and calibration map.

Defined here once, for training and prediction alike: what one scored response is (`Example`, `as_example`,
`assistant_prefixes`, `read_examples`), how a regression APM's input is built (`regression_inputs`,
`collate_regression`), the decoding budget of a generative one, the folder's names (`META`, `BEST`, `HEAD`), the
calibration map (`QuantileMap`, `fit_calibration`) and agreement with human labels (`agreement`, `format_table`).
"""

from __future__ import annotations

import bisect
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from steerlm import heads, metrics, models
from steerlm.attributes import AttributeSchema, word_count
from steerlm.data import templates
from steerlm.data.collate import pad
from steerlm.data.records import ASSISTANT, TEXT_TO_VALUE, Record, Turn, record_from_json
from steerlm.errors import UserError
from steerlm.io import read_jsonl

#: The steerlm JSON of an APM model folder (`load_apm` requires it).
META = models.APM_META
#: The model folder inside a train-apm output folder (beside config.yaml, metrics.jsonl and the checkpoint).
BEST = "best"
#: The regression head's file in the backbone + head layout (`heads.save`).
HEAD = "apm_head.safetensors"
#: Fewest held-out predictions a calibration map is made from (fewer leave that attribute rounded).
MIN_REFERENCE = 5


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
    """What `APM.predict` accepts, as an Example: an Example, or any item of `heads.scored_conversation` (a Record or
    a JSON record, scored at its last assistant turn; a list of Turns ending with the response; a `(prompt,
    response)` pair of strings)."""
    if isinstance(item, Example):
        return item
    system, turns = heads.scored_conversation(item)
    return Example(system, _bare(turns))


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


# ---------------------------------------------------------------- regression APM: inputs


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
                      input_format: str = "plain", response_tokens: int = 200, whole_length: bool = False):  # fmt: skip
    """(token ids, response masks, segment ids, response lengths) of the examples in `input_format`: 'pair' (see
    `pair_inputs`), 'plain': each example's `heads.plain_text` and `heads.text_end` (a causal backbone's EOS),
    truncated from the left, with a 0/1 mask of the tokens of the scored response (found through
    the fast tokenizer's character offsets; every token when the tokenizer is not a fast one), None for the segment
    ids, and with `whole_length` the whole response's token count (else None: the length input then counts the
    response tokens the cut input holds, at most `max_length`, as APM folders without `length_tokens` did); or
    'opening': 'plain' with the response cut to its first `response_tokens` tokens (a fast tokenizer's), so the
    opening of a long answer is read rather than its end, and the whole response's token count."""
    if input_format == "pair":
        return pair_inputs(examples, tokenizer, max_length, response_tokens)
    lengths = None
    if whole_length or input_format == "opening":
        enc = tokenizer([e.turns[-1].value for e in examples], add_special_tokens=False, verbose=False,
                        return_offsets_mapping=input_format == "opening")  # fmt: skip
        lengths = [len(x) for x in enc["input_ids"]]
    if input_format == "opening":
        # the response cut after its first `response_tokens` tokens (at that token's last character), as the pair
        # input keeps it; the context then fills the rest from the left
        examples = [
            Example(e.system, [*e.turns[:-1], Turn(e.turns[-1].role, e.turns[-1].value[: spans[response_tokens - 1][1]])], e.levels)
            if len(spans) > response_tokens else e
            for e, spans in zip(examples, enc["offset_mapping"], strict=True)
        ]  # fmt: skip
    eos = heads.text_end(backbone, tokenizer)
    texts = [heads.plain_text(e.turns) + eos for e in examples]
    if not getattr(tokenizer, "is_fast", False):
        ids = heads.tokenize_left(tokenizer, texts, max_length)
        return ids, [[1] * len(x) for x in ids], None, lengths
    ids, offsets = heads.tokenize_left(tokenizer, texts, max_length, offsets=True)
    masks = []
    for e, text, spans in zip(examples, texts, offsets, strict=True):
        start = len(text) - len(eos) - len(e.turns[-1].value)
        # special tokens have empty (0, 0) spans and stay out; a token overlapping the response counts
        masks.append([1 if end > start and end > begin else 0 for begin, end in spans])
    return ids, masks, None, lengths


def input_rows(ids, masks, types, lengths) -> list[dict]:
    """The outputs of `regression_inputs` as one dict per example (what `collate_regression` batches)."""
    rows = [{"input_ids": x, "response_mask": m} for x, m in zip(ids, masks, strict=True)]
    for row, t in zip(rows, types or [], strict=False):
        row["token_type_ids"] = t
    for row, n in zip(rows, lengths or [], strict=False):
        row["response_length"] = n
    return rows


def collate_regression(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows of `input_rows` (with `target` / `present` when training) as right-padded tensors, each (B, T) or (B,)
    or (B, attributes)."""
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


# ---------------------------------------------------------------- generative APM: prompt and decoding budget


def add_bos(tokenizer) -> bool:
    """Whether a generative APM's prompt starts with BOS: where the tokenizer adds one itself (training and
    prediction encode the same way)."""
    return bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


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

    def label(
        self, pred: dict[str, float], calibrated: bool = False, given: dict[str, int] | None = None
    ) -> str | None:
        """The attribute string of rounded (or, with `calibrated`, quantile-mapped) predictions, where `given`
        levels (human ones, annotate's `human_labels: fill`) replace the predicted ones; None when there are none,
        e.g. a failed parse."""
        levels = self.calibrate(pred) if calibrated else self.round(pred)
        return self.schema.render({**levels, **(given or {})}) or None

    def _batches(self, ids: list[list[int]], batch_size: int, progress: bool):
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        bar = tqdm(total=len(ids), desc="score", unit="turn", disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk
            bar.update(len(chunk))
        bar.close()

    def _predict_regression(self, examples: list[Example], batch_size: int, progress: bool) -> list[dict]:
        rows = input_rows(*regression_inputs(examples, self.backbone, self.tokenizer, self.max_length,
                                              self.input_format, self.response_tokens,
                                              self.meta.get("length_tokens") == "response"))  # fmt: skip
        out: list[dict] = [{}] * len(rows)
        top = self.schema.max_level
        dtype = self.autocast_dtype()
        for chunk in self._batches([r["input_ids"] for r in rows], batch_size, progress):
            batch = collate_regression([rows[i] for i in chunk], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if dtype is None:
                y = self.model(**batch)
            else:  # the features in the fitted precision; the head in fp32, as it was fitted
                with torch.autocast(self.device.type, dtype=dtype):
                    features = self.model.features(**batch)
                y = self.model.head(features.float()) * self.model.scale
            y = y.float().clamp(0, top).cpu().tolist()
            for i, row in zip(chunk, y, strict=True):
                out[i] = {n: float(v) for n, v in zip(self.schema.names, row, strict=True)}
        return out

    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the features at prediction: a ridge head (`head_fit: ridge`) was fitted on features
        computed in the `precision` its steerlm_apm.json records, so they are computed in it again where this device
        has it natively (bf16: a CUDA device with bf16, or a CPU with AVX512-BF16/AMX; fp16: CUDA), else in fp32
        with a warning. None (fp32) for folders that record no precision (every gradient-trained APM)."""
        from steerlm.train import cpu_has_fast_bf16  # here: steerlm.train pulls in accelerate

        precision = self.meta.get("precision")
        if precision not in ("bf16", "fp16"):
            return None
        cuda = self.device.type == "cuda"
        if precision == "bf16" and (
            torch.cuda.is_bf16_supported(including_emulation=False) if cuda else cpu_has_fast_bf16()
        ):
            return torch.bfloat16
        if precision == "fp16" and cuda:
            return torch.float16
        warnings.warn(f"APM {self.path}: its head was fitted on {precision} features, which this device computes "
                      "only by emulation; predicting in fp32 (levels may differ slightly)", stacklevel=2)  # fmt: skip
        return None

    def _predict_generative(self, examples: list[Example], batch_size: int, progress: bool) -> list[dict]:
        tok = self.tokenizer
        budget = max_label_tokens(self.schema, tok)
        ids = []
        for e in examples:
            record = Record(_bare(e.turns), e.system, type=TEXT_TO_VALUE)
            segs = templates.value_prompt_segments(record, self.template, tok)
            ids.append(templates.encode_text_segments(segs, tok, add_bos(tok))[-(self.max_length - budget) :])
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
