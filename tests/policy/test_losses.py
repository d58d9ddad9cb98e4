"""Loss functions on hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from poseloop.policy import losses
from poseloop.rewards import losses as reward_losses


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_bradley_terry_on_hand_computed_values() -> None:
    ra, rb = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0])
    target = torch.tensor([1.0, 0.5, 0.0])  # a wins, tie, b wins
    expected = (-math.log(sig(1.0)) + -math.log(0.5) + -math.log(1 - sig(-2.0))) / 3
    assert reward_losses.bradley_terry_loss(ra, rb, target).item() == pytest.approx(expected, rel=1e-6)


def test_per_rater_normalisation_makes_harsh_and_generous_raters_agree() -> None:
    harsh = [-5.0, -4.0, -3.0]
    generous = [3.0, 4.0, 5.0]
    z = reward_losses.normalize_per_rater(torch.tensor(harsh + generous + [2.0]), [1, 1, 1, 2, 2, 2, 3])
    s = math.sqrt(2 / 3)
    assert z[:3].tolist() == pytest.approx([-1 / s, 0.0, 1 / s])
    assert torch.equal(z[:3], z[3:6])
    assert z[6].item() == 0.0  # a single score carries no scale information


def test_score_mse() -> None:
    assert reward_losses.score_mse_loss(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])).item() == pytest.approx(2.5)


def test_ppo_first_ratio_is_exactly_one_and_loss_is_minus_mean_advantage() -> None:
    lp = torch.tensor([-1.2, -0.7, -3.0])
    adv = torch.tensor([1.0, -2.0, 7.0])
    loss, info = losses.ppo_clip_loss(lp, lp.clone(), adv, clip_range=1e-4, adv_clip_max=5.0)
    assert info["ratio"].item() == 1.0
    assert info["approx_kl"].item() == 0.0 and info["clipfrac"].item() == 0.0
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 5.0) / 3)  # advantage 7 clipped to 5


def test_ppo_clipping_on_hand_computed_values() -> None:
    old = torch.zeros(2)
    lp = torch.log(torch.tensor([1.5, 0.5]))  # ratios 1.5 and 0.5
    adv = torch.tensor([1.0, 1.0])
    loss, info = losses.ppo_clip_loss(lp, old, adv, clip_range=0.2, adv_clip_max=5.0)
    # A > 0: max(-1.5, -1.2) = -1.2 and max(-0.5, -0.8) = -0.5
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2, rel=1e-6)
    assert info["clipfrac"].item() == 1.0
    assert info["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2, rel=1e-6)
    # Gradient flows only through the unclipped branch (ratio 0.5 here).
    lp = lp.clone().requires_grad_(True)
    losses.ppo_clip_loss(lp, old, adv, 0.2, 5.0)[0].backward()
    assert lp.grad is not None and lp.grad.tolist() == pytest.approx([0.0, -0.5 / 2])


def test_d3po_without_clamp_on_hand_computed_values() -> None:
    lw, ll = torch.tensor([-1.0]), torch.tensor([-2.0])
    rw, rl = torch.tensor([-1.5]), torch.tensor([-1.5])
    # log r_w = 0.5, log r_l = -0.5, beta 2 -> -log sigmoid(2)
    loss = losses.d3po_loss(lw, ll, rw, rl, beta=2.0, clamp_eps=None)
    assert loss.item() == pytest.approx(-math.log(sig(2.0)), rel=1e-6)


def test_d3po_published_clamp_pins_the_loss_near_log_two() -> None:
    lw, ll = torch.tensor([-1.0]), torch.tensor([-2.0])
    rw, rl = torch.tensor([-1.5]), torch.tensor([-1.5])
    loss = losses.d3po_loss(lw, ll, rw, rl, beta=0.1, clamp_eps=0.1)
    expected = -math.log(sig(0.1 * (math.log(1.1) - math.log(0.9))))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # |log r| <= log(1.1) per side, so beta (log r_w - log r_l) is within +-0.02: loss in [0.6832, 0.7032].
    assert 0.6831 < loss.item() < 0.7033
    # The clamped ratios pass no gradient: the published defaults cannot move the policy here.
    lw = lw.clone().requires_grad_(True)
    losses.d3po_loss(lw, ll, rw, rl, 0.1, 0.1).backward()
    assert lw.grad is not None and lw.grad.item() == 0.0


def test_diffusion_dpo_on_hand_computed_values() -> None:
    loss = losses.diffusion_dpo_loss(torch.tensor([0.10]), torch.tensor([0.12]), torch.tensor([0.11]),
                                     torch.tensor([0.11]), beta=100.0)
    # inside = -0.02 - 0 -> -log sigmoid(-50 * -0.02) = -log sigmoid(1)
    assert loss.item() == pytest.approx(-math.log(sig(1.0)), rel=1e-5)


def test_refl_loss() -> None:
    assert losses.refl_loss(torch.tensor([0.5, 2.0]), margin=1.0, scale=2.0).item() == pytest.approx(0.5)


def test_bradley_terry_weights_scale_each_pair() -> None:
    ra, rb = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    target = torch.tensor([1.0, 0.0])
    l1, l2 = -math.log(sig(1.0)), -math.log(1 - sig(-1.0))
    weighted = reward_losses.bradley_terry_loss(ra, rb, target, weight=torch.tensor([3.0, 0.5]))
    assert weighted.item() == pytest.approx((3.0 * l1 + 0.5 * l2) / 2, rel=1e-6)
