"""Everything that teaches a model to read the attribute line (SteerLM step 3, docs/steering.md), in one place.

    steerlm sft --data=runs/x/data --conditioning_loss.weight=1.0      # NLL + the discriminative term (default)
    steerlm sft --data=runs/x/data --conditioning_loss.weight=0        # plain answer NLL (the ablation)
    steerlm readout --model=runs/x/sft/best --data=runs/x/data/val.jsonl   # the model's own attribute read-out

Plain answer NLL gives the attribute line almost no gradient: most answer tokens do not depend on the attributes,
so their loss drowns the little that does. Measured on this CPU, 100 LoRA steps of plain NLL left the flip gap at
+0.0002 nats/token and the answers identical at every requested level. This module owns the levers that fix that
and the metrics that show it:

- **corrupted attribute strings** (`corrupt_levels`, `corrupt_records`): the same answer under a label with one
  attribute moved to another level;
- **the discriminative term** (`conditioned_lm_loss`): the two-condition form of GeDi's generative-discriminative
  training (Krause et al., 2021, "GeDi", §3.1): `weight * softplus(log p(answer | prompt, corrupted) -
  log p(answer | prompt, true))`, log p summed over the answer tokens, both rows in one batched forward pass. The
  corrupted rows never enter the language-modelling term;
- **label dropout** (`drop_labels`), **oversampling** of rare levels (`oversample_copies`), **sibling grouping**
  (`sibling_key`), **computed attributes** (`computed_buckets`, `add_computed_labels`);
- **read-outs**: the flip gap (`flip_sets`, `flip_gaps`) and the model's own attribute read-out (`readout`): Bayes'
  rule over the model's class-conditional likelihoods, as GeDi uses them, giving each held-out answer a posterior
  over the levels of each attribute.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from steerlm import config as config_lib
from steerlm.attributes import AttributeSchema, LengthBuckets, computed_from_dict, flip_levels, with_computed
from steerlm.data import templates
from steerlm.data.collate import (
    collate_packed,
    example_sums,
    example_tokens,
    model_inputs,
    pad,
    supports_logits_to_keep,
)
from steerlm.data.records import ASSISTANT, Record, Turn
from steerlm.errors import UserError

#: How many attributes of a label a corruption moves (`ConditioningLossArgs.corrupt`).
CORRUPT_MODES = ("one", "each")
#: How the answer's token log-probabilities enter the gap (`ConditioningLossArgs.reduce`).
REDUCE_MODES = ("sum", "mean")
#: Length-bucket edges written by `steerlm prepare --computed=verbosity` beside train.jsonl.
COMPUTED_FILE = "computed.json"


@dataclass
class ConditioningLossArgs:
    """The discriminative term of attribute-conditioned SFT (GeDi §3.1, two-condition form)."""

    weight: float = 1.0
    """lambda: weight of `softplus(log p(answer | corrupted line) - log p(answer | true line))` (log p summed over the
    answer's tokens) added to the per-token NLL. 0 trains plain NLL (no corrupted rows are built). Each trained
    answer costs a second row in the same forward pass (2x the rows, not 2x the steps)."""
    distance_power: float = 1.0
    """How a corrupted level is drawn: another level, with probability proportional to |new - true| **
    distance_power. 1 (default) favours far levels, whose difference the answer shows most, yet keeps near levels
    in play so neighbouring levels are told apart too; 0 draws the other levels uniformly (measured on the
    quickstart: 0 read the line better and made most answers an attribute line, docs/steering.md)."""
    corrupt: str = "one"
    """Which attributes of the label move: 'one' (drawn uniformly: every pair contrasts exactly one attribute) or
    'each' (every attribute independently with probability 1/2, at least one: with several attributes, each is
    contrasted in more of the pairs)."""
    attributes: list[str] = field(default_factory=list)
    """The attributes the corrupted lines move (the others keep their true levels); default: every attribute of the
    label. Narrowing it puts every pair on the attributes that must steer generation: measured, verbosity steered
    the answers' length only when every pair contrasted it (docs/steering.md)."""
    shares: dict[str, float] = field(default_factory=dict)
    """With corrupt='one': how often each attribute is the one that moves, relative to the others (those not named
    get 1; 0 never moves). {verbosity: 4, quality: 1, humor: 1} contrasts verbosity in two thirds of the pairs and
    quality and humor in a sixth each, so every attribute of the line is read while the one whose steering needs
    the most pairs keeps most of them (docs/steering.md). Default: equal shares."""
    reduce: str = "sum"
    """How log p(answer | line) is taken over the answer's tokens: 'sum' (the log-likelihood of the whole answer:
    a long answer's gap is large, so it saturates the softplus early, and every token of an unsaturated pair gets up
    to weight/2 of gradient) or 'mean' (GeDi §3.1's length-normalised form, log p / T: every answer saturates at the
    same per-token gap, whatever its length; pair it with `scale`)."""
    scale: float = 1.0
    """The gap is multiplied by this before the softplus: GeDi's alpha, the sharpness of the class posterior. With
    reduce='mean' the term saturates once the per-token gap reaches a few / scale nats (the flip gap)."""
    gap_clip: float = 0.0
    """> 0: each answer token adds at most this many nats (in the true line's favour) to the gap, so the term cannot
    be met by a few tokens made very unlikely under the corrupted line. Measured on the quickstart (unclipped), the
    corrupted lines pointed mostly at level 0 and the level-0 line unlearnt an answer's first token (next-token
    entropy 6.8 nats there against 3.7-4.4 under the other lines), which guidance turned into fragments; clipped at
    1 nat, level 0 answered (docs/steering.md). 0: no clip."""

    def __post_init__(self):
        self.attributes = config_lib.split_names(self.attributes)
        if self.corrupt not in CORRUPT_MODES:
            raise ValueError(f"corrupt must be one of {', '.join(CORRUPT_MODES)}, not {self.corrupt!r}")
        if self.reduce not in REDUCE_MODES:
            raise ValueError(f"reduce must be one of {', '.join(REDUCE_MODES)}, not {self.reduce!r}")
        if not (0 < self.scale <= 1000):
            raise ValueError(f"scale must be in (0, 1000], not {self.scale}")
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise ValueError(f"weight must be a finite number >= 0, not {self.weight}")
        if not (0 <= self.gap_clip < math.inf):
            raise ValueError(f"gap_clip must be a finite number >= 0, not {self.gap_clip}")
        if not (0 <= self.distance_power <= 8):
            raise ValueError(f"distance_power must be in [0, 8], not {self.distance_power}")
        bad = [f"{k}: {v}" for k, v in self.shares.items()
               if not isinstance(v, (int, float)) or not (v >= 0 and math.isfinite(v))]  # fmt: skip
        if bad:
            raise ValueError(f"shares must be finite numbers >= 0, not {', '.join(bad)}")
        if self.shares and self.corrupt != "one":
            raise ValueError("shares apply to corrupt='one' (one attribute moves per pair)")
        if self.attributes and not any(can_move(n, self.attributes, self.shares) for n in self.attributes):
            raise ValueError("shares leave none of attributes to move")
        outside = [k for k in self.shares if self.attributes and k not in self.attributes]
        if outside:
            raise ValueError(f"shares names {outside[0]!r}, which is not in attributes ({', '.join(self.attributes)})")


# ---------------------------------------------------------------- trained turns, computed attributes


def trained_turns(record: Record) -> list[int]:
    """Indices of the assistant turns the loss falls on, by the one SPEC §4 rule (`templates.is_trained`): never the
    first turn, never a user turn or a turn of the record's masked role, never a `no_loss` answer."""
    return [j for j in range(len(record.conversations)) if templates.is_trained(record, j)]


def computed_buckets(names: list[str], *, meta: dict | None, data_folder: Path, train_records: list[Record],
                     levels: int) -> tuple[dict[str, LengthBuckets], dict[str, str]]:  # fmt: skip
    """Bucket edges of computed attributes: those of `names`, plus any in the data folder's computed.json (labels
    from `steerlm prepare --computed`). Sources in order: the base steerlm model (continued training keeps its
    edges), the data folder, a fit on the training responses. Returns (name -> buckets, name -> source)."""
    sources = []
    if meta and meta.get("computed"):
        sources.append(("base model", computed_from_dict(meta["computed"])))
    data_file = data_folder / COMPUTED_FILE
    if data_file.is_file():
        try:
            sources.append((str(data_file), computed_from_dict(json.loads(data_file.read_text(encoding="utf-8")))))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"bad computed attributes file: {e}", file=str(data_file)) from None
    wanted = list(dict.fromkeys(names + [n for _, found in sources for n in found]))
    out, origin = {}, {}
    for name in wanted:
        for where, found in sources:
            if name in found and found[name].levels == levels:
                out[name], origin[name] = found[name], where
                break
        else:
            if name in names:
                texts = [t.value for r in train_records for t in r.assistant_turns]
                out[name], origin[name] = LengthBuckets.fit(texts, levels), "fitted on the training responses"
    return out, origin


