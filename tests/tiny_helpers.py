"""Small helpers shared by the tests that load the tiny models (import them; fixtures live in conftest)."""

from __future__ import annotations

from pathlib import Path

import torch

from poseloop import sampling
from poseloop.config import ModelConfig, SampleConfig, tiny
from poseloop.models import Components
from poseloop.poses import get_builtin_pose, render_pose


def model_cfg(models_dir: Path, **overrides: object) -> ModelConfig:
    """The tiny SD1.5 model config pointing at the session's embedded model, with field overrides."""
    cfg = tiny().model
    cfg.base = str(models_dir / "tiny-sd15")
    cfg.controlnet = str(models_dir / "tiny-sd15" / "controlnet")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def eps_of(comp: Components) -> torch.Tensor:
    """Noise prediction (CFG + ControlNet) for fixed inputs: what a saved and reloaded model must reproduce."""
    pose = render_pose(get_builtin_pose("walking"), 64, 64)
    cfg = SampleConfig(guidance_scale=3.0)
    cond = sampling.make_conditioning(comp, ["a walking robot", "a cat"], [pose, pose], cfg, 64, 64)
    side = 64 // comp.vae_scale_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sampling.predict_noise(comp, x, torch.tensor(501), cond, cfg.guidance_scale, 1.0)
