"""`steerlm train-apm`: the attribute prediction model, SteerLM step 1 (SPEC §5.1).

    steerlm train-apm --data runs/data --out runs/apm          # ridge head on frozen SmolLM2-135M (default, 3-5 min)
    steerlm train-apm --data runs/data --out runs/apm --model minilm-l6               # the same on MiniLM (~20 s)
    steerlm train-apm --data runs/data --out runs/apm --model minilm-l6 --head_fit gradient   # fine-tuned
    steerlm train-apm --data runs/data --out runs/apm-gen --kind generative \\
        --model smollm2-135m-instruct --train.lora.r=8 --train.lr=2e-4       # the paper's generative APM

Every labelled assistant turn of the training records is one example: the conversation up to and including that
response, with its human levels as targets. Two kinds:
- `regression`: a backbone (an encoder or a causal LM) plus one linear output per attribute, fitted to the labels
  present (a missing label is masked, never filled). Input is the conversation as plain text (`heads.plain_text`),
  truncated from the left so the response is kept (encoders: `[CLS] context [SEP] response [SEP]`). By default
  (`head_fit: ridge`) the backbone stays frozen and the head is fitted in closed form on its features (ridge
  regression per attribute): one forward pass per example, so a causal LM backbone trains in minutes on a CPU;
  `--head_fit=gradient` fine-tunes backbone and head with a masked MSE (docs/apm.md).
- `generative`: the causal LM learns the attribute string of TEXT_TO_VALUE records (SPEC §3, masks §4) and
  predicts by greedy decoding; a string that fails strict parsing is counted, never repaired.

The output folder loads back by path with `load_apm(path)`; `APM.predict` is what annotate, eval-apm, bootstrap,
the server and the evaluation use (both in `steerlm/apm_model.py`, with the inputs that training shares).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import PartialState
from torch import nn
from tqdm.auto import tqdm

from steerlm import conditioning, heads, models, tracking, train
from steerlm import config as config_lib
from steerlm.apm_model import (
    BEST,
    HEAD,
    META,
    Example,
    add_bos,
    agreement,
    collate_regression,
    fit_calibration,
    format_table,
    input_rows,
    load_apm,
    read_examples,
    regression_inputs,
)
from steerlm.attributes import HELPSTEER, NAMED_SETS, OASST_LABELS, STEERABLE, AttributeSchema
from steerlm.config import TrainArgs
from steerlm.data import templates
from steerlm.data.collate import collate_lm, collate_packed
from steerlm.data.records import ASSISTANT, TEXT_TO_VALUE, Record, Turn, data_levels
from steerlm.errors import UserError
from steerlm.io import write_json

KNOWN_ATTRIBUTES = tuple(dict.fromkeys(STEERABLE + OASST_LABELS + HELPSTEER))
#: Where the ridge head on a causal LM reads its second hidden state by default (`Config.hidden_layers`), as a
#: fraction of the layers: on SmolLM2-135M, layer 20 of 30 ranked OASST quality best on the inner validation trees
#: (mean of three splits: 0.416; layers 18-22 within 0.02), and on the held-out trees too (docs/apm.md).
AUTO_DEPTH = 2 / 3


@dataclass
class APMTrainArgs(TrainArgs):
    """TrainArgs with the defaults of the gradient recipe measured for a MiniLM regression APM on OASST
    (`head_fit: gradient`, docs/apm.md): levels predicted directly, the head at its own learning rate, 256 tokens of
    `[CLS] context [SEP] response [SEP]`. The ridge head (the default) uses only `max_length` and `precision`."""

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
    model: str = "smollm2-135m-instruct"
    """Backbone: a built-in (smollm2-135m-instruct, minilm-l6, tiny-encoder, tiny-lm), a folder or a hub id. The
    default with the defaults below (a ridge head on frozen SmolLM2-135M, hidden states 20 and 30) ranked held-out
    OASST quality and helpfulness above the answers' word count on each of three tree splits, in 184 s per split on
    this 2-core CPU; `minilm-l6` takes ~20 s and ranks a little lower (docs/apm.md)."""
    backbone: Literal["auto", "encoder", "causal"] = "auto"
    """Kind of backbone; 'auto' decides from the model (built-in name or the folder's config.json)."""
    pooling: Literal["auto", "cls", "mean", "response", "last"] = "auto"
    """Regression read-out: 'cls' = the encoder's pooler on its first token (what transformers'
    `BertForSequenceClassification` computes), 'mean' over all tokens, 'response' = mean over the scored
    response's tokens, or the 'last' token; 'auto' = cls for encoders with a pooler (else mean), last for causal
    LMs (docs/apm.md)."""
    input: Literal["auto", "pair", "plain", "opening"] = "auto"
    """Regression input: 'pair' = `[CLS] context [SEP] response [SEP]` with segment ids (encoders with [CLS]/[SEP]:
    the response's first `response_tokens` kept, the context cut from the left), 'plain' = `heads.plain_text` cut from
    the left (a long response keeps its end), 'opening' = plain text with the response cut to its first
    `response_tokens` (any backbone with a fast tokenizer); 'auto' = pair where the tokenizer has [CLS]/[SEP], else
    plain."""
    response_tokens: int = 200
    """'pair' and 'opening' inputs: tokens of the scored response kept (its beginning); the context gets what
    remains."""
    length_feature: bool = True
    """Regression (a generative APM reads the text and ignores it): also feed the head the scored response's log token count, its weight started at the least-squares
    fit of the training levels on it (the APM starts as the length baseline and learns what length does not say).
    Length is the strongest single cue of OASST quality (docs/apm.md). Without it, an encoder read through 'cls'
    is saved as a standard transformers sequence-classification folder."""
    hidden_layers: list[int] = field(default_factory=list)
    """Regression: hidden states averaged before pooling, as indices into the backbone's `hidden_states` (0 = the
    embeddings, -1 = the last layer's output, so `20,-1` on SmolLM2-135M's 30 layers = two thirds up and the last).
    Empty = chosen: with the ridge head on a causal LM, the state two thirds up and the last (`AUTO_DEPTH`; on
    SmolLM2-135M layer 20 ranked quality best of every layer on the inner validation trees, docs/apm.md), else the
    last hidden state alone (`-1` asks for it explicitly); the resolved list is saved in config.yaml and the APM's
    metadata. Not with the 'cls' pooler (it reads the last layer). The ridge head standardises the features; a
    gradient head sees the states' own scales (a Llama-type model's last state is normed, the others not)."""
    head_fit: Literal["auto", "gradient", "ridge"] = "auto"
    """Regression: 'gradient' trains the backbone and the head together (`train.*`); 'ridge' keeps the backbone
    frozen, reads every example once (in `train.precision`) and fits the head per attribute in closed form (ridge
    regression on standardised features, the length input unpenalised; `fit_ridge`); 'auto' pooling is then the
    mean over the response's tokens. 'auto' = ridge for a regression APM without LoRA (it ranked held-out answers
    better than every gradient recipe measured, in a fraction of the time: docs/apm.md), else gradient (LoRA and the
    generative APM train by gradient)."""
    ridge_alpha: float = 1e4
    """Ridge penalty (`head_fit: ridge`) on features standardised to unit variance. 1e4 and 3e4 ranked best on
    held-out OASST trees with SmolLM2-135M's 576 features (docs/apm.md; choosing it on the validation split or by
    leave-one-out, which puts answers of one tree on both sides, did worse on new trees)."""
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
        if self.head_fit == "auto":
            self.head_fit = "ridge" if self.kind == "regression" and not self.train.lora.enabled else "gradient"
        if self.head_fit == "ridge":
            if self.kind != "regression":
                raise ValueError("head_fit 'ridge' fits a regression head; a generative APM has none")
            if self.train.lora.enabled:
                raise ValueError("head_fit 'ridge' keeps the backbone frozen; set train.lora.r=0")
            if self.ridge_alpha <= 0:
                raise ValueError(f"ridge_alpha must be positive, not {self.ridge_alpha}")
        if self.kind == "generative" and self.hidden_layers:
            raise ValueError("hidden_layers choose a regression head's features; a generative APM has none")
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


# ---------------------------------------------------------------- training data


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


# ---------------------------------------------------------------- regression APM: targets and loss


def masked_mse(pred: torch.Tensor, target: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the labels present only (SPEC §5.1): missing labels are masked, never filled."""
    return (((pred - target) ** 2) * present).sum() / present.sum().clamp(min=1.0)


def has_pair_tokens(tokenizer) -> bool:
    """Whether the tokenizer has the [CLS]/[SEP] tokens of the 'pair' input."""
    return tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None


def _regression_rows(examples, schema, backbone, tokenizer, max_length, input_format, response_tokens) -> list[dict]:
    # the length input counts the whole response, also where the cut input holds only part of it
    rows = input_rows(*regression_inputs(examples, backbone, tokenizer, max_length, input_format, response_tokens,
                                         whole_length=True))  # fmt: skip
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


# ---------------------------------------------------------------- regression APM: the closed-form head (head_fit: ridge)


def ridge_solve(x: torch.Tensor, y: torch.Tensor, present: torch.Tensor, alpha: float,
                free: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """A linear head fitted per attribute by ridge regression: features `x` (N, D) standardised with their mean and
    standard deviation, targets `y` (N, A) on the rows where `present` (N, A) is 1, the penalty `alpha * |w|^2` on
    every feature but the columns in `free` (the length input: its scale is meaningful, so it is not shrunk).
    Returns (weight (A, D), bias (A,)) with the standardisation folded in, so that `x @ weight.T + bias` predicts
    from raw features. Computed in float64."""
    x, y, present = x.double(), y.double(), present.double()
    mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mu) / sd
    weight, bias = torch.zeros(y.shape[1], x.shape[1], dtype=torch.float64), torch.zeros(y.shape[1], dtype=torch.float64)  # fmt: skip
    for j in range(y.shape[1]):
        rows = present[:, j] > 0
        zj, yj = z[rows], y[rows, j]
        z_mean, y_mean = zj.mean(0), yj.mean()
        centred = zj - z_mean
        penalty = torch.full((x.shape[1],), float(alpha), dtype=torch.float64)
        for col in free:
            if float(centred[:, col].abs().max()) > 0:  # unpenalised, a constant column would make it singular
                penalty[col] = 0.0
        w = torch.linalg.solve(centred.T @ centred + torch.diag(penalty), centred.T @ (yj - y_mean))
        weight[j] = w / sd
        bias[j] = y_mean - ((mu / sd + z_mean) * w).sum()
    return weight.float(), bias.float()


def head_features(model: heads.HeadModel, rows: list[dict], collate, batch_size: int, precision: str,
                  desc: str) -> torch.Tensor:  # fmt: skip
    """`model.features` of every row (N, D), in row order, under `precision`'s autocast (batches of similar length)."""
    device = next(model.parameters()).device
    dtype = models.resolve_dtype(precision) if precision in ("bf16", "fp16") else None
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    out: list[torch.Tensor | None] = [None] * len(rows)
    model.eval()
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for start in tqdm(range(0, len(order), batch_size), desc=f"train-apm: features ({desc})", unit="batch"):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in collate([rows[i] for i in chunk]).items() if k not in ("target", "present")}  # fmt: skip
            for i, f in zip(chunk, model.features(**batch).float().cpu(), strict=True):
                out[i] = f
    return torch.stack(out)


def fit_ridge(model: heads.HeadModel, train_rows: list[dict], val_rows: list[dict], collate, cfg: Config) -> dict:
    """`head_fit: ridge`: the frozen backbone's features of every example, then `ridge_solve` into `model.head`.
    Returns {precision, val_loss (the validation MSE, as the gradient fit reports it)}."""
    precision, why = train.resolve_precision(cfg.train.precision)
    print(f"precision: {precision} ({why})", flush=True)
    model.to(models.device())
    x = head_features(model, train_rows, collate, cfg.batch_size_eval, precision, "train")
    x_val = head_features(model, val_rows, collate, cfg.batch_size_eval, precision, "val")

    def targets(rows):
        return torch.tensor([r["target"] for r in rows]), torch.tensor([r["present"] for r in rows])

    free = [x.shape[1] - 1] if model.length_feature else []
    weight, bias = ridge_solve(x, *targets(train_rows), cfg.ridge_alpha, free)
    with torch.no_grad():
        model.head.weight.copy_(weight)
        model.head.bias.copy_(bias)
    y_val, present_val = targets(val_rows)
    return {"precision": precision, "val_loss": float(masked_mse(x_val @ weight.T + bias, y_val, present_val))}


# ---------------------------------------------------------------- generative APM (TEXT_TO_VALUE, SPEC §3-§4)


def _t2v_record(e: Example, schema: AttributeSchema) -> Record:
    """The example as a TEXT_TO_VALUE record whose only label is the scored turn's: one trained string per example,
    and the prompt matches `value_prompt_segments` at prediction time (earlier labels are not shown there either)."""
    turns = [Turn(t.role, t.value) for t in e.turns]
    turns[-1] = Turn(ASSISTANT, turns[-1].value, schema.render(e.levels))
    return Record(turns, e.system, type=TEXT_TO_VALUE)


def _generative_rows(examples, schema, tokenizer, template, max_length, dropped) -> list[dict]:
    rows = []
    for e in examples:
        enc = templates.encode(_t2v_record(e, schema), tokenizer, template, None, add_bos(tokenizer))
        if enc is None:
            dropped["no trainable tokens"] += 1
            continue
        # Truncate from the left: the trained label sits at the end of the text.
        rows.append({"input_ids": enc["input_ids"][-max_length:], "labels": enc["labels"][-max_length:]})
    return rows


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
    pooling = None  # the regression APM's read-out, resolved once its backbone is loaded

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
        if input_format == "opening" and not getattr(tokenizer, "is_fast", False):
            raise UserError("the 'opening' input cuts the response by a fast tokenizer's offsets", field="input")
        if input_format == "opening" and cfg.response_tokens + 8 > max_length:
            raise UserError(f"the 'opening' input keeps {cfg.response_tokens} response tokens, more than "
                            f"train.max_length {max_length} leaves room for", field="response_tokens")  # fmt: skip
        # a frozen backbone's pooler and last token were never trained to summarise; its response tokens' mean is
        # what the ridge head reads best (docs/apm.md)
        requested = "response" if cfg.head_fit == "ridge" and cfg.pooling == "auto" else cfg.pooling
        pooling = heads.resolve_pooling(requested, backbone, base, cfg.model)
        if not cfg.hidden_layers and cfg.head_fit == "ridge" and backbone == "causal" and pooling != "cls":
            cfg.hidden_layers = [round(AUTO_DEPTH * models.unwrap(base).config.num_hidden_layers), -1]
            print(f"train-apm: hidden_layers {cfg.hidden_layers} (the state {AUTO_DEPTH:.2f} up and the last; "
                  "--hidden_layers=-1 reads the last alone)", flush=True)  # fmt: skip
        if pooling == "cls" and cfg.hidden_layers:
            raise UserError("the 'cls' pooler reads the last layer only; choose --pooling=mean or response with "
                            "hidden_layers", field="hidden_layers")  # fmt: skip
        heads.freeze_unused(base, pooler_used=pooling == "cls")
        base = models.apply_lora(base, cfg.train.lora)
        torch.manual_seed(cfg.train.seed)
        model = heads.HeadModel(base, len(schema.names), pooling, cfg.length_feature, layers=cfg.hidden_layers)
        # Start exactly at the predict-the-mean baseline: zero weights, bias at the training means in levels
        # (random weights would start from noisy predictions that the backbone first has to learn away).
        nn.init.zeros_(model.head.weight)
        with torch.no_grad():
            model.head.bias.copy_(torch.tensor([means[n] for n in schema.names]))
        train_rows = _regression_rows(train_ex, schema, backbone, tokenizer, max_length, input_format, cfg.response_tokens)  # fmt: skip
        if cfg.length_feature and cfg.head_fit == "gradient":
            # ... or, with the length input, at the least-squares line of level on log length (the length
            # baseline): the backbone then learns what the length does not say
            weight, bias = length_fit(train_rows)
            with torch.no_grad():
                model.head.weight[:, -1] = weight
                model.head.bias.copy_(bias)
        val_rows = _regression_rows(val_ex, schema, backbone, tokenizer, max_length, input_format, cfg.response_tokens)  # fmt: skip

        def collate(rows):
            return collate_regression(rows, tokenizer.pad_token_id)

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
        "scale": "levels" if cfg.kind == "regression" else None, "head_fit": cfg.head_fit if cfg.kind == "regression" else None,
        "length_tokens": "response" if cfg.kind == "regression" else None,
        "hidden_layers": list(cfg.hidden_layers) if cfg.kind == "regression" else None,
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
    if cfg.head_fit == "ridge":
        print("train-apm: a ridge head trains no steps (train.epochs, lr, max_steps and resume do not apply)")
        ridge = fit_ridge(model, train_rows, val_rows, collate, cfg)
        # the features were computed in this precision: the loaded APM computes them in it too where the device
        # has it natively (`APM.autocast_dtype`)
        meta.update(precision=ridge["precision"], ridge_alpha=cfg.ridge_alpha)
        main_process = PartialState().is_main_process  # as train.fit saves: one writer under torchrun
        # the run's one metrics row, as a trained run's rows (the folder layout is the same; model cards follow a
        # model back to its data through a training stage's folder, which metrics.jsonl marks)
        trackers = (
            tracking.start(cfg.train.report_to, out, "train-apm", dataclasses.asdict(cfg.train))
            if main_process
            else None
        )
        log = train.MetricsLog(out / train.METRICS, None, main_process, trackers)
        log.write({"step": 0, "val_loss": ridge["val_loss"], "seconds": round(time.time() - start, 1)})
        log.close()
        if main_process:
            save_best(model, {"val_loss": ridge["val_loss"]})
        PartialState().wait_for_everyone()
        summary = {"steps": 0, "best": ridge["val_loss"], "best_step": 0, "head_fit": "ridge"}
    else:
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
    if cfg.head_fit == "ridge":
        done = f"ridge head fitted in {time.time() - start:.0f} s; val_loss {summary['best']:.4f}"
    else:
        done = (f"{summary['steps']} steps in {time.time() - start:.0f} s; best val_loss {summary['best']:.4f} at step "
                f"{summary['best_step']}")  # fmt: skip
    print(f"train-apm: {done} -> {out / BEST}")
    sys.stdout.flush()
    return summary
