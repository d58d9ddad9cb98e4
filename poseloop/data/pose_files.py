"""Keypoint files: OpenPose JSON (people[], BODY_25 or OpenPose-18, pixel or normalised) and our {"body": [...]} JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from poseloop.data.poses import BODY_POINTS, FACE_POINTS, HAND_POINTS, Pose

__all__ = ["load_keypoint_file"]

# BODY_25 (OpenPose's default model) -> OpenPose-18: drop mid-hip (8) and the six foot points.
_BODY25_TO_18 = (0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18)


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{src}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save the "
                         "keypoint file as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{src}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:  # Python's JSON parser recurses once per nesting level
        raise ValueError(f"{src}: JSON nested too deeply; a keypoint file needs a few levels "
                         '({"people": [{"pose_keypoints_2d": [...]}]})') from None

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
