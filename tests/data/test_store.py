"""Trajectory files and the samples folder."""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from poseloop.data import store as store_module
from poseloop.data.inputs import InputError
from poseloop.data.store import (
    SampleStore,
    StorageError,
    Trajectory,
    TrajectoryError,
    atomic_write,
    check_trajectory,
    load_trajectory,
    read_latest_file,
    save_trajectory,
    write_latest_file,
)


def make_traj(steps: int = 5) -> Trajectory:
    return Trajectory(
        latents=torch.randn(steps + 1, 4, 8, 8).half(),
        log_probs=torch.randn(steps),
        timesteps=torch.arange(steps, 0, -1) * 200 + 1,
        metadata={"seed": "42", "prompt": "a dancer, \"quoted\""},
    )


def test_trajectory_round_trips_exactly(tmp_path: Path) -> None:
    traj = make_traj()
    path = tmp_path / "t" / "x.safetensors"
    save_trajectory(traj, path)
    back = load_trajectory(path)
    assert torch.equal(back.latents, traj.latents)
    assert torch.equal(back.log_probs, traj.log_probs)
    assert torch.equal(back.timesteps, traj.timesteps)
    assert back.metadata["prompt"] == 'a dancer, "quoted"'
    assert back.metadata["seed"] == "42"
    # Latents are stored once (T+1), in float16: the file is barely bigger than that.
    assert path.stat().st_size < traj.latents.numel() * 2 + 1024


def test_wrong_shapes_are_refused_before_writing(tmp_path: Path) -> None:
    traj = make_traj()
    traj.log_probs = torch.randn(4)
    with pytest.raises(ValueError, match=r"log_probs have shape \(4,\)"):
        save_trajectory(traj, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_loading_a_foreign_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"latents": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="foreign.safetensors .*is unreadable: not a poseloop trajectory"):
        load_trajectory(path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_trajectory(tmp_path / "missing.safetensors")


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_store_paths_stay_inside_the_samples_folder(tmp_path: Path) -> None:
    store = SampleStore(tmp_path)
    p = store.image_path("round-0001", 3, 1)
    assert store.rel(p) == "round-0001/images/g00003_s1.png"
    assert store.abs(store.rel(p)) == p.resolve()
    with pytest.raises(ValueError, match="outside the samples folder"):
        store.abs("../etc/passwd")


def test_remove_orphans_keeps_referenced_files(tmp_path: Path) -> None:
    store = SampleStore(tmp_path)
    keep = store.image_path("r", 0, 0)
    orphan = store.image_path("r", 0, 1)
    for p in (keep, orphan):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    removed = store.remove_orphans("r", [store.rel(keep)])
    assert removed == [orphan]
    assert keep.exists() and not orphan.exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_corrupted_trajectory_is_a_one_line_error_naming_file_and_sample(tmp_path: Path, damage: str) -> None:
    store = SampleStore(tmp_path)
    path = store.trajectory_path("round-0003", 7, 2)
    save_trajectory(make_traj(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x07garbage" * 20, "empty": b""}[damage])
    with pytest.raises(TrajectoryError) as err:
        load_trajectory(path, sample="sample 41")
    msg = str(err.value)
    assert isinstance(err.value, InputError)  # the scripts print InputErrors as one line and exit 2
    assert "\n" not in msg and str(path) in msg and "sample 41" in msg and "g00007_s2 of round round-0003" in msg
    assert "--store.round round-0003" in msg  # what to do
    assert err.value.path == path
    # The header-only check (used before a model loads) finds the same problem without loading tensors.
    found = check_trajectory(path, sample="sample 41")
    assert isinstance(found, TrajectoryError) and str(path) in str(found)


def test_check_trajectory_accepts_a_good_file_and_refuses_inconsistent_shapes(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_trajectory(make_traj(), good)
    assert check_trajectory(good) is None
    bad = tmp_path / "bad.safetensors"
    save_file({"latents": torch.zeros(3, 4, 2, 2).half(), "log_probs": torch.zeros(5), "timesteps": torch.arange(5)},
              str(bad), metadata={"format": store_module.TRAJECTORY_FORMAT})
    assert "do not agree" in str(check_trajectory(bad))
    with pytest.raises(TrajectoryError, match="bad.safetensors"):
        load_trajectory(bad)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_write_honours_the_umask(tmp_path: Path, umask_022: None) -> None:
    path = tmp_path / "a.txt"
    atomic_write(path, lambda tmp: tmp.write_text("x"))
    # mkstemp alone gives 0600: another user (a ComfyUI service) could not read the file.
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.umask(0o027)
    atomic_write(path, lambda tmp: tmp.write_text("y"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert store_module.current_umask() == 0o027


def _assert_one_line(err: BaseException, *needles: str) -> None:
    msg = str(err)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_a_full_disk_is_a_storage_error_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")

    def full(tmp: Path) -> None:
        tmp.write_text("ha")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as err:
        atomic_write(path, full)
    assert isinstance(err.value, InputError)
    _assert_one_line(err.value, "no space left", str(tmp_path), "run the same command again")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_read_only_folder_is_a_storage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)  # tests run as root, where this alone does not stop writes: mkstemp is made to fail too

    def denied(*args: object, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", str(folder))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(StorageError) as err:
        atomic_write(folder / "a.png", lambda tmp: tmp.write_text("x"))
    _assert_one_line(err.value, "cannot write", "a.png", "chmod -R u+w", "nothing stored was changed")
    folder.chmod(0o755)
    assert list(folder.iterdir()) == []


def test_latest_pointer_is_json_and_the_old_one_line_format_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    write_latest_file(path, "run-e0003")
    assert json.loads(path.read_text()) == {"version": "run-e0003"}
    assert read_latest_file(path) == "run-e0003"
    path.write_text("run-0001\n")  # written by older versions
    assert read_latest_file(path) == "run-0001"
    path.write_text('{"name": 1}')
    with pytest.raises(ValueError, match="expected JSON"):
        read_latest_file(path)


def test_remove_orphans_covers_copied_source_photos(tmp_path: Path) -> None:
    store = SampleStore(tmp_path)
    keep, orphan = store.source_path("r", "a-1.jpg"), store.source_path("r", "b-2.jpg")
    for p in (keep, orphan):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    # Rows of older rounds hold absolute source paths: they are skipped, not an error.
    assert store.remove_orphans("r", [store.rel(keep), "/elsewhere/photo.jpg"]) == [orphan]
