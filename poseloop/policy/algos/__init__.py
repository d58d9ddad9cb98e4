"""Policy-training algorithms: one module each, registered by name; the trainer dispatches on cfg.algo.

An algorithm is a subclass of Algorithm. The trainer (poseloop.policy.trainer.PolicyTrainer) builds it before
any model loads, then calls epoch() once per epoch and logs the row it returns; sampling, re-scoring,
the optimizer step, checkpoints, logging, guards and exports are the trainer's. What an algorithm may
use of its trainer is the Trainer protocol below, and nothing else (tests/test_trainer_api.py checks
every module here). The table names each class by "module:Class" so that this package imports nothing
heavy (the config reads its names).

Adding an algorithm: its module in this folder (a subclass of Algorithm) and one line in ALGORITHMS.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from PIL import Image

    from poseloop.policy.advantages import PerPromptStatTracker
    from poseloop.config.generation import ModelConfig, SampleConfig
    from poseloop.policy.lineage import Parent
    from poseloop.models.loading import Components
    from poseloop.config.policy import PolicyConfig
    from poseloop.policy.rollouts import TrajectoryBatch

# cfg.algo -> "module:Class". Adding an algorithm: its module in this folder and one line here.
ALGORITHMS: dict[str, str] = {
    "ddpo": "poseloop.policy.algos.ddpo:DDPO",
    "d3po": "poseloop.policy.algos.d3po:D3PO",
    "refl": "poseloop.policy.algos.refl:ReFL",
    "draft": "poseloop.policy.algos.draft:DRaFT",
    "rlcm": "poseloop.policy.algos.rlcm:RLCM",
}


@runtime_checkable
class Trainer(Protocol):
    """The trainer as an algorithm sees it: what it reads and the operations it calls (PolicyTrainer has them).

    An algorithm reads these attributes and sets none of them; processes: with N > 1 (accelerate launch)
    each process holds its own share of an epoch's items and these operations keep the processes in step.
    """

    cfg: PolicyConfig  # the validated run config
    comp: Components  # the loaded pipeline parts (UNet, ControlNet, VAE, scheduler, ...) with the trainable target
    accelerator: Accelerator  # backward(loss), autocast(), process_index, num_processes, is_main_process
    reward: Any  # the run's reward (a callable reward object; None for offline D3PO)
    tracker: PerPromptStatTracker  # per-(prompt, pose) reward statistics -> advantages (resumed with the run)
    specs: list[Any]  # the (prompt, pose) groups (poseloop.data.inputs.GroupSpec), indexed by group number
    width: int  # sample size in pixels
    height: int
    progress: bool  # whether to show progress bars
    model_cfg: ModelConfig  # the model as loaded: the base, plus a parent ControlNet (the reference's weights)
    parent: Parent | None  # the policy this run continues (poseloop.policy.lineage), None = the base model
    reward_components: dict[str, float]  # a weighted reward's member means over the last sample_groups()

    def epoch_items(self, epoch: int) -> tuple[list[int], list[int], list[str]]:
        """This process's (groups, seeds, group keys) of an epoch: a pure function of (run seed, epoch)."""
        ...

    def start_seeds(self, epoch: int, groups: Sequence[int]) -> list[int] | None:
        """Each item's x_T seed with train.shared_start (one per group and epoch), else None (its own seed)."""
        ...

    def sample_groups(self, groups: Sequence[int], seeds: Sequence[int], reward: Any | None,
                      start_seeds: Sequence[int] | None = None
                      ) -> tuple[TrajectoryBatch, torch.Tensor | None, list[Image.Image]]:
        """Trajectories of one image per (group, seed) under the current weights, their rewards [N], the images."""
        ...

    def group_image(self, g: int) -> Image.Image:
        """The pose (conditioning) image of group g."""
        ...

    def group_metadata(self, g: int) -> dict[str, Any]:
        """What a reward is told about group g's images."""
        ...

    def choose_steps(self, batch: TrajectoryBatch, gen: torch.Generator) -> list[int]:
        """The steps to train a minibatch on (train.timestep_fraction, train.first_steps; never a deterministic one)."""
        ...

    def rescore(self, cond: Any, latents: torch.Tensor, timesteps: torch.Tensor, step: int,
                sample_cfg: SampleConfig) -> torch.Tensor:
        """log-probs [B] of a recorded step under the current weights, with gradient, as sampling computed them."""
        ...

    def log_probs(self, batch: TrajectoryBatch, steps: Sequence[int] | None = None, progress: str = ""
                  ) -> torch.Tensor:
        """log-probs [N, T] of the trajectories under the current weights (no grad; NaN off `steps`)."""
        ...

    def reference_log_probs(self, batch: TrajectoryBatch, steps: Sequence[int] | None = None) -> torch.Tensor:
        """log-probs [N, T] under the model the run started from (no grad; NaN off `steps`)."""
        ...

    def note_first_ratio(self, log_probs: torch.Tensor, old: torch.Tensor) -> None:
        """Report the first trained step's log-probs and the ones they are compared with (a re-scoring check)."""
        ...

    def local_part(self, mb: torch.Tensor, n_local: int) -> tuple[torch.Tensor, float]:
        """This process's part (local indices) of a global minibatch, and the factor its mean loss is scaled by."""
        ...

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """t concatenated over processes (CPU)."""
        ...

    def gather_keys(self, keys: list[str]) -> list[str]:
        """Group keys concatenated over processes."""
        ...

    def optimizer_step(self) -> None:
        """Average the gradients over processes, clip, step, zero them; counts the step."""
        ...


class Algorithm:
    """One training algorithm on a Trainer: built before the model loads, then run once per epoch.

    It uses only the Trainer protocol (cfg, comp, accelerator, reward, tracker, specs, width, height,
    progress, model_cfg, parent, reward_components; epoch_items, start_seeds, sample_groups, group_image,
    group_metadata, choose_steps, rescore, log_probs, reference_log_probs, note_first_ratio, local_part,
    gather, gather_keys, optimizer_step). The trainer keeps it as trainer.algorithm and reads `pairs` and
    kl_is_measured() of it (tests call trainer.algorithm.epoch(0), .pairs, ...).
    """

    # Offline training data the run's identity hashes (D3PO's stored preference pairs); None = online only.
    pairs: Sequence[Any] | None = None

    def __init__(self, trainer: Trainer) -> None:
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
