"""OpenPose-18 poses: a Pose type, built-in poses, keypoint-file loading, skeleton rendering and detection.

controlnet_aux is imported lazily inside functions: importing it pulls in every detector it ships
(~5 s and a burst of warnings), and ``import poseloop`` must stay fast.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from controlnet_aux.open_pose import OpenposeDetector, PoseResult

__all__ = [
    "OPENPOSE18_NAMES",
    "BODY_POINTS",
    "HAND_POINTS",
    "FACE_POINTS",
    "WEIGHT_FILES",
    "Pose",
    "BUILTIN_POSES",
    "get_builtin_pose",
    "load_keypoint_file",
    "render_pose",
    "load_openpose_detector",
    "detect_poses",
    "pose_from_result",
    "pose_to_result",
]

OPENPOSE18_NAMES: tuple[str, ...] = (
    "nose",
    "neck",
    "right_shoulder",
    "right_elbow",
    "right_wrist",
    "left_shoulder",
    "left_elbow",
    "left_wrist",
    "right_hip",
    "right_knee",
    "right_ankle",
    "left_hip",
    "left_knee",
    "left_ankle",
    "right_eye",
    "left_eye",
    "right_ear",
    "left_ear",
)
BODY_POINTS = 18
HAND_POINTS = 21
FACE_POINTS = 68

# File names as published in the Hugging Face repo lllyasviel/Annotators.
WEIGHT_FILES: tuple[str, str, str] = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
_WEIGHTS_HINT = (
    "The OpenPose annotator weights are in the Hugging Face repo lllyasviel/Annotators; "
    "download them with: huggingface-cli download lllyasviel/Annotators "
    "body_pose_model.pth hand_pose_model.pth facenet.pth --local-dir {dir}"
)

# Index permutation that mirrors a body: every right point trades places with its left twin.
_BODY_FLIP = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)



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

def _face_flip() -> tuple[int, ...]:
    """Index permutation mirroring the 68-point (iBUG/Multi-PIE) face layout."""
    perm = list(range(FACE_POINTS))
    pairs = [(i, 16 - i) for i in range(8)]  # jaw line
    pairs += [(17 + i, 26 - i) for i in range(5)]  # eyebrows
    pairs += [(31, 35), (32, 34)]  # nostrils; 27-30 (bridge) and 33 are on the midline
    pairs += [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
    pairs += [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
    pairs += [(60, 64), (61, 63), (65, 67)]  # inner lips
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return tuple(perm)


_FACE_FLIP = _face_flip()

# BODY_25 (OpenPose's default model) -> OpenPose-18: drop mid-hip (8) and the six foot points.
_BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


def _as_points(value: Any, n: int, field: str) -> np.ndarray:
    """Coerce ``value`` to a float32 (n, 3) array or raise ValueError naming ``field``."""
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n, 3):
        raise ValueError(f"Pose.{field} must have shape ({n}, 3) of (x, y, confidence); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"Pose.{field} contains NaN or infinite values")
    # Canonicalise missing points to (0, 0, 0) so equality and serialisation do not depend on junk coordinates.
    arr = arr.copy()
    arr[arr[:, 2] <= 0] = 0.0
    return arr


def _points_to_list(arr: np.ndarray | None) -> list[list[float]] | None:
    if arr is None:
        return None
    # str() of a float32 is its shortest round-tripping repr: readable JSON ("0.3", not "0.30000001192092896")
    # that still converts back to the identical float32.
    return [[float(str(v)) for v in row] for row in arr]


def _close(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=1e-6))


def _mirror(arr: np.ndarray | None, perm: Sequence[int] | None) -> np.ndarray | None:
    if arr is None:
        return None
    out = arr.copy()
    present = out[:, 2] > 0
    out[present, 0] = 1.0 - out[present, 0]
    if perm is not None:
        out = out[list(perm)]
    return out


@dataclass(eq=False)
class Pose:
    """One person's OpenPose keypoints, normalised to 0..1 of the canvas; confidence 0 means missing."""

    body: np.ndarray
    left_hand: np.ndarray | None = None
    right_hand: np.ndarray | None = None
    face: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.body = _as_points(self.body, BODY_POINTS, "body")
        if self.left_hand is not None:
            self.left_hand = _as_points(self.left_hand, HAND_POINTS, "left_hand")
        if self.right_hand is not None:
            self.right_hand = _as_points(self.right_hand, HAND_POINTS, "right_hand")
        if self.face is not None:
            self.face = _as_points(self.face, FACE_POINTS, "face")
        self.name = str(self.name)

    def __eq__(self, other: object) -> bool:
        # A tolerance, because mirroring twice (1 - (1 - x)) is not bit-exact in float32.
        if not isinstance(other, Pose):
            return NotImplemented
        return (
            self.name == other.name
            and _close(self.body, other.body)
            and _close(self.left_hand, other.left_hand)
            and _close(self.right_hand, other.right_hand)
            and _close(self.face, other.face)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays: not hashable

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (lists of [x, y, confidence]); the inverse of from_dict."""
        return {
            "name": self.name,
            "body": _points_to_list(self.body),
            "left_hand": _points_to_list(self.left_hand),
            "right_hand": _points_to_list(self.right_hand),
            "face": _points_to_list(self.face),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pose:
        """Build a Pose from a to_dict() dict, validating every shape (ValueError on a mismatch)."""
        if not isinstance(d, dict) or "body" not in d:
            raise ValueError(f"Pose.from_dict expects a dict with a 'body' key; got {type(d).__name__}")
        return cls(
            body=d["body"],
            left_hand=d.get("left_hand"),
            right_hand=d.get("right_hand"),
            face=d.get("face"),
            name=d.get("name", "") or "",
        )

    def flipped(self) -> Pose:
        """Return the horizontal mirror image: x -> 1 - x with left and right points (and hands) swapped."""
        return Pose(
            body=_mirror(self.body, _BODY_FLIP),  # type: ignore[arg-type]
            # The mirrored right hand becomes the person's left hand; hand indices have no sides.
            left_hand=_mirror(self.right_hand, None),
            right_hand=_mirror(self.left_hand, None),
            face=_mirror(self.face, _FACE_FLIP),
            name=self.name,
        )

    def visible(self) -> np.ndarray:
        """Return a boolean mask of the body points that are present (confidence > 0)."""
        return self.body[:, 2] > 0


# ----------------------------------------------------------------------------------------------
# Built-in poses.
#
# Built with simple forward kinematics so limb lengths stay anatomically consistent. Units are
# fractions of a square canvas; a 1.75 m adult standing is 0.8 tall (head top 0.1, soles 0.9),
# i.e. 0.457 canvas units per metre. Angles are degrees from "straight down", positive toward
# image-right (the person's left, since they face the camera).

_UPPER_ARM = 0.137
_FOREARM = 0.119
_THIGH = 0.19
_SHIN = 0.19
_TORSO = 0.243  # neck to mid-hip
_SHOULDER_HALF = 0.09
_HIP_HALF = 0.055
_HEAD_TOP_ABOVE_NOSE = 0.07


def _step(start: tuple[float, float], angle: float, length: float) -> tuple[float, float]:
    a = math.radians(angle)
    return (start[0] + length * math.sin(a), start[1] + length * math.cos(a))


def _figure(
    *,
    neck: tuple[float, float] = (0.5, 0.237),
    torso: float = 0.0,
    torso_scale: float = 1.0,
    head_turn: float = 0.0,
    head_tilt: float = 0.0,
    r_arm: tuple[float, float] = (-8.0, -5.0),
    l_arm: tuple[float, float] = (8.0, 5.0),
    r_leg: tuple[float, float] = (-2.0, 0.0),
    l_leg: tuple[float, float] = (2.0, 0.0),
    arm_scale: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 1.0), (1.0, 1.0)),
    leg_scale: tuple[tuple[float, float], tuple[float, float]] = ((1.0, 1.0), (1.0, 1.0)),
) -> np.ndarray:
    """Forward kinematics for a camera-facing figure; the *_scale factors fake foreshortening."""
    pts: dict[str, tuple[float, float]] = {}
    pts["neck"] = neck
    # Shoulder line is perpendicular to the torso axis.
    perp = math.radians(torso)
    ux, uy = math.cos(perp), -math.sin(perp)
    pts["right_shoulder"] = (neck[0] - _SHOULDER_HALF * ux, neck[1] - _SHOULDER_HALF * uy + 0.005)
    pts["left_shoulder"] = (neck[0] + _SHOULDER_HALF * ux, neck[1] + _SHOULDER_HALF * uy + 0.005)
    mid_hip = _step(neck, torso, _TORSO * torso_scale)
    pts["right_hip"] = (mid_hip[0] - _HIP_HALF * ux, mid_hip[1] - _HIP_HALF * uy)
    pts["left_hip"] = (mid_hip[0] + _HIP_HALF * ux, mid_hip[1] + _HIP_HALF * uy)
    # Head: the nose sits above the neck along the (tilted) head axis; a turn slides features sideways.
    nose = _step(neck, 180.0 + torso + head_tilt, 0.068)
    nose = (nose[0] + head_turn, nose[1])
    pts["nose"] = nose
    pts["right_eye"] = (nose[0] - 0.019 + 0.3 * head_turn, nose[1] - 0.018)
    pts["left_eye"] = (nose[0] + 0.019 + 0.3 * head_turn, nose[1] - 0.018)
    pts["right_ear"] = (nose[0] - 0.042 - 0.5 * head_turn, nose[1] - 0.008)
    pts["left_ear"] = (nose[0] + 0.042 - 0.5 * head_turn, nose[1] - 0.008)
    for side, (ua, fa), (su, sf) in (("right", r_arm, arm_scale[0]), ("left", l_arm, arm_scale[1])):
        elbow = _step(pts[f"{side}_shoulder"], ua, _UPPER_ARM * su)
        pts[f"{side}_elbow"] = elbow
        pts[f"{side}_wrist"] = _step(elbow, fa, _FOREARM * sf)
    for side, (th, sh), (st, ss) in (("right", r_leg, leg_scale[0]), ("left", l_leg, leg_scale[1])):
        knee = _step(pts[f"{side}_hip"], th, _THIGH * st)
        pts[f"{side}_knee"] = knee
        pts[f"{side}_ankle"] = _step(knee, sh, _SHIN * ss)
    body = np.zeros((BODY_POINTS, 3), dtype=np.float32)
    for i, name in enumerate(OPENPOSE18_NAMES):
        body[i] = (pts[name][0], pts[name][1], 1.0)
    return body


def _place(body: np.ndarray, ground: float = 0.9, margin: float = 0.04) -> np.ndarray:
    """Stand the figure on ``ground`` (lowest point), centre it, and shrink it if it would leave the canvas."""
    out = body.copy()
    x_lo, x_hi = float(out[:, 0].min()), float(out[:, 0].max())
    y_hi = float(out[:, 1].max())
    top = min(float(out[:, 1].min()), float(out[0, 1]) - _HEAD_TOP_ABOVE_NOSE) + ground - y_hi
    out[:, 0] += 0.5 - (x_lo + x_hi) / 2.0
    out[:, 1] += ground - y_hi
    scale = 1.0
    if top < margin:
        scale = min(scale, (ground - margin) / (ground - top))
    half_w = (x_hi - x_lo) / 2.0
    if half_w > 0.5 - margin:
        scale = min(scale, (0.5 - margin) / half_w)
    out[:, 0] = 0.5 + (out[:, 0] - 0.5) * scale
    out[:, 1] = ground + (out[:, 1] - ground) * scale
    return out


def _builtin_poses() -> dict[str, Pose]:
    poses: dict[str, np.ndarray] = {}
    poses["standing"] = _place(_figure())
    poses["arms_raised"] = _place(_figure(r_arm=(-160.0, -165.0), l_arm=(160.0, 165.0)))
    poses["t_pose"] = _place(_figure(r_arm=(-90.0, -90.0), l_arm=(90.0, 90.0), r_leg=(-3.0, 0.0), l_leg=(3.0, 0.0)))
    # Elbows flare out; forearms run back in to the waist (slightly foreshortened as they angle back).
    poses["hands_on_hips"] = _place(
        _figure(r_arm=(-52.0, 45.0), l_arm=(52.0, -45.0), arm_scale=((1.0, 0.9), (1.0, 0.9)), r_leg=(-5.0, 0.0), l_leg=(5.0, 0.0))
    )
    # Left hand up beside the head, palm to camera; right arm relaxed.
    poses["waving"] = _place(_figure(l_arm=(100.0, 170.0), r_arm=(-8.0, -4.0), head_tilt=-5.0))
    # Front view of a stride: the forward leg's foot lands lower in the image, the back heel lifts;
    # arms swing opposite to legs, the forward arm bent and foreshortened.
    poses["walking"] = _place(
        _figure(
            r_arm=(-6.0, 25.0),
            l_arm=(12.0, 8.0),
            arm_scale=((0.85, 0.7), (0.95, 1.0)),
            r_leg=(-6.0, 4.0),
            l_leg=(4.0, 16.0),
            leg_scale=((1.0, 1.05), (0.95, 0.8)),
        )
    )
    # Running, seen from the front: the right knee is driven up toward the camera (thigh nearly
    # end-on, so short), the left foot kicks back and up behind (short shin, raised ankle); elbows
    # bent ~90 degrees, right fist forward at chest height, left elbow swung back; both feet airborne.
    poses["running"] = _place(
        _figure(
            r_arm=(-15.0, 135.0),
            l_arm=(25.0, 10.0),
            arm_scale=((0.8, 0.8), (0.8, 0.5)),
            r_leg=(-35.0, 3.0),
            l_leg=(8.0, 30.0),
            leg_scale=((0.3, 0.85), (1.0, 0.45)),
        ),
        ground=0.86,
    )
    # On a chair: thighs point at the camera so they look short and the knees sit just below and
    # outside the hips; shins drop to the floor; hands rest on the thighs.
    poses["sitting"] = _place(
        _figure(
            r_arm=(-5.0, 25.0),
            l_arm=(5.0, -25.0),
            arm_scale=((1.0, 0.75), (1.0, 0.75)),
            r_leg=(-65.0, -2.0),
            l_leg=(65.0, 2.0),
            leg_scale=((0.35, 1.0), (0.35, 1.0)),
        ),
        ground=0.88,
    )
    # Kneeling on the right knee: right thigh vertical with the knee on the floor and the shin
    # folded back (seen end-on, so very short); left thigh points forward at the camera (short),
    # left shin vertical to the planted foot; left forearm resting on the raised knee.
    poses["kneeling"] = _place(
        _figure(
            r_arm=(-8.0, -4.0),
            l_arm=(10.0, 35.0),
            arm_scale=((1.0, 1.0), (1.0, 0.6)),
            r_leg=(-3.0, -160.0),
            l_leg=(40.0, 2.0),
            leg_scale=((1.0, 0.2), (0.3, 1.05)),
        ),
        ground=0.9,
    )
    # Star jump in the air: arms up and out, legs apart with knees slightly bent, feet off the ground.
    poses["jumping"] = _place(
        _figure(r_arm=(-140.0, -150.0), l_arm=(140.0, 150.0), r_leg=(-22.0, -12.0), l_leg=(22.0, 12.0)),
        ground=0.82,
    )
    # Pointing to the image-left with the right arm straight at shoulder height, head turned that way.
    poses["pointing"] = _place(_figure(r_arm=(-95.0, -97.0), l_arm=(8.0, 4.0), head_turn=-0.012))
    # Upper arms hang by the ribs; forearms fold across the chest (foreshortened), wrists crossing.
    poses["arms_crossed"] = _place(
        _figure(
            r_arm=(-3.0, 62.0),
            l_arm=(3.0, -62.0),
            arm_scale=((0.95, 1.0), (0.95, 1.0)),
        )
    )
    return {name: Pose(body=body, name=name) for name, body in poses.items()}


BUILTIN_POSES: dict[str, Pose] = _builtin_poses()


def get_builtin_pose(name: str) -> Pose:
    """Return a copy of the built-in pose ``name``; ValueError listing the available names if unknown."""
    try:
        pose = BUILTIN_POSES[name]
    except KeyError:
        raise ValueError(
            f"Unknown built-in pose {name!r}; available poses: {', '.join(sorted(BUILTIN_POSES))}"
        ) from None
    # A copy, so callers that edit keypoints cannot corrupt the shared table.
    return Pose.from_dict(pose.to_dict())


# ----------------------------------------------------------------------------------------------
# Keypoint files.


class _Raw:
    """Keypoints as read from a file, before pixel/normalised resolution."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.parts: dict[str, np.ndarray | None] = {}
        self.width: float | None = None
        self.height: float | None = None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _finish_points(arr: np.ndarray) -> np.ndarray:
    # OpenPose writes undetected points as (0, 0, 0); treat an exact (0, 0) or confidence <= 0 as missing.
    missing = (arr[:, 2] <= 0) | ((arr[:, 0] == 0) & (arr[:, 1] == 0))
    arr[missing] = 0.0
    return arr


def _parse_flat(src: str, field: str, values: Any, sizes: dict[int, str]) -> tuple[np.ndarray, int]:
    """Parse OpenPose's flat [x, y, c, x, y, c, ...]; ``sizes`` maps accepted lengths to descriptions."""
    expected = " or ".join(f"{n} ({desc})" for n, desc in sizes.items())
    if not isinstance(values, list):
        raise ValueError(f"{src}: {field} must be a flat list of numbers; expected {expected}; found {type(values).__name__}")
    for i, v in enumerate(values):
        if not _is_number(v):
            raise ValueError(f"{src}: {field}[{i}] is {v!r}; expected a finite number")
    if len(values) not in sizes:
        raise ValueError(f"{src}: {field} has {len(values)} numbers; expected {expected}.")
    arr = np.asarray(values, dtype=np.float64).reshape(-1, 3)
    return arr, len(values)


def _parse_nested(src: str, field: str, values: Any, n: int, what: str) -> np.ndarray:
    """Parse our nested [[x, y] | [x, y, c] | null, ...] with exactly ``n`` entries."""
    if not isinstance(values, list):
        raise ValueError(
            f"{src}: {field} must be a list of {n} points ([x, y], [x, y, confidence] or null) for {what}; "
            f"found {type(values).__name__}"
        )
    if len(values) != n:
        raise ValueError(
            f"{src}: {field} has {len(values)} points; expected {n} ({what}, each [x, y], [x, y, confidence] or null)"
        )
    arr = np.zeros((n, 3), dtype=np.float64)
    for i, p in enumerate(values):
        if p is None:
            continue
        if not isinstance(p, list) or len(p) not in (2, 3) or not all(_is_number(v) for v in p):
            raise ValueError(
                f"{src}: {field}[{i}] is {p!r}; expected [x, y], [x, y, confidence] or null with finite numbers"
            )
        arr[i] = (p[0], p[1], p[2] if len(p) == 3 else 1.0)
    return _finish_points(arr)


def _size_from(src: str, where: str, obj: dict[str, Any], wkey: str, hkey: str) -> tuple[float | None, float | None]:
    w, h = obj.get(wkey), obj.get(hkey)
    for key, v in ((wkey, w), (hkey, h)):
        if v is not None and (not _is_number(v) or v <= 0):
            raise ValueError(f"{src}: {where}{key} is {v!r}; expected a positive number of pixels")
    return w, h


def _read_openpose(src: str, data: dict[str, Any]) -> list[_Raw]:
    people = data["people"]
    if not isinstance(people, list):
        raise ValueError(f"{src}: people must be a list of person objects; found {type(people).__name__}")
    if not people:
        raise ValueError(f"{src}: people is an empty list; expected at least one person")
    w, h = _size_from(src, "", data, "canvas_width", "canvas_height")
    out = []
    for pi, person in enumerate(people):
        where = f"people[{pi}]"
        if not isinstance(person, dict):
            raise ValueError(f"{src}: {where} must be an object; found {type(person).__name__}")
        if "pose_keypoints_2d" not in person:
            raise ValueError(f"{src}: {where} has no pose_keypoints_2d; expected 54 numbers (18 points x (x, y, confidence))")
        raw = _Raw(where)
        raw.width, raw.height = w, h
        body, n = _parse_flat(
            src,
            f"{where}.pose_keypoints_2d",
            person["pose_keypoints_2d"],
            {54: "18 OpenPose body points x (x, y, confidence)", 75: "BODY_25, converted to 18 points"},
        )
        if n == 75:
            body = body[list(_BODY25_TO_18)]
        raw.parts["body"] = _finish_points(body)
        for key, part in (("hand_left_keypoints_2d", "left_hand"), ("hand_right_keypoints_2d", "right_hand")):
            vals = person.get(key)
            if vals is None or vals == []:  # OpenPose writes [] when hands were not requested
                raw.parts[part] = None
                continue
            arr, _ = _parse_flat(src, f"{where}.{key}", vals, {63: "21 hand points x (x, y, confidence)"})
            raw.parts[part] = _finish_points(arr)
        vals = person.get("face_keypoints_2d")
        if vals is None or vals == []:
            raw.parts["face"] = None
        else:
            arr, n = _parse_flat(
                src,
                f"{where}.face_keypoints_2d",
                vals,
                {204: "68 face points x (x, y, confidence)", 210: "OpenPose's 70 face points; the 2 pupils are dropped"},
            )
            raw.parts["face"] = _finish_points(arr[:FACE_POINTS])
        out.append(raw)
    return out


def _read_ours(src: str, obj: Any, where: str) -> _Raw:
    if not isinstance(obj, dict) or "body" not in obj:
        raise ValueError(
            f"{src}: {where or 'top level'} must be an object with a 'body' list of 18 points; "
            f"found {type(obj).__name__}" + (f" with keys {sorted(obj)}" if isinstance(obj, dict) else "")
        )
    prefix = f"{where}." if where else ""
    raw = _Raw(where or "pose")
    raw.width, raw.height = _size_from(src, prefix, obj, "width", "height")
    raw.parts["body"] = _parse_nested(src, f"{prefix}body", obj["body"], BODY_POINTS, "OpenPose-18 body points")
    for key, n, what in (
        ("left_hand", HAND_POINTS, "hand points"),
        ("right_hand", HAND_POINTS, "hand points"),
        ("face", FACE_POINTS, "face points"),
    ):
        vals = obj.get(key)
        raw.parts[key] = None if vals is None else _parse_nested(src, f"{prefix}{key}", vals, n, what)
    raw.name = str(obj.get("name", "") or "")  # type: ignore[attr-defined]
    return raw


def load_keypoint_file(path: str | Path, width: int | None = None, height: int | None = None) -> list[Pose]:
    """Load poses from an OpenPose JSON file or our own {"body": [...]} JSON; ValueError names file and field."""
    path = Path(path)
    src = str(path)
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None

    if isinstance(data, dict) and "people" in data:
        raws = _read_openpose(src, data)
    elif isinstance(data, dict) and "body" in data:
        raws = [_read_ours(src, data, "")]
    elif isinstance(data, list):
        if not data:
            raise ValueError(f"{src}: the top-level list is empty; expected at least one pose object")
        raws = [_read_ours(src, item, f"[{i}]") for i, item in enumerate(data)]
    else:
        found = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{src}: unrecognised keypoint file; expected OpenPose JSON ({{\"people\": [...]}}), "
            f"a pose object ({{\"body\": [18 points]}}) or a list of pose objects; found {found}"
        )

    for raw in raws:
        if not np.any(raw.parts["body"][:, 2] > 0):  # type: ignore[index]
            raise ValueError(f"{src}: {raw.where} has no visible body points (all missing or confidence 0)")

    # One decision per file: a pixel file whose person happens to sit near the top-left corner must
    # not be mistaken for a normalised one, so all present coordinates of all people vote together.
    coords = [p[p[:, 2] > 0, :2] for raw in raws for p in raw.parts.values() if p is not None]
    allc = np.concatenate(coords) if coords else np.zeros((0, 2))
    normalised = bool(np.all((allc >= 0.0) & (allc <= 1.0)))

    poses = []
    for raw in raws:
        if normalised:
            w, h = 1.0, 1.0
        else:
            # Explicit arguments win over the file so a caller can correct a wrong canvas size.
            w = float(width) if width is not None else raw.width  # type: ignore[assignment]
            h = float(height) if height is not None else raw.height  # type: ignore[assignment]
            if w is None or h is None:
                keys = "canvas_width/canvas_height" if raws[0].where.startswith("people") else "width/height"
                raise ValueError(
                    f"{src}: {raw.where} has pixel coordinates (values outside 0..1) but no canvas size; "
                    f"add {keys} to the file or pass width= and height= to load_keypoint_file"
                )
            if w <= 0 or h <= 0:
                raise ValueError(f"{src}: canvas size must be positive; got width={w}, height={h}")
        parts: dict[str, np.ndarray | None] = {}
        for key, arr in raw.parts.items():
            if arr is None or not np.any(arr[:, 2] > 0):
                parts[key] = None if key != "body" else arr
                continue
            scaled = arr.astype(np.float32)
            present = scaled[:, 2] > 0
            scaled[present, 0] /= w
            scaled[present, 1] /= h
            parts[key] = scaled
        poses.append(
            Pose(
                body=parts["body"],  # type: ignore[arg-type]
                left_hand=parts["left_hand"],
                right_hand=parts["right_hand"],
                face=parts["face"],
                name=getattr(raw, "name", ""),
            )
        )
    return poses


# ----------------------------------------------------------------------------------------------
# controlnet_aux bridge: conversion, rendering, detection.


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