def add_computed_labels(records: list[Record], computed: dict[str, LengthBuckets], levels: int) -> None:
    """Set the computed attributes of every assistant turn from its text, in place (other labels kept)."""
    if not computed:
        return
    for r in records:
        for t in r.assistant_turns:
            t.label = with_computed(t.label, t.value, computed, levels)


def _copy(record: Record, labels: dict[int, str | None]) -> Record:
    """`record` with the labels of the turns in `labels` replaced (turn index -> new label)."""
    turns = [Turn(t.role, t.value, labels.get(j, t.label), dict(t.extra)) for j, t in enumerate(record.conversations)]
    return Record(turns, record.system, record.mask, record.type, dict(record.extra))


# ---------------------------------------------------------------- label dropout, siblings, oversampling


def drop_labels(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], int]:
    """Copies of `records` where each trained, labelled assistant turn loses its attribute line with probability
    `fraction` (seeded): the model learns the unconditional answer too, the neutral condition of attribute guidance
    (`templates.inference_segments(record, None)`). Returns (records, turns dropped)."""
    rng = random.Random(seed * 7919 + 17)
    out, dropped = [], 0
    for r in records:
        gone = {}
        for j in trained_turns(r):
            if fraction > 0 and r.conversations[j].label is not None and rng.random() < fraction:
                gone[j] = None
        dropped += len(gone)
        out.append(_copy(r, gone))
    return out, dropped


