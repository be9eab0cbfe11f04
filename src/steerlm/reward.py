"""`steerlm train-rm`: a pairwise reward model, the RLHF baseline's second step (InstructGPT, SPEC §6).

    steerlm train-rm $STEERLM_DATA/hh-rlhf/harmless-base-dev.jsonl.gz $STEERLM_DATA/oasst1/oasst1-en-dev.jsonl \\
        --out runs/rm --skip_invalid
    steerlm train-rm runs/data/train.jsonl --model smollm2-135m-instruct --train.lora.r=8 --train.lr=2e-4

A backbone (an encoder, or a causal LM's decoder stack) reads `User: ...` / `Assistant: ...` text and a linear head
turns the final token's state (or the mean over tokens, or an encoder's pooler) into one score r(x, y): the
regression APM's model with one output (`heads.HeadModel`). Comparisons come from:
- OASST sibling ranks: for K ranked replies to one message, all K·(K-1)/2 (better, worse) pairs;
- HH-RLHF: chosen beats rejected.
All comparisons of one prompt form one training example, so they share a batch and each response is encoded once;
the loss is `-log σ(r_w - r_l)` (`losses.pairwise_loss`), each prompt's pairs averaged first. Held-out comparisons
are split by OASST tree / HH pair; the pairwise accuracy and reward margin on them pick the best checkpoint.

The output folder is a model folder: a standard transformers `*ForSequenceClassification` folder with one label
where one computes the same score (a causal LM read at its last token, an encoder read through its pooler), else
the backbone + `reward_head.safetensors` (`heads.save`); and `steerlm_rm.json`. `load_rm(path).score(records)`
(`steerlm/rm_model.py`) gives one float per conversation, scored at its last answer.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from steerlm import config as config_lib
from steerlm import heads, models, train
from steerlm.config import TrainArgs
from steerlm.data import invariants, preferences
from steerlm.data.collate import pad
from steerlm.data.preferences import Comparisons
from steerlm.errors import UserError
from steerlm.io import write_json
from steerlm.losses import pairwise_loss
from steerlm.rm_model import HEAD, LABEL, META, rm_text, score_ids

POSITIONAL = "data"


@dataclass
class RMTrainArgs(TrainArgs):
    """TrainArgs with defaults that suit a MiniLM reward model on a CPU."""

    epochs: float = 2.0
    """Passes over the training comparisons (fractions allowed)."""
    lr: float = 3e-5
    """Peak learning rate (MiniLM: 2e-5..5e-5; a LoRA causal LM: ~2e-4)."""
    batch_size: int = 8
    """Prompts per micro-batch (all of a prompt's responses and comparisons come with it)."""
    max_length: int = 256
    """Tokens per conversation; longer ones lose their beginning (the response is kept)."""


@dataclass
class Config:
    data: list[str] = field(default_factory=list)
    """Comparison sources: HH-RLHF `{chosen, rejected}` files, OASST flat rows / trees, or conversation records whose
    assistant turns carry `rank` (e.g. `steerlm prepare` output); the kind is recognised from the first line."""
    val_data: list[str] = field(default_factory=list)
    """Held-out comparison sources (same kinds as `data`); default: `val_fraction` of the groups of each source."""
    out: str = "runs/rm"
    """Output folder: a reward-model folder that `load_rm` / `steerlm ppo --reward_model` read back."""
    model: str = "minilm-l6"
    """Backbone: a built-in (minilm-l6, tiny-encoder, smollm2-135m-instruct, tiny-lm), a folder (e.g. the SFT model,
    as InstructGPT does) or a hub id."""
    backbone: Literal["auto", "encoder", "causal"] = "auto"
    """Kind of backbone; 'auto' decides from the model."""
    pooling: Literal["auto", "last", "mean", "cls"] = "auto"
    """Read-out: the 'last' real token (SPEC §6; a causal LM reads a final EOS), the 'mean' over tokens, or 'cls' =
    an encoder's pooler on its first token (what `BertForSequenceClassification` computes); 'auto' = last for
    causal LMs, and for encoders cls when they have a pooler (MiniLM does), else mean. 'last' on a causal LM and
    'cls' save a standard transformers folder, the reward model TRL users load with
    `AutoModelForSequenceClassification`; 'mean' has no transformers class (backbone + head file)."""
    val_fraction: float = 0.1
    """Without `val_data`: the share of OASST trees / HH pairs held out to measure pairwise accuracy."""
    max_prompts: int = 0
    """Use at most this many prompts (comparison groups) per source file, before the split; 0 means all."""
    lang: str = "en"
    """OASST languages to keep ('en', 'en,de', or 'all')."""
    skip_invalid: bool = False
    """Count and skip malformed lines/pairs instead of stopping (the real HH-RLHF data has a few empty turns)."""
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """Held-out metric that picks the best checkpoint."""
    batch_size_eval: int = 32
    """Conversations per batch when scoring."""
    seed: int = 0
    """Seed of the train/validation split and of the prompt subsample."""
    overwrite: bool = False
    """Replace an existing output folder."""
    resume: bool = False
    """Continue an interrupted run from its last checkpoint."""
    train: RMTrainArgs = field(default_factory=RMTrainArgs)
    """Optimisation settings (train.lora.r > 0 trains LoRA adapters; causal LMs only)."""

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), not {self.val_fraction}")
        if self.max_prompts < 0:
            raise ValueError(f"max_prompts must be >= 0, not {self.max_prompts}")
        if self.overwrite and self.resume:
            raise ValueError("choose one of overwrite and resume")


