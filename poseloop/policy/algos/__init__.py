"""Policy-training algorithms: one module each, registered by name; the trainer dispatches on cfg.algo.

An algorithm is a subclass of Algorithm. The trainer (poseloop.policy.trainer.PolicyTrainer) builds it before
any model loads, then calls epoch() once per epoch and logs the row it returns; sampling, re-scoring,
the optimizer step, checkpoints, logging, guards and exports are the trainer's. The table names each
class by "module:Class" so that this package imports nothing heavy (the config reads its names).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poseloop.policy.trainer import PolicyTrainer

# cfg.algo -> "module:Class". Adding an algorithm: its module in this folder and one line here.
ALGORITHMS: dict[str, str] = {
    "ddpo": "poseloop.policy.algos.ddpo:DDPO",
    "d3po": "poseloop.policy.algos.d3po:D3PO",
    "refl": "poseloop.policy.algos.refl:ReFL",
    "draft": "poseloop.policy.algos.draft:DRaFT",
    "rlcm": "poseloop.policy.algos.rlcm:RLCM",
}


class Algorithm:
    """One training algorithm on a PolicyTrainer: built before the model loads, then run once per epoch.

    What an algorithm uses of its trainer: cfg, comp, policy, accelerator, reward, tracker, progress;
    _epoch_items(epoch) (this process's groups and seeds), _sample_groups(...) (trajectories + rewards),
    _gather(t), _chosen_trainable_steps(batch, gen), _rescore(...) (log-probs [B] with gradient),
    _reference_log_probs(batch) / _log_probs(batch) (no grad), _optimizer_step(); it sets first_ratio.
    The trainer keeps it as trainer.algorithm (tests call trainer.algorithm.epoch(0), .pairs, ...).
    """

    def __init__(self, trainer: PolicyTrainer) -> None:
        """Keep the trainer; an algorithm with offline data checks that data here, before any model loads."""
        self.trainer = trainer

    def epoch(self, epoch: int) -> dict[str, float]:
        """One epoch (0-based): gather trajectories, update the policy; the metrics row (without 'epoch')."""
        raise NotImplementedError

    def kl_is_measured(self) -> bool:
        """Whether the logged approx_kl can show a policy that does not move (guard.min_kl)."""
        return True


def algorithm_class(name: str) -> type[Algorithm]:
    """The Algorithm subclass registered as `name` (cfg.algo), imported on first use."""
    module, _, cls = ALGORITHMS[name].partition(":")
    found: type[Algorithm] = getattr(importlib.import_module(module), cls)
    return found
