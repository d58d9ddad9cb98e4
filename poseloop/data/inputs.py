"""Prompts and poses for a round: jsonl datasets, prompt files, keypoint files, photos, the pose library.

Everything here is read and checked before any model loads, so that bad input fails fast and
nothing already stored is touched.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from poseloop.config.generation import DataConfig
from poseloop.data.pose_files import load_keypoint_file
from poseloop.data.poses import BUILTIN_POSES, Pose, get_builtin_pose


class InputError(ValueError):
    """Bad input data; the message names the file (and line) and how to fix it."""


@dataclass
class GroupSpec:
    """One (prompt, pose) group to generate."""

    prompt: str
    pose_name: str
    poses: list[Pose] | None  # ground-truth keypoints of every person, when known
    condition_image: Path | None = None  # given pose image (jsonl); None = render from `poses`
    source_image: Path | None = None  # the photo the pose came from, when there is one

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this group's content, for the round's plan hash."""
        return {
            "prompt": self.prompt,
            "pose": self.pose_name,
            "keypoints": None if self.poses is None else [p.to_dict() for p in self.poses],
            "condition": None if self.condition_image is None else _file_digest(self.condition_image),
        }


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's content; InputError naming the file, line and byte when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a BOM from Windows editors is harmless
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         "save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 old.txt > new.txt`, or 'Save as UTF-8' "
                         "in the editor) and run again") from None


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _resolve(base: Path, value: str) -> Path:
    """A dataset path: relative to the dataset file's folder, else to the working directory."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return base / p if (base / p).exists() or not p.exists() else p


def read_jsonl(path: str | Path) -> list[GroupSpec]:
    """Read the pose-ControlNet dataset format: one {"image", "condition_image", "text"} a line.

    An optional "keypoints" key names a keypoint JSON file with the ground-truth pose.
    """
    path = Path(path)
    base = path.parent
    specs = []
    text = read_text_file(path, "the dataset")
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                             '{"image": ..., "condition_image": ..., "text": ...} object') from None
        except RecursionError:  # Python's JSON parser recurses once per nesting level
            raise InputError(f"{where}: JSON nested too deeply; each line must be one flat "
                             '{"image": ..., "condition_image": ..., "text": ...} object') from None
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, found {type(obj).__name__}")
        for key in ("condition_image", "text"):
            if not isinstance(obj.get(key), str) or not obj[key].strip():
                raise InputError(f'{where}: "{key}" is missing or not a non-empty string')
        condition = _resolve(base, obj["condition_image"])
        if not condition.is_file():
            raise InputError(f'{where}: condition_image {obj["condition_image"]!r} not found '
                             f"(looked in {base} and the working directory)")
        try:
            with Image.open(condition) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for broken files
            raise InputError(f"{where}: condition_image {condition} is not a readable image ({e})") from None
        source = None
        if obj.get("image"):
            source = _resolve(base, obj["image"])
            if not source.is_file():
                raise InputError(f'{where}: image {obj["image"]!r} not found (looked in {base} and the '
                                 "working directory); remove the key if there is no source image")
        poses = None
        if obj.get("keypoints"):
            kp = _resolve(base, obj["keypoints"])
            if not kp.is_file():
                raise InputError(f'{where}: keypoints file {obj["keypoints"]!r} not found')
            # Pixel keypoints of a dataset line refer to its condition image.
            with Image.open(condition) as im:
                poses = _load_keypoints(kp, im.width, im.height)
        specs.append(GroupSpec(prompt=obj["text"].strip(), pose_name=condition.stem, poses=poses,
                               condition_image=condition, source_image=source))
    if not specs:
        raise InputError(f"{path}: no samples (the file is empty)")
    return specs


def _load_keypoints(path: Path, width: int | None, height: int | None) -> list[Pose]:
    """Poses of a keypoint file; width/height (pixels) override the file's own canvas size."""
    try:
        poses = load_keypoint_file(path, width or None, height or None)
    except ValueError as e:
        raise InputError(str(e)) from None
    if not poses:
        raise InputError(f"{path}: no person in the file")
    return poses


def check_source_images(specs: list[GroupSpec], dataset: str | Path, allowed: list[str | Path]) -> None:
    """A dataset's "image" files are copied into the samples folder: each must be an image (it is decoded) in the
    dataset file's folder or an allowed one, so a line cannot copy a secrets file or /proc/self/environ in."""
    roots = [Path(dataset).resolve().parent, *(Path(a).expanduser().resolve() for a in allowed)]
    for spec in specs:
        if spec.source_image is None:
            continue
        real = spec.source_image.resolve()  # symlinks followed: a link in the dataset folder to elsewhere is elsewhere
        if not any(real.is_relative_to(root) for root in roots):
            raise InputError(f'{dataset}: "image" {spec.source_image} is outside the dataset file\'s folder '
                             f"{roots[0]}; move the photo there, or allow its folder with --store.source_dirs "
                             f"{real.parent}")
        try:
            with Image.open(real) as im:
                im.load()  # decoded in full: a renamed text file or a bare image header is refused
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, DecompressionBombError)
            raise InputError(f'{dataset}: "image" {spec.source_image} is not a readable image ({type(e).__name__}); '
                             'point "image" at the source photo (PNG, JPEG, WebP) or remove the key') from None


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt a line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    prompts = [ln.strip() for ln in read_text_file(path, "the prompts file").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputError(f"{path}: no prompts (one prompt a line expected)")
    return prompts


def pose_sources(data: DataConfig) -> list[tuple[str, list[Pose], Path | None]]:
    """(name, poses, source photo) for every pose from the library, keypoint files and photos."""
    out: list[tuple[str, list[Pose], Path | None]] = []
    names = list(BUILTIN_POSES) if data.poses == ["all"] else data.poses
    for name in names:
        try:
            out.append((name, [get_builtin_pose(name)], None))
        except ValueError as e:
            raise InputError(f"data.poses: {e}") from None
    for file in data.keypoints:
        # Pixel coordinates need the file's own canvas size (canvas_width / canvas_height).
        out.append((Path(file).stem, _load_keypoints(Path(file), None, None), None))
    if data.photos:
        from poseloop.data.openpose import detect_poses, load_openpose_detector

        detector = load_openpose_detector(data.detector_weights)
        for file in data.photos:
            with Image.open(file) as im:
                found = detect_poses(im.convert("RGB"), detector, include_hands=data.draw_hands,
                                     include_face=data.draw_face)
            if not found:
                raise InputError(f"data.photos: no person detected in {file}; use a photo with a clearly visible "
                                 "person or give its keypoints with --data.keypoints")
            out.append((Path(file).stem, found, Path(file)))
    return out


def build_groups(data: DataConfig) -> list[GroupSpec]:
    """All groups of a round: the jsonl's pairs, or every prompt x every pose."""
    if data.dataset:
        specs = read_jsonl(data.dataset)
    else:
        prompts = read_prompts_file(data.prompts_file) if data.prompts_file else list(data.prompts)
        if any(not p.strip() for p in prompts):
            raise InputError("data.prompts: empty prompt; remove it or write some text")
        specs = [GroupSpec(prompt=p.strip(), pose_name=name, poses=poses, source_image=src)
                 for p in prompts for name, poses, src in pose_sources(data)]
    if data.max_groups:
        specs = specs[: data.max_groups]
    return specs
