"""scripts/train_world.py's configuration: how the embedded pose world is trained, and its presets."""

from __future__ import annotations

from dataclasses import dataclass

from poseloop.config.lib import ConfigError, field
from poseloop.models.embedded import WORLD_ARCH, WORLD_WEIGHTS


@dataclass
class WorldConfig:
    """What scripts/train_world.py trains and for how long (steps, not minutes, so it is deterministic)."""

    size: int = field(64, help="image size in pixels (square; multiple of 4)")
    seed: int = field(0, help="seed of the renders, the initial weights and the data order")
    threads: int = field(2, help="torch threads; results are reproducible for a given thread count")
    examples: int = field(24000, help="rendered training examples")
    vae_steps: int = field(2000, help="VAE optimiser steps")
    vae_batch: int = field(8, help="VAE batch size (small batches learned faster per minute on 2 cores)")
    vae_lr: float = field(1e-3, help="VAE learning rate")
    vae_posterior: str = field("sample", help="what the VAE's decoder learns from: 'sample' (the posterior's samples, "
                               "as the shipped world) or 'mean' (its mean, as the cached latents the UNet learns are; the "
                               "log-variance is then fixed so that sample() gives the mean): sharper colours in round "
                               "trips, but a worse generator in the build tried (docs/WORLD.md)")
    vae_logvar_bias: float | None = field(-6.0, help="initial bias of the VAE's log-variance output; -6 (the shipped "
                                           "world) starts the posterior's noise small, so all four latent channels "
                                           "carry the image and round trips keep the colours; none: diffusers' "
                                           "initialisation, about 0, whose round trips lose them (docs/WORLD.md)")
    vae_channels: list[int] = field(default_factory=lambda: list(WORLD_ARCH["vae_channels"]),
                                    help="VAE block widths, finest first (three blocks: latents are 1/4 of the image)")
    detector_steps: int = field(1500, help="pose detector optimiser steps")
    detector_batch: int = field(32, help="pose detector batch size")
    detector_lr: float = field(2e-3, help="pose detector learning rate")
    unet_steps: int = field(3600, help="UNet + ControlNet + text encoder optimiser steps")
    unet_heads: int = field(WORLD_ARCH["unet_heads"], help="attention heads of the UNet and ControlNet (diffusers' "
                            "attention_head_dim): 2 run about 2x faster on a CPU than the first world's 8, "
                            "docs/WORLD.md compares the two")
    unet_batch: int = field(32, help="UNet batch size")
    unet_lr: float = field(8e-4, help="UNet, ControlNet and text encoder learning rate")
    prompt_dropout: float = field(0.1, help="fraction of empty prompts, so classifier-free guidance works")
    noise_offset: float = field(0.2, help="std of a per-image, per-channel constant added to the training noise "
                                "(offset noise): SD's schedule leaves the image's mean colour in its most-noised "
                                "latents, so a UNet trained without it takes the background from the start noise "
                                "and not the prompt (docs/WORLD.md); 0: plain noise")
    ema: float = field(0.998, help="EMA decay of the exported diffusion weights")
    eval_examples: int = field(48, help="fresh examples sampled and measured at each snapshot and at the end "
                               "(and 4x as many VAE round trips of renders)")
    lcm_steps: int = field(600, help="LCM-LoRA distillation steps on the finished world (poseloop.world.lcm_distill; "
                           "0: no LCM-LoRA is shipped)")
    preview_steps: int = field(1500, help="steps of the preview decoder (an AutoencoderTiny distilled from the VAE, "
                               "poseloop.world.preview_distill; 0: none is shipped); its encoder trains a quarter as long")
    preview_renders: int = field(6000, help="fresh renders whose VAE latents the preview decoder learns from")
    preview_generated: int = field(1024, help="items sampled in each of the default and LCM rounds whose final "
                                   "latents the preview decoder learns from")
    snapshot_every: int = field(600, help="UNet steps between snapshots (weights + sample grid + metrics)")
    run_dir: str = field("models/world_run", help="folder for stage checkpoints, loss plots and sample grids")
    out: str = field(str(WORLD_WEIGHTS), help="where the shipped fp16 weights are written")

    def validate(self) -> None:
        """Check fields before any work starts."""
        if self.size < 32 or self.size % 4:
            raise ConfigError(f"size: {self.size} must be a multiple of 4 and >= 32 (the VAE downsamples by 4)")
        for name in ("examples", "eval_examples", "vae_batch", "detector_batch", "unet_batch", "threads",
                     "snapshot_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if len(self.vae_channels) != 3 or any(c < 1 or c % min(self.vae_channels) for c in self.vae_channels):
            raise ConfigError(f"vae_channels: {self.vae_channels} must be three widths, each a multiple of the "
                              "smallest (the group norm's group count), e.g. 16 32 64")
        if self.unet_heads < 1 or 32 % self.unet_heads:
            raise ConfigError(f"unet_heads: {self.unet_heads} must divide 32 (the UNet's narrowest width), e.g. 2")
        for name in ("vae_steps", "detector_steps", "unet_steps", "lcm_steps", "preview_steps", "preview_renders",
                     "preview_generated"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0 (got {getattr(self, name)})")
        if self.vae_posterior not in ("mean", "sample"):
            raise ConfigError(f"vae_posterior: {self.vae_posterior!r} must be 'mean' or 'sample'")
        if not 0 <= self.prompt_dropout < 1:
            raise ConfigError(f"prompt_dropout: must be in [0, 1) (got {self.prompt_dropout})")
        if self.noise_offset < 0:
            raise ConfigError(f"noise_offset: must be >= 0 (got {self.noise_offset}); 0 turns it off")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema: must be in [0, 1) (got {self.ema})")


def full() -> WorldConfig:
    """The shipped embedded world (50 minutes on 2 cores; then 5.5 for the LCM-LoRA, 12 for the preview decoder)."""
    return WorldConfig()


def smoke() -> WorldConfig:
    """A few steps of every stage: checks the script end to end in about a minute."""
    return WorldConfig(examples=256, vae_steps=20, detector_steps=20, unet_steps=20, unet_batch=8, lcm_steps=5,
                       preview_steps=8, preview_renders=64, preview_generated=16, snapshot_every=10,
                       run_dir="models/world_run_smoke", out="models/world_weights_smoke")


PRESETS = {"full": full, "smoke": smoke}
