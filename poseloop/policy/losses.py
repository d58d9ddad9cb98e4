"""Loss functions of the policy trainers: pure functions of tensors.

Shapes: every per-sample tensor is [B]; losses return a scalar (mean over the batch) unless noted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