def sibling_key(record: Record, index: int) -> str:
    """The batch group of a record: the parent message of its last trained answer (OASST `message_id` of the user
    turn before it, else that conversation prefix's text), so sibling replies to one prompt, often with different
    labels, are learned side by side."""
    trained = trained_turns(record)
    if not trained:
        return f"record:{index}"
    last = trained[-1]
    parent = record.conversations[last - 1]
    if parent.extra.get("message_id"):
        return f"id:{parent.extra['message_id']}"
    prefix = json.dumps([record.system] + [(t.role, t.value) for t in record.conversations[:last]])
    return "text:" + hashlib.sha1(prefix.encode("utf-8")).hexdigest()


def oversample_copies(records: list[Record], schema: AttributeSchema, max_copies: int) -> list[int]:
    """How many times each record is used: rare attribute levels (of its last trained answer) are repeated,
    round(sqrt(count of the attribute's commonest level / count of its level)), largest over attributes, capped at
    `max_copies`. Computed attributes with quantile buckets are near-uniform and so get ~1."""
    if max_copies <= 1:
        return [1] * len(records)
    last_levels = []
    for r in records:
        trained = trained_turns(r)
        label = r.conversations[trained[-1]].label if trained else None
        last_levels.append(schema.parse(label) if label else {})
    counts: dict[str, Counter] = {}
    for levels in last_levels:
        for k, v in levels.items():
            counts.setdefault(k, Counter())[v] += 1
    copies = []
    for levels in last_levels:
        weight = max((math.sqrt(max(counts[k].values()) / counts[k][v]) for k, v in levels.items()), default=1.0)
        copies.append(max(1, min(max_copies, round(weight))))
    return copies


# ---------------------------------------------------------------- corrupted attribute strings


def can_move(name: str, movable: Sequence[str] = (), shares: Mapping[str, float] | None = None) -> bool:
    """Whether a corrupted line may move attribute `name`: it is in `movable` (every attribute when empty) and its
    share (`ConditioningLossArgs.shares`, default 1) is above 0."""
    return (not movable or name in movable) and (shares or {}).get(name, 1.0) > 0


