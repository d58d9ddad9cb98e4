"""Files of a samples folder: PNG images, pose images and trajectories, written atomically.

Layout (paths in the database are relative to the samples folder):
    <round>/poses/g00012.png              pose condition of group 12
    <round>/images/g00012_s1.png          image 1 of group 12
    <round>/trajectories/g00012_s1.safetensors
Trajectory file: latents [T+1, C, h, w] float16 (stored once: x_T ... x_0), log_probs [T] float32,
timesteps [T] int64, and string metadata (seed, prompt, sampler settings, format version).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, safe_open, save_file

TRAJECTORY_FORMAT = "poseloop.trajectory/1"


@dataclass
class Trajectory:
    """A stored denoising trajectory of one image."""

    latents: torch.Tensor  # [T+1, C, h, w] float16
    log_probs: torch.Tensor  # [T] float32
    timesteps: torch.Tensor  # [T] int64
    metadata: dict[str, str] = field(default_factory=dict)

    def validate(self, where: str = "trajectory") -> None:
        """Check shapes and dtypes agree; raise ValueError naming `where`."""
        steps = self.timesteps.shape[0]
        if self.latents.ndim != 4 or self.latents.shape[0] != steps + 1:
            raise ValueError(f"{where}: latents have shape {tuple(self.latents.shape)}; expected [T+1, C, h, w] "
                             f"with T = {steps} timesteps")
        if tuple(self.log_probs.shape) != (steps,):
            raise ValueError(f"{where}: log_probs have shape {tuple(self.log_probs.shape)}; expected [{steps}]")
        if self.latents.dtype != torch.float16 or self.log_probs.dtype != torch.float32:
            raise ValueError(f"{where}: expected float16 latents and float32 log_probs, got "
                             f"{self.latents.dtype} and {self.log_probs.dtype}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path) -> None:
    """Save an image as PNG atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_trajectory(traj: Trajectory, path: Path) -> None:
    """Save a trajectory as safetensors atomically."""
    traj.validate(str(path))
    tensors = {
        "latents": traj.latents.contiguous(),
        "log_probs": traj.log_probs.contiguous(),
        "timesteps": traj.timesteps.contiguous(),
    }
    metadata = {"format": TRAJECTORY_FORMAT, **{k: str(v) for k, v in traj.metadata.items()}}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_trajectory(path: str | Path) -> Trajectory:
    """Load a trajectory saved by save_trajectory; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {path} is missing; run generate.py again with the settings of its "
                                "round and --store.round <round name>: missing files of existing rows are "
                                "regenerated from their seeds")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    if metadata.get("format") != TRAJECTORY_FORMAT:
        raise ValueError(f"{path}: not a poseloop trajectory (format {metadata.get('format')!r}, "
                         f"expected {TRAJECTORY_FORMAT!r})")
    tensors = load_file(str(path))
    try:
        traj = Trajectory(tensors["latents"], tensors["log_probs"], tensors["timesteps"], metadata)
    except KeyError as e:
        raise ValueError(f"{path}: missing tensor {e.args[0]!r}") from None
    traj.validate(str(path))
    return traj


class SampleStore:
    """Paths inside a samples folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def abs(self, rel: str) -> Path:
        """Absolute path of a path stored in the database; refuses paths outside the folder."""
        p = (self.root / rel).resolve()
        if not p.is_relative_to(self.root):
            raise ValueError(f"path {rel!r} points outside the samples folder {self.root}")
        return p

    def rel(self, path: Path) -> str:
        """Path relative to the samples folder, as stored in the database (always with '/')."""
        return path.resolve().relative_to(self.root).as_posix()

    def pose_path(self, round_name: str, group_index: int) -> Path:
        return self.root / round_name / "poses" / f"g{group_index:05d}.png"

    def image_path(self, round_name: str, group_index: int, sample_index: int) -> Path:
        return self.root / round_name / "images" / f"g{group_index:05d}_s{sample_index}.png"

    def trajectory_path(self, round_name: str, group_index: int, sample_index: int) -> Path:
        return self.root / round_name / "trajectories" / f"g{group_index:05d}_s{sample_index}.safetensors"

    def remove_orphans(self, round_name: str, referenced: Iterable[str]) -> list[Path]:
        """Delete files of a round that no row references (and stale temporaries); return them."""
        keep = {self.abs(r) for r in referenced}
        removed = []
        round_dir = self.root / round_name
        for sub in ("poses", "images", "trajectories"):
            folder = round_dir / sub
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.is_file() and p.resolve() not in keep:
                    p.unlink()
                    removed.append(p)
        return removed