# ---------------------------------------------------------------- comparisons from the sources


def read_comparisons(cfg: Config) -> tuple[list[Comparisons], list[Comparisons], dict]:
    """(train, validation, counts): from `val_data` when given, else each source split by its own groups."""
    if not cfg.data:
        raise UserError("no comparison data given (files of HH-RLHF pairs, OASST messages or ranked records)",
                        field="data")  # fmt: skip
    train_c, val_c, counts = [], [], {}
    sources = [(p, "train") for p in cfg.data] + [(p, "val") for p in cfg.val_data]
    for path, role in sources:
        stats: Counter = Counter()
        kind, items = preferences.read_source(path, lang=cfg.lang, skip_invalid=cfg.skip_invalid, stats=stats)
        if kind == "hh":
            comps = preferences.comparisons_from_hh(items)
        else:
            comps = preferences.comparisons_from_records(items, kind)
        if not comps:
            raise UserError("no comparisons: no prompt has two ranked answers (OASST `rank`) or chosen/rejected pair",
                            file=str(path))  # fmt: skip
        if cfg.max_prompts and len(comps) > cfg.max_prompts:
            # Whole groups are kept or dropped, so that the split below still separates trees.
            groups = sorted({c.group for c in comps})
            random.Random(cfg.seed).shuffle(groups)
            keep, kept = set(), 0
            for g in groups:
                if kept >= cfg.max_prompts:
                    break
                keep.add(g)
                kept += sum(c.group == g for c in comps)
            comps = [c for c in comps if c.group in keep]
        if cfg.val_data:
            tr, va = (comps, []) if role == "train" else ([], comps)
        else:
            tr, va = preferences.split(comps, cfg.val_fraction, cfg.seed)
        name = f"{role}:{Path(path).name}" if cfg.val_data else Path(path).name
        for c in comps:
            c.origin = name
        train_c += tr
        val_c += va
        counts[name] = {
            "kind": kind,
            "prompts": len(comps),
            "pairs": sum(len(c.pairs) for c in comps),
            "train_pairs": sum(len(c.pairs) for c in tr),
            "val_pairs": sum(len(c.pairs) for c in va),
            **{k: v for k, v in stats.items() if k in ("invalid", "identical")},
        }
    return train_c, val_c, counts


# ---------------------------------------------------------------- training pieces


def encode_comparisons(comps: list[Comparisons], backbone: str, tokenizer, max_length: int,
                       dropped: dict[str, Counter] | None = None) -> list[dict]:  # fmt: skip
    """One example per prompt: its responses tokenized and cut to `max_length` by the comparison rule (the answers
    are kept, the shared context is cut first: `invariants.truncate_comparison`), and its (better, worse) pairs.

    A pair whose two sides are the same tokens after that (an uncased or normalising tokenizer, or a length that
    leaves no room for the answers) is dropped and counted in `dropped[c.origin]` (`invariants.IDENTICAL`), as
    exact duplicates are before tokenization; a prompt with no pair left is left out."""
    dropped = {} if dropped is None else dropped
    texts = [
        rm_text(c.conversation(i).conversations, backbone, tokenizer) for c in comps for i in range(len(c.responses))
    ]
    ids = iter(tokenizer(texts, verbose=False)["input_ids"])
    special = tokenizer.all_special_ids
    out = []
    for c in comps:
        seqs = invariants.truncate_comparison([next(ids) for _ in c.responses], max_length, special)
        rows = invariants.Rows(dropped.setdefault(c.origin, Counter()))
        pairs = invariants.distinct_pairs(seqs, c.pairs, rows, field=c.group)
        if pairs:
            out.append({"input_ids": seqs, "pairs": pairs, "source": c.source, "chars": [len(r) for r in c.responses]})
    return out


