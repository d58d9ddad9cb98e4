"""controlnet_aux's OpenPose: Pose <-> PoseResult, skeleton rendering (the ControlNet's condition), detection.

controlnet_aux is imported lazily inside functions: importing it pulls in every detector it ships
(~5 s and a burst of warnings), and ``import poseloop`` must stay fast.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from poseloop.data.poses import BODY_POINTS, FACE_POINTS, HAND_POINTS, Pose

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from controlnet_aux.open_pose import OpenposeDetector, PoseResult

__all__ = ["WEIGHT_FILES", "render_pose", "load_openpose_detector", "detect_poses", "pose_from_result",
           "pose_to_result"]

# File names as published in the Hugging Face repo lllyasviel/Annotators.
WEIGHT_FILES: tuple[str, str, str] = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_WEIGHTS_HINT = (
    "The OpenPose annotator weights are in the Hugging Face repo lllyasviel/Annotators; "
    "download them with: huggingface-cli download lllyasviel/Annotators "
    "body_pose_model.pth hand_pose_model.pth facenet.pth --local-dir {dir}"
)
def _import_controlnet_aux() -> None:
    """Import controlnet_aux once with its import-time warnings silenced.

    Importing any part of it imports every detector it ships (timm, mediapipe, ...), which print a
    screenful of deprecation warnings that say nothing about this program.
    """
    if "controlnet_aux.open_pose" in sys.modules:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import controlnet_aux.open_pose  # noqa: F401


def pose_to_result(pose: Pose) -> PoseResult:
    """Convert a Pose to controlnet_aux's PoseResult (normalised coordinates, None for missing body points)."""
    _import_controlnet_aux()
    from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult

    body = [Keypoint(float(x), float(y), float(c), i) if c > 0 else None for i, (x, y, c) in enumerate(pose.body)]
    present = pose.body[:, 2] > 0

    def part(arr: np.ndarray | None) -> list[Any] | None:
        if arr is None:
            return None
        # controlnet_aux's hand/face drawing dereferences every entry, so missing points must be
        # Keypoints too; it skips coordinates <= 0, which is how its own detector marks them (-1).
        return [Keypoint(float(x), float(y), float(c)) if c > 0 else Keypoint(-1.0, -1.0, 0.0) for x, y, c in arr]

    return PoseResult(
        BodyResult(body, float(pose.body[present, 2].sum()), int(present.sum())),
        part(pose.left_hand),
        part(pose.right_hand),
        part(pose.face),
    )


def pose_from_result(result: Any, name: str = "") -> Pose:
    """Convert a controlnet_aux PoseResult (normalised coordinates) to a Pose."""

    def part(kps: Sequence[Any] | None, n: int, field: str) -> np.ndarray | None:
        if kps is None:
            return None
        if len(kps) != n:
            raise ValueError(f"PoseResult.{field} has {len(kps)} keypoints; expected {n}")
        arr = np.zeros((n, 3), dtype=np.float32)
        for i, kp in enumerate(kps):
            # The detector marks unfound hand/face points with negative coordinates (-1 / W).
            if kp is None or kp.x < 0 or kp.y < 0 or kp.score <= 0:
                continue
            arr[i] = (float(kp.x), float(kp.y), float(kp.score))
        return arr

    body = part(result.body.keypoints, BODY_POINTS, "body.keypoints")
    return Pose(
        body=body,  # type: ignore[arg-type]
        left_hand=part(result.left_hand, HAND_POINTS, "left_hand"),
        right_hand=part(result.right_hand, HAND_POINTS, "right_hand"),
        face=part(result.face, FACE_POINTS, "face"),
        name=name,
    )


_MIN_DRAW = 128


def render_pose(
    pose: Pose | list[Pose], width: int, height: int, draw_hands: bool = True, draw_face: bool = True
) -> Image.Image:
    """Render the standard OpenPose skeleton image (RGB, black background) that OpenPose ControlNets expect."""
    _import_controlnet_aux()
    from controlnet_aux.open_pose import draw_poses

    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"render_pose needs a positive size; got width={width}, height={height}")
    poses = [pose] if isinstance(pose, Pose) else list(pose)
    width, height = int(width), int(height)
    # controlnet_aux draws limbs 8 px wide whatever the canvas size, which merges a small skeleton
    # into one blob; small canvases are drawn at >= _MIN_DRAW px and shrunk so proportions survive.
    factor = max(1, math.ceil(_MIN_DRAW / min(width, height)))
    canvas = draw_poses([pose_to_result(p) for p in poses], height * factor, width * factor,
                        draw_body=True, draw_hand=draw_hands, draw_face=draw_face)
    image = Image.fromarray(canvas, mode="RGB")
    if factor > 1:
        image = image.resize((width, height), Image.Resampling.BOX)
    return image


def load_openpose_detector(weights_dir: str | Path, device: str | None = None) -> OpenposeDetector:
    """Load controlnet_aux's OpenposeDetector from a local folder of the three .pth files; never uses the network."""
    weights_dir = Path(weights_dir).expanduser()
    paths = [weights_dir / f for f in WEIGHT_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        where = "folder does not exist" if not weights_dir.is_dir() else "folder lacks them"
        raise FileNotFoundError(
            f"OpenPose weights missing from {weights_dir} ({where}): {', '.join(missing)}. "
            + _WEIGHTS_HINT.format(dir=weights_dir)
        )
    _import_controlnet_aux()
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face
    from controlnet_aux.open_pose.hand import Hand

    # Built piece by piece rather than via OpenposeDetector.from_pretrained: that falls back to
    # hf_hub_download for anything that is not a directory, and we want the failing file named.
    loaded = []
    for cls, p in zip((Body, Hand, Face), paths):
        try:
            loaded.append(cls(str(p)))
        except Exception as e:  # torch.load / key transfer / load_state_dict failures
            raise ValueError(
                f"{p}: could not load as an OpenPose {cls.__name__.lower()} model state dict "
                f"({type(e).__name__}: {e}). " + _WEIGHTS_HINT.format(dir=weights_dir)
            ) from e
    detector = OpenposeDetector(*loaded)
    if device is not None:
        detector.to(device)
    return detector


def detect_poses(
    image: Image.Image, detector: OpenposeDetector, include_hands: bool = True, include_face: bool = True
) -> list[Pose]:
    """Detect every person in ``image`` and return their Poses (normalised coordinates, real body confidences)."""
    import torch
    _import_controlnet_aux()
    from controlnet_aux.open_pose import BodyResult, Keypoint, PoseResult

    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    # The networks were trained on BGR (OpenCV) input; OpenposeDetector.detect_poses flips the same way.
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    h, w = bgr.shape[:2]
    poses = []
    # This re-does OpenposeDetector.detect_poses because that method rebuilds the body keypoints
    # without their scores (every confidence becomes 1.0); here the heatmap scores are kept.
    with torch.no_grad():
        candidate, subset = detector.body_estimation(bgr)
        for body in detector.body_estimation.format_body_result(candidate, subset):
            left = right = face = None
            if include_hands and detector.hand_estimation is not None:
                left, right = detector.detect_hands(body, bgr)
            if include_face and detector.face_estimation is not None:
                face = detector.detect_face(body, bgr)
            norm_body = BodyResult(
                [
                    Keypoint(float(k.x) / w, float(k.y) / h, float(k.score), int(k.id)) if k is not None else None
                    for k in body.keypoints
                ],
                float(body.total_score),
                int(body.total_parts),
            )
            poses.append(pose_from_result(PoseResult(norm_body, left, right, face)))
    return poses
