"""Attribute-conditioned supervised fine-tuning (SteerLM step 3, SPEC §5.3), or plain SFT as its baseline.

    steerlm sft --model=smollm2-135m-instruct --data=runs/x/prepare --out=runs/x/sft
    steerlm sft --model=tiny-lm --data=train.jsonl --val_data=val.jsonl --train.lora.r=8 --train.lr=2e-4
    steerlm sft --data=runs/x/prepare --out=runs/x/sft-nll --conditioning_loss.weight=0    # plain answer NLL
    torchrun --nproc_per_node 4 -m steerlm.cli sft --config configs/sft.yaml      # data-parallel (docs/sft.md)

1. read VALUE_TO_TEXT records (a `steerlm prepare`/`annotate` folder with train.jsonl and val.jsonl, or files);
   keep every quality level (SteerLM learns from all of them), or with `min_quality` train only on answers at
   or above a quality level (the paper's high-quality-subset baseline; lower answers stay as context);
2. choose what conditions the answers: the attribute string of each assistant turn (all attributes in the data, or
   `attributes`, plus computed ones such as `verbosity`), or nothing (`conditioning: none`: the labels are removed,
   so the attribute line is absent);
3. encode with the one masking function (`templates.encode`, SPEC §4): the loss falls on the answers and their end
   marker only; records with no trainable token left after truncation are dropped and counted. Each labelled
   answer also gets a corrupted twin for the discriminative term (`conditioning.py`);
4. train with the shared loop (`train.fit`: accelerate, validation loss, flip gap and the model's own attribute
   read-out at each validation, resumable checkpoints) on the NLL plus the discriminative term, and keep the best
   model by validation loss in `out/best` (a model folder, or a LoRA adapter folder, plus `steerlm_model.json`
   telling `steerlm generate` the schema, template and conditioning).
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from steerlm import conditioning, model_card, models, train
from steerlm import config as config_lib
from steerlm.attributes import (
    COMPUTED,
    MIDDLE,
    NAMED_SETS,
    AttributeSchema,
    LengthBuckets,
    check_guidance_reference,
    computed_to_dict,
)
from steerlm.batching import check_guidance_scale
from steerlm.conditioning import ConditioningLossArgs
from steerlm.config import TrainArgs
from steerlm.data import invariants, templates
from steerlm.data.records import (
    ASSISTANT,
    TRAIN_NAMES,
    VAL_NAMES,
    VALUE_TO_TEXT,
    Record,
    Turn,
    data_levels,
    find_split,
    read_records,
)
from steerlm.errors import UserError
from steerlm.generator import NO_GUIDANCE, resolve_guidance, saved_guidance
from steerlm.io import write_json

META = models.MODEL_META
BEST = "best"
SUMMARY = "summary.json"
#: How `truncation` cuts a conversation longer than the training window (`Config.truncation`).
TRUNCATIONS = ("end", "early_turns")


@dataclass
class Config:
    data: str
    """Training records: a folder with train.jsonl (and val.jsonl) from `steerlm prepare`/`annotate`, or a .jsonl
    file."""
    out: str = "runs/sft"
    """Output folder: best/ (the model), checkpoint/ (for --resume), metrics.jsonl, summary.json, config.yaml."""
    model: str = "smollm2-135m-instruct"
    """Base model: a built-in name, a Hugging Face folder or hub id, a .gguf file, or a steerlm model folder (a LoRA
    adapter folder continues training its adapter, or is merged first for full fine-tuning)."""
    val_data: str = ""
    """Validation records file (default: val.jsonl in the data folder, else `val_fraction` of the trees)."""
    val_fraction: float = 0.05
    """Without validation data: the share of conversation trees held out for validation (0: no validation; best/
    is then the last model)."""
    template: str = "auto"
    """Prompt style: 'chat' (the base model's own chat template, attribute line behind a marker), 'nemo' (NeMo's
    <extra_id_*> format, SPEC §3), or 'auto': the base steerlm model's style, else 'chat'."""
    conditioning: str = "attributes"
    """'attributes' (SteerLM: answers conditioned on their attribute string) or 'none' (plain SFT baseline)."""
    attributes: list[str] = field(default_factory=list)
    """Attributes kept in the attribute string (a list, or a named set: steerable, paper, helpsteer); default:
    every attribute found in the training data."""
    levels: int = 0
    """Levels per attribute, L (labels run 0..L-1); 0: the base steerlm model's schema, else the data folder's
    (`levels` in its stats.json, written by `steerlm prepare`/`annotate`), else 10 (SPEC §1)."""
    min_quality: int = -1
    """Train only on assistant turns whose quality label is >= this level (others stay as context; turns without a
    quality label are not trained on); -1 keeps every quality level, as SteerLM does."""
    computed: list[str] = field(default_factory=list)
    """Attributes computed from each response and set in its label (added to the schema): `verbosity`, the response's
    length bucket. Bucket edges: the base steerlm model's, else the data folder's computed.json (`steerlm prepare
    --computed=verbosity`), else fitted on the training responses; they are stored in steerlm_model.json."""
    label_dropout: float = 0.0
    """Fraction of trained assistant turns whose attribute line is left out (seeded), so the model also learns the
    unconditional answer: the neutral condition of attribute guidance (`--guidance_scale` at generation)."""
    guidance_scale: float | None = None
    """The attribute guidance the model is saved with (steerlm_model.json `guidance`): `steerlm generate`, `chat`,
    `serve` and the pipeline check use it where they set none (docs/steering.md, "Guidance against the middle
    level"). Unset: the base model's when it is a steerlm model (bootstrap's second round keeps the first's), else 1
    (none)."""
    guidance_reference: str | None = None
    """Its neutral condition: '', an attribute string, or 'middle' (`SamplingArgs.guidance_reference`). Unset: the
    base model's, else ''."""
    group_siblings: bool = False
    """Keep sibling replies to one prompt (records whose last answer has the same parent message) in one batch, so
    answers to the same prompt with different labels are learned side by side."""
    oversample_max: int = 1
    """Repeat examples whose attribute levels are rare: copies = round(sqrt(share of the attribute's commonest level /
    share of the example's level)), largest over attributes, capped at this (1: no oversampling)."""
    flip_gap: bool = True
    """At each validation also log `flip_gap`: mean per-token loss on validation answers under the mirrored attribute
    string (level q -> L-1-q) minus that under the true one. > 0 means the model uses the attributes."""
    flip_gap_examples: int = 64
    """Validation records used for flip_gap (the first N with labels; 0: all)."""
    flip_each: bool = False
    """Also log `flip_gap_<name>`, mirroring one attribute at a time (one more validation pass per attribute)."""
    conditioning_loss: ConditioningLossArgs = field(default_factory=ConditioningLossArgs)
    """The discriminative term that makes the model read the attribute line (GeDi §3.1; docs/steering.md):
    `weight` (lambda, 0: plain NLL) and `distance_power` (how corrupted levels are drawn)."""
    readout_examples: int = 16
    """Held-out answers of the model's own attribute read-out at each validation (`conditioning.readout`: the
    posterior over each attribute's levels from the answer's likelihood under every level; costs examples x
    attributes x L forward passes); 0: off."""
    truncation: str = "end"
    """How a training conversation longer than `train.max_length` tokens is cut: 'end' (its tokens past the window,
    SPEC §4) or 'early_turns' (its earliest exchanges first, so its last answer ends inside the window:
    `templates.drop_early_turns`; then the end). Validation records are always cut at the end, so validation loss
    compares across settings."""
    skip_invalid: bool = False
    """Count and skip malformed records instead of stopping at the first."""
    dtype: str = "fp32"
    """Weights dtype: 'fp32', 'bf16', 'fp16' or 'auto' (the checkpoint's own). For mixed precision (fp32 master
    weights, bf16 compute) keep fp32 here and set `--train.precision`."""
    resume: bool = False
    """Continue an interrupted run from out/checkpoint (same settings)."""
    overwrite: bool = False
    """Replace the outputs of an earlier run in `out`."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Optimisation (SteerLM paper, full fine-tuning: lr 5e-6, weight decay 1e-2, 5 epochs; LoRA wants ~1e-4)."""

    def __post_init__(self):
        self.dtype = config_lib.dtype_choice(self.dtype)
        self.attributes = config_lib.split_names(self.attributes)
        if self.template not in ("auto",) + templates.STYLES:
            raise ValueError(f"template must be 'auto', 'chat' or 'nemo', not {self.template!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATIONS)}, not {self.truncation!r}")
        if self.conditioning not in ("attributes", "none"):
            raise ValueError(f"conditioning must be 'attributes' or 'none', not {self.conditioning!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), not {self.val_fraction}")
        if self.levels != 0 and not 2 <= self.levels <= 100:
            raise ValueError(f"levels must be 0 (automatic) or between 2 and 100, not {self.levels}")
        if self.min_quality < -1:
            raise ValueError(f"min_quality must be >= 0, or -1 to keep every level, not {self.min_quality}")
        if self.conditioning == "none" and self.attributes:
            raise ValueError("attributes are meaningless with conditioning 'none'")
        self.computed = config_lib.split_names(self.computed)
        unknown = [n for n in self.computed if n not in COMPUTED]
        if unknown:
            raise ValueError(f"unknown computed attribute {unknown[0]!r}; known: {', '.join(COMPUTED)}")
        if self.conditioning == "none" and self.computed:
            raise ValueError("computed attributes are meaningless with conditioning 'none'")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), not {self.label_dropout}")
        if self.oversample_max < 1:
            raise ValueError(f"oversample_max must be >= 1, not {self.oversample_max}")
        if self.flip_gap_examples < 0:
            raise ValueError(f"flip_gap_examples must be >= 0, not {self.flip_gap_examples}")
        if self.guidance_scale is not None:
            check_guidance_scale(self.guidance_scale)
        if self.guidance_reference is not None:
            check_guidance_reference(self.guidance_reference)
        if self.conditioning == "none" and (self.guidance_scale not in (None, 1.0) or self.guidance_reference):
            raise ValueError("attribute guidance is meaningless with conditioning 'none'")


