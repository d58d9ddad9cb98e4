"""Built-in rewards behind one interface (``Reward``), built from spec strings by ``build_reward``.

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

Spec grammar (see docs/REWARDS.md)::

    spec    := term ( "+" term )*
    term    := [ number "*" ] reward | reward "*" number
    reward  := name [ ":" option ( "," option )* ]
    option  := key "=" value | value          (a bare value is the reward's positional option)
    value   := text without "," | "..." | '...'

A "+" with whitespace on both sides always separates terms; a bare "+" only when a known reward
name (optionally "weight*") follows it, so file names such as ``sac+logos+ava1-l14-linearMSE.pth``
survive unquoted. Heavy libraries (controlnet_aux, open_clip)
are imported when a reward that needs them is built.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from poseloop.metrics import clip_score, multi_person_oks
from poseloop.poses import Pose

__all__ = [
    "Reward",
    "RewardTerm",
    "BrightnessReward",
    "JpegCompressibilityReward",
    "PoseAccuracyReward",
    "OpenClipEmbedder",
    "TextAlignmentReward",
    "AestheticMLP",
    "AestheticReward",
    "LatentReward",
    "WeightedReward",
    "available_rewards",
    "parse_reward_spec",
    "build_reward",
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


def _batch_size(prompts: Sequence[str], metadata: Sequence[dict]) -> int:
    if len(prompts) != len(metadata):
        raise ValueError(f"got {len(prompts)} prompts but {len(metadata)} metadata dicts; one of each per sample")
    return len(prompts)


def _check_images(name: str, images: torch.Tensor | None, batch: int) -> torch.Tensor:
    if images is None:
        raise ValueError(f"reward {name!r} needs decoded images (needs_images=True) but images is None")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"reward {name!r} expects images [B, 3, H, W] in 0..1; got shape {tuple(images.shape)}")
    if images.shape[0] != batch:
        raise ValueError(f"reward {name!r}: {images.shape[0]} images for {batch} prompts")
    return images


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in 0..1 -> uint8 [B, H, W, 3], rounded as sampling.to_pil does."""
    arr = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (arr * 255).round().astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Simple rewards


class BrightnessReward:
    """Mean pixel value in 0..1: a SYNTHETIC reward for tests and demos (trivially hackable, not a quality signal)."""

    name = "brightness"
    needs_images = True

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """Mean brightness of each image [B]."""
        images = _check_images(self.name, images, _batch_size(prompts, metadata))
        return images.float().mean(dim=(1, 2, 3))


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

        images = _check_images(self.name, images, _batch_size(prompts, metadata))
        sizes = []
        for arr in _to_uint8(images):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell() / 1000.0)
        out = torch.tensor(sizes, dtype=torch.float32, device=images.device)
        return out if self.incompressible else -out


# ----------------------------------------------------------------------------------------------
# Pose accuracy


def ground_truth_poses(meta: dict, index: int = 0) -> list[Pose]:
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
            f"pose_accuracy: {where} has no ground-truth keypoints (metadata['keypoints'] missing or empty); "
            "pose accuracy needs the pose the sample was conditioned on. Drop this reward for pose-free groups."
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
            from poseloop.poses import load_openpose_detector
            from poseloop.world_detector import is_detector_folder, load_detector

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

        from poseloop.poses import detect_poses

        images = _check_images(self.name, images, _batch_size(prompts, metadata))
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
        images = _check_images(self.name, images, _batch_size(prompts, metadata))
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
        images = _check_images(self.name, images, _batch_size(prompts, metadata))
        emb = F.normalize(self.clip.image_features(images), dim=-1)
        return self.head(emb).reshape(-1).float().to(images.device)


# ----------------------------------------------------------------------------------------------
# Learned latent reward


class LatentReward:
    """The learned reward model on final latents (poseloop.reward_model); needs no decoded images."""

    name = "latent"
    needs_images = False

    def __init__(
        self, version: str = "latest", *, models_dir: str | Path = "models", device: str = "cpu", model: Any = None
    ) -> None:
        if model is None:
            from poseloop.reward_model import load_reward_model

            # Loaded frozen and in eval mode by reward_model; gradients still reach the input latents.
            model = load_reward_model(version, models_dir=models_dir, device=device)
        self.version = version
        self.model = model

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """The reward model's score of each final latent [B]."""
        batch = _batch_size(prompts, metadata)
        if latents is None:
            raise ValueError("reward 'latent' needs the final latents but latents is None")
        if latents.shape[0] != batch:
            raise ValueError(f"reward 'latent': {latents.shape[0]} latents for {batch} prompts")
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


# ----------------------------------------------------------------------------------------------
# Registry and spec parsing


@dataclass(frozen=True)
class _Option:
    kind: type
    default: Any  # None: required or derived from models_dir by the factory
    help: str


@dataclass(frozen=True)
class _Entry:
    help: str
    factory: Callable[[dict[str, Any], str, str], Reward]  # (options, device, models_dir)
    options: dict[str, _Option] = field(default_factory=dict)
    positional: str | None = None  # the option a bare value sets (latent:latest)