def corrupt_levels(levels: dict[str, int], max_level: int, rng: random.Random, power: float = 1.0,
                   mode: str = "one", movable: Sequence[str] = (),
                   shares: Mapping[str, float] | None = None) -> dict[str, int]:  # fmt: skip
    """`levels` with attributes moved to other levels, each new level drawn with probability proportional to
    |new - old| ** power: one attribute drawn uniformly, or in proportion to `shares` (default 1 each; `mode`
    'one'), or every attribute with probability 1/2 and at least one ('each'); only those in `movable` when it is
    given. Raises ValueError when nothing can move (no attribute, none of `movable` in `levels` with a share above 0,
    or a schema with one level)."""
    shares = shares or {}
    names = sorted(n for n in levels if can_move(n, movable, shares))
    if not names or max_level < 1:
        raise ValueError("nothing to corrupt: no attribute, or only one level")
    if mode == "each":
        moved = [n for n in names if rng.random() < 0.5] or [rng.choice(names)]
    elif shares:
        moved = rng.choices(names, weights=[shares.get(n, 1.0) for n in names])
    else:
        moved = [rng.choice(names)]
    out = dict(levels)
    for name in moved:
        choices = [v for v in range(max_level + 1) if v != levels[name]]
        out[name] = rng.choices(choices, weights=[abs(v - levels[name]) ** power for v in choices])[0]
    return out


def corrupt_records(records: Sequence[Record], schema: AttributeSchema, seed: int, power: float = 1.0,
                    mode: str = "one", movable: Sequence[str] = (),
                    shares: Mapping[str, float] | None = None) -> list[Record | None]:  # fmt: skip
    """For each record, a copy whose trained, labelled assistant turns each carry a corrupted attribute string
    (`corrupt_levels`, seeded by `seed` and the record's position; only `movable` attributes move when given, in
    proportion to `shares` when given); None where no trained turn has a label among them (label dropout, or
    unlabelled data) — such records get no discriminative term."""
    rng = random.Random(seed * 104_729 + 3)
    out: list[Record | None] = []
    for r in records:
        new = {}
        for j in trained_turns(r):
            label = r.conversations[j].label
            levels = schema.parse(label) if label else {}
            if any(can_move(n, movable, shares) for n in levels):
                new[j] = schema.render(corrupt_levels(levels, schema.max_level, rng, power, mode, movable, shares))
        out.append(_copy(r, new) if new else None)
    return out


def align_trained(a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
    """Labels of two encodings of the same answers under different attribute lines, cut to the same number of
    trained tokens (an attribute line of another length shifts where right truncation falls), so their summed log
    probabilities cover the same answer tokens."""
    n = min(sum(x != templates.IGNORE_INDEX for x in a), sum(x != templates.IGNORE_INDEX for x in b))

    def keep_first(labels: list[int]) -> list[int]:
        out, seen = [], 0
        for x in labels:
            if x != templates.IGNORE_INDEX:
                seen += 1
                out.append(x if seen <= n else templates.IGNORE_INDEX)
            else:
                out.append(x)
        return out

    return keep_first(a), keep_first(b)


def pair_example(true: dict, alt: dict | None) -> dict:
    """One training example: the true encoding, and its corrupted twin under `alt_input_ids`/`alt_labels` (aligned
    with `align_trained`), or no twin."""
    if alt is None:
        return dict(true)
    labels, alt_labels = align_trained(true["labels"], alt["labels"])
    if all(x == templates.IGNORE_INDEX for x in labels):
        return dict(true)
    return {"input_ids": true["input_ids"], "labels": labels, "alt_input_ids": alt["input_ids"],
            "alt_labels": alt_labels}  # fmt: skip


def collate_pairs(examples: list[dict], pad_id: int, capacity: int = 0) -> dict[str, torch.Tensor]:
    """Examples (some with a corrupted twin) -> one padded batch of R = B + (twins) rows: the B true rows first, then
    the twins. `pair_of` (R,) is -1 on true rows and, on a twin row, the index of its true row. With `capacity` > 0,
    the B + twins sequences are packed instead (`collate.collate_packed`, rows of at most `capacity` tokens) and
    `pair_of` indexes those sequences in the same order."""
    ids = [e["input_ids"] for e in examples]
    labels = [e["labels"] for e in examples]
    pair_of = [-1] * len(examples)
    for i, e in enumerate(examples):
        if "alt_input_ids" in e:
            ids.append(e["alt_input_ids"])
            labels.append(e["alt_labels"])
            pair_of.append(i)
    if capacity > 0:
        packed = collate_packed([{"input_ids": s, "labels": x} for s, x in zip(ids, labels, strict=True)], pad_id,
                                capacity)  # fmt: skip
        return {**packed, "pair_of": torch.tensor(pair_of, dtype=torch.long)}
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "labels": pad(labels, templates.IGNORE_INDEX),
        "pair_of": torch.tensor(pair_of, dtype=torch.long),
    }


