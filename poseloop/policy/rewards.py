"""Rewards as the policy trainer calls them: resolve a spec, check it fits the model's latents, score a batch."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from poseloop.config.lib import ConfigError
from poseloop.sampling.sampler import pil_to_tensor


def resolve_reward(spec: str, device: str = "cpu", models_dir: str = "models") -> Any:
    """build_reward(spec) with 'latest' meaning the newest learned reward model; ConfigError when unknown."""
    spec = spec.strip()
    if spec == "latest":
        spec = "latent:latest"
    try:
        from poseloop.rewards.spec import build_reward
    except ImportError as e:
        raise ConfigError(f"reward: poseloop.rewards.spec cannot be imported ({e}); pass a reward object in code") from e
    try:
        return build_reward(spec, device=device, models_dir=models_dir)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"reward: {e}") from e
    except FileNotFoundError as e:
        raise ConfigError(f"reward: {e} (train a reward model first, or pick a built-in reward)") from e


def reward_latent_shape(reward: Any) -> tuple[int, ...] | None:
    """The latent shape a latent-space reward expects, when it says (members of a weighted mix included)."""
    for obj in (reward, getattr(reward, "model", None)):
        shape = getattr(obj, "latent_shape", None)
        if shape is not None:
            return tuple(int(s) for s in shape)
    for member in getattr(reward, "members", ()):
        shape = reward_latent_shape(member[1] if isinstance(member, tuple) else member)
        if shape is not None:
            return shape
    return None


def check_reward_fits(reward: Any, latent_channels: int, name: str = "reward",
                      latent_size: tuple[int, int] | None = None, vae_scale_factor: int = 8) -> None:
    """A latent reward made for other latents is refused (channels) or warned about (spatial size)."""
    shape = reward_latent_shape(reward)
    if shape is None:
        return
    if shape[0] != latent_channels:
        raise ConfigError(f"{name}: the reward model {getattr(reward, 'name', '')!r} scores latents of shape "
                          f"{list(shape)} ({shape[0]} channels) but this model's latents have {latent_channels} "
                          "channels; train a reward model on this model's samples")
    if latent_size is not None and tuple(shape[1:]) != tuple(latent_size):
        # The CNN pools adaptively, so it runs, but it scores images of a size it never saw.
        h, w = (s * vae_scale_factor for s in shape[1:])
        warnings.warn(f"{name}: the reward model was trained on latents {list(shape)} ({w}x{h} px images) but this "
                      f"run samples latents {[latent_channels, *latent_size]}; its scores may mean little. Set "
                      f"--sample.width {w} --sample.height {h}, or train the reward model on rounds of this size",
                      stacklevel=2)


def score(reward: Any, images: Sequence[Image.Image], latents: torch.Tensor, prompts: list[str],
          metadata: list[dict[str, Any]]) -> torch.Tensor:
    """Call a reward on a batch; returns float32 [B] on CPU."""
    needs_images = getattr(reward, "needs_images", True)
    with torch.no_grad():
        out = reward(pil_to_tensor(images) if needs_images else None, latents.float(), prompts, metadata)
    out = torch.as_tensor(out).detach().float().reshape(-1).cpu()
    if out.shape[0] != len(prompts):
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} returned {out.shape[0]} scores for "
                         f"{len(prompts)} images")
    return out
