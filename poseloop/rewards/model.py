"""The learned reward model: a small CNN ensemble on the sampler's final latents (no training code here).

A version on disk (models/reward/<version>/) holds:
    weights.safetensors   every ensemble member's parameters ("members.<i>.<name>")
    config.json           model hyper-parameters, latent shape, ensemble size, the training config
    metrics.json          held-out numbers (written by poseloop.rewards.training)
    training_curve.png, calibration.png
and models/reward/latest is a small JSON file {"version": "<name>"} naming the newest version (the same
format as models/policies/latest; an older one-line file is read too).

Latent convention: what the sampler stores as x_0, i.e. the VAE latent times vae.config.scaling_factor
(minus shift_factor where a VAE has one); images are brought there by `encode_images`.

Saved versions are read and written by poseloop.rewards.versions; poseloop.rewards.loading loads any kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from poseloop.config.lib import ConfigError
from poseloop.config.reward import ARCHES, RewardModelConfig

REWARD_FORMAT = "poseloop.reward/1"  # config.json's "format" of every saved version

def ensemble_mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B], std [B]) over the members of values [E, B]; std is 0 for a single member."""
    std = values.std(0, unbiased=False) if values.shape[0] > 1 else torch.zeros_like(values[0])
    return values.mean(0), std


class LatentShapeError(ValueError):
    """Latents do not match what a reward model was trained on (channel count or rank)."""


class AlmostPerfectNet(nn.Module):
    """AlmostPerfect's reward CNN: conv C-8-16-32 (3x3, ReLU, max-pool 2), adaptive pool 8x8, MLP 2048-1024-1."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = (in_channels, 8, 16, 32)
        for cin, cout in zip(chans[:-1], chans[1:]):
            # ceil_mode keeps tiny latents (e.g. 4x4) from pooling to nothing; identical on even sizes.
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B]."""
        return self.head(self.pool(self.features(x))).squeeze(-1)


class ImprovedNet(nn.Module):
    """Input standardisation, two GroupNorm conv stages, global mean+max pooling, dropout MLP head.

    Global pooling makes the head's size independent of the latent size (SD 64x64, SDXL 128x128, tiny 8x8)
    and far smaller than AlmostPerfect's 2M-parameter Linear(2048, 1024), which overfits a few hundred labels.
    """

    def __init__(self, in_channels: int, cfg: RewardModelConfig) -> None:
        super().__init__()
        w = cfg.width
        self.normalize_input = cfg.normalize_input
        # Set from the training latents by the trainer (set_input_stats); identity until then.
        self.register_buffer("in_mean", torch.zeros(in_channels))
        self.register_buffer("in_std", torch.ones(in_channels))

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU()]

        self.stage1 = nn.Sequential(*block(in_channels, w), *block(w, w))
        self.stage2 = nn.Sequential(*block(w, 2 * w), *block(2 * w, 2 * w))
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(4 * w, cfg.hidden), nn.SiLU(),
                                  nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel statistics of the training latents ([C] each)."""
        self.in_mean.copy_(mean)
        self.in_std.copy_(std.clamp(min=1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B]."""
        if self.normalize_input:
            x = (x - self.in_mean[:, None, None]) / self.in_std[:, None, None]
        h = self.stage1(x)
        # Downsample only while the map is large: tiny latents (8x8) keep their resolution.
        if min(h.shape[-2:]) > 8:
            h = F.avg_pool2d(h, 2)
        h = self.stage2(h)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 4w]
        return self.head(pooled).squeeze(-1)


