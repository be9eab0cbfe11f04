"""Loss functions whose meaning must not drift between stages: defined once here.

- `pairwise_loss`: the reward model's comparison loss (InstructGPT eq. 1, SPEC §6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pairwise_loss(
    r_chosen: torch.Tensor, r_rejected: torch.Tensor, groups: torch.Tensor | None = None
) -> torch.Tensor:
    """`-log σ(r(x, y_w) - r(x, y_l))` averaged over comparisons (SPEC §6).

    With `groups` (one prompt index per comparison), each prompt's K·(K-1)/2 comparisons are averaged first and the
    prompts then weigh equally, as InstructGPT does (its loss divides a prompt's comparisons by C(K, 2) so that a
    prompt with many ranked replies does not dominate the batch or overfit)."""
    losses = -F.logsigmoid(r_chosen - r_rejected)
    if groups is None:
        return losses.mean()
    n_groups = int(groups.max()) + 1
    sums = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device).index_add(0, groups, losses)
    counts = torch.zeros(n_groups, dtype=losses.dtype, device=losses.device).index_add(
        0, groups, torch.ones_like(losses)
    )
    present = counts > 0
    return (sums[present] / counts[present]).mean()
