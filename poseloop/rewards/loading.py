"""Loading a saved reward model of any kind: latent CNN ensemble, conditioned, or (via clip_head) CLIP head."""

from __future__ import annotations

from pathlib import Path

import torch

from poseloop.config.reward import RewardModelConfig
from poseloop.rewards.conditioned import load_conditioned_reward_model
from poseloop.rewards.model import LatentRewardModel
from poseloop.rewards.versions import WEIGHTS_FILE, load_checked_weights, read_version, reward_model_kind


def load_reward_model(path_or_version: str | Path = "latest", models_dir: str | Path = "models",
                      device: str | torch.device = "cpu") -> LatentRewardModel:
    """Load a saved version (folder, version name or 'latest') in eval mode with frozen parameters.

    A conditioned version comes back as a ConditionedRewardModel (poseloop.rewards.conditioned) with its text encoder.
    """
    if reward_model_kind(path_or_version, models_dir) == "conditioned":
        return load_conditioned_reward_model(path_or_version, models_dir, device=device)
    folder, data = read_version(path_or_version, models_dir, "latent")
    cfg = RewardModelConfig(**data["model"])
    model = LatentRewardModel(cfg, data["latent_shape"], data["ensemble_size"], version=data.get("version") or folder.name,
                              extra_config=data.get("training"))
    load_checked_weights(model, folder / WEIGHTS_FILE)
    model.to(device)
    model.eval()
    # Rewards are frozen functions for the policy trainer; gradients still flow to the input latents.
    model.requires_grad_(False)
    return model
