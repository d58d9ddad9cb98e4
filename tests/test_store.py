"""Trajectory files and the samples folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from poseloop.store import SampleStore, Trajectory, atomic_write, load_trajectory, save_trajectory


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
    with pytest.raises(ValueError, match="foreign.safetensors: not a poseloop trajectory"):
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
