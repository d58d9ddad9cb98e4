"""Files of a samples folder: PNG images, pose images and trajectories, written atomically.

Layout (paths in the database are relative to the samples folder):
    <round>/poses/g00012.png              pose condition of group 12
    <round>/images/g00012_s1.png          image 1 of group 12
    <round>/trajectories/g00012_s1.safetensors
    <round>/sources/<photo>-<hash>.jpg    a source photo from outside the folder, copied in
Trajectory file: latents [T+1, C, h, w] float16 (stored once: x_T ... x_0), log_probs [T] float32,
timesteps [T] int64, and string metadata (seed, prompt, sampler settings, format version).
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from poseloop.data.inputs import InputError

TRAJECTORY_FORMAT = "poseloop.trajectory/1"


class TrajectoryError(InputError):
    """A trajectory file exists but cannot be read (truncated, overwritten, not a trajectory)."""

    def __init__(self, message: str, path: Path | None = None, short: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.short = short or message  # "<file> (<sample>) is unreadable: <reason>", for warnings that list several


class StorageError(InputError):
    """A file or row could not be written (no permission, read-only or full disk); what was stored is intact."""


# errno values that mean "the folder is not writable" and "the disk is full".
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
_FULL = {errno.ENOSPC, errno.EDQUOT}
# The same conditions as libraries report them in messages only (safetensors' Rust I/O errors, SQLite).
_FULL_TEXT = ("no space left on device", "os error 28", "storagefull", "disk quota exceeded",
              "database or disk is full")
_NOT_WRITABLE_TEXT = ("permission denied", "os error 13", "read-only file system", "os error 30",
                      "attempt to write a readonly database", "unable to open database file")


def storage_error(exc: BaseException, where: str | Path) -> StorageError | None:
    """A one-line StorageError saying what to do when exc means 'not writable' or 'disk full'; else None."""
    if isinstance(exc, StorageError):
        return exc
    code = exc.errno if isinstance(exc, OSError) else None
    # Only errors that carry the OS condition in their text alone are read by message: no false alarms.
    text = str(exc).lower() if type(exc).__name__ in ("SafetensorError", "OperationalError") else ""
    where = Path(where)
    folder = where if where.is_dir() else where.parent
    if code in _FULL or any(t in text for t in _FULL_TEXT):
        return StorageError(f"no space left on the disk of {folder} while writing {where.name}: free some space "
                            f"(see `df -h {folder}`) and run the same command again; everything stored before is "
                            "intact and an interrupted run resumes where it stopped")
    if code in _NOT_WRITABLE or any(t in text for t in _NOT_WRITABLE_TEXT):
        return StorageError(f"cannot write {where} ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}): "
                            f"{folder} is read-only or not yours; make it writable (e.g. `chmod -R u+w {folder}`) "
                            "or point the command at a writable folder, then run it again; nothing stored was changed")
    return None


@contextmanager
def storage_errors(where: str | Path) -> Iterator[None]:
    """Turn 'not writable' and 'disk full' errors raised inside into a StorageError naming `where`."""
    try:
        yield
    except StorageError:
        raise
    except Exception as e:
        err = storage_error(e, where)
        if err is None:
            raise
        raise err from e


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it and set it back
        old = os.umask(0o022)
        os.umask(old)
    return old


def default_mode(directory: bool = False) -> int:
    """The mode open() / mkdir() would give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_umask(folder: Path) -> None:
    """Give a freshly written folder tree the modes the umask asks for (0755 / 0644 under umask 022).

    mkdtemp makes 0700 folders and safetensors writes 0600 files whatever the umask; exports are read
    by other users (a ComfyUI or web server account), so they get ordinary modes before they are renamed
    into place.
    """
    dir_mode, file_mode = default_mode(directory=True), default_mode()
    os.chmod(folder, dir_mode)
    for parent, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(parent, d), dir_mode)
        for f in files:
            os.chmod(os.path.join(parent, f), file_mode)


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
    """Write via a temporary file in the same folder, then rename: readers never see half a file.

    The file gets the mode a plain open() would (0644 under umask 022), not mkstemp's 0600, so that
    other users (a ComfyUI service, a web server) can read it. A full disk or a folder that is not
    writable raises StorageError; the previous file, if any, is left as it was.
    """
    path = Path(path)
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with storage_errors(path):
            write(tmp)
            os.chmod(tmp, default_mode())
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_latest_file(path: Path, version: str) -> None:
    """Atomically write a 'latest' pointer: JSON {"version": "<name>"}, one format for rewards and policies."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps({"version": version}) + "\n"))


def read_latest_file(path: Path) -> str:
    """The version a 'latest' pointer names: JSON {"version": ...}, or the older one-line plain format."""
    text = path.read_text(encoding="utf-8").strip()
    if text.startswith("{"):
        try:
            version = json.loads(text)["version"]
        except (json.JSONDecodeError, KeyError, TypeError):
            version = None
        if not isinstance(version, str) or not version.strip():
            raise ValueError(f'{path}: expected JSON {{"version": "<name>"}}; write the file again (the training '
                             "script that made the version does) or by hand")
        return version.strip()
    if not text or "\n" in text:
        raise ValueError(f'{path}: expected JSON {{"version": "<name>"}} (or one line naming a version); write the '
                         "file again or by hand")
    return text  # written by older versions of poseloop: one line


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


def describe_sample(path: Path) -> str:
    """'image g00003_s1 of round round-0001' for a path in the samples layout, else the file name."""
    if path.parent.name == "trajectories" and path.parent.parent.name:
        return f"image {path.stem} of round {path.parent.parent.name}"
    return path.name


def _unreadable(path: Path, sample: str, reason: str) -> TrajectoryError:
    """The one-line error for a trajectory file that exists but cannot be used."""
    rnd = path.parent.parent.name if path.parent.name == "trajectories" else "<round name>"
    short = f"trajectory file {path} ({', '.join(filter(None, (sample, describe_sample(path))))}) is unreadable: {reason}"
    return TrajectoryError(
        f"{short}. Restore it from a backup, or delete it and run generate.py again with the round's settings and "
        f"--store.round {rnd}: missing files of existing rows are regenerated from their seeds", path, short)


def load_trajectory(path: str | Path, sample: str = "") -> Trajectory:
    """Load a trajectory saved by save_trajectory; errors name the file and `sample` (e.g. 'sample 17')."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file {path} is missing; run generate.py again with the settings of its "
                                "round and --store.round <round name>: missing files of existing rows are "
                                "regenerated from their seeds")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        if metadata.get("format") != TRAJECTORY_FORMAT:
            raise _unreadable(path, sample, f"not a poseloop trajectory (format {metadata.get('format')!r}, expected "
                                            f"{TRAJECTORY_FORMAT!r})")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        # A truncated or overwritten file: safetensors' own message does not name the file.
        raise _unreadable(path, sample, str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    try:
        traj = Trajectory(tensors["latents"], tensors["log_probs"], tensors["timesteps"], metadata)
    except KeyError as e:
        raise _unreadable(path, sample, f"missing tensor {e.args[0]!r}") from None
    try:
        traj.validate(str(path))
    except ValueError as e:
        raise _unreadable(path, sample, str(e).removeprefix(f"{path}: ")) from None
    return traj


def check_trajectory(path: str | Path, sample: str = "") -> TrajectoryError | None:
    """Without loading the tensors: the error load_trajectory would raise for an unreadable file, or None.

    Reads the header only (format, tensor names and shapes, file length), so whole datasets can be
    checked before a model loads.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = set(f.keys())
            shapes = {k: f.get_slice(k).get_shape() for k in keys}
    except (SafetensorError, OSError) as e:
        return _unreadable(path, sample, str(e).splitlines()[0] if str(e) else type(e).__name__)
    if metadata.get("format") != TRAJECTORY_FORMAT:
        return _unreadable(path, sample, f"not a poseloop trajectory (format {metadata.get('format')!r}, expected "
                                         f"{TRAJECTORY_FORMAT!r})")
    for key in ("latents", "log_probs", "timesteps"):
        if key not in keys:
            return _unreadable(path, sample, f"missing tensor {key!r}")
    steps = shapes["timesteps"][0] if shapes["timesteps"] else -1
    if len(shapes["latents"]) != 4 or shapes["latents"][0] != steps + 1 or list(shapes["log_probs"]) != [steps]:
        return _unreadable(path, sample, f"tensor shapes latents {shapes['latents']}, log_probs "
                                         f"{shapes['log_probs']}, timesteps {shapes['timesteps']} do not agree")
    return None


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

    def source_path(self, round_name: str, name: str) -> Path:
        return self.root / round_name / "sources" / name

    def remove_orphans(self, round_name: str, referenced: Iterable[str]) -> list[Path]:
        """Delete files of a round that no row references (and stale temporaries); return them."""
        keep = {self.abs(r) for r in referenced if not Path(r).is_absolute()}
        removed = []
        round_dir = self.root / round_name
        for sub in ("poses", "images", "trajectories", "sources"):
            folder = round_dir / sub
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if p.is_file() and p.resolve() not in keep:
                    p.unlink()
                    removed.append(p)
        return removed
