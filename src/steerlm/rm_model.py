"""The reward model as the stages that use it see it (SPEC §6): `load_rm(path).score(items)` reads back a folder
written by `steerlm train-rm` (`steerlm/reward.py`) and gives r(x, y), one float per conversation; PPO and the
evaluation's reward-model judge use it. Defined here once, for training and scoring alike: the folder's names
(`META`, `HEAD`, `LABEL`), what the model reads (`rm_text`) and batched scoring of token ids (`score_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from steerlm import heads, models
from steerlm.data.collate import pad
from steerlm.data.records import Turn
from steerlm.errors import UserError

#: The steerlm JSON of a reward-model folder (`load_rm` requires it).
META = models.RM_META
#: The head's file in the backbone + head layout (`heads.save`).
HEAD = "reward_head.safetensors"
#: The one label of a standard reward-model folder (`id2label`).
LABEL = "reward"


def rm_text(turns: Sequence[Turn], backbone: str, tokenizer) -> str:
    """What the reward model reads: the plain conversation (as the regression APM), ended by EOS on a causal
    backbone so that the read-out token is the same whatever the answer's last word (`heads.text_end`)."""
    return heads.plain_text(turns) + heads.text_end(backbone, tokenizer)


def score_ids(
    model: heads.HeadModel, ids: list[list[int]], pad_id: int, batch_size: int, progress: bool = False
) -> list[float]:
    """Scores of tokenized conversations, in length-sorted batches (little padding), returned in input order.

    Each distinct token sequence is scored once, so inputs that read the same to the model (two answers identical
    after tokenization and truncation) get exactly the same score, a tie, not one decided by the float noise of
    where they fell in a batch."""
    dev = next(model.parameters()).device
    distinct: dict[tuple[int, ...], int] = {}
    where = [distinct.setdefault(tuple(s), len(distinct)) for s in ids]
    unique = list(distinct)
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    scores = [0.0] * len(unique)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="score", disable=not progress, leave=False):
            chunk = order[start : start + batch_size]
            rows = [list(unique[i]) for i in chunk]
            x, mask = pad(rows, pad_id).to(dev), pad([[1] * len(r) for r in rows], 0).to(dev)
            for i, r in zip(chunk, model(x, mask)[:, 0].float().cpu().tolist(), strict=True):
                scores[i] = r
    return [scores[k] for k in where]


class RewardScorer:
    """A trained reward model loaded back: `score(items)` gives one float per conversation."""

    def __init__(self, model: heads.HeadModel, tokenizer, meta: dict, path: str | None = None):
        self.model, self.tokenizer, self.meta, self.path = model, tokenizer, meta, path
        self.backbone, self.max_length = meta["backbone"], int(meta["max_length"])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def score(self, items: Sequence[Any], batch_size: int = 16, progress: bool = False) -> list[float]:
        """r(x, y) for each item of `heads.scored_conversation`: a Record or JSON record (scored at its last assistant
        turn; later turns are ignored), a list of Turns ending with the answer, or a `(prompt, response)` pair."""
        texts = [rm_text(heads.scored_conversation(x)[1], self.backbone, self.tokenizer) for x in items]
        was_training = self.model.training
        self.model.eval()
        try:
            return score_ids(self.model, heads.tokenize_left(self.tokenizer, texts, self.max_length),
                             self.tokenizer.pad_token_id, batch_size, progress)  # fmt: skip
        finally:
            self.model.train(was_training)


def load_rm(path: str | Path, *, device: torch.device | None = None) -> RewardScorer:
    """Load a folder written by `steerlm train-rm`, in either layout (`heads.load`; the model is the folder itself,
    a `best/` inside it is accepted too, as other stages lay out theirs); a folder without steerlm_rm.json is a
    UserError."""
    path = Path(path)
    if not (path / META).exists() and (path / "best" / META).exists():
        path = path / "best"
    meta = models.read_meta(path, META)
    for key in ("backbone", "pooling", "max_length"):
        if key not in meta:
            raise UserError(f"missing key {key!r}", file=str(path / META))
    model, tokenizer = heads.load(path, meta, HEAD, device or models.device())
    return RewardScorer(model, tokenizer, meta, str(path))
