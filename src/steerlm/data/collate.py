"""Batching of encoded examples: padding to the longest sequence in the batch."""

from __future__ import annotations

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
