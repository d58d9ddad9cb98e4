"""OpenPose-18 poses: the Pose type and the built-in poses.

Reading keypoint files is poseloop.data.pose_files; drawing skeletons and detecting poses (controlnet_aux's
OpenPose) is poseloop.data.openpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "OPENPOSE18_NAMES",
    "BODY_POINTS",
    "HAND_POINTS",
    "FACE_POINTS",
    "Pose",
    "BUILTIN_POSES",
    "get_builtin_pose",
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


# Index permutation that mirrors a body: every right point trades places with its left twin.
_BODY_FLIP = (0, 1, 5, 6, 7, 2, 3, 4, 11, 12, 13, 8, 9, 10, 15, 14, 17, 16)



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