# ---------------------------------------------------------------- the loss


def token_nll(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labelled tokens: (nll (R, T-1) float32, 0 where unlabelled; mask
    (R, T-1) bool), where position t predicts token t+1 and the mask marks labels != -100 (SPEC §4). Padded or packed
    batches. The LM head runs on the labelled positions only when the model takes a per-row `logits_to_keep`
    (`collate.supports_logits_to_keep`): the prompt's positions (about half of the quickstart's tokens) need no
    (vocabulary)-wide logits, which are a fifth of a 135M model's forward FLOPs; the loss is the same."""
    labels = batch["labels"][:, 1:]
    mask = labels != templates.IGNORE_INDEX
    keep = F.pad(mask, (0, 1))  # (R, T): the last position predicts nothing
    if supports_logits_to_keep(model, per_row=True):
        logits = model(**model_inputs(batch), logits_to_keep=keep).logits  # (labelled tokens, V)
    else:
        logits = model(**model_inputs(batch)).logits[keep]  # the same rows, in the same (row-major) order
    nll = torch.zeros(labels.shape, dtype=torch.float32, device=logits.device)
    return nll.masked_scatter(mask, F.cross_entropy(logits.float(), labels[mask], reduction="none")), mask


def conditioned_lm_loss(model, batch: dict, weight: float = 0.0, reduce: str = "sum",
                        scale: float = 1.0, gap_clip: float = 0.0) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """SFT loss: mean per-token NLL over the true rows' answer tokens, plus `weight` times the discriminative term
    mean over pairs of softplus(scale * (log p(answer | corrupted) - log p(answer | true))) (GeDi §3.1), log p summed
    over the answer tokens (`reduce='sum'`) or averaged over them (`'mean'`, GeDi's length normalisation); with
    `gap_clip` > 0 each token's share of that difference is clipped below at -gap_clip nats
    (`ConditioningLossArgs.gap_clip`). Twin rows (`pair_of >= 0`) never enter the NLL. Returns (loss, metrics):
    `nll`, and with twins `disc_loss` and `disc_acc` (share of pairs whose true line is the likelier)."""
    nll, mask = token_nll(model, batch)
    pair_of = batch.get("pair_of")
    seq_nll = example_sums(nll * mask, batch)  # (R,) summed NLL of each row's (packed: sequence's) answer tokens
    tokens = example_sums(mask.float(), batch)
    true_rows = pair_of < 0 if pair_of is not None else torch.ones_like(tokens, dtype=torch.bool)
    lm = seq_nll[true_rows].sum() / tokens[true_rows].sum().clamp(min=1)
    metrics: dict = {"nll": lm.detach()}
    twins = ~true_rows
    if weight <= 0 or not bool(twins.any()):
        return lm, metrics
    if gap_clip > 0:  # per token: log p(token | corrupted) - log p(token | true), the twin's tokens aligned with
        per_token = example_tokens(nll, mask, batch)  # its true row's (`align_trained`)
        gap = (per_token[pair_of[twins]] - per_token[twins]).clamp(min=-gap_clip).sum(-1)
        gap = gap if reduce == "sum" else gap / tokens[twins].clamp(min=1)
    else:
        seq_logp = -seq_nll if reduce == "sum" else -seq_nll / tokens.clamp(min=1)
        gap = seq_logp[twins] - seq_logp[pair_of[twins]]
    disc = F.softplus(scale * gap).mean()
    metrics.update(disc_loss=disc.detach(), disc_acc=(gap < 0).float().mean().detach())
    return lm + weight * disc, metrics


# ---------------------------------------------------------------- read-outs: flip gap


def flip_records(records: list[Record], schema: AttributeSchema, names: tuple[str, ...] | None = None) -> list[Record]:
    """`records` with the levels of `names` (default: all) mirrored, q -> L-1-q, in every assistant label."""
    out = []
    for r in records:
        new = {}
        for j, t in enumerate(r.conversations):
            if t.role == ASSISTANT and t.label:
                levels = schema.parse(t.label)
                flipped = flip_levels({k: v for k, v in levels.items() if names is None or k in names},
                                      schema.max_level)  # fmt: skip
                new[j] = schema.render({**levels, **flipped})
        out.append(_copy(r, new))
    return out


