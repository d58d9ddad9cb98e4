"""Trajectories as the policy trainer keeps them, and the pure helpers that pick seeds and steps."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Any

import torch

from poseloop.config.generation import SampleConfig


@dataclass
class TrajectoryBatch:
    """Trajectories of one epoch (or a D3PO pair set), kept on the CPU between passes."""

    latents: torch.Tensor  # [N, T+1, C, h, w] float16
    log_probs: torch.Tensor  # [N, T] float32 (sampling policy)
    timesteps: torch.Tensor  # [T]
    cond: Any  # Conditioning of N
    sample_cfg: SampleConfig
    extra: dict[str, Any] = dc_field(default_factory=dict)


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that is a pure function of its parts (run seed, epoch, index, ...)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def cat_conditioning(conds: Sequence[Any]) -> Any:
    """Concatenate Conditioning objects along the batch dimension."""
    from poseloop.sampling.sampler import Conditioning

    def cat(xs: list[Any]) -> Any:
        if xs[0] is None:
            return None
        if isinstance(xs[0], dict):
            return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
        return torch.cat(xs)

    return Conditioning(prompt_embeds=cat([c.prompt_embeds for c in conds]),
                        negative_embeds=cat([c.negative_embeds for c in conds]),
                        control=cat([c.control for c in conds]), added=cat([c.added for c in conds]),
                        negative_added=cat([c.negative_added for c in conds]))


def chosen_steps(num_steps: int, fraction: float, gen: torch.Generator) -> list[int]:
    """A random subset (round(fraction * T), at least 1) of the step indices, in sampling order."""
    k = max(1, int(round(fraction * num_steps)))
    return sorted(torch.randperm(num_steps, generator=gen)[:k].tolist())