# ---------------------------------------------------------------- 1. data


def data_files(cfg: Config) -> tuple[Path, Path | None]:
    """(train file, validation file or None) from `data` (folder or file) and `val_data`."""
    data = Path(cfg.data)
    if data.is_dir():
        train_file = find_split(data, TRAIN_NAMES)
        if train_file is None:
            raise UserError(f"no {' or '.join(TRAIN_NAMES)} in the data folder", file=str(data))
        val = find_split(data, VAL_NAMES)
    elif data.is_file():
        train_file, val = data, None
    else:
        raise UserError("no such data folder or file", file=str(data))
    if cfg.val_data:
        val = Path(cfg.val_data)
        if not val.is_file():
            raise UserError("no such validation file", file=str(val))
    return train_file, val


def _label_keys(label: str) -> list[str]:
    return [part.partition(":")[0] for part in label.split(",") if part]


def data_schema(records: list[Record], levels: int, file: str) -> AttributeSchema | None:
    """A schema holding every attribute the labels use, to parse them strictly (out-of-range levels are errors)."""
    names = {k for r in records for t in r.assistant_turns if t.label for k in _label_keys(t.label)}
    if not names:
        return None
    try:
        return AttributeSchema(tuple(names), levels)
    except ValueError as e:
        raise UserError(f"bad attribute name in labels: {e}", file=file) from None


