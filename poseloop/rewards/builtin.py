"""Built-in rewards behind one interface (``Reward``); spec strings are parsed and built in poseloop.rewards.spec.

Every reward maps a batch to a float32 tensor [B], higher is better:

    reward(images, latents, prompts, metadata) -> Tensor[B]

``images`` are decoded samples [B, 3, H, W] in 0..1 (None is allowed for rewards whose
``needs_images`` is False), ``latents`` the final latents [B, C, h, w], ``metadata`` one dict per
sample ("keypoints": list of Pose.to_dict() dicts, "width", "height", "source_image", "group_id").
The result lives on the device of the inputs (``images`` if given, else ``latents``).

Rewards never switch autograd off themselves: text_alignment, aesthetic and (if its model allows)
latent are differentiable w.r.t. their inputs (for ReFL); call them under ``torch.no_grad()`` when
only values are needed. pose_accuracy and the JPEG rewards are not differentiable (keypoint
detection, JPEG encoding); brightness is, trivially.

Heavy libraries (controlnet_aux, open_clip) are imported when a reward that needs them is built.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from poseloop.metrics.scores import clip_score, multi_person_oks
from poseloop.data.poses import Pose
from poseloop.rewards.images import batch_size, check_images

__all__ = [
    "Reward",
    "BrightnessReward",
    "WarmthReward",
    "JpegCompressibilityReward",
    "PoseAccuracyReward",
    "PromptAttributesReward",
    "OpenClipEmbedder",
    "TextAlignmentReward",
    "AestheticMLP",
    "AestheticReward",
    "LatentReward",
    "WeightedReward",
    "clip_preprocess",
    "load_aesthetic_head",
    "default_clip_weights",
    "ground_truth_poses",
]


@runtime_checkable
class Reward(Protocol):
    """A batch reward: ``reward(images, latents, prompts, metadata) -> Tensor[B]`` (float32, higher is better)."""

    name: str
    needs_images: bool  # False for latent-only rewards, so the trainer can skip decoding

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------
# Shared input checks


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in 0..1 -> uint8 [B, H, W, 3], rounded as sampling.to_pil does."""
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (arr * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Simple rewards


class _ImageStatReward:
    """A statistic of the decoded images, one value per image."""

    name = ""
    needs_images = True

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """The statistic of each image [B]."""
        return self.stat(check_images(self.name, images, batch_size(prompts, metadata)).float())

    def stat(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in 0..1 -> [B]."""
        raise NotImplementedError


class BrightnessReward(_ImageStatReward):
    """Mean pixel value in 0..1: a SYNTHETIC reward for tests and demos (trivially hackable, not a quality signal)."""

    name = "brightness"

    def stat(self, images: torch.Tensor) -> torch.Tensor:
        """Mean brightness of each image [B]."""
        return images.mean(dim=(1, 2, 3))


class WarmthReward(_ImageStatReward):
    """Mean red minus mean blue, -1..1: a SYNTHETIC reward for tests and demos (a warm light scores high)."""

    name = "warmth"

    def stat(self, images: torch.Tensor) -> torch.Tensor:
        """Mean red minus mean blue of each image [B]."""
        return (images[:, 0] - images[:, 2]).mean(dim=(1, 2))


class JpegCompressibilityReward:
    """DDPO's JPEG task: -(JPEG size in kB at ``quality``), or +size for incompressibility; not differentiable."""

    needs_images = True

    def __init__(self, incompressible: bool = False, quality: int = 95) -> None:
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"JPEG quality must be 1..100; got {quality}")
        self.incompressible = incompressible
        self.quality = int(quality)
        self.name = "jpeg_incompressibility" if incompressible else "jpeg_compressibility"

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """Signed JPEG file size in kB (1 kB = 1000 bytes, as DDPO) per image [B]."""
        from PIL import Image

        images = check_images(self.name, images, batch_size(prompts, metadata))
        sizes = []
        for arr in _to_uint8(images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        out = torch.tensor(sizes, dtype=torch.float32, device=images.device)
        return out if self.incompressible else -out


# ----------------------------------------------------------------------------------------------
# Pose accuracy


def ground_truth_poses(meta: dict, index: int = 0, reward: str = "pose_accuracy") -> list[Pose]:
    """The GT poses of one sample's metadata ("keypoints": Pose dicts, a JSON string of them, or Poses).

    Raises ValueError when absent: a pose reward without ground truth would silently train on garbage.
    """
    kp = meta.get("keypoints")
    where = f"sample {index}" + (f" (group_id={meta['group_id']})" if meta.get("group_id") is not None else "")
    if isinstance(kp, str):  # Group.keypoints_json passed through unparsed
        kp = json.loads(kp)
    if isinstance(kp, dict):
        kp = [kp]
    if not kp:
        raise ValueError(
            f"{reward}: {where} has no ground-truth keypoints (metadata['keypoints'] missing or empty); "
            "it needs the pose the sample was conditioned on. Drop this reward for pose-free groups."
        )
    poses = []
    for p in kp:
        poses.append(p if isinstance(p, Pose) else Pose.from_dict(p))
    return poses


class PoseAccuracyReward:
    """OKS between the GT keypoints and the body keypoints detected in the image (0 if nobody is found).

    The detector is OpenPose (a folder of lllyasviel/Annotators' .pth files) or the embedded world's
    heatmap detector (a folder with model.safetensors, e.g. models/tiny-sd15/pose_detector).
    """

    name = "pose_accuracy"
    needs_images = True

    def __init__(self, weights_dir: str | Path | None = None, *, device: str = "cpu", detector: Any = None) -> None:
        if detector is None:
            if weights_dir is None:
                raise ValueError("PoseAccuracyReward needs weights_dir (folder of the OpenPose .pth files) or a detector")
            from poseloop.data.openpose import load_openpose_detector
            from poseloop.world.detector import is_detector_folder, load_detector

            # Loaded now, not on first call, so a missing file fails at build time with its name.
            if is_detector_folder(weights_dir):
                detector = load_detector(weights_dir, device=device)
            else:
                detector = load_openpose_detector(weights_dir, device=None if device == "cpu" else device)
        self.detector = detector
        self.last_detections: list[list[Pose]] = []  # per sample, for logging and debugging

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """Multi-person OKS per image [B] (GT people matched greedily by OKS; unmatched GT people count 0)."""
        from PIL import Image

        from poseloop.data.openpose import detect_poses

        images = check_images(self.name, images, batch_size(prompts, metadata))
        # Validate every sample's ground truth before running the (slow) detector.
        gts = [ground_truth_poses(m, i) for i, m in enumerate(metadata)]
        h, w = images.shape[-2:]
        scores, self.last_detections = [], []
        batched = self.detector.detect(_to_uint8(images)) if hasattr(self.detector, "detect") else None
        for i, (arr, gt) in enumerate(zip(_to_uint8(images), gts)):
            if batched is not None:  # the embedded world's detector takes the whole batch at once
                found = batched[i]
            else:
                found = detect_poses(Image.fromarray(arr), self.detector, include_hands=False, include_face=False)
            self.last_detections.append(found)
            try:
                scores.append(multi_person_oks(gt, found, width=w, height=h))
            except ValueError as e:
                raise ValueError(f"pose_accuracy: sample {i}: {e}") from e
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


class PromptAttributesReward:
    """SYNTHETIC, the embedded world only: the share of the prompt's shirt colour, trousers colour and background
    that the world's reader (poseloop.world.render.measure_attributes) finds in the image, in the condition pose's
    regions: 0, 1/3, 2/3 or 1. The world's stand-in for a text-alignment reward."""

    name = "prompt_attributes"
    needs_images = True

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """Share of the prompt's three attributes found in each image [B]."""
        from poseloop.world.render import WorldError, measure_attributes, parse_prompt

        images = check_images(self.name, images, batch_size(prompts, metadata))
        wants = []
        for i, prompt in enumerate(prompts):  # every prompt checked before any image is read
            try:
                wants.append(parse_prompt(prompt))
            except WorldError as e:
                raise ValueError(f"{self.name}: sample {i}: {e}") from None
        poses = [ground_truth_poses(m, i, self.name)[0] for i, m in enumerate(metadata)]
        scores = []
        for arr, want, pose in zip(_to_uint8(images), wants, poses):
            got = measure_attributes(arr, pose)
            scores.append(sum(getattr(got, k) == getattr(want, k) for k in ("shirt", "trousers", "background")) / 3)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


# ----------------------------------------------------------------------------------------------
# CLIP-based rewards

_CLIP_HINT = (
    "Get open_clip weights for a pretrained tag (open_clip.list_pretrained() lists (arch, tag) pairs), e.g. "
    "ViT-L-14 / laion2b_s32b_b82k is the Hugging Face repo laion/CLIP-ViT-L-14-laion2B-s32B-b82K: "
    "huggingface-cli download laion/CLIP-ViT-L-14-laion2B-s32B-b82K open_clip_pytorch_model.bin --local-dir {dir}"
)


def default_clip_weights(arch: str, models_dir: str | Path = "models") -> Path:
    """Where a spec without weights= looks for open_clip weights: <models_dir>/open_clip/<arch>/open_clip_pytorch_model.bin."""
    return Path(models_dir) / "open_clip" / arch / "open_clip_pytorch_model.bin"


def clip_preprocess(
    images: torch.Tensor, size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Torch-native, differentiable CLIP preprocessing: bicubic resize of the short side, centre crop, normalise."""
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = images.shape[-2:]
    # Same geometry as open_clip's default transform (Resize(shortest side) + CenterCrop), without PIL,
    # so gradients reach the pixels.
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    x = images.float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
    x = x[..., top : top + th, left : left + tw]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class OpenClipEmbedder:
    """An open_clip model built offline from an architecture name and loaded from a local weights file."""

    def __init__(self, arch: str, weights: str | Path, *, device: str = "cpu") -> None:
        weights = Path(weights).expanduser()
        if not weights.is_file():
            raise FileNotFoundError(
                f"open_clip weights for {arch} not found: {weights}. " + _CLIP_HINT.format(dir=weights.parent)
            )
        import open_clip

        try:
            # pretrained=None: build from the config only; nothing is downloaded.
            model = open_clip.create_model(arch, pretrained=None, device="cpu")
        except RuntimeError as e:
            raise ValueError(f"unknown open_clip architecture {arch!r} ({e}); see open_clip.list_models()") from e
        try:
            open_clip.load_checkpoint(model, str(weights))
        except Exception as e:  # torch.load, key or shape mismatches
            raise ValueError(f"{weights}: could not load as {arch} open_clip weights ({type(e).__name__}: {e})") from e
        self.arch = arch
        self.device = torch.device(device)
        # Frozen: gradients flow to the images only.
        self.model = model.eval().requires_grad_(False).to(self.device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = open_clip.get_model_preprocess_cfg(model)
        self.image_size = cfg.get("size", 224)
        self.mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
        self._text_cache: dict[str, torch.Tensor] = {}

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings [B, D] of images [B, 3, H, W] in 0..1 (differentiable)."""
        x = clip_preprocess(images.to(self.device), self.image_size, self.mean, self.std)
        return self.model.encode_image(x).float()

    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unnormalised text embeddings [B, D]; cached per prompt since DDPO repeats prompts every epoch."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if todo:
            with torch.no_grad():
                feats = self.model.encode_text(self.tokenizer(todo).to(self.device)).float()
            if len(self._text_cache) + len(todo) > 10000:  # bound memory for open-ended prompt streams
                self._text_cache.clear()
            self._text_cache.update(zip(todo, feats))
        return torch.stack([self._text_cache[p] for p in prompts])


class TextAlignmentReward:
    """CLIP score: cosine(image embedding, prompt embedding) x ``scale`` (1 by default), differentiable in images."""

    name = "text_alignment"
    needs_images = True

    def __init__(self, clip: OpenClipEmbedder, scale: float = 1.0) -> None:
        self.clip = clip
        self.scale = float(scale)

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """CLIP score per sample [B]."""
        images = check_images(self.name, images, batch_size(prompts, metadata))
        score = clip_score(self.clip.image_features(images), self.clip.text_features(prompts), self.scale)
        return score.to(images.device)


class AestheticMLP(torch.nn.Module):
    """The LAION improved-aesthetic-predictor head (768-1024-128-64-16-1 with dropouts); keys layers.N.*."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score [B, 1] of L2-normalised CLIP image embeddings [B, D]."""
        return self.layers(x)


_AESTHETIC_HINT = (
    "The LAION aesthetic predictor is sac+logos+ava1-l14-linearMSE.pth from "
    "github.com/christophschuhmann/improved-aesthetic-predictor (an MLP on OpenAI CLIP ViT-L/14 image embeddings)."
)


def load_aesthetic_head(path: str | Path) -> torch.nn.Module:
    """Load an aesthetic head from a .pth state dict: the improved-aesthetic-predictor MLP or a single linear layer."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic predictor weights not found: {path}. " + _AESTHETIC_HINT)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a torch state dict ({type(e).__name__}: {e})") from e
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    keys = set(sd)
    mlp_keys = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    if mlp_keys <= keys:
        head: torch.nn.Module = AestheticMLP(int(sd["layers.0.weight"].shape[1]))
    else:
        # A linear probe: either bare weight/bias or a one-layer "layers.0.*" / "linear.*" module.
        prefix = next((p for p in ("", "layers.0.", "linear.") if f"{p}weight" in keys and f"{p}bias" in keys), None)
        if prefix is None or sd[f"{prefix}weight"].ndim != 2 or sd[f"{prefix}weight"].shape[0] != 1:
            raise ValueError(
                f"{path}: unrecognised aesthetic head; expected the improved-aesthetic-predictor MLP "
                f"(keys layers.0/2/4/6/7.weight|bias) or a linear layer with weight [1, D]; found keys {sorted(keys)[:8]}"
            )
        w = sd[f"{prefix}weight"]
        head = torch.nn.Linear(w.shape[1], 1)
        sd = {"weight": w, "bias": sd[f"{prefix}bias"]}
    try:
        head.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{path}: {e}") from e
    return head.eval().requires_grad_(False)


def _clip_embed_dim(model: Any) -> int | None:
    """Image embedding width of an open_clip model, or None if it cannot be told without running it."""
    dim = getattr(getattr(model, "visual", None), "output_dim", None)
    if dim is None:
        proj = getattr(model, "text_projection", None)
        dim = proj.shape[1] if isinstance(proj, torch.Tensor) else None
    return None if dim is None else int(dim)


class AestheticReward:
    """LAION aesthetic score: an MLP (or linear) head on L2-normalised CLIP image embeddings; differentiable."""

    name = "aesthetic"
    needs_images = True

    def __init__(self, clip: OpenClipEmbedder, head: torch.nn.Module) -> None:
        in_dim = head.in_features if isinstance(head, torch.nn.Linear) else getattr(head, "input_size", None)
        embed_dim = _clip_embed_dim(clip.model)
        if in_dim is not None and embed_dim is not None and in_dim != embed_dim:
            raise ValueError(
                f"aesthetic head expects {in_dim}-dim CLIP embeddings but {clip.arch} gives {embed_dim}; "
                "the LAION predictor needs clip_arch=ViT-L-14-quickgelu with the OpenAI weights"
            )
        self.clip = clip
        self.head = head.to(clip.device)

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """Predicted aesthetic score per image [B] (about 1..10 with the real LAION weights)."""
        images = check_images(self.name, images, batch_size(prompts, metadata))
        emb = F.normalize(self.clip.image_features(images), dim=-1)
        return self.head(emb).reshape(-1).float().to(images.device)


# ----------------------------------------------------------------------------------------------
# Learned latent reward


class LatentReward:
    """The learned reward model on final latents (poseloop.rewards.model); needs no decoded images. A conditioned
    one (poseloop.rewards.conditioned) also reads the prompts and metadata["keypoints"/"width"/"height"]."""

    name = "latent"
    needs_images = False

    def __init__(
        self, version: str = "latest", *, models_dir: str | Path = "models", device: str = "cpu", model: Any = None
    ) -> None:
        if model is None:
            from poseloop.rewards.loading import load_reward_model

            # Loaded frozen and in eval mode by reward_model; gradients still reach the input latents.
            model = load_reward_model(version, models_dir=models_dir, device=device)
        self.version = version
        self.model = model

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """The reward model's score of each final latent [B]."""
        batch = batch_size(prompts, metadata)
        if latents is None:
            raise ValueError("reward 'latent' needs the final latents but latents is None")
        if latents.shape[0] != batch:
            raise ValueError(f"reward 'latent': {latents.shape[0]} latents for {batch} prompts")
        if getattr(self.model, "conditioned", False):  # a conditioned model also reads the prompts and the poses
            out = torch.as_tensor(self.model.score(latents, prompts, metadata)).float().reshape(-1)
        else:
            out = torch.as_tensor(self.model.score(latents)).float().reshape(-1)
        if out.shape[0] != batch:
            raise ValueError(f"reward model returned {out.shape[0]} scores for {batch} latents")
        return out.to(latents.device)


# ----------------------------------------------------------------------------------------------
# Weighted mixes


class WeightedReward:
    """sum_i w_i * reward_i; the unweighted member values of the last call are kept in ``last_components``."""

    def __init__(self, members: Sequence[tuple[Reward, float]]) -> None:
        if not members:
            raise ValueError("WeightedReward needs at least one member")
        self.members: list[tuple[str, Reward, float]] = []
        seen: dict[str, int] = {}
        for reward, weight in members:
            if not math.isfinite(float(weight)):
                raise ValueError(f"weight of {reward.name!r} must be finite; got {weight}")
            # Two members with the same name (e.g. two CLIPs) get distinct log keys: name, name#2, ...
            seen[reward.name] = seen.get(reward.name, 0) + 1
            label = reward.name if seen[reward.name] == 1 else f"{reward.name}#{seen[reward.name]}"
            self.members.append((label, reward, float(weight)))
        self.name = " + ".join(f"{w:g}*{label}" for label, _, w in self.members)
        self.needs_images = any(r.needs_images for _, r, _ in self.members)
        self.weights: dict[str, float] = {label: w for label, _, w in self.members}
        self.last_components: dict[str, torch.Tensor] = {}

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """Weighted sum of the members' rewards [B]."""
        components: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for label, reward, weight in self.members:
            value = reward(images, latents, prompts, metadata).float()
            components[label] = value
            if total is not None:
                value = value.to(total.device)
            total = weight * value if total is None else total + weight * value
        self.last_components = components
        assert total is not None
        return total
