"""Batching of encoded examples: padding to the longest sequence in the batch, or packing several examples per row.

Packing follows transformers' padding-free format (`DataCollatorWithFlattening`): `position_ids` restart at 0 for
every example and no 2D attention mask is given. transformers 5 reads such rows as packed
(`masking_utils.find_packed_sequence_indices`, used when the attention mask is None and no KV cache is passed): the
sdpa and eager paths build a block-diagonal causal mask, so each token attends only inside its own example, and
flash-attention takes the same boundaries as varlen lengths. Hence `model_inputs`, which calls the model with
`use_cache=False` on a packed batch (a fresh cache would switch the detection off)."""

from __future__ import annotations

import inspect
import sys

import torch

from steerlm.data.templates import IGNORE_INDEX


def pad(seqs: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
    """Pad integer sequences to one length; `side='left'` for generation, so every prompt ends at the same index."""
    width = max(len(s) for s in seqs)
    rows = [
        ([value] * (width - len(s)) + list(s)) if side == "left" else (list(s) + [value] * (width - len(s)))
        for s in seqs
    ]
    return torch.tensor(rows, dtype=torch.long)


def collate_lm(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """`{"input_ids", "labels"}` examples -> padded tensors with an attention mask; padded labels are ignored."""
    ids = [e["input_ids"] for e in examples]
    batch = {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "labels": pad([e["labels"] for e in examples], IGNORE_INDEX),
    }
    return batch


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Example indices grouped into rows of at most `capacity` tokens, first-fit over the examples longest first (an
    example longer than `capacity` gets a row of its own). Deterministic: ties keep the input order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = next((k for k, r in enumerate(room) if r >= lengths[i]), None)
        if j is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[j].append(i)
            room[j] -= lengths[i]
    return rows


def collate_packed(examples: list[dict], pad_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """`{"input_ids", "labels"}` examples -> packed rows of at most `capacity` tokens (`pack_rows`), each row padded to
    the longest. Returns `input_ids`, `labels` and `position_ids` (R, T) and `seq_idx` (R, T): the index in
    `examples` of each token's example, -1 on padding. Labels are the examples' own (SPEC §4 masks) except an
    example's first token, set to IGNORE_INDEX: it is never predicted within its example, and in a packed row the
    previous example's last position would predict it. The padding tail has its own position ids from 0, so it is a
    segment of its own, and ignored labels."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    ids, labels, positions, seq_idx = [], [], [], []
    for row in rows:
        r_ids, r_labels, r_pos, r_seq = [], [], [], []
        for i in row:
            e = examples[i]
            r_ids += e["input_ids"]
            r_labels += [IGNORE_INDEX] + list(e["labels"][1:])
            r_pos += range(len(e["input_ids"]))
            r_seq += [i] * len(e["input_ids"])
        ids.append(r_ids)
        labels.append(r_labels)
        positions.append(r_pos)
        seq_idx.append(r_seq)
    width = max(len(r) for r in ids)
    for r_pos in positions:
        r_pos += range(width - len(r_pos))
    return {
        "input_ids": pad(ids, pad_id),
        "labels": pad(labels, IGNORE_INDEX),
        "position_ids": torch.tensor(positions, dtype=torch.long),
        "seq_idx": pad(seq_idx, -1),
    }


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The keyword arguments of a causal LM's forward for a padded batch (`input_ids`, `attention_mask`) or a packed
    one (`input_ids`, `position_ids`, `use_cache=False`: see the module docstring)."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def supports_logits_to_keep(model, per_row: bool = False) -> bool:
    """Whether `model`'s forward (under DDP/FSDP and PEFT wrappers) takes transformers' `logits_to_keep`: the LM head
    on the last positions only (an int) or, with `per_row`, on chosen positions of each row (a (B, T) bool mask, or
    (B, N) positions). The per-row forms are those of `transformers.modeling_utils.slice_logits_to_keep`, so a model
    whose module does not use that function (an older one slicing every row alike) is answered False."""
    while hasattr(model, "module"):  # DistributedDataParallel, FSDP
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        if "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return False
    except (TypeError, ValueError):
        return False
    return not per_row or hasattr(sys.modules.get(type(base).__module__), "slice_logits_to_keep")


def n_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (not padding) tokens in a padded or packed batch; 0 for a batch that has neither mask."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "seq_idx" in batch:
        return int((batch["seq_idx"] >= 0).sum())
    return 0


def example_tokens(values: torch.Tensor, mask: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example values of the masked predictions, in order: (E, K) with row e holding example e's masked values
    of `values` (R, T-1) and zeros after them (K: the most any example has). The examples are the rows of a padded
    batch or the sequences of a packed one (`seq_idx`), as in `example_sums`, whose sums these rows add up to."""
    owner = batch["seq_idx"][:, 1:] if "seq_idx" in batch else torch.arange(len(values), device=values.device)[:, None]
    owner = owner.expand_as(mask)[mask]  # the example of each masked prediction, row-major (each example in order)
    examples = int(batch["seq_idx"].max()) + 1 if "seq_idx" in batch else len(values)
    counts = torch.bincount(owner, minlength=examples)
    order = torch.argsort(owner, stable=True)
    rank = torch.empty_like(owner)
    rank[order] = torch.arange(len(owner), device=owner.device) - (counts.cumsum(0) - counts)[owner[order]]
    out = torch.zeros(examples, int(counts.max()) if len(owner) else 0, dtype=values.dtype, device=values.device)
    return out.index_put((owner, rank), values[mask])


def example_sums(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example sums of per-prediction values `values` (R, T-1), where position t predicts token t+1 (as
    `conditioning.token_nll`): (E,), one sum per row of a padded batch, or per example of a packed one (`seq_idx`;
    a prediction belongs to the example of the token it predicts)."""
    if "seq_idx" not in batch:
        return values.sum(dim=1)
    owner = batch["seq_idx"][:, 1:]
    keep = owner >= 0
    out = torch.zeros(int(batch["seq_idx"].max()) + 1, dtype=values.dtype, device=values.device)
    return out.index_add(0, owner[keep], values[keep])