def flip_sets(records: list[Record], schema: AttributeSchema, tokenizer, style: str, max_length: int, limit: int,
              each: bool) -> tuple[list[dict], dict[str, list[dict]]]:  # fmt: skip
    """Validation examples for the flip-gap check: (true examples, {metric name: flipped examples}) over the first
    `limit` records with a labelled trained answer; `flip_gap` mirrors every attribute, `flip_gap_<name>` one."""
    chosen = [r for r in records if any(r.conversations[j].label for j in trained_turns(r))]
    chosen = chosen[:limit] if limit > 0 else chosen
    variants = {"flip_gap": None} | ({f"flip_gap_{n}": (n,) for n in schema.names} if each else {})
    true, flipped = [], {k: [] for k in variants}
    for r in chosen:
        ex = templates.encode(r, tokenizer, style, max_length)
        alts = {k: templates.encode(flip_records([r], schema, names)[0], tokenizer, style, max_length)
                for k, names in variants.items()}  # fmt: skip
        if ex is None or any(a is None for a in alts.values()):
            continue
        true.append(ex)
        for k, a in alts.items():
            flipped[k].append(a)
    return true, flipped


def loss_sums(model, examples: list[dict], collate, batch_size: int, accelerator) -> torch.Tensor:
    """(summed NLL, trainable tokens) over `examples`: each process takes a share, the sums are reduced."""
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    shard = examples[accelerator.process_index :: accelerator.num_processes]
    for start in range(0, len(shard), batch_size):
        batch = {k: v.to(accelerator.device) for k, v in collate(shard[start : start + batch_size]).items()}
        nll, mask = token_nll(model, batch)
        total += torch.stack([(nll * mask).sum().double(), mask.sum().double()])
    return accelerator.reduce(total, reduction="sum")


def flip_gaps(model, flips: tuple[list[dict], dict[str, list[dict]]], collate, batch_size: int,
              accelerator) -> dict[str, float]:  # fmt: skip
    """Per-token loss under the mirrored attribute strings minus under the true ones, on the same answers (> 0: the
    model reads the line)."""
    true = loss_sums(model, flips[0], collate, batch_size, accelerator)
    out = {}
    for name, flipped in flips[1].items():
        other = loss_sums(model, flipped, collate, batch_size, accelerator)
        out[name] = float(other[0] / other[1] - true[0] / true[1])
    return out


# ---------------------------------------------------------------- read-outs: the model as its own APM


@dataclass
class ReadoutItem:
    """One held-out answer to read: its record cut after the answer (earlier answers are context), the turn index
    of the answer, and its true levels."""

    record: Record
    turn: int
    levels: dict[str, int]


def readout_items(records: Sequence[Record], schema: AttributeSchema, attributes: Sequence[str] | None = None,
                  limit: int = 0, *, tokenizer=None, style: str = "chat", max_length: int | None = None,
                  ) -> list[ReadoutItem]:  # fmt: skip
    """The records' last trained, labelled answers (at most `limit`, 0: all), each cut to end there with the earlier
    assistant turns as context only, and with their levels of `attributes` (default: the schema's). With a
    `tokenizer`, answers that right truncation at `max_length` would leave with nothing to score are passed over,
    so `limit` counts answers that can be read."""
    names = tuple(attributes or schema.names)
    items = []
    for r in records:
        turns = [j for j in trained_turns(r) if r.conversations[j].label]
        if not turns:
            continue
        j = turns[-1]
        levels = {k: v for k, v in schema.parse(r.conversations[j].label, ignore_unknown=True).items() if k in names}
        if not levels:
            continue
        convo = [Turn(t.role, t.value, t.label, {**t.extra, templates.NO_LOSS: True} if i != j and t.role == ASSISTANT
                      else dict(t.extra)) for i, t in enumerate(r.conversations[: j + 1])]  # fmt: skip
        item = ReadoutItem(Record(convo, r.system, r.mask, r.type, dict(r.extra)), j, levels)
        if tokenizer is not None and templates.encode(item.record, tokenizer, style, max_length) is None:
            continue
        items.append(item)
        if limit and len(items) >= limit:
            break
    return items


def answer_logps(model, examples: list[dict], pad_id: int, batch_size: int, device) -> list[float]:
    """Summed log p of each example's labelled tokens (the answer, SPEC §4), batched, no gradient."""
    out: list[float] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = {
            "input_ids": pad([e["input_ids"] for e in chunk], pad_id).to(device),
            "attention_mask": pad([[1] * len(e["input_ids"]) for e in chunk], 0).to(device),
            "labels": pad([e["labels"] for e in chunk], templates.IGNORE_INDEX).to(device),
        }
        with torch.no_grad():
            nll, mask = token_nll(model, batch)
        out += (-(nll * mask).sum(dim=1)).tolist()
    return out


