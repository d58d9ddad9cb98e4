"""The learned reward model of kind "conditioned": the latent CNN ensemble that also sees the prompt and the pose.

A rater judges an image against its condition (does the figure follow the pose, is the shirt the colour the
prompt asked for); a model of the final latents alone can learn that only through correlations that break on new
poses and prompts. This kind adds both:

    pose:   the OpenPose condition image rendered from the sample's keypoints (metadata "keypoints", "width",
            "height"), area-downsampled to the latent grid and concatenated to the latent: [B, C + 3, h, w].
            A convolution then compares the latent and the skeleton where they overlap, which carries over to
            poses never labelled.
    prompt: the token states of the base model's own text encoder (what its UNet cross-attends to: SD1.5's last
            hidden states, SDXL's two penultimate ones side by side), so it works offline for any checkpoint.
            K learned queries attend over the tokens ([B, K*D]); that vector scales and shifts (FiLM) the
            second conv stage's channels and enters the head beside the pooled image features.

score(latents, prompts, metadata) is the ensemble mean, differentiable in the latents (ReFL, DRaFT); the
conditions are constants. The text encoder is not saved with the weights: config.json names the model it came
from (its ModelConfig), and a probe embedding checks on load that the same encoder is found there.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from poseloop.rewards.model import LatentRewardModel
from poseloop.rewards.versions import WEIGHTS_FILE, read_version
from poseloop.config.reward import RewardModelConfig

POSE_CHANNELS = 3  # the OpenPose condition image's RGB
TEXT_QUERIES = 4
PROBE_PROMPT = "a person in a red shirt and blue trousers, on a beach"
# A probe's entries are token states of size ~1; the same weights on another device or library version differ by
# < 1e-3, another text encoder by about their size.
PROBE_TOLERANCE = 1e-2


class ConditionMissingError(ValueError):
    """A conditioned reward model was called without the prompts or the poses it needs."""


# ---- the condition's inputs ------------------------------------------------------------------------


class PromptEncoder:
    """The base model's tokenizer(s) and frozen text encoder(s): prompts -> token states [B, T, D] and mask [B, T]."""

    def __init__(self, model_config: dict[str, Any], device: str | torch.device = "cpu") -> None:
        self.model_config = dict(model_config)
        self.device = torch.device(device)
        base = Path(str(model_config["base"])).expanduser()
        self.arch = str(model_config.get("arch", "sd15"))
        if (base / "text_encoder").is_dir() and (base / "tokenizer").is_dir():
            from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

            pairs = [(CLIPTokenizer.from_pretrained(base / "tokenizer"), CLIPTextModel.from_pretrained(base / "text_encoder"))]
            if self.arch == "sdxl":
                pairs.append((CLIPTokenizer.from_pretrained(base / "tokenizer_2"),
                              CLIPTextModelWithProjection.from_pretrained(base / "text_encoder_2")))
        else:  # a single-file checkpoint or a hub id: the pipeline's own loader, then only its text part is kept
            from poseloop.config.generation import ModelConfig
            from poseloop.config.lib import from_dict
            from poseloop.models.loading import load_components

            cfg = from_dict(ModelConfig, self.model_config)
            cfg.dtype, cfg.device = "float32", "cpu"
            pipe = load_components(cfg).pipe
            pairs = [(pipe.tokenizer, pipe.text_encoder)]
            if self.arch == "sdxl":
                pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        self.pairs = [(tok, enc.float().eval().requires_grad_(False).to(self.device)) for tok, enc in pairs]
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        states, mask = [], None
        for tok, enc in self.pairs:
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
            out = enc(ids.input_ids.to(self.device), output_hidden_states=True)
            # As the pipelines condition the UNet: SD1.5 the last layer, SDXL the penultimate of each encoder.
            states.append(out.hidden_states[-2] if self.arch == "sdxl" else out.last_hidden_state)
            mask = ids.attention_mask.bool()
        return torch.cat(states, dim=-1)[0].float().cpu(), mask[0].cpu()  # type: ignore[index]

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states [B, T, D] and mask [B, T] (True = a real token); cached per prompt."""
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                if len(self._cache) > 10000:  # bound memory for open-ended prompt streams
                    self._cache.clear()
                self._cache[p] = self._encode(p)
        return (torch.stack([self._cache[p][0] for p in prompts]), torch.stack([self._cache[p][1] for p in prompts]))

    @property
    def dim(self) -> int:
        return int(self.encode([PROBE_PROMPT])[0].shape[-1])

    def probe(self) -> list[float]:
        """The first 16 entries of the probe prompt's first 4 token states: identifies the encoder."""
        return self.encode([PROBE_PROMPT])[0][0, :4, :4].flatten().tolist()


