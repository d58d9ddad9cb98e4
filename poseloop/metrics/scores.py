"""Metrics shared by the built-in rewards and by evaluation: OKS (COCO), multi-person matching, CLIP score, LPIPS.

Heavy libraries (lpips, torchvision) are imported inside the functions that need them so that
``import poseloop.metrics.scores`` stays fast.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from poseloop.data.poses import Pose

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import torch

__all__ = [
    "COCO17_NAMES",
    "COCO_SIGMAS",
    "OPENPOSE18_TO_COCO17",
    "openpose_to_coco",
    "keypoint_bbox_area",
    "oks",
    "oks_matrix",
    "match_poses",
    "multi_person_oks",
    "clip_score",
    "lpips_distance",
]

COCO17_NAMES: tuple[str, ...] = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)

# COCO's per-keypoint sigmas (COCO-17 order), exactly as in pycocotools' COCOeval.
COCO_SIGMAS: np.ndarray = (
    np.array([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89])
    / 10.0
)

# For each COCO-17 index, the OpenPose-18 index holding the same body point; OpenPose's neck (1) has no
# COCO counterpart (COCO derives it as the shoulders' mean) and is dropped.
OPENPOSE18_TO_COCO17: tuple[int, ...] = (0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10)


def openpose_to_coco(body: np.ndarray) -> np.ndarray:
    """Reorder an OpenPose-18 (18, 3) body array into COCO-17 (17, 3) order (the neck is dropped)."""
    body = np.asarray(body, dtype=np.float64)
    if body.shape != (18, 3):
        raise ValueError(f"expected an OpenPose-18 body of shape (18, 3); got {body.shape}")
    return body[list(OPENPOSE18_TO_COCO17)]


def _coco_pixels(pose: Pose, width: float, height: float) -> tuple[np.ndarray, np.ndarray]:
    """(17, 2) pixel coordinates and a (17,) visibility mask of a Pose in COCO-17 order."""
    kp = openpose_to_coco(pose.body)
    xy = kp[:, :2] * np.array([width, height], dtype=np.float64)
    return xy, kp[:, 2] > 0


def keypoint_bbox_area(pose: Pose, width: float = 1.0, height: float = 1.0) -> float:
    """Area (pixels^2) of the bounding box of the pose's visible COCO-17 keypoints; 0 if fewer than two."""
    xy, vis = _coco_pixels(pose, width, height)
    if vis.sum() < 2:
        return 0.0
    pts = xy[vis]
    return float((pts[:, 0].max() - pts[:, 0].min()) * (pts[:, 1].max() - pts[:, 1].min()))


def oks(gt: Pose, pred: Pose, area: float | None = None, *, width: float = 1.0, height: float = 1.0) -> float:
    """COCO Object Keypoint Similarity of ``pred`` against ``gt`` over the visible GT COCO-17 keypoints.

    Poses are normalised 0..1; ``width``/``height`` turn them into pixels. ``area`` is the object
    scale s^2 in pixels^2; by default the bounding-box area of the GT's visible keypoints (COCO
    uses the segmentation area, which we do not have). With the default area the value does not
    depend on a common scale of width and height, only on their ratio.
    """
    gxy, gvis = _coco_pixels(gt, width, height)
    pxy, pvis = _coco_pixels(pred, width, height)
    if not gvis.any():
        raise ValueError(
            "OKS needs at least one visible ground-truth COCO-17 keypoint (OpenPose's neck alone does not count)"
        )
    if area is None:
        area = keypoint_bbox_area(gt, width, height)
    if area < 0 or not np.isfinite(area):
        raise ValueError(f"OKS area must be a finite non-negative number of pixels^2; got {area}")
    variances = (2.0 * COCO_SIGMAS) ** 2
    d2 = ((pxy - gxy) ** 2).sum(axis=1)
    # As pycocotools' computeOks: e = d^2 / (2 s^2 (2 sigma)^2), with eps added to the area so a
    # degenerate (zero-area) GT still gives 1 for an exact hit.
    e = d2 / variances / (area + np.spacing(1)) / 2.0
    sim = np.exp(-e)
    # A GT keypoint the prediction lacks scores 0 (infinitely far). pycocotools would measure from
    # the detector's placeholder coordinates, which are just as meaningless.
    sim[~pvis] = 0.0
    return float(sim[gvis].mean())


def oks_matrix(
    gts: Sequence[Pose],
    preds: Sequence[Pose],
    *,
    width: float = 1.0,
    height: float = 1.0,
    areas: Sequence[float | None] | None = None,
) -> np.ndarray:
    """OKS of every (ground truth, prediction) pair: a float64 array of shape [len(gts), len(preds)]."""
    if areas is not None and len(areas) != len(gts):
        raise ValueError(f"areas has {len(areas)} entries for {len(gts)} ground-truth poses")
    out = np.zeros((len(gts), len(preds)), dtype=np.float64)
    for i, g in enumerate(gts):
        a = None if areas is None else areas[i]
        for j, p in enumerate(preds):
            out[i, j] = oks(g, p, a, width=width, height=height)
    return out


