"""Policy training (DDPO, D3PO): the names every existing `from poseloop.training import ...` uses.

The code lives in modules of one concept each (docs/ARCHITECTURE.md, "Policy training"):
poseloop.policy_config (config dataclasses, presets, config hash), poseloop.trainer (PolicyTrainer's
core and train()), poseloop.rollouts (trajectory batches, seeds, steps), poseloop.policy_rewards,
poseloop.run_files (checkpoint files, metrics CSV, plots, grids) and poseloop.algos (one module per
algorithm, and the stored preference pairs). This module only re-exports them.
"""

from __future__ import annotations

from poseloop.algos import ALGORITHMS, Algorithm, algorithm_class
from poseloop.algos.preferences import PreferencePair, TrainingInputError, load_preference_pairs
from poseloop.policy_config import (
    PRESETS,
    D3POConfig,
    GuardConfig,
    OptimConfig,
    OutputConfig,
    PolicyConfig,
    TargetConfig,
    TrainConfig,
    config_hash,
    sd15,
    sd15_faithful,
    sdxl,
    tiny,
    tiny_faithful,
    tiny_sdxl,
)
from poseloop.policy_rewards import check_reward_fits, resolve_reward, reward_latent_shape, score
from poseloop.rollouts import TrajectoryBatch, cat_conditioning, chosen_steps, derive_seed
from poseloop.run_files import plot_history, rng_state, save_grid, set_rng_state, write_csv
from poseloop.trainer import PolicyTrainer, TrainResult, train

__all__ = [
    "ALGORITHMS", "Algorithm", "D3POConfig", "GuardConfig", "OptimConfig", "OutputConfig", "PRESETS", "PolicyConfig",
    "PolicyTrainer", "PreferencePair", "TargetConfig", "TrainConfig", "TrainResult", "TrainingInputError",
    "TrajectoryBatch", "algorithm_class", "cat_conditioning", "check_reward_fits", "chosen_steps", "config_hash",
    "derive_seed", "load_preference_pairs", "plot_history", "resolve_reward", "reward_latent_shape", "rng_state",
    "save_grid", "score", "sd15", "sd15_faithful", "sdxl", "set_rng_state", "tiny", "tiny_faithful", "tiny_sdxl",
    "train", "write_csv",
]
