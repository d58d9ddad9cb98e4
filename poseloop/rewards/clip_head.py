"""The learned reward model of kind "clip": a small head trained on this app's labels over frozen CLIP features.

score(image, prompt) = mean over ensemble members of  head([e_i, e_i * e_t])
    e_i = L2-normalised CLIP image embedding of the decoded image (the CLIP's own preprocessing, in torch)
    e_t = L2-normalised CLIP text embedding of the prompt

Why this head. PickScore and HPSv2 fine-tune the whole CLIP and score scale * cos(e_i, e_t); the LAION aesthetic
predictor and ImageReward keep the backbone (nearly) fixed and train an MLP on the image (or joint) embedding.
A few hundred labels cannot fine-tune a CLIP, so the backbone stays frozen and only a head learns. Its input holds
both published forms: sum(e_i * e_t) *is* the PickScore/HPS cosine, so a linear layer on e_i * e_t is a re-weighted
(per-dimension trainable) PickScore, and e_i alone is the aesthetic predictor's input (prompt-independent
quality). An MLP on the concatenation can use either; the per-feature standardisation stored with each head
(training statistics) puts the two parts, whose raw entries differ by ~sqrt(D) in size, on one scale.

The frozen CLIP is loaded with poseloop.rewards.published' loaders (a transformers CLIPModel folder as PickScore,
with its differentiable processor copy) or poseloop.rewards.builtin.OpenClipEmbedder (an open_clip checkpoint, plain or
HPS's {'state_dict': ...}); its weights are not copied into the reward folder, config.json names them and a
probe embedding checks on load that the same CLIP is found there. Gradients flow from the score through the
frozen CLIP to the image pixels (ReFL, DRaFT).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from poseloop.config.lib import ConfigError
from poseloop.config.reward import check_clip_path
from poseloop.rewards.images import batch_size, check_images
from poseloop.rewards.model import REWARD_FORMAT, ensemble_mean_std
from poseloop.rewards.versions import WEIGHTS_FILE, load_checked_weights, read_version
from poseloop.config.reward import RewardModelConfig

PROBE_PROMPT = "a person in a red shirt and blue trousers, on a beach"
# Tolerance of the probe check: a normalised D-dim embedding has entries of ~1/sqrt(D) (0.03..0.09 for D=128..1024);
# the same weights in float32 on another device or library version differ by < 1e-3 (TF32 matmuls), while a
# different CLIP (another checkpoint, or the right file under the wrong architecture) moves entries by ~their size.
PROBE_TOLERANCE = 5e-3


class FrozenClip:
    """A frozen CLIP's normalised image and text embeddings, differentiable in the images (0..1, any size)."""

    def __init__(self, path: str | Path, arch: str = "ViT-H-14", processor: str | Path | None = None,
                 device: str | torch.device = "cpu") -> None:
        path = Path(path).expanduser()
        self.path, self.device = path, torch.device(device)
        image: Callable[[torch.Tensor], torch.Tensor]
        text: Callable[[Sequence[str]], torch.Tensor]
        try:
            if path.is_dir():
                from poseloop.rewards.published import PickScoreReward, load_pickscore

                model, proc = load_pickscore(path, processor or None, device=str(self.device))
                enc = PickScoreReward(model, proc, device=str(self.device))
                image, text = enc.image_embeds, enc.text_embeds  # both L2-normalised already
                self.source = f"transformers CLIPModel folder {path}"
            else:
                from poseloop.rewards.builtin import OpenClipEmbedder

                emb = OpenClipEmbedder(arch, path, device=str(self.device))

                def image(im: torch.Tensor) -> torch.Tensor:
                    return F.normalize(emb.image_features(im), dim=-1)

                def text(prompts: Sequence[str]) -> torch.Tensor:
                    return F.normalize(emb.text_features(prompts), dim=-1)

                self.source = f"open_clip {arch} checkpoint {path}"
        except (ValueError, OSError, RuntimeError) as e:
            # Loader messages can carry a whole state-dict mismatch listing: one line is enough to act on.
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(f"model.clip: {path} could not be loaded as a CLIP: {first}") from None
        self._image, self._text = image, text

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings [B, D] of images [B, 3, H, W] in 0..1 (differentiable)."""
        return self._image(images.to(self.device)).float()

    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised prompt embeddings [B, D] (cached per prompt by the underlying encoder)."""
        return self._text(list(prompts)).float()

    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """The head's input [B, 2D]: [e_i, e_i * e_t] (see the module doc)."""
        e_i = self.image_embeds(images)
        e_t = self.text_embeds(prompts).to(e_i.device)
        return torch.cat([e_i, e_i * e_t], dim=-1)

    @torch.no_grad()
    def probe(self) -> dict[str, list[float]]:
        """Embeddings of a fixed synthetic image and prompt: saved with a head, compared when it is loaded."""
        y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
        img = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * (x + y))])[None]  # smooth: no resize aliasing
        return {"image": [round(float(v), 6) for v in self.image_embeds(img)[0]],
                "text": [round(float(v), 6) for v in self.text_embeds([PROBE_PROMPT])[0]]}