def match_poses(
    gts: Sequence[Pose], preds: Sequence[Pose], *, width: float = 1.0, height: float = 1.0
) -> list[tuple[int, int | None, float]]:
    """Greedily match GT to predicted people by highest OKS; one (gt index, pred index or None, OKS) per GT."""
    m = oks_matrix(gts, preds, width=width, height=height)
    result: dict[int, tuple[int | None, float]] = {}
    free = m.copy()
    # Take the best remaining pair each time, so a clear match is never stolen by a worse one;
    # each person is used at most once.
    for _ in range(min(len(gts), len(preds))):
        i, j = np.unravel_index(int(np.argmax(free)), free.shape)
        if free[i, j] < 0:  # only used-up rows/columns remain
            break
        result[int(i)] = (int(j), float(m[i, j]))
        free[i, :] = -1.0
        free[:, j] = -1.0
    return [(i, *result.get(i, (None, 0.0))) for i in range(len(gts))]


def multi_person_oks(gts: Sequence[Pose], preds: Sequence[Pose], *, width: float = 1.0, height: float = 1.0) -> float:
    """Mean over GT people of the OKS of their greedily matched prediction (0 for an unmatched GT)."""
    if not gts:
        raise ValueError("multi_person_oks needs at least one ground-truth pose")
    return float(np.mean([s for _, _, s in match_poses(gts, preds, width=width, height=height)]))


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Row-wise cosine similarity of image and text embeddings [B, D] times ``scale`` (100 for the usual CLIPScore)."""
    import torch.nn.functional as F

    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} vs {tuple(text_features.shape)}")
    return scale * F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)


# ----------------------------------------------------------------------------------------------
# LPIPS

_LPIPS_CACHE: dict[tuple[str, str | None, str], Any] = {}
_LPIPS_LOCK = threading.Lock()


def _lpips_model(net: str, weights: str | Path | None, device: str) -> Any:
    """Build (once per net/weights/device) an LPIPS model without touching the network."""
    key = (net, None if weights is None else str(weights), str(device))
    with _LPIPS_LOCK:
        if key in _LPIPS_CACHE:
            return _LPIPS_CACHE[key]
        import torch

        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(
                f"LPIPS backbone weights not found: {weights}. For net='alex' use torchvision's AlexNet ImageNet "
                "state dict (alexnet-owt-7be5be79.pth from download.pytorch.org/models/) or a full LPIPS state dict."
            )
        import lpips

        # pnet_rand=True: pretrained=False for the backbone, which would otherwise be downloaded. The linear
        # heads (pretrained=True) ship inside the lpips wheel. A fixed seed makes the random backbone the
        # same in every process, so test values are reproducible.
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # lpips calls torchvision with the deprecated pretrained= argument; that noise is not ours.
            warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
            torch.manual_seed(0)
            model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        if weights is not None:
            sd = torch.load(str(weights), map_location="cpu", weights_only=True)
            own = model.state_dict()
            if any(k.startswith("net.") for k in sd):  # a full LPIPS state dict
                model.load_state_dict(sd, strict=False)
            else:
                # A torchvision backbone ("features.N.weight"): LPIPS keeps torchvision's layer numbers inside
                # its slices ("net.slice2.3.weight"), so the mapping is by that number.
                mapped = {}
                for k in own:
                    parts = k.split(".")
                    if parts[0] == "net" and parts[1].startswith("slice"):
                        src = "features." + ".".join(parts[2:])
                        if src in sd:
                            mapped[k] = sd[src]
                if not mapped:
                    raise ValueError(f"{weights}: no LPIPS or torchvision '{net}' backbone keys found")
                model.load_state_dict(mapped, strict=False)
        model = model.eval().to(device)
        model.requires_grad_(False)
        _LPIPS_CACHE[key] = model
        return model


def lpips_distance(
    a: torch.Tensor, b: torch.Tensor, *, net: str = "alex", lpips_weights: str | Path | None = None, device: str = "cpu"
) -> torch.Tensor:
    """LPIPS distance [B] between image batches [B, 3, H, W] in 0..1 (0 for identical images); differentiable."""
    if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
        raise ValueError(f"lpips_distance expects two [B, 3, H, W] batches of the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    model = _lpips_model(net, lpips_weights, device)
    if lpips_weights is None:  # on every call, not only when the cached model is built: callers must know
        warnings.warn(
            "LPIPS is using a RANDOM backbone (no lpips_weights given): distances are 0 for identical images "
            "but not perceptually meaningful. Pass lpips_weights for real values.",
            stacklevel=2,
        )
    # normalize=True maps 0..1 to LPIPS' expected -1..1.
    d = model(a.to(device).float(), b.to(device).float(), normalize=True)
    return d.reshape(a.shape[0])