def build_member(cfg: RewardModelConfig, in_channels: int) -> nn.Module:
    """One ensemble member of the configured architecture."""
    if cfg.arch == "almostperfect":
        return AlmostPerfectNet(in_channels)
    if cfg.arch == "improved":
        return ImprovedNet(in_channels, cfg)
    raise ConfigError(f"model.arch: {cfg.arch!r} is not one of {', '.join(ARCHES)}")


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in 0..1 -> latents [B, C, H/f, W/f] as the sampler stores them (mean x scaling)."""
    x = images.to(vae.device, vae.dtype) * 2 - 1
    encoded = vae.encode(x)
    # The posterior mean, not a sample: scoring must be deterministic. An AutoencoderTiny (a TAESD-style
    # preview VAE) gives its latents directly.
    z = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


class LatentRewardModel(nn.Module):
    """An ensemble of reward CNNs on final latents; score() is the ensemble mean and is differentiable.

    prompts and metadata (one dict per sample, "keypoints"/"width"/"height") are accepted everywhere and ignored
    here; the conditioned kind (poseloop.rewards.conditioned, `conditioned` True) needs them.
    """

    conditioned = False

    def __init__(self, cfg: RewardModelConfig, latent_shape: Sequence[int], ensemble_size: int = 1,
                 version: str = "", extra_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1 (got {ensemble_size})")
        # The saved kind says what the weights are: a plain ensemble is "latent" whatever config it was given.
        self.config = replace(cfg, kind="latent") if cfg.kind == "conditioned" else cfg
        self.latent_shape: tuple[int, int, int] = tuple(int(s) for s in latent_shape)  # type: ignore[assignment]
        self.version = version
        # The training config and anything else saved next to the weights (config.json "training").
        self.extra_config = dict(extra_config or {})
        self.members = nn.ModuleList(build_member(cfg, self.latent_shape[0]) for _ in range(ensemble_size))

    @property
    def ensemble_size(self) -> int:
        return len(self.members)

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise LatentShapeError unless latents are [B, C, h, w] with this model's channel count."""
        c = self.latent_shape[0]
        if latents.ndim != 4:
            raise LatentShapeError(f"reward model {self.version or '(unsaved)'}: expected latents [B, {c}, h, w], got "
                                   f"shape {tuple(latents.shape)}")
        if latents.shape[1] != c:
            raise LatentShapeError(
                f"reward model {self.version or '(unsaved)'} was trained on {c}-channel latents "
                f"{list(self.latent_shape)} but got {latents.shape[1]}-channel latents {tuple(latents.shape)}: it "
                "belongs to another VAE / model family. Train a reward model on samples of this model "
                "(python train_reward.py --data.rounds ...) or use another reward.")

    def member_scores(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
                      metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Every member's reward: latents [B, C, h, w] -> [E, B]."""
        self.check_latents(latents)
        p = next(self.parameters())
        x = latents.to(p.device, p.dtype)
        return torch.stack([m(x) for m in self.members])  # [E, B]

    def forward(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
                metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Same as score()."""
        return self.member_scores(latents, prompts, metadata).mean(0)

    def score(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
              metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Reward per latent [B, C, h, w] -> [B]: the ensemble mean; differentiable with respect to latents."""
        return self.member_scores(latents, prompts, metadata).mean(0)

    def score_with_uncertainty(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
                               metadata: Sequence[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B], std [B]) over ensemble members; std is 0 for a single-member model."""
        return ensemble_mean_std(self.member_scores(latents, prompts, metadata))

    @torch.no_grad()
    def rank(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
             metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Indices of latents [B, C, h, w], best first."""
        return torch.argsort(self.score(latents, prompts, metadata), descending=True)

    def prefer_prob(self, latents_a: torch.Tensor, latents_b: torch.Tensor, prompts: Sequence[str] | None = None,
                    metadata: Sequence[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """P(a beats b) = sigmoid(r_a - r_b) per member -> (ensemble mean [B], ensemble std [B]); a pair shares its
        condition (one group)."""
        return ensemble_mean_std(torch.sigmoid(self.member_scores(latents_a, prompts, metadata)
                                               - self.member_scores(latents_b, prompts, metadata)))

    def score_images(self, images: torch.Tensor, vae: Any) -> torch.Tensor:
        """Reward of images [B, 3, H, W] in 0..1: VAE-encode (posterior mean x scaling) then score -> [B]."""
        return self.score(encode_images(vae, images))

    def config_dict(self) -> dict[str, Any]:
        """What config.json holds (without the training config when none was given)."""
        return {"format": REWARD_FORMAT, "version": self.version, "model": asdict(self.config),
                "latent_shape": list(self.latent_shape), "ensemble_size": self.ensemble_size,
                "latent_convention": "final sampler latent x_0 = VAE posterior mean * scaling_factor",
                "training": self.extra_config}


@dataclass
class PairSuggestion:
    """A candidate pair to ask raters about, with the model's preference and its uncertainty."""

    a: int
    b: int
    p_a: float  # ensemble-mean P(a beats b)
    std: float  # ensemble std of P(a beats b): disagreement between members


@torch.no_grad()
def suggest_pairs(model: LatentRewardModel, latents: torch.Tensor, pairs: Sequence[tuple[int, int]],
                  top_k: int | None = None, prompts: Sequence[str] | None = None,
                  metadata: Sequence[dict] | None = None) -> list[PairSuggestion]:
    """Candidate pairs (indices into latents [N, C, h, w]) sorted by ensemble std of P(a beats b), most uncertain first.

    prompts / metadata: one per latent, for a conditioned model."""
    if not pairs:
        return []
    idx = torch.as_tensor(list(pairs), dtype=torch.long)  # [P, 2]
    member = model.member_scores(latents, prompts, metadata)  # [E, N]: each latent scored once, however many pairs it is in
    p = torch.sigmoid(member[:, idx[:, 0]] - member[:, idx[:, 1]])  # [E, P]
    std = p.std(0, unbiased=False) if p.shape[0] > 1 else torch.zeros_like(p[0])
    mean = p.mean(0)
    # Ties in std (e.g. a single-member model) fall back to closeness of P to 0.5.
    order = sorted(range(len(pairs)), key=lambda i: (-float(std[i]), abs(float(mean[i]) - 0.5)))
    out = [PairSuggestion(int(idx[i, 0]), int(idx[i, 1]), float(mean[i]), float(std[i])) for i in order]
    return out if top_k is None else out[:top_k]


__all__ = [
    "REWARD_FORMAT", "LatentRewardModel", "LatentShapeError", "PairSuggestion", "build_member", "encode_images",
    "ensemble_mean_std", "suggest_pairs",
]