def parse_label(schema: AttributeSchema, label: str | None, file: str, index: int) -> dict[str, int]:
    if not label:
        return {}
    try:
        return schema.parse(label)
    except UserError as e:
        raise UserError(f"record {index + 1}: {e.reason}", file=file, field=e.field) from None


def condition(records: list[Record], *, data: AttributeSchema | None, schema: AttributeSchema | None,
              min_quality: int, file: str, stats: Counter) -> list[Record]:  # fmt: skip
    """Records as training sees them: labels re-rendered with `schema` (None: removed, plain SFT), VALUE_TO_TEXT,
    and answers below `min_quality` marked as context only (`templates.NO_LOSS`)."""
    out = []
    for i, r in enumerate(records):
        if r.type != VALUE_TO_TEXT:
            stats["converted to VALUE_TO_TEXT"] += 1
        turns, trained = [], 0
        for j, t in enumerate(r.conversations):
            levels = parse_label(data, t.label, file, i) if data is not None and t.role == ASSISTANT else {}
            label = (schema.render(schema.restrict(levels)) or None) if schema is not None else None
            extra = dict(t.extra)
            if t.role == ASSISTANT and j > 0:
                if min_quality >= 0 and levels.get("quality", -1) < min_quality:
                    extra[templates.NO_LOSS] = True
                    stats["answers below min_quality (context only)"] += 1
                else:
                    trained += 1
            turns.append(Turn(t.role, t.value, label if t.role == ASSISTANT else None, extra))
        if trained == 0 and min_quality >= 0:
            stats["records without an answer at min_quality"] += 1
            continue
        out.append(Record(turns, r.system, r.mask, VALUE_TO_TEXT, dict(r.extra)))
    return out