def readout(model, tokenizer, items: Sequence[ReadoutItem], schema: AttributeSchema, style: str, max_length: int,
            batch_size: int = 8, device=None, progress: Callable | None = None) -> dict:  # fmt: skip
    """The model's own attribute read-out: for each item and attribute, the answer's log-likelihood under every level
    of that attribute (the others at their true levels) turned into a posterior by Bayes' rule with a uniform prior
    (GeDi §3). Per attribute: `spearman` of the expected level against the true one, `accuracy` (argmax == true),
    `within1` (|argmax - true| <= 1), `chance` (1/L: a uniform guess), `n`. Items whose answer truncation leaves
    nothing to score are skipped. Cost: items x (attributes x (L - 1) + 1) forward passes of up to `max_length`
    tokens (the answer under its true line is scored once per item)."""
    from scipy.stats import spearmanr

    device = device or next(model.parameters()).device
    L = schema.levels
    per: dict[str, list[tuple[int, float, int]]] = {}
    names = [n for n in schema.names if any(n in it.levels for it in items)]
    total = sum(n in it.levels for it in items for n in names)
    done = 0
    for it in items:
        base = schema.parse(it.record.conversations[it.turn].label, ignore_unknown=True)
        read = [n for n in names if n in it.levels]
        # the answer under its true line recurs in every attribute's row of levels: each sequence is scored once
        unique: dict[tuple, int] = {}
        sequences: list[dict] = []
        at: dict[str, list[int]] = {}  # attribute -> where its L sequences sit in `sequences`
        for name in read:
            examples = [templates.encode(_copy(it.record, {it.turn: schema.render({**base, name: level})}), tokenizer,
                                         style, max_length) for level in range(L)]  # fmt: skip
            if any(e is None for e in examples):
                continue
            shortest = examples[0]["labels"]  # the answer tokens every level's encoding still holds
            for e in examples[1:]:
                shortest, _ = align_trained(shortest, e["labels"])
            at[name] = []
            for e in examples:
                labels = align_trained(e["labels"], shortest)[0]
                key = (tuple(e["input_ids"]), tuple(labels))
                if key not in unique:
                    unique[key] = len(sequences)
                    sequences.append({"input_ids": e["input_ids"], "labels": labels})
                at[name].append(unique[key])
        scored = answer_logps(model, sequences, tokenizer.pad_token_id, batch_size, device)
        for name, slots in at.items():
            post = torch.softmax(torch.tensor([scored[i] for i in slots]), dim=0)
            expected = float((post * torch.arange(L)).sum())
            per.setdefault(name, []).append((it.levels[name], expected, int(post.argmax())))
        done += len(read)
        if progress is not None:
            progress(done, total)
    result = {}
    for name, rows in per.items():
        true = [t for t, _, _ in rows]
        exp = [e for _, e, _ in rows]
        arg = [a for _, _, a in rows]
        rho = spearmanr(true, exp).statistic if len(set(true)) > 1 and len(set(exp)) > 1 else float("nan")
        result[name] = {"n": len(rows), "spearman": None if math.isnan(rho) else float(rho),
                        "accuracy": sum(a == t for a, t in zip(arg, true, strict=True)) / len(rows),
                        "within1": sum(abs(a - t) <= 1 for a, t in zip(arg, true, strict=True)) / len(rows),
                        "chance": 1.0 / L, "mean_true": sum(true) / len(rows), "mean_expected": sum(exp) / len(rows)}  # fmt: skip
    return result


def format_readout(result: dict) -> str:
    """A small table of `readout`'s result: one line per attribute."""
    lines = [f"  {'attribute':<12} {'n':>4} {'spearman':>9} {'exact':>7} {'+-1':>7} {'chance':>7}"]
    for name, r in result.items():
        rho = "n/a" if r["spearman"] is None else f"{r['spearman']:+.3f}"
        lines.append(
            f"  {name:<12} {r['n']:>4} {rho:>9} {r['accuracy']:>7.3f} {r['within1']:>7.3f} {r['chance']:>7.3f}"
        )
    return "\n".join(lines)