def collate_comparisons(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Flatten the responses of a batch of prompts; pair indices point into the flat batch, `group` names the
    prompt of each pair (for the per-prompt average of the loss)."""
    seqs, chosen, rejected, group = [], [], [], []
    for g, row in enumerate(rows):
        base = len(seqs)
        seqs += row["input_ids"]
        for better, worse in row["pairs"]:
            chosen.append(base + better)
            rejected.append(base + worse)
            group.append(g)
    return {
        "input_ids": pad(seqs, pad_id),
        "attention_mask": pad([[1] * len(s) for s in seqs], 0),
        "chosen": torch.tensor(chosen, dtype=torch.long),
        "rejected": torch.tensor(rejected, dtype=torch.long),
        "group": torch.tensor(group, dtype=torch.long),
    }


def comparison_loss(model: heads.HeadModel, batch: dict) -> tuple[torch.Tensor, dict]:
    rewards = model(batch["input_ids"], batch["attention_mask"])[:, 0]
    r_w, r_l = rewards[batch["chosen"]], rewards[batch["rejected"]]
    loss = pairwise_loss(r_w, r_l, batch["group"])
    return loss, {"accuracy": (r_w > r_l).float().mean().item(), "margin": (r_w - r_l).mean().item()}


def pair_metrics(rows: list[dict], scores: list[list[float]], prefix: str = "val_") -> dict:
    """Pairwise accuracy (a tie counts as wrong), mean margin r_w - r_l and loss over all pairs, overall and per
    source."""
    by_source: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row, s in zip(rows, scores, strict=True):
        for better, worse in row["pairs"]:
            by_source[row["source"]].append((s[better], s[worse]))
    out: dict = {}
    parts = [("", [p for ps in by_source.values() for p in ps])]
    if len(by_source) > 1:
        parts += [(f"_{k}", v) for k, v in sorted(by_source.items())]
    for name, pairs in parts:
        if not pairs:
            continue
        margins = [rw - rl for rw, rl in pairs]
        out[f"{prefix}accuracy{name}"] = sum(m > 0 for m in margins) / len(pairs)
        out[f"{prefix}margin{name}"] = sum(margins) / len(pairs)
        # -log σ(m), computed stably for very negative margins
        out[f"{prefix}loss{name}"] = sum(math.log1p(math.exp(-m)) if m > -30 else -m for m in margins) / len(pairs)
        out[f"{prefix}pairs{name}"] = len(pairs)
    return out


def format_metrics(metrics: dict, prefix: str = "val_") -> str:
    """One fixed-format line: held-out pairwise accuracy (overall, then per source), margin and loss."""
    acc = f"accuracy {metrics.get(prefix + 'accuracy', 0):.3f}"
    per_source = [
        f"{k.removeprefix(prefix + 'accuracy_')} {v:.3f}"
        for k, v in metrics.items()
        if k.startswith(prefix + "accuracy_")
    ]
    if per_source:
        acc += f" ({', '.join(per_source)})"
    margin, loss = metrics.get(prefix + "margin", 0), metrics.get(prefix + "loss", 0)
    return f"held-out pairs {metrics.get(prefix + 'pairs', 0)} | {acc} | margin {margin:.3f} | loss {loss:.4f}"


def length_baseline(rows: list[dict]) -> float | None:
    """Pairwise accuracy of 'the longer answer wins' (in characters) over encoded comparisons, the trivial reward
    model to beat."""
    pairs = [(r["chars"][better], r["chars"][worse]) for r in rows for better, worse in r["pairs"]]
    return sum(a > b for a, b in pairs) / len(pairs) if pairs else None


def main(cfg: Config) -> dict:
    start = time.time()
    out = Path(cfg.out)
    if train.prepare_output(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, meta_name=META, what="reward-model"):
        print(f"train-rm: {out} is already complete (nothing to resume)")
        return {}
    backbone = cfg.backbone if cfg.backbone != "auto" else heads.backbone_kind(cfg.model)
    if backbone == "encoder" and cfg.train.lora.enabled:
        raise UserError("LoRA is offered for causal LM backbones; fine-tune an encoder fully (lora.r=0)",
                        field="train.lora.r")  # fmt: skip

    # 1. comparisons: every ranked pair of each prompt, split by OASST tree / HH pair
    train_c, val_c, counts = read_comparisons(cfg)
    if not val_c:
        raise UserError("no held-out comparisons (too few prompts for the validation fraction)", field="val_fraction")

    # 2. model: backbone (+ LoRA) and a scalar head
    base, tokenizer = models.load_encoder(cfg.model, device=torch.device("cpu"))
    if hasattr(base, "merge_and_unload"):  # e.g. initialised from a LoRA SFT model (InstructGPT starts from SFT)
        base = base.merge_and_unload()
    pooling = heads.resolve_pooling(cfg.pooling, backbone, base, cfg.model)
    if backbone == "causal":
        heads.pad_apart_from_eos(tokenizer, base)
    heads.freeze_unused(base, pooler_used=pooling == "cls")
    base = models.apply_lora(base, cfg.train.lora)
    torch.manual_seed(cfg.train.seed)
    # No bias: the pairwise loss sees only differences of rewards, so a bias would get no gradient; without one, a
    # causal reward model is exactly transformers' `*ForSequenceClassification`, whose `score` layer has none.
    model = heads.HeadModel(base, 1, pooling, bias=False)
    nn.init.normal_(model.head.weight, std=0.02)
    max_length = cfg.train.max_length
    # the tokens actually used must still compare two different things (invariants: dropped and counted per file)
    dropped: dict[str, dict[str, Counter]] = {"train": {}, "val": {}}
    train_rows = encode_comparisons(train_c, backbone, tokenizer, max_length, dropped["train"])
    val_rows = encode_comparisons(val_c, backbone, tokenizer, max_length, dropped["val"])
    for role, by_name in dropped.items():
        for name, n in by_name.items():
            for reason, k in n.items():
                counts[name][f"{role}_pairs"] -= k
                counts[name][reason] = counts[name].get(reason, 0) + k
    if not train_rows or not val_rows:
        raise UserError(f"no {'training' if not train_rows else 'held-out'} comparison left after tokenization "
                        f"(max_length {max_length}): {counts}", field="train.max_length")  # fmt: skip
    n_train, n_val = sum(len(r["pairs"]) for r in train_rows), sum(len(r["pairs"]) for r in val_rows)
    baseline = length_baseline(val_rows)
    print(f"train-rm: {cfg.model} ({backbone}, {pooling} pooling); {len(train_rows)} prompts / {n_train} pairs to "
          f"train, {len(val_rows)} / {n_val} held out; longer-answer-wins baseline {baseline:.3f}")  # fmt: skip
    for name, c in counts.items():
        print(f"  {name}: {c}")

    meta = {
        "kind": "reward", "backbone": backbone, "pooling": pooling, "max_length": max_length, "base_model": cfg.model,
        "lora": cfg.train.lora.enabled, "text_format": heads.TEXT_FORMAT, "data": counts,
    }  # fmt: skip

    # 3. held-out pairwise accuracy (the best-checkpoint criterion) and saving the best model as a loadable folder
    def evaluate(m) -> dict:
        flat = [ids for row in val_rows for ids in row["input_ids"]]
        scores = iter(score_ids(m, flat, tokenizer.pad_token_id, cfg.batch_size_eval))
        metrics = pair_metrics(val_rows, [[next(scores) for _ in row["input_ids"]] for row in val_rows])
        print(format_metrics(metrics), flush=True)
        return metrics

    def save_best(m, metrics: dict) -> None:
        staging = out / ".best.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        heads.save(m, tokenizer, staging, META, {**meta, "step_metrics": metrics}, backbone=backbone,
                   labels=(LABEL,), head_file=HEAD)  # fmt: skip
        models.publish_into(staging, out, META)

    out.mkdir(parents=True, exist_ok=True)
    config_lib.save(cfg, out)
    before = {}
    if not cfg.resume:
        model.eval()
        before = evaluate(model)
        model.train()
    summary = train.fit(model, train_rows, lambda rows: collate_comparisons(rows, tokenizer.pad_token_id),
                        comparison_loss, cfg.train, out, evaluate=evaluate, save_best=save_best, metric=cfg.metric,
                        higher_is_better=cfg.metric == "val_accuracy", resume=cfg.resume, desc="train-rm")  # fmt: skip
    # 4. the finished folder is the model: the resumable checkpoint is no longer needed
    shutil.rmtree(out / train.CHECKPOINT, ignore_errors=True)
    shutil.rmtree(out / f".{train.CHECKPOINT}.old", ignore_errors=True)
    best = models.read_meta(out, META).get("step_metrics", {})
    summary = {**summary, "length_baseline": baseline, "untrained": before, "best_metrics": best, "data": counts}
    write_json(out / "summary.json", summary)
    untrained = before.get("val_accuracy", float("nan"))
    print(f"train-rm: {summary['steps']} steps in {time.time() - start:.0f} s; best {format_metrics(best)} "
          f"(untrained accuracy {untrained:.3f}, longer-wins {baseline:.3f}) -> {out}", flush=True)  # fmt: skip
    return summary