def build_examples(records: list[Record], tokenizer, style: str, max_length: int) -> tuple[list[dict], Counter]:
    """Token ids and SPEC §4 labels per record (`templates.encode_all`); (examples, dropped by reason)."""
    return templates.encode_all(records, tokenizer, style, max_length)


def encode_records(records: list[Record], tokenizer, style: str, max_length: int,
                   count: list[bool] | None = None) -> tuple[list[dict], list[int], Counter]:  # fmt: skip
    """As `build_examples`, also returning the index of each example's record; `count[i]` False leaves a dropped
    record out of the counts (an oversampled copy)."""
    examples, kept, dropped = [], [], Counter()
    rows, copies = invariants.Rows(dropped), invariants.Rows()  # an oversampled copy is not counted again
    for i, r in enumerate(records):
        ex = templates.encode(r, tokenizer, style, max_length)  # None: the shared nothing-to-learn check failed
        if not (rows if count is None or count[i] else copies).keep(None if ex else invariants.NOTHING_TO_LEARN):
            continue
        examples.append(ex)
        kept.append(i)
    return examples, kept, dropped


# ---------------------------------------------------------------- 2. model


def load_model(cfg: Config, accelerator):
    """(model, tokenizer, lora): the base model, with LoRA applied when `train.lora.r > 0`. A LoRA adapter folder as
    base keeps training its adapter (LoRA) or is merged into its base first (full fine-tuning)."""
    model, tokenizer = models.load_causal_lm(cfg.model, dtype=cfg.dtype, device=accelerator.device,
                                             lora_trainable=cfg.train.lora.enabled)  # fmt: skip
    if hasattr(model, "merge_and_unload"):
        if cfg.train.lora.enabled:
            accelerator.print(f"sft: continuing the LoRA adapter of {cfg.model} (its own rank and targets)")
        else:
            model = model.merge_and_unload().requires_grad_(True)  # peft froze the base weights
    else:
        model = models.apply_lora(model, cfg.train.lora)
    model.train()
    return model, tokenizer, hasattr(model, "merge_and_unload")


# ---------------------------------------------------------------- 3. training


def make_evaluate(examples: list[dict], collate, batch_size: int, accelerator,
                  flips: tuple[list[dict], dict[str, list[dict]]] | None = None, readout_fn=None):  # fmt: skip
    """Validation loss per trainable token over all of `examples`. With `flips` (`conditioning.flip_sets`), also the
    flip gaps; with `readout_fn(model) -> dict`, the model's own attribute read-out (`conditioning.readout`), logged
    flat as `readout_<attribute>_<metric>`."""

    def evaluate(model) -> dict:
        total = conditioning.loss_sums(model, examples, collate, batch_size, accelerator)
        val_loss = float(total[0] / total[1]) if total[1] > 0 else float("nan")
        metrics = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "val_tokens": int(total[1])}
        if flips and flips[0]:
            metrics.update(conditioning.flip_gaps(model, flips, collate, batch_size, accelerator))
            accelerator.print("flip gap (loss with mirrored attributes - loss with true ones, per token): "
                              + ", ".join(f"{k} {v:+.4f}" for k, v in metrics.items() if k.startswith("flip_gap")))  # fmt: skip
        if readout_fn is not None:
            result = readout_fn(model)
            accelerator.print("attribute read-out (the model as its own APM, held-out answers):\n"
                              + conditioning.format_readout(result))  # fmt: skip
            for name, r in result.items():
                for k in ("spearman", "accuracy", "within1"):
                    metrics[f"readout_{name}_{k}"] = r[k]
        return metrics

    return evaluate