_POSE_CACHE: dict[tuple[str, int, int, int, int], torch.Tensor] = {}


def pose_map(keypoints: Any, width: int, height: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The OpenPose condition image of a sample's keypoints, area-downsampled to the latent grid: [3, h, w] in 0..1.

    keypoints: Poses, Pose.to_dict() dicts or a JSON string of them; None gives a blank map.
    """
    from poseloop.data.openpose import render_pose
    from poseloop.data.poses import Pose

    if keypoints is None:
        return torch.zeros(POSE_CHANNELS, *latent_hw)
    if isinstance(keypoints, (Pose, dict)):
        keypoints = [keypoints]
    if isinstance(keypoints, list):  # Poses or their dicts, as rewards.ground_truth_poses accepts them
        keypoints = [p.to_dict() if isinstance(p, Pose) else p for p in keypoints]
    text = keypoints if isinstance(keypoints, str) else json.dumps(keypoints, sort_keys=True)
    key = (text, int(width), int(height), int(latent_hw[0]), int(latent_hw[1]))
    if key not in _POSE_CACHE:
        kp = json.loads(text)
        poses = [Pose.from_dict(d) for d in ([kp] if isinstance(kp, dict) else kp)]
        img = render_pose(poses, int(width), int(height), draw_hands=False, draw_face=False)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]
        if len(_POSE_CACHE) > 20000:
            _POSE_CACHE.clear()
        _POSE_CACHE[key] = F.interpolate(x[None], size=latent_hw, mode="area")[0]
    return _POSE_CACHE[key]


def pose_maps(metadata: Sequence[dict[str, Any]], latent_hw: tuple[int, int], vae_scale: int) -> torch.Tensor:
    """Pose maps [B, 3, h, w] of samples' metadata ("keypoints", "width", "height"; size from the latent if absent)."""
    out = []
    for m in metadata:
        w = int(m.get("width") or latent_hw[1] * vae_scale)
        h = int(m.get("height") or latent_hw[0] * vae_scale)
        out.append(pose_map(m.get("keypoints"), w, h, latent_hw))
    return torch.stack(out)


# ---- the network ---------------------------------------------------------------------------------


class ConditionedNet(nn.Module):
    """One member: [latent, pose map] -> two GroupNorm conv stages, the second FiLM-ed by the prompt -> MLP head."""

    def __init__(self, in_channels: int, text_dim: int, cfg: RewardModelConfig) -> None:
        super().__init__()
        w = cfg.width
        self.normalize_input = cfg.normalize_input
        self.latent_channels = in_channels
        self.register_buffer("in_mean", torch.zeros(in_channels))
        self.register_buffer("in_std", torch.ones(in_channels))

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU()]

        self.stage1 = nn.Sequential(*block(in_channels + POSE_CHANNELS, w), *block(w, w))
        self.stage2 = nn.Sequential(*block(w, 2 * w), *block(2 * w, 2 * w))
        self.text_norm = nn.LayerNorm(text_dim)
        self.queries = nn.Parameter(torch.randn(TEXT_QUERIES, text_dim) / text_dim ** 0.5)
        self.text_proj = nn.Sequential(nn.Linear(TEXT_QUERIES * text_dim, cfg.hidden), nn.SiLU())
        self.film = nn.Linear(cfg.hidden, 4 * w)  # scale and shift of the 2w channels
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(4 * w + cfg.hidden, cfg.hidden), nn.SiLU(),
                                  nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics of the training latents ([C] each; the pose channels stay 0..1)."""
        self.in_mean.copy_(mean[:self.latent_channels])
        self.in_std.copy_(std[:self.latent_channels].clamp(min=1e-4))

    def text_vector(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of K learned queries over the real tokens: [B, T, D], [B, T] -> [B, hidden]."""
        s = self.text_norm(states)
        logits = torch.einsum("btd,kd->bkt", s, self.queries) / s.shape[-1] ** 0.5  # [B, K, T]
        logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
        pooled = torch.einsum("bkt,btd->bkd", logits.softmax(-1), s)  # [B, K, D]
        return self.text_proj(pooled.flatten(1))

    def forward(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, C + 3, h, w] (latent then pose map), states [B, T, D], mask [B, T] -> [B]."""
        c = self.latent_channels
        lat, pose = x[:, :c], x[:, c:]
        if self.normalize_input:
            lat = (lat - self.in_mean[:, None, None]) / self.in_std[:, None, None]
        h = self.stage1(torch.cat([lat, pose], dim=1))
        if min(h.shape[-2:]) > 8:
            h = F.avg_pool2d(h, 2)
        h = self.stage2(h)
        t = self.text_vector(states.to(h.dtype), mask)
        scale, shift = self.film(t).chunk(2, dim=1)  # [B, 2w] each; zero at initialisation
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3)), t], dim=1)
        return self.head(pooled).squeeze(-1)


# ---- the model -----------------------------------------------------------------------------------


class ConditionedRewardModel(LatentRewardModel):
    """A latent reward-model ensemble that also reads each sample's prompt and pose (metadata["keypoints"])."""

    conditioned = True

    def __init__(self, cfg: RewardModelConfig, latent_shape: Sequence[int], text_dim: int, ensemble_size: int = 1,
                 version: str = "", extra_config: dict[str, Any] | None = None, encoder: PromptEncoder | None = None,
                 text_model: dict[str, Any] | None = None, probe: list[float] | None = None,
                 vae_scale: int = 8) -> None:
        nn.Module.__init__(self)
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1 (got {ensemble_size})")
        self.config = replace(cfg, kind="conditioned")
        self.latent_shape = tuple(int(s) for s in latent_shape)  # type: ignore[assignment]
        self.version = version
        self.extra_config = dict(extra_config or {})
        self.text_dim = int(text_dim)
        self.encoder = encoder  # not an nn.Module attribute: its weights are never saved with the members
        self.text_model = dict(text_model or (encoder.model_config if encoder is not None else {}))
        self.probe = probe if probe is not None else (encoder.probe() if encoder is not None else [])
        self.vae_scale = int(vae_scale)
        self.members = nn.ModuleList(ConditionedNet(self.latent_shape[0], self.text_dim, cfg)
                                     for _ in range(ensemble_size))

    def condition(self, latents: torch.Tensor, prompts: Sequence[str] | None, metadata: Sequence[dict] | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pose maps [B, 3, h, w], token states [B, T, D], mask [B, T]) of a batch's prompts and metadata."""
        b = latents.shape[0]
        if prompts is None or metadata is None:
            raise ConditionMissingError(
                f"reward model {self.version or '(unsaved)'} is conditioned: score(latents, prompts, metadata) needs "
                "each sample's prompt and metadata (keypoints, width, height); train --model.kind latent for a model "
                "of the latents alone")
        if len(prompts) != b or len(metadata) != b:
            raise ConditionMissingError(f"reward model {self.version or '(unsaved)'}: {b} latents but {len(prompts)} "
                                        f"prompts and {len(metadata)} metadata dicts")
        if self.encoder is None:
            raise RuntimeError("this conditioned reward model has no text encoder attached (load it with "
                               "load_reward_model)")
        if any(m.get("keypoints") is None for m in metadata):
            warnings.warn(f"reward model {self.version or '(unsaved)'}: some samples have no keypoints; their pose "
                          "input is blank, so only the prompt and the latent are judged", stacklevel=3)
        states, mask = self.encoder.encode(list(prompts))
        return pose_maps(metadata, tuple(latents.shape[-2:]), self.vae_scale), states, mask  # type: ignore[arg-type]

    def member_scores_inputs(self, x: torch.Tensor, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Every member's reward of precomputed inputs: x [B, C + 3, h, w], states [B, T, D], mask [B, T] -> [E, B]."""
        p = next(self.parameters())
        x, states, mask = x.to(p.device, p.dtype), states.to(p.device, p.dtype), mask.to(p.device)
        return torch.stack([m(x, states, mask) for m in self.members])

    def member_scores(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
                      metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Every member's reward: latents [B, C, h, w] with their prompts and metadata -> [E, B]."""
        self.check_latents(latents)
        pose, states, mask = self.condition(latents, prompts, metadata)
        p = next(self.parameters())
        x = torch.cat([latents.to(p.device, p.dtype), pose.to(p.device, p.dtype)], dim=1)
        return self.member_scores_inputs(x, states, mask)

    def score_images(self, images: torch.Tensor, vae: Any, prompts: Sequence[str] | None = None,
                     metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Reward of images [B, 3, H, W] in 0..1 with their conditions: VAE-encode, then score -> [B]."""
        from poseloop.rewards.model import encode_images

        return self.score(encode_images(vae, images), prompts, metadata)

    def config_dict(self) -> dict[str, Any]:
        """What config.json holds: the latent kind's fields, the text encoder's model and probe, the pose input."""
        out = super().config_dict()
        out.update(kind="conditioned", text_dim=self.text_dim, text_model=self.text_model, text_probe=self.probe,
                   vae_scale=self.vae_scale,
                   condition="pose: OpenPose image of metadata keypoints, area-downsampled to the latent grid, "
                             "concatenated; prompt: the base model's text-encoder token states, attention-pooled, FiLM")
        return out


def load_conditioned_reward_model(path_or_version: str | Path = "latest", models_dir: str | Path = "models",
                                  device: str | torch.device = "cpu", encoder: PromptEncoder | None = None
                                  ) -> ConditionedRewardModel:
    """Load a conditioned version with the text encoder its config names (or `encoder`), frozen, in eval mode."""
    folder, data = read_version(path_or_version, models_dir, "conditioned")
    cfg = RewardModelConfig(**data["model"])
    if encoder is None:
        base = Path(str(data["text_model"].get("base", ""))).expanduser()
        if str(data["text_model"].get("base", "")).startswith(("/", ".", "~")) and not base.exists():
            raise FileNotFoundError(f"reward model {folder} reads prompts with the text encoder of {base}, which is not "
                                    "there any more; put the same model back at that path")
        encoder = PromptEncoder(data["text_model"], device=device)
    probe = data.get("text_probe") or []
    if probe:
        now = torch.tensor(encoder.probe())
        want = torch.tensor(probe)
        if want.shape != now.shape or float((want - now).abs().max()) > PROBE_TOLERANCE:
            raise ValueError(f"reward model {folder}: the text encoder of {data['text_model'].get('base')} is not the "
                             "one it was trained with (a fixed prompt's token states differ); restore that model")
    model = ConditionedRewardModel(cfg, data["latent_shape"], data["text_dim"], data["ensemble_size"],
                                   version=data.get("version") or folder.name, extra_config=data.get("training"),
                                   encoder=encoder, text_model=data["text_model"], probe=probe,
                                   vae_scale=int(data.get("vae_scale", 8)))
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.to(device)
    model.eval()
    model.requires_grad_(False)  # a frozen reward; gradients still reach the input latents
    return model


__all__ = [
    "ConditionMissingError", "ConditionedNet", "ConditionedRewardModel", "PromptEncoder",
    "load_conditioned_reward_model", "pose_map", "pose_maps",
]
