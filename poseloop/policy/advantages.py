"""Per-prompt reward normalisation for DDPO (advantages), with a running buffer per prompt.

A prompt (here: a prompt + pose group key) keeps its last `buffer_size` rewards. Its advantage is
(reward - mean) / std over that buffer once it holds `min_count` rewards; before that the
statistics of the whole batch are used, as DDPO's PerPromptStatTracker does. With buffer_size 0 a key's
advantages come from its rewards in this update alone (GRPO-style groups: images that share a start share
nothing with earlier visits of their prompt).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np


class PerPromptStatTracker:
    """Running per-key reward buffers that turn rewards into normalised advantages."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16, eps: float = 1e-6) -> None:
        if buffer_size < 0 or min_count < 1:
            raise ValueError("buffer_size must be >= 0 (0 = this update's rewards of the key) and min_count >= 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.eps = eps
        self.buffers: dict[str, deque[float]] = {}

    def update(self, keys: Sequence[str], rewards: np.ndarray | Sequence[float]) -> np.ndarray:
        """Add a batch of rewards and return their advantages [B] (float32)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(keys) != rewards.shape[0]:
            raise ValueError(f"{len(keys)} keys but {rewards.shape[0]} rewards")
        # Batch statistics are the fallback for keys whose buffer is still short.
        batch_mean = rewards.mean()
        batch_std = rewards.std() + self.eps
        advantages = np.empty_like(rewards)
        for key in dict.fromkeys(keys):  # unique keys, in first-seen order (deterministic)
            idx = np.array([i for i, k in enumerate(keys) if k == key])
            if self.buffer_size == 0:
                values = rewards[idx]
                advantages[idx] = (values - values.mean()) / (values.std() + self.eps)
                continue
            buf = self.buffers.setdefault(key, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = np.asarray(buf)
                mean, std = values.mean(), values.std() + self.eps
            advantages[idx] = (rewards[idx] - mean) / std
        return advantages.astype(np.float32)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, for checkpoints."""
        return {"buffer_size": self.buffer_size, "min_count": self.min_count, "eps": self.eps,
                "buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state_dict() output."""
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.eps = float(state["eps"])
        self.buffers = {k: deque((float(x) for x in v), maxlen=self.buffer_size) for k, v in state["buffers"].items()}