def load_frozen_clip(cfg: RewardModelConfig, device: str | torch.device = "cpu") -> FrozenClip:
    """The frozen CLIP a clip-kind config names (checked first; ConfigError on a bad path)."""
    check_clip_path(cfg)
    return FrozenClip(cfg.clip, cfg.clip_arch, cfg.clip_processor or None, device=device)


class ClipHead(nn.Module):
    """One ensemble member: standardised [e_i, e_i * e_t] -> dropout MLP -> reward."""

    def __init__(self, feature_dim: int, cfg: RewardModelConfig) -> None:
        super().__init__()
        # Training-feature statistics, set by the trainer (set_input_stats); identity until then.
        self.register_buffer("in_mean", torch.zeros(feature_dim))
        self.register_buffer("in_std", torch.ones(feature_dim))
        self.net = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(feature_dim, cfg.hidden), nn.GELU(),
                                 nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-feature statistics of the training features ([F] each)."""
        self.in_mean.copy_(mean)
        self.in_std.copy_(std.clamp(min=1e-6))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, F] -> [B]."""
        return self.net((feats - self.in_mean) / self.in_std).squeeze(-1)


class ClipRewardModel(nn.Module):
    """An ensemble of heads over a frozen CLIP; score_images() is differentiable in the images."""

    kind = "clip"

    def __init__(self, cfg: RewardModelConfig, feature_dim: int, ensemble_size: int = 1, version: str = "",
                 extra_config: dict[str, Any] | None = None, clip: FrozenClip | None = None,
                 probe: dict[str, list[float]] | None = None) -> None:
        super().__init__()
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1 (got {ensemble_size})")
        self.config = cfg
        self.feature_dim = int(feature_dim)
        self.version = version
        self.extra_config = dict(extra_config or {})
        self.clip = clip  # not an nn.Module: its weights are never saved with the heads
        self.probe = probe or (clip.probe() if clip is not None else {})
        self.members = nn.ModuleList(ClipHead(self.feature_dim, cfg) for _ in range(ensemble_size))

    @property
    def ensemble_size(self) -> int:
        return len(self.members)

    def member_scores_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Every member's reward of features [B, F] -> [E, B]."""
        if feats.ndim != 2 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"clip reward model {self.version or '(unsaved)'}: expected features [B, {self.feature_dim}], "
                             f"got {tuple(feats.shape)}")
        p = next(self.parameters())
        x = feats.to(p.device, p.dtype)
        return torch.stack([m(x) for m in self.members])

    def score_features(self, feats: torch.Tensor) -> torch.Tensor:
        """Ensemble-mean reward of precomputed features [B, F] -> [B]."""
        return self.member_scores_features(feats).mean(0)

    def features(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """[e_i, e_i * e_t] of images [B, 3, H, W] in 0..1 and their prompts (differentiable in the images)."""
        if self.clip is None:
            raise RuntimeError("this clip reward model has no CLIP attached (load it with load_clip_reward_model)")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"clip reward model: expected images [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"clip reward model: {images.shape[0]} images for {len(prompts)} prompts")
        return self.clip.features(images, prompts)

    def score_images(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Reward [B] of images [B, 3, H, W] in 0..1 with their prompts; differentiable with respect to the images."""
        return self.score_features(self.features(images, prompts))

    def score_images_with_uncertainty(self, images: torch.Tensor, prompts: Sequence[str]
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B], std [B]) over ensemble members; std is 0 for a single-member model."""
        return ensemble_mean_std(self.member_scores_features(self.features(images, prompts)))

    def config_dict(self) -> dict[str, Any]:
        """What config.json holds."""
        model = asdict(self.config)
        # Absolute paths: the reward is loaded later from other working directories (train_policy, evaluate).
        model["clip"] = str(Path(model["clip"]).expanduser().resolve()) if model["clip"] else ""
        if model["clip_processor"]:
            model["clip_processor"] = str(Path(model["clip_processor"]).expanduser().resolve())
        return {"format": REWARD_FORMAT, "version": self.version, "kind": "clip", "model": model,
                "feature_dim": self.feature_dim, "ensemble_size": self.ensemble_size,
                "features": "[e_i, e_i * e_t]: L2-normalised frozen-CLIP image embedding of the decoded image and its "
                            "product with the prompt's text embedding",
                "clip_probe": self.probe, "training": self.extra_config}


def load_clip_reward_model(path_or_version: str | Path = "latest", models_dir: str | Path = "models",
                           device: str | torch.device = "cpu", clip: FrozenClip | None = None) -> ClipRewardModel:
    """Load a clip-kind version with its frozen CLIP (from config.json's model.clip, or `clip`), heads frozen."""
    folder, data = read_version(path_or_version, models_dir, "clip")
    cfg = RewardModelConfig(**data["model"])
    if clip is None:
        if not Path(cfg.clip).expanduser().exists():
            raise FileNotFoundError(f"reward model {folder} is a head on the CLIP {cfg.clip}, which is not there any "
                                    "more; put the same CLIP back at that path (the head's weights do not include it)")
        try:
            clip = load_frozen_clip(cfg, device=device)
        except ConfigError as e:
            raise ValueError(f"reward model {folder}: {e}") from None
    probe = data.get("clip_probe") or {}
    if probe:
        now = clip.probe()
        for key in ("image", "text"):
            want, got = torch.tensor(probe[key]), torch.tensor(now[key])
            if want.shape != got.shape or float((want - got).abs().max()) > PROBE_TOLERANCE:
                raise ValueError(f"reward model {folder}: the CLIP at {cfg.clip} is not the one its head was trained on "
                                 f"(the {key} embedding of a fixed probe differs); restore the original CLIP files")
    model = ClipRewardModel(cfg, data["feature_dim"], data["ensemble_size"], version=data.get("version") or folder.name,
                            extra_config=data.get("training"), clip=clip, probe=probe)
    load_checked_weights(model, folder / WEIGHTS_FILE)
    model.to(device)
    model.eval()
    # A frozen reward for the policy trainer; gradients still flow to the input images.
    model.requires_grad_(False)
    return model


class ClipHeadReward:
    """A clip-kind learned reward model as a poseloop.rewards.builtin reward: decoded images + prompts -> [B]."""

    name = "clip_head"
    needs_images = True
    differentiable = True

    def __init__(self, version: str = "latest", *, models_dir: str | Path = "models", device: str = "cpu",
                 model: ClipRewardModel | None = None) -> None:
        self.version = version
        self.model = model if model is not None else load_clip_reward_model(version, models_dir, device=device)

    def __call__(self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str],
                 metadata: list[dict]) -> torch.Tensor:
        """The head's score of each (image, prompt) [B], on the images' device."""
        images = check_images(self.name, images, batch_size(prompts, metadata))
        return self.model.score_images(images, prompts).float().to(images.device)


@torch.no_grad()
def image_file_features(clip: FrozenClip, paths: Sequence[Path], prompts: Sequence[str], *, flip: bool,
                        batch_size: int = 16, progress: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Frozen features of PNG files, computed once: (x [N, 2D], x of mirrored images [N, 2D] or None, RGB stats [N, 6]).

    The RGB per-channel mean/std are the linear baseline's features (poseloop.rewards.report.linear_baseline).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    from poseloop.sampling.sampler import pil_to_tensor

    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        from poseloop.rewards.labels import LabelDataError

        raise LabelDataError(f"{len(missing)} labelled image file(s) are missing (e.g. {missing[0]}); the clip reward "
                             "model reads the samples' PNGs: restore the round's images/ folder")
    n = len(paths)
    x: list[torch.Tensor | None] = [None] * n
    xf: list[torch.Tensor | None] = [None] * n
    stats: list[torch.Tensor | None] = [None] * n
    by_size: dict[tuple[int, int], list[int]] = {}  # one batch holds images of one size
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            by_size.setdefault(im.size, []).append(i)
    with tqdm(total=n, desc="CLIP features", unit="image", disable=not progress) as bar:
        for idx in by_size.values():
            for k in range(0, len(idx), batch_size):
                chunk = idx[k:k + batch_size]
                imgs = []
                for i in chunk:
                    with Image.open(paths[i]) as im:
                        imgs.append(im.convert("RGB"))
                t = pil_to_tensor(imgs)  # [b, 3, H, W] in 0..1
                ps = [prompts[i] for i in chunk]
                f = clip.features(t, ps).cpu()
                ff = clip.features(t.flip(-1), ps).cpu() if flip else None
                st = torch.cat([t.mean(dim=(2, 3)), t.std(dim=(2, 3))], dim=1)
                for j, i in enumerate(chunk):
                    x[i], stats[i] = f[j], st[j]
                    if ff is not None:
                        xf[i] = ff[j]
                bar.update(len(chunk))
    return (torch.stack(x), torch.stack(xf) if flip else None,  # type: ignore[arg-type]
            torch.stack(stats))  # type: ignore[arg-type]


__all__ = [
    "ClipHead", "ClipHeadReward", "ClipRewardModel", "FrozenClip", "image_file_features",
    "load_clip_reward_model", "load_frozen_clip",
]
