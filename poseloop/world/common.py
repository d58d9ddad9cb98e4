"""What every stage of the embedded world's training shares: image tensors, atomic weight files, loss plots, EMA."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in -1..1."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def atomic_save(state: dict[str, torch.Tensor], path: Path, fp16: bool = False) -> None:
    """Write tensors as safetensors (optionally fp16) under a temporary name, then rename."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: (v.half() if fp16 and v.is_floating_point() else v).detach().contiguous()
               for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def plot_losses(curves: dict[str, list[float]], path: Path, title: str) -> None:
    """A PNG of loss curves per step (log scale, smoothed to ~200 points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in curves.items():
        if ys:
            k = max(1, len(ys) // 200)
            smooth = np.convolve(ys, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k - 1, smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    if ax.lines:  # a run of zero steps (a stage switched off) has no curve to label
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class Ema:
    """Exponential moving average of parameters (the exported weights)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average one step towards the current parameters."""
        d = min(self.decay, (1 + step) / (10 + step))  # warm start, as diffusers' EMAModel
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the averaged and the current parameters (twice restores them)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)