def _build_pose(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    weights = Path(o["weights"] or Path(models_dir) / "annotators")
    embedded = Path(models_dir) / "tiny-sd15" / "pose_detector"
    if not o["weights"] and not weights.is_dir() and embedded.is_dir():
        raise FileNotFoundError(f"pose_accuracy: no OpenPose weights in {weights}; for the embedded model use its "
                                f"own detector: pose_accuracy:weights={embedded}")
    return PoseAccuracyReward(weights, device=device)


def _build_text(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    clip = OpenClipEmbedder(o["arch"], o["weights"] or default_clip_weights(o["arch"], models_dir), device=device)
    return TextAlignmentReward(clip, scale=o["scale"])


def _build_aesthetic(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    head = load_aesthetic_head(o["weights"] or Path(models_dir) / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    arch = o["clip_arch"]
    clip = OpenClipEmbedder(arch, o["clip_weights"] or default_clip_weights(arch, models_dir), device=device)
    return AestheticReward(clip, head)


def _build_learned(o: dict[str, Any], device: str, models_dir: str) -> Reward:
    """A saved reward model of either kind: the folder's config.json says which (poseloop.reward_model)."""
    from poseloop.reward_model import reward_model_kind

    if reward_model_kind(o["version"], models_dir) == "clip":
        from poseloop.clip_reward import ClipHeadReward

        return ClipHeadReward(o["version"], models_dir=models_dir, device=device)
    return LatentReward(o["version"], models_dir=models_dir, device=device)


_REGISTRY: dict[str, _Entry] = {
    "brightness": _Entry(
        "SYNTHETIC: mean image brightness 0..1, for tests and demos only (trivially hackable)",
        lambda o, d, m: BrightnessReward(),
    ),
    "jpeg_compressibility": _Entry(
        "DDPO task: -(JPEG size in kB at quality 95); not differentiable",
        lambda o, d, m: JpegCompressibilityReward(False, o["quality"]),
        {"quality": _Option(int, 95, "JPEG quality 1..100")},
    ),
    "jpeg_incompressibility": _Entry(
        "DDPO task: +(JPEG size in kB at quality 95); not differentiable",
        lambda o, d, m: JpegCompressibilityReward(True, o["quality"]),
        {"quality": _Option(int, 95, "JPEG quality 1..100")},
    ),
    "pose_accuracy": _Entry(
        "COCO OKS 0..1 of the OpenPose body detected in the image vs metadata['keypoints']; not differentiable",
        _build_pose,
        {"weights": _Option(str, None, "folder with body_pose_model.pth, hand_pose_model.pth, facenet.pth "
                                        "(lllyasviel/Annotators), or the embedded world's detector "
                                        "models/tiny-sd15/pose_detector; default <models_dir>/annotators")},
    ),
    "text_alignment": _Entry(
        "CLIP score: cosine(image, prompt) x scale with open_clip; differentiable in the images",
        _build_text,
        {
            "arch": _Option(str, "ViT-L-14", "open_clip architecture name"),
            "weights": _Option(str, None, "open_clip weights file; default <models_dir>/open_clip/<arch>/open_clip_pytorch_model.bin"),
            "scale": _Option(float, 1.0, "multiplier of the cosine (100 for the usual CLIPScore)"),
        },
    ),
    "aesthetic": _Entry(
        "LAION aesthetic predictor (MLP on L2-normalised CLIP ViT-L-14 image embeddings); differentiable",
        _build_aesthetic,
        {
            "weights": _Option(str, None, "head .pth; default <models_dir>/aesthetic/sac+logos+ava1-l14-linearMSE.pth"),
            # OpenAI's CLIP (the head's training features) uses QuickGELU; open_clip's plain "ViT-L-14" built with
            # pretrained=None uses GELU, so loading the OpenAI weights into it gives different embeddings.
            "clip_arch": _Option(str, "ViT-L-14-quickgelu", "open_clip architecture of the embeddings (OpenAI ViT-L/14 "
                                 "weights: timm/vit_large_patch14_clip_224.openai)"),
            "clip_weights": _Option(str, None, "open_clip weights; default <models_dir>/open_clip/<arch>/open_clip_pytorch_model.bin"),
        },
    ),
    "latent": _Entry(
        "learned reward model from train_reward.py; latent:latest, latent:<version> or latent:<folder>; the latent "
        "kind scores final latents (needs no decoded images), the clip kind decoded images + prompts",
        _build_learned,
        {"version": _Option(str, "latest", "'latest' or a saved reward model's path/version")},
        positional="version",
    ),
}

# PickScore and HPSv2 live in their own module (heavy imports stay inside their factories).
from poseloop import published_rewards as _published  # noqa: E402

_published.register(_REGISTRY, _Entry, _Option)


def available_rewards() -> dict[str, str]:
    """Reward name -> one-line help, for CLIs and error messages."""
    return {name: e.help for name, e in _REGISTRY.items()}


@dataclass(frozen=True)
class RewardTerm:
    """One parsed term of a spec: reward name, raw string options and its weight (None when not given)."""

    name: str
    options: dict[str, str]
    weight: float | None = None


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?"
_LEADING_WEIGHT = re.compile(rf"^\s*({_NUMBER})\s*\*\s*(.*)$", re.S)
_TRAILING_WEIGHT = re.compile(rf"^(.*?)\s*\*\s*({_NUMBER})\s*$", re.S)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _unknown_name(name: str) -> ValueError:
    listing = "; ".join(f"{n}: {h}" for n, h in available_rewards().items())
    return ValueError(f"unknown reward {name!r}; available rewards: {', '.join(_REGISTRY)} ({listing})")


def _split_outside_quotes(
    text: str, sep: str, accept: Callable[[str, str], bool] = lambda before, rest: True
) -> list[str]:
    """Split ``text`` at ``sep`` outside quotes, where ``accept(text before sep, text after sep)`` holds."""
    parts, start, quote = [], 0, ""
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == sep and accept(text[:i], text[i + 1 :]):
            parts.append(text[start:i])
            start = i + 1
    if quote:
        raise ValueError(f"unbalanced {quote} quote in reward spec {text!r}")
    parts.append(text[start:])
    return parts


def _split_terms(spec: str) -> list[str]:
    """Split a spec at its term-separating '+' signs (see the module doc for which ones separate)."""

    def accept(before: str, rest: str) -> bool:
        # " + " (spaces both sides) always separates, so a misspelt name still reaches the unknown-name error;
        # a bare "+" separates only before [weight*] a known reward name (file names may contain "+").
        if before[-1:].isspace() and rest[:1].isspace():
            return True
        m = re.match(rf"\s*(?:{_NUMBER}\s*\*\s*)?([A-Za-z_][A-Za-z0-9_]*)\s*(?=$|[:*+])", rest)
        return bool(m) and m.group(1) in _REGISTRY

    return _split_outside_quotes(spec, "+", accept)


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    return v


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """Parse a spec string into its terms (names checked against the registry; options not yet typed)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty reward spec; available rewards: {', '.join(_REGISTRY)}")
    terms = []
    for raw in _split_terms(spec):
        text = raw.strip()
        if not text:
            raise ValueError(f"empty term in reward spec {spec!r} (a stray '+'?)")
        weight: float | None = None
        m = _LEADING_WEIGHT.match(text)
        if m:
            weight, text = float(m.group(1)), m.group(2).strip()
        m = _TRAILING_WEIGHT.match(text)
        if m:
            if weight is not None:
                raise ValueError(f"term {raw.strip()!r} has two weights; write 'w*name' or 'name*w'")
            text, weight = m.group(1).strip(), float(m.group(2))
        name, _, opt_text = text.partition(":")
        name = name.strip()
        if not _NAME.match(name):
            raise ValueError(
                f"cannot parse term {raw.strip()!r} of reward spec {spec!r}: expected [weight*]name[:key=value,...][*weight] "
                f"joined by ' + '; available rewards: {', '.join(_REGISTRY)}"
            )
        if name not in _REGISTRY:
            raise _unknown_name(name)
        entry = _REGISTRY[name]
        options: dict[str, str] = {}
        if opt_text.strip():
            for item in _split_outside_quotes(opt_text, ","):
                key, eq, value = item.partition("=")
                if eq and _NAME.match(key.strip()):
                    key = key.strip()
                elif entry.positional is not None:
                    key, value = entry.positional, item  # a bare value (may itself contain '=')
                else:
                    allowed = ", ".join(entry.options) or "none"
                    raise ValueError(f"reward {name!r}: option {item.strip()!r} is not key=value (options: {allowed})")
                if key not in entry.options:
                    allowed = ", ".join(entry.options) or "none"
                    raise ValueError(f"reward {name!r} has no option {key!r} (options: {allowed})")
                if key in options:
                    raise ValueError(f"reward {name!r}: option {key!r} given twice")
                options[key] = _unquote(value)
        terms.append(RewardTerm(name, options, weight))
    return terms


def _typed_options(term: RewardTerm) -> dict[str, Any]:
    entry = _REGISTRY[term.name]
    out: dict[str, Any] = {}
    for key, opt in entry.options.items():
        if key not in term.options:
            out[key] = opt.default
            continue
        raw = term.options[key]
        try:
            out[key] = opt.kind(raw)
        except ValueError:
            raise ValueError(f"reward {term.name!r}: option {key}={raw!r} is not a valid {opt.kind.__name__}") from None
        if opt.kind is str and not raw:
            raise ValueError(f"reward {term.name!r}: option {key} is empty")
    return out


def build_reward(spec: str, *, device: str = "cpu", models_dir: str = "models") -> Reward:
    """Build a reward from a spec (see module doc); one unweighted term gives that reward, anything else a WeightedReward."""
    terms = parse_reward_spec(spec)
    built = []
    for term in terms:
        options = _typed_options(term)  # type errors before any model is loaded
        built.append((term, options))
    members = [(_REGISTRY[t.name].factory(o, device, str(models_dir)), t.weight) for t, o in built]
    if len(members) == 1 and members[0][1] is None:
        return members[0][0]
    return WeightedReward([(r, 1.0 if w is None else w) for r, w in members])

