"""What every image reward checks and does to its input: batch checks, resizing and normalisation (differentiable)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def batch_size(prompts: Sequence[str], metadata: Sequence[dict]) -> int:
    """The batch a reward is asked to score: one prompt and one metadata dict per sample."""
    if len(prompts) != len(metadata):
        raise ValueError(f"got {len(prompts)} prompts but {len(metadata)} metadata dicts; one of each per sample")
    return len(prompts)


def check_images(name: str, images: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The images [B, 3, H, W] in 0..1 a reward needs; ValueError naming the reward when they do not fit."""
    if images is None:
        raise ValueError(f"reward {name!r} needs decoded images (needs_images=True) but images is None")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward {name!r} expects images [B, 3, H, W] in 0..1; got shape {tuple(images.shape)}")
    if images.shape[0] != batch:
        raise ValueError(f"reward {name!r}: {images.shape[0]} images for {batch} prompts")
    return images


def check_batch(name: str, images: torch.Tensor | None, prompts: Sequence[str], metadata: Sequence[dict]
                ) -> torch.Tensor:
    """check_images for a batch of prompts and metadata dicts."""
    return check_images(name, images, batch_size(prompts, metadata))


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std of images [B, C, H, W]."""
    m = torch.tensor(list(mean), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Images [B, C, H, W] resized to `size` (antialiased bicubic); unchanged when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    # Antialiased bicubic: what torchvision's Resize does on tensors, and close to PIL's BICUBIC.
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