def prepare_out(cfg: Config, accelerator) -> Path:
    """Check the output folder against resume/overwrite; clear an earlier run's outputs on overwrite."""
    out = Path(cfg.out)
    ours = [BEST, train.CHECKPOINT, f".{train.CHECKPOINT}.old", f".{train.CHECKPOINT}.tmp", train.METRICS, SUMMARY,
            "config.yaml"]  # fmt: skip
    existing = [n for n in ours if (out / n).exists()]
    if existing and not (cfg.resume or cfg.overwrite):
        raise UserError("output folder holds an earlier run; pass --resume to continue it or --overwrite", field="out")
    accelerator.wait_for_everyone()
    if existing and cfg.overwrite and not cfg.resume and accelerator.is_main_process:
        for n in existing:
            shutil.rmtree(out / n) if (out / n).is_dir() else (out / n).unlink()
    accelerator.wait_for_everyone()
    if cfg.resume and not train.has_checkpoint(out):
        accelerator.print(f"sft: no checkpoint in {out}; starting from the beginning")
    return out


def run(cfg: Config) -> tuple[dict, torch.nn.Module]:
    """Train; returns (summary, trained model). `main` returns the summary only."""
    from steerlm.data.oasst import split_by_tree

    accelerator = train.accelerator_for(cfg.train)  # precision 'auto' resolved here, so config.yaml records it
    say = accelerator.print
    out = prepare_out(cfg, accelerator)

    # 1. data: read, pick the validation split, condition the labels
    train_file, val_file = data_files(cfg)
    stats: Counter = Counter()
    train_records = read_records(train_file, skip_invalid=cfg.skip_invalid, stats=stats)
    val_records = read_records(val_file, skip_invalid=cfg.skip_invalid, stats=stats) if val_file else []
    if val_file is None and cfg.val_fraction > 0:
        train_records, val_records = split_by_tree(train_records, cfg.val_fraction, cfg.train.seed)
    if not train_records:
        raise UserError("no training records", file=str(train_file))
    meta = models.model_meta(cfg.model)
    levels = (
        cfg.levels or ((meta.get("attributes") or {}).get("levels") if meta else 0) or data_levels(train_file) or 10
    )
    computed: dict[str, LengthBuckets] = {}
    wanted: dict[str, LengthBuckets] = {}
    if cfg.conditioning == "attributes":  # computed attributes (verbosity) are set from the answers' text
        # a steerlm base model's computed attributes are set again too (bootstrap's round: APM labels lack them)
        to_set = list(dict.fromkeys(cfg.computed + list((meta or {}).get("computed") or {})))
        computed, origin = conditioning.computed_buckets(to_set, meta=meta, data_folder=train_file.parent,
                                            train_records=train_records, levels=levels)  # fmt: skip
        wanted = {n: computed[n] for n in to_set}
        conditioning.add_computed_labels(train_records + val_records, wanted, levels)
        for n, b in computed.items():
            say(f"sft: computed attribute {n}: {b.unit} edges {list(b.edges)} ({origin[n]})")
    data = data_schema(train_records + val_records, levels, str(train_file))
    schema = None
    if cfg.conditioning == "attributes":
        names = cfg.attributes
        if len(names) == 1 and names[0] in NAMED_SETS:
            names = list(NAMED_SETS[names[0]])
        if names:
            names = list(dict.fromkeys(list(names) + list(wanted)))
        if not names and data is None:
            raise UserError("no assistant turn carries an attribute label; use --conditioning=none for plain SFT",
                            file=str(train_file))  # fmt: skip
        try:
            schema = AttributeSchema(tuple(names) if names else data.names, levels)
        except ValueError as e:
            raise UserError(str(e), field="attributes") from None
    if cfg.min_quality >= 0 and (data is None or "quality" not in data.names):
        raise UserError("min_quality needs quality labels, and no record has one", file=str(train_file))
    if cfg.min_quality > levels - 1:
        raise UserError(f"min_quality {cfg.min_quality} is above the top level {levels - 1}", field="min_quality")
    # the guidance saved with the model (its base's unless set): names and levels checked now, not at generation
    guidance = NO_GUIDANCE
    if schema is not None:
        resolved = resolve_guidance({"guidance_scale": cfg.guidance_scale, "guidance_reference": cfg.guidance_reference},
                                    saved_guidance(meta, f"{cfg.model}/{META}"))  # fmt: skip
        guidance = (resolved["guidance_scale"], resolved["guidance_reference"])
        if guidance[1] not in ("", MIDDLE):
            try:
                schema.parse(guidance[1])
            except UserError as e:
                raise UserError(e.reason, field="guidance_reference") from None
    kw = dict(data=data, schema=schema, min_quality=cfg.min_quality, stats=stats)
    train_records = condition(train_records, file=str(train_file), **kw)
    val_records = condition(val_records, file=str(val_file or train_file), **kw)

    # steering levers (docs/steering.md): oversample rare levels, drop some attribute lines, group siblings
    levers: dict = {}
    copies = (
        conditioning.oversample_copies(train_records, schema, cfg.oversample_max)
        if schema
        else [1] * len(train_records)
    )
    if cfg.oversample_max > 1:
        levers["oversampled extra copies"] = sum(c - 1 for c in copies)
    plan_records, plan_keys, first_copy = [], [], []
    for i, (r, c) in enumerate(zip(train_records, copies, strict=True)):
        key = conditioning.sibling_key(r, i) if cfg.group_siblings else None
        for k in range(c):
            plan_records.append(r)
            plan_keys.append(key if k == 0 else f"{key}#copy{k}")
            first_copy.append(k == 0)
    if schema is not None and cfg.label_dropout > 0:
        plan_records, n_dropped = conditioning.drop_labels(plan_records, cfg.label_dropout, cfg.train.seed)
        levers["answers without attribute line (label_dropout)"] = n_dropped

    # 2. model and template
    model, tokenizer, lora = load_model(cfg, accelerator)
    style = cfg.template if cfg.template != "auto" else (meta or {}).get("template", "chat")

    # 3. encode (SPEC §4 masks); records with nothing trainable left are dropped and counted
    if cfg.truncation == "early_turns":
        cut = [templates.drop_early_turns(r, tokenizer, style, cfg.train.max_length) for r in plan_records]
        levers["conversations cut at their earliest turns (truncation)"] = sum(
            c is not r for c, r in zip(cut, plan_records, strict=True)
        )
        plan_records = cut
    train_examples, kept, dropped = encode_records(plan_records, tokenizer, style, cfg.train.max_length, first_copy)
    groups = [plan_keys[i] for i in kept] if cfg.group_siblings else None
    if groups is not None:
        levers["sibling groups"] = len(set(groups))
    # the discriminative term's twins: the same answers under an attribute line with one attribute moved
    weight = cfg.conditioning_loss.weight if schema is not None else 0.0
    if weight > 0:
        movable, shares = cfg.conditioning_loss.attributes, cfg.conditioning_loss.shares
        for name, names in (("attributes", movable), ("shares", shares)):
            unknown = [n for n in names if n not in schema.names]
            if unknown:
                raise UserError(f"{unknown[0]!r} is not in the attribute line ({', '.join(schema.names)})",
                                field=f"conditioning_loss.{name}")  # fmt: skip
        if not any(conditioning.can_move(n, movable, shares) for n in schema.names):
            raise UserError("every attribute has share 0: nothing to contrast", field="conditioning_loss.shares")
        twins = conditioning.corrupt_records([plan_records[i] for i in kept], schema, cfg.train.seed,
                                             cfg.conditioning_loss.distance_power, cfg.conditioning_loss.corrupt,
                                             movable, shares)  # fmt: skip
        for n, twin in enumerate(twins):
            alt = templates.encode(twin, tokenizer, style, cfg.train.max_length) if twin is not None else None
            train_examples[n] = conditioning.pair_example(train_examples[n], alt)
        levers["answers with a corrupted twin (conditioning_loss)"] = sum("alt_input_ids" in e for e in train_examples)
    val_examples, val_dropped = build_examples(val_records, tokenizer, style, cfg.train.max_length)
    if not train_examples:
        raise UserError(f"no training example left after encoding ({dict(dropped)})", file=str(train_file))
    notes = {k: v for k, v in stats.items()}
    for k, v in dropped.items():
        notes[f"train dropped: {k}"] = v
    for k, v in val_dropped.items():
        notes[f"val dropped: {k}"] = v
    say(f"sft: {len(train_records)} train / {len(val_records)} val records -> {len(train_examples)} / "
        f"{len(val_examples)} examples; template {style}, conditioning {cfg.conditioning}"
        + (f" ({schema.levels} levels: {', '.join(schema.names)})" if schema else ""))  # fmt: skip
    for k, v in notes.items():
        say(f"sft:   {k}: {v}")
    for k, v in levers.items():
        say(f"sft:   {k}: {v}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        config_lib.save(cfg, out)

    # 4. train; the best model by validation loss is saved as out/best
    out_meta = {"attributes": schema.to_dict() if schema else None, "template": style,
                "conditioning": cfg.conditioning, "base_model": cfg.model, "lora": lora}  # fmt: skip
    kept_computed = {n: b for n, b in computed.items() if schema is not None and n in schema.names}
    if kept_computed:  # the edges travel with the model: measurement uses the ones training used
        out_meta["computed"] = computed_to_dict(kept_computed)
    if schema is not None and cfg.label_dropout > 0:
        out_meta["label_dropout"] = cfg.label_dropout  # the unconditional prompt was trained (attribute guidance)
    if guidance != NO_GUIDANCE:
        out_meta["guidance"] = {"scale": guidance[0], "reference": guidance[1]}
    if weight > 0:
        out_meta["conditioning_loss"] = {"weight": weight, "distance_power": cfg.conditioning_loss.distance_power,
                                         "corrupt": cfg.conditioning_loss.corrupt,
                                         "attributes": list(cfg.conditioning_loss.attributes),
                                         "shares": dict(cfg.conditioning_loss.shares),
                                         "reduce": cfg.conditioning_loss.reduce,
                                         "scale": cfg.conditioning_loss.scale,
                                         "gap_clip": cfg.conditioning_loss.gap_clip}  # fmt: skip

    def save_best(m, metrics: dict) -> None:
        models.save_model(m, tokenizer, out / BEST, META, out_meta)

    collate = partial(conditioning.collate_pairs, pad_id=tokenizer.pad_token_id,
                      capacity=cfg.train.max_length if cfg.train.packing else 0)  # fmt: skip
    flips = None
    if schema is not None and cfg.flip_gap and val_records:
        flips = conditioning.flip_sets(val_records, schema, tokenizer, style, cfg.train.max_length,
                                       cfg.flip_gap_examples, cfg.flip_each)  # fmt: skip
    readouts: list[dict] = []
    readout_fn = None
    items = (conditioning.readout_items(val_records, schema, limit=cfg.readout_examples, tokenizer=tokenizer,
                                        style=style, max_length=cfg.train.max_length) if schema else [])  # fmt: skip
    if items and cfg.readout_examples > 0:

        def readout_fn(m) -> dict:
            readouts.append(conditioning.readout(m, tokenizer, items, schema, style, cfg.train.max_length,
                                                 2 * cfg.train.batch_size, accelerator.device))  # fmt: skip
            return readouts[-1]

    evaluate = (make_evaluate(val_examples, collate, cfg.train.batch_size, accelerator, flips, readout_fn)
                if val_examples else None)  # fmt: skip
    loss_fn = partial(conditioning.conditioned_lm_loss, weight=weight, reduce=cfg.conditioning_loss.reduce,
                      scale=cfg.conditioning_loss.scale, gap_clip=cfg.conditioning_loss.gap_clip)  # fmt: skip
    summary = train.fit(model, train_examples, collate, loss_fn, cfg.train, out, evaluate=evaluate,
                        save_best=save_best, resume=cfg.resume, groups=groups, desc="sft",
                        accelerator=accelerator)  # fmt: skip
    trained = accelerator.unwrap_model(model)
    if evaluate is None and accelerator.is_main_process:
        save_best(trained, {})
        say("sft: no validation data; best/ is the last model")
    accelerator.wait_for_everyone()
    summary.update(train_records=len(train_records), val_records=len(val_records), train_examples=len(train_examples),
                   val_examples=len(val_examples), dropped=notes, num_processes=accelerator.num_processes,
                   template=style, conditioning=cfg.conditioning, attributes=out_meta["attributes"], lora=lora,
                   best_dir=str(out / BEST), steering=levers, conditioning_loss=out_meta.get("conditioning_loss"),
                   readout=readouts[-1] if readouts else None)  # fmt: skip
    if accelerator.is_main_process:
        write_json(out / SUMMARY, summary)
        model_card.write(out / BEST, summary=summary)  # the card now has the measured loss, flip gap and read-out
    best = "n/a" if summary.get("best") is None else f"{summary['best']:.4f} at step {summary['best_step']}"
    say(f"sft: {summary['steps']} steps in {summary['seconds']} s on {accelerator.num_processes} process(es); "
        f"best val_loss {best} -> {out / BEST}")  # fmt: skip
    return summary, trained


def main(cfg: Config) -> dict:
    return run(cfg)[0]
