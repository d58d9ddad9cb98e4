"""Loss functions of the reward model and the policy trainers: pure functions of tensors.

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


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float, adv_clip_max: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's clipped surrogate: mean(max(-A r, -A clip(r, 1 - c, 1 + c))), r = exp(logp - logp_old).

    Returns (loss, {"approx_kl", "clipfrac", "ratio"}) where approx_kl = 0.5 mean((logp - logp_old)^2).
    """
    adv = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.mean(torch.maximum(unclipped, clipped))
    with torch.no_grad():
        info = {
            "approx_kl": 0.5 * torch.mean((log_prob - old_log_prob) ** 2),
            "clipfrac": torch.mean((torch.abs(ratio - 1.0) > clip_range).float()),
            "ratio": ratio.mean(),
        }
    return loss, info


def d3po_loss(log_prob_w: torch.Tensor, log_prob_l: torch.Tensor, ref_log_prob_w: torch.Tensor,
              ref_log_prob_l: torch.Tensor, beta: float, clamp_eps: float | None) -> torch.Tensor:
    """D3PO per-step loss: -log sigmoid(beta (log r_w - log r_l)), r = pi_theta / pi_ref.

    With clamp_eps the ratios are clamped to [1 - eps, 1 + eps] as published; with beta 0.1 and
    eps 0.1 the loss then cannot leave [0.6832, 0.7032]. clamp_eps=None drops the clamp.
    """
    log_r_w = log_prob_w - ref_log_prob_w
    log_r_l = log_prob_l - ref_log_prob_l
    if clamp_eps is not None:
        lo, hi = torch.log(torch.tensor(1.0 - clamp_eps)), torch.log(torch.tensor(1.0 + clamp_eps))
        log_r_w = torch.clamp(log_r_w, lo.item(), hi.item())
        log_r_l = torch.clamp(log_r_l, lo.item(), hi.item())
    return -F.logsigmoid(beta * (log_r_w - log_r_l)).mean()


def diffusion_dpo_loss(model_err_w: torch.Tensor, model_err_l: torch.Tensor, ref_err_w: torch.Tensor,
                       ref_err_l: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-DPO: -log sigmoid(-beta/2 ((e_w - e_l) - (ref_e_w - ref_e_l))) on per-sample MSE errors."""
    inside = (model_err_w - model_err_l) - (ref_err_w - ref_err_l)
    return -F.logsigmoid(-0.5 * beta * inside).mean()


def refl_loss(reward: torch.Tensor, margin: float, scale: float) -> torch.Tensor:
    """ReFL (ImageReward): mean(relu(margin - reward)) * scale."""
    return F.relu(margin - reward).mean() * scale
