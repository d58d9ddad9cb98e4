"""What the reward model's ensemble is fitted on and what one member's fit records (shared by training and report)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class FitInputs:
    """What the networks read for every labelled sample, computed once before training (never per epoch)."""

    x: torch.Tensor  # [N, ...] final latents (latent kind) or frozen CLIP features [N, F] (clip kind)
    x_flipped: torch.Tensor | None  # [N, ...] the same of the mirrored samples; None without flip augmentation
    stats: torch.Tensor  # [N, 2C] per-channel mean/std of the latents (or RGB images): the linear baseline's features
    stats_of: str  # what `stats` describes, for the report
    clip: Any = None  # clip kind: the FrozenClip the features came from (kept for the saved model)
    # conditioned kind (x holds [latent, pose map]): each distinct prompt's token states, and each sample's prompt
    text: tuple[torch.Tensor, torch.Tensor] | None = None  # ([P, T, D] states, [P, T] mask)
    prompt_idx: torch.Tensor | None = None  # [N] long, into text
    encoder: Any = None  # the PromptEncoder (kept for the saved model)

    def text_of(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The extra network inputs of samples idx: (states, mask) for the conditioned kind, () otherwise."""
        if self.text is None or self.prompt_idx is None:
            return ()
        p = self.prompt_idx[idx]
        return self.text[0][p], self.text[1][p]


@dataclass
class MemberHistory:
    """Per-epoch curves of one ensemble member."""

    train_loss: list[float]
    heldout_loss: list[float]
    train_acc: list[float | None]
    heldout_acc: list[float | None]
    best_epoch: int
    seconds: float


def channel_stats(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std of [N, C, h, w] -> [N, 2C]: the linear baseline's features."""
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
