"""Loss functions of the reward model: pure functions of tensors.

Shapes: every per-sample tensor is [B]; losses return a scalar (mean over the batch) unless noted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def bradley_terry_loss(reward_a: torch.Tensor, reward_b: torch.Tensor, target: torch.Tensor,
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """-log P(label) with P(a beats b) = sigmoid(r_a - r_b); target 1 = a preferred, 0 = b, 0.5 = tie.

    With `weight` [B] each pair's term is scaled before the mean: mean(w_i * l_i).
    """
    return F.binary_cross_entropy_with_logits(
        reward_a - reward_b, target.to(reward_a.dtype), weight=None if weight is None else weight.to(reward_a.dtype)
    )


def normalize_per_rater(scores: torch.Tensor, rater_ids: Sequence[int] | torch.Tensor, eps: float = 1e-6
                        ) -> torch.Tensor:
    """z-score each rater's scores, so that a harsh and a generous rater with the same ranking agree.

    A rater with a single score or no spread gets 0 for every score (no information about the scale).
    """
    ids = torch.as_tensor(rater_ids)
    out = torch.zeros_like(scores, dtype=torch.float32)
    for rid in ids.unique():
        mask = ids == rid
        s = scores[mask].float()
        std = s.std(unbiased=False) if s.numel() > 1 else torch.tensor(0.0)
        out[mask] = (s - s.mean()) / std if std > eps else torch.zeros_like(s)
    return out


def score_mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between predicted rewards and (normalised) scores."""
    return F.mse_loss(pred, target.to(pred.dtype))
