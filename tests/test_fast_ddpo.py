"""DDPO's fused update (train.fused_update): the same gradient and optimizer step as re-scoring, one forward less."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from poseloop.training import PolicyTrainer
from test_policy import Brightness, policy_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

# Relative L2 distance of the two gradients. Both compute the same fp32 graph; they differ only in
# batch shapes (the sampler's chunk vs the update's shuffled minibatch, which BLAS may reduce in
# another order: ~1e-7 relative per op) and in the order the per-step losses are summed (one backward
# of the sum vs one backward per step). Measured: 1.3e-7; 1e-4 leaves margin and is still 1000x
# below the distance to another epoch's gradient (asserted below, so the check can fail).
GRAD_TOL = 1e-4


def run_epoch(trainer: PolicyTrainer, epoch: int, fused: bool, state: dict) -> tuple[dict, dict, int]:
    """One DDPO epoch from `state`: (gradients before the clip and step, weights after, re-scoring calls)."""
    trainer.policy.load_state_dict(state["policy"])
    trainer.optimizer.load_state_dict(state["optim"])
    trainer.tracker.load_state_dict(state["tracker"])
    trainer.cfg.train.fused_update = fused
    grads: dict[str, torch.Tensor] = {}
    calls = {"rescore": 0}
    real_step, real_rescore = trainer._optimizer_step, trainer._rescore

    def step() -> None:
        assert not grads, "the fused epoch must be one optimizer step"
        grads.update({n: p.grad.detach().clone() for n, p in trainer.policy.named_trainable().items()
                      if p.requires_grad and p.grad is not None})
        real_step()

    def rescore(*args: object) -> torch.Tensor:
        calls["rescore"] += 1
        return real_rescore(*args)  # type: ignore[arg-type]

    trainer._optimizer_step, trainer._rescore = step, rescore  # type: ignore[method-assign]
    try:
        row = trainer.ddpo_epoch(epoch)
    finally:
        del trainer._optimizer_step, trainer._rescore  # back to the class's methods
    assert row["clipfrac"] == 0.0 and abs(row["ratio"] - 1.0) < 1e-5  # first step: r = 1, clip inactive
    weights = {n: p.detach().clone() for n, p in trainer.policy.named_trainable().items()}
    return grads, weights, calls["rescore"]


def rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors."""
    assert a.keys() == b.keys() and a
    num = sum(float((a[k] - b[k]).pow(2).sum()) for k in a)
    den = sum(float(b[k].pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def test_fused_update_gives_the_standard_gradient_and_step(models_dir: Path, tmp_path: Path) -> None:
    # One optimizer step per epoch: 4 samples, minibatches of 2, grad_accum 2 (the exact case); half the
    # steps (the shuffle generator is replayed to pick them before sampling); the pose ControlNet at full
    # strength; gradient clipping on (it sees the same gradient, so it clips the same).
    cfg = policy_cfg(models_dir, tmp_path, train__grad_accum=2, train__timestep_fraction=0.5,
                     sample__controlnet_scale=1.0, optim__max_grad_norm=1e-3, train__fused_update=True)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    state = {"policy": trainer.policy.state_dict(), "optim": trainer.optimizer.state_dict(),
             "tracker": trainer.tracker.state_dict()}
    assert trainer.algorithm.fused_steps(0, 4) is not None
    g_fast, w_fast, calls_fast = run_epoch(trainer, 0, True, state)
    g_std, w_std, calls_std = run_epoch(trainer, 0, False, state)
    assert calls_fast == 0 and calls_std > 0  # the fused path never re-scores
    assert float(sum(g.abs().sum() for g in g_std.values())) > 0
    assert rel(g_fast, g_std) < GRAD_TOL
    # The same clipped Adam step: Adam's first step moves each element by ~lr whatever its gradient's size,
    # so elements whose gradient is near 0 amplify fp32 noise; measured max 1.4e-4 lr, allowed 1e-2 lr.
    lr = cfg.optim.lr
    for k in w_std:
        assert torch.allclose(w_fast[k], w_std[k], atol=1e-2 * lr, rtol=0), k
    # Discrimination: another epoch's samples give a clearly different gradient, far above the tolerance.
    g_other, _, _ = run_epoch(trainer, 1, False, state)
    assert rel(g_other, g_std) > 1000 * GRAD_TOL


def test_fused_update_only_where_exact(models_dir: Path, tmp_path: Path) -> None:
    # Two optimizer steps an epoch (grad_accum 1) or two inner epochs: the later passes run under updated
    # weights, so re-scoring is required; and the flag (off by default: memory) turns the fused path off.
    trainer = PolicyTrainer(policy_cfg(models_dir, tmp_path, train__fused_update=True), reward=Brightness(),
                            progress=False)
    algo = trainer.algorithm
    assert algo.fused_steps(0, 4) is None  # 2 minibatches, grad_accum 1
    trainer.cfg.train.grad_accum = 2
    assert algo.fused_steps(0, 4) is not None
    trainer.cfg.train.inner_epochs = 2
    assert algo.fused_steps(0, 4) is None
    trainer.cfg.train.inner_epochs, trainer.cfg.train.fused_update = 1, False
    assert algo.fused_steps(0, 4) is None
    # The steps whose graphs sampling keeps are the ones the update trains: never a deterministic last step.
    from diffusers import DDIMScheduler

    trainer.cfg.train.fused_update, trainer.cfg.train.timestep_fraction = True, 1.0
    trainer.comp.pipe.scheduler = DDIMScheduler.from_config(trainer.comp.scheduler.config, set_alpha_to_one=True)
    assert algo.fused_steps(0, 4) == [0, 1, 2]  # 4 steps, all drawn (timestep_fraction 1), the last has no density
