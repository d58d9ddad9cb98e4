"""Hardening, round 3 (issue 34): planted pickles, 64-bit ids on PostgreSQL, path-like names, two runs at once,
non-image dataset files, unbounded sizes, hostile reward-model folders, deep JSON, blank tokens.

Each test failed on the code before its fix; bad input ends in one line naming the field or file, and
nothing stored is changed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flask import Flask
from PIL import Image

import generate as generate_script
from poseloop.config.generation import GenerateConfig
from poseloop.config.lib import ConfigError
from poseloop.sampling.round import generate
from poseloop.data.inputs import InputError
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose
from webapp_fixtures import BOTH_DATABASES, Blind, Env, app, cmp, env  # noqa: F401  (pytest fixtures)

# ---------------------------------------------------------------- helpers


def files_under(root: Path) -> list[str]:
    """Every file below root (relative), sorted: what 'nothing was written' compares."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


# Holds a lock file the way another run would: flock'ed, with its pid and command line in it.
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f"{os.getpid()}\\nother-run --its-flags\\n".encode())
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture
def other_run() -> Iterator[object]:
    """Start another process holding a lock file: holder(path) -> Popen; killed (SIGKILL) at the end."""
    procs: list[subprocess.Popen[str]] = []

    def hold(path: Path) -> subprocess.Popen[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def one_line(msg: str) -> str:
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ---------------------------------------------------------------- 1. pickles planted in a run folder


class Planted:
    """A pickle payload: unpickling it writes a marker file (what an attacker's code would do instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.write_text, (self.marker, "planted code ran"))


def test_a_pickle_planted_in_the_checkpoint_never_runs_on_resume(models_dir: Path, tmp_path: Path,
                                                                  one_thread: None) -> None:
    from tiny_helpers import Brightness, policy_cfg

    from poseloop.policy.trainer import PolicyTrainer, train

    cfg = policy_cfg(models_dir, tmp_path, train__epochs=1)
    cfg.output.run_name = "victim"
    result = train(cfg, reward=Brightness(), progress=False)
    ckpt = result.run_dir / "checkpoint"
    originals = {name: (ckpt / name).read_bytes() for name in ("optimizer.pt", "rng.pt")}
    marker = tmp_path / "pwned"
    cfg2 = policy_cfg(models_dir, tmp_path, train__epochs=2)
    cfg2.output.run_name = "victim"
    trainer = PolicyTrainer(cfg2, reward=Brightness(), progress=False)  # what re-running the command builds
    for name in originals:
        torch.save(Planted(marker), ckpt / name)
        with pytest.raises(ConfigError) as info:
            trainer.load_checkpoint()
        assert not marker.exists(), f"the payload in {name} ran on resume"
        msg = one_line(str(info.value))
        assert msg.startswith("train.resume: ") and str(ckpt / name) in msg and "--train.resume false" in msg
        (ckpt / name).write_bytes(originals[name])
    # The checkpoint written by the trainer itself (tensors and plain values) still resumes.
    assert trainer.run().epochs_this_run == 1


def test_resume_files_load_without_pickled_code_and_old_rng_files_still_load(tmp_path: Path) -> None:
    import random

    import numpy as np

    from poseloop.policy.run_files import CheckpointFileError, load_resume_file, rng_state, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(load_resume_file(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    # rng.pt of earlier versions held numpy's state as an array: numpy arrays, and nothing else, are allowed.
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": []}
    torch.save(old, tmp_path / "old.pt")
    expected = (random.random(), float(np.random.rand()))
    set_rng_state(load_resume_file(tmp_path / "old.pt"))
    assert (random.random(), float(np.random.rand())) == expected
    torch.save({"x": Planted(tmp_path / "pwned")}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointFileError, match=re.escape(str(tmp_path / "bad.pt"))):
        load_resume_file(tmp_path / "bad.pt")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- 2. ids beyond 32 bits (PostgreSQL's INTEGER)


@BOTH_DATABASES
def test_ids_beyond_32_bits_get_a_4xx_on_every_route(app: Flask, env: Env, cmp: Blind) -> None:
    """PostgreSQL's id columns are 32 bits: 2**31 .. 2**63-1 were a 500 (an overflow when bound) on 12 routes."""
    app.testing = False  # an exception must come back as the 500 a real client sees
    c = app.test_client()
    valid = {"round_id": env.rounds[0], "sample_id": env.samples[env.groups[env.rounds[0]][0]][0],
             "group_id": env.groups[env.rounds[0]][0], "comparison_id": cmp.comparison_id, "token": "0-0",
             "what": "left", "filename": "app.js"}
    probed = 0
    for rule in app.url_map.iter_rules():
        args = re.findall(r"<int:([a-z_]+)>", rule.rule)
        for arg in args:
            for bad in (2**31, 2**40, 2**63 - 1):
                url = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>",
                             lambda m, arg=arg, bad=bad: str(bad if m.group(1) == arg else valid[m.group(1)]), rule.rule)
                for method in set(rule.methods or ()) - {"HEAD", "OPTIONS"}:
                    r = c.open(url, method=method, data="{}", content_type="application/json")
                    assert 400 <= r.status_code < 500 and r.is_json, f"{method} {url}: {r.status_code}"
                    probed += 1
    assert probed >= 3 * 8
    sid = valid["sample_id"]
    other = env.samples[env.groups[env.rounds[0]][0]][1]
    bodies = [("/api/scores", {"rater": "ann", "sample_id": 2**31, "score": 1}, "sample_id"),
              ("/api/preferences", {"rater": "ann", "left_id": sid, "right_id": 2**40, "choice": "left"}, "right_id"),
              ("/api/preferences", {"rater": "ann", "left_id": 2**62, "right_id": other, "choice": "left"}, "left_id"),
              ("/api/undo", {"rater": "ann", "round_id": 2**31}, "round_id"),
              ("/api/import/scores", {"rater": "ann", "round_id": 2**63 - 1, "scores": {}}, "round_id")]
    for path, body, field in bodies:
        r = c.post(path, data=json.dumps(body), content_type="application/json")
        assert r.status_code == 400 and field in r.json["error"] and "2**31" in r.json["error"], (path, r.json)
    for query in (f"/api/stats?round_id={2**31}", f"/api/export/d3po.json?round_id={2**40}"):
        r = c.get(query)
        assert r.status_code == 400 and "round_id" in r.json["error"], (query, r.status_code)


# ---------------------------------------------------------------- 3. names that become paths


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", ".hidden", "a\\b", "tab\there", "r" * 200, " padded "])
def test_a_round_name_that_is_a_path_is_refused_before_anything_is_written(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    samples = tmp_path / "a" / "samples"
    argv = ["--model.base", str(models_dir / "tiny-sd15"), "--model.controlnet",
            str(models_dir / "tiny-sd15" / "controlnet"), "--store.samples_dir", str(samples),
            "--set", "sample.steps=2", "--set", "sample.width=64", "--set", "sample.height=64",
            "--data.poses", "standing", "--data.prompts", "a kid", "--set", "sample.images_per_group=2",
            "--store.round", name]
    with pytest.raises(SystemExit) as exc:
        generate_script.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    # Refused while the flags are parsed: argparse's usage, then the one line naming the field.
    assert "Traceback" not in err and err.splitlines()[-1].startswith("generate.py: error: store.round: "), err
    assert "plain name" in err.splitlines()[-1]
    assert files_under(tmp_path) == []  # neither the samples folder nor ../../x/poses/g00000.png


def test_an_evaluation_name_that_is_a_path_is_refused() -> None:
    from poseloop.config.evaluation import EvaluateConfig

    cfg = EvaluateConfig()
    cfg.eval.policy, cfg.eval.name = "latest", "../outside"
    with pytest.raises(ConfigError, match=r"^eval\.name: '\.\./outside' contains a path separator"):
        cfg.validate()


# ---------------------------------------------------------------- 4. two runs at once


GENERATE_LOCK = ".generate.lock"  # poseloop.sampling.round.GENERATE_LOCK, spelt out: the lock file is an interface


def test_a_second_generate_into_one_samples_folder_stops_naming_the_first(
    tiny_cfg: GenerateConfig, other_run: object
) -> None:
    samples = Path(tiny_cfg.store.samples_dir)
    holder = other_run(samples / GENERATE_LOCK)  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:  # a LockBusyError
        generate(tiny_cfg)
    msg = one_line(str(info.value))
    assert f"pid {holder.pid}" in msg and str(samples) in msg and "--store.samples_dir" in msg
    assert getattr(info.value, "pid", None) == holder.pid
    assert files_under(samples) == [GENERATE_LOCK]  # nothing of ours: no database, no round
    holder.kill()  # kill -9: the kernel drops its lock; the file it leaves behind is stale and taken over
    holder.wait()
    result = generate(tiny_cfg)
    assert result.samples_new == 4
    assert not (samples / GENERATE_LOCK).exists()


def test_a_second_policy_run_into_one_run_folder_stops_naming_the_first(
    models_dir: Path, tmp_path: Path, other_run: object, one_thread: None
) -> None:
    from tiny_helpers import Brightness, policy_cfg

    from poseloop.policy.trainer import train

    cfg = policy_cfg(models_dir, tmp_path)
    cfg.output.run_name = "shared"
    run_dir = Path(cfg.output.runs_dir) / "shared"
    holder = other_run(run_dir / ".lock")  # type: ignore[operator]
    with pytest.raises(ConfigError) as info:  # a LockBusyError
        train(cfg, reward=Brightness(), progress=False)
    msg = one_line(str(info.value))
    assert f"pid {holder.pid}" in msg and "--output.run_name" in msg
    assert not (run_dir / "checkpoint").exists() and not (run_dir / "metrics.csv").exists()


def test_two_reward_trainings_never_get_one_version_name(tmp_path: Path, other_run: object,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import datetime

    from poseloop.rewards import training as reward_training
    from poseloop.config.reward import TrainRewardConfig

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: object = None) -> Frozen:  # type: ignore[override]
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(reward_training, "datetime", Frozen)
    models = tmp_path / "models"
    # A shared --output.version: the second run stops at once (before loading labels), naming the first.
    holder = other_run(models / "reward" / ".mine.lock")  # type: ignore[operator]
    cfg = TrainRewardConfig()
    cfg.data.samples_dir, cfg.output.models_dir, cfg.output.version = str(tmp_path / "no-labels"), str(models), "mine"
    with pytest.raises(ConfigError) as info:  # a LockBusyError, not the missing labels
        reward_training.train_reward(cfg, progress=False)
    msg = one_line(str(info.value))
    assert msg.startswith("output.version: 'mine' is being trained") and f"pid {holder.pid}" in msg
    # Another train_reward.py started in the same second and is still training: its name is taken.
    holder2 = other_run(models / "reward" / ".20260102-030405.lock")  # type: ignore[operator]
    first = reward_training.reserve_version(models)
    second = reward_training.reserve_version(models)
    assert (first[0], second[0]) == ("20260102-030405-2", "20260102-030405-3")
    from poseloop.data.locks import release

    for _name, path, fd in (first, second):
        release(path, fd)
    assert holder.poll() is None and holder2.poll() is None  # the other runs are untouched


# ---------------------------------------------------------------- 5. a dataset's "image" must be an image from an allowed folder


def _dataset(folder: Path, image: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    render_pose(get_builtin_pose("waving"), 64, 64).save(folder / "cond.png")
    path = folder / "data.jsonl"
    path.write_text(json.dumps({"image": image, "condition_image": "cond.png", "text": "a man"}) + "\n")
    return path


def test_a_dataset_image_that_is_not_an_allowed_image_is_never_copied(tiny_cfg: GenerateConfig, tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secrets.png"  # an image name does not make it an image
    secret.parent.mkdir()
    secret.write_text("API_KEY=hunter2\n")
    outside = tmp_path / "elsewhere" / "real.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    data = tmp_path / "data"
    (data / "notes.txt").parent.mkdir(parents=True)
    (data / "notes.txt").write_text("not an image")
    (data / "link.png").symlink_to(outside)
    cases = [("/proc/self/environ", "outside the dataset file's folder"),
             (str(secret), "outside the dataset file's folder"),
             ("notes.txt", "not a readable image"),
             ("link.png", "outside the dataset file's folder"),  # a symlink out of the folder
             (str(outside), "--store.source_dirs")]
    for image, words in cases:
        tiny_cfg.data.dataset = str(_dataset(data, image))
        with pytest.raises(InputError) as info:
            generate(tiny_cfg)
        msg = one_line(str(info.value))
        assert words in msg and '"image"' in msg and str(data / "data.jsonl") in msg, (image, msg)
        assert files_under(Path(tiny_cfg.store.samples_dir)) == [], image
    # A folder allowed explicitly: its images are copied in.
    tiny_cfg.data.dataset = str(_dataset(data, str(outside)))
    tiny_cfg.store.source_dirs = [str(outside.parent)]
    tiny_cfg.sample.images_per_group = 1
    generate(tiny_cfg)
    copied = [p for p in files_under(Path(tiny_cfg.store.samples_dir)) if "/sources/" in p]
    assert len(copied) == 1 and copied[0].startswith("round-0001/sources/real-")


# ---------------------------------------------------------------- 6. unbounded sizes


@pytest.mark.parametrize("field, value", [("width", 65536), ("height", 65536), ("images_per_group", 10**9),
                                          ("batch_size", 10**9)])
def test_sizes_that_cannot_fit_in_memory_are_refused_naming_the_field(field: str, value: int) -> None:
    from poseloop.config.generation import tiny

    cfg = tiny()
    setattr(cfg.sample, field, value)
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert one_line(str(info.value)).startswith(f"sample.{field}: ")


def test_groups_per_epoch_beyond_memory_is_refused() -> None:
    from poseloop.config.policy import tiny

    cfg = tiny()
    cfg.train.groups_per_epoch = 10**9
    with pytest.raises(ConfigError, match=r"^train\.groups_per_epoch: 1000000000 groups x 4 images is above"):
        cfg.validate()
    cfg.train.groups_per_epoch = 8
    cfg.output.grid_images = 10**9
    with pytest.raises(ConfigError, match=r"^output\.grid_images: must be <= 64"):
        cfg.validate()


# ---------------------------------------------------------------- 7. hostile reward-model folders


@pytest.fixture
def reward_folder(tmp_path: Path) -> Path:
    """A valid saved latent reward model (improved CNN, 2 members, 4x8x8 latents)."""
    from poseloop.rewards.model import LatentRewardModel
    from poseloop.rewards.versions import save_reward_model
    from poseloop.config.reward import RewardModelConfig

    torch.manual_seed(0)
    folder = tmp_path / "reward" / "v1"
    save_reward_model(LatentRewardModel(RewardModelConfig(width=8, hidden=8), (4, 8, 8), 2, version="v1"), folder)
    return folder


def _edit(folder: Path, **changes: object) -> None:
    data = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if "." in key:
            section, name = key.split(".")
            data[section][name] = value
        else:
            data[key] = value
    (folder / "config.json").write_text(json.dumps(data))


def test_hostile_reward_model_folders_are_one_line_naming_file_and_field(reward_folder: Path) -> None:
    from safetensors.torch import save_file

    from poseloop.policy.rewards import resolve_reward
    from poseloop.rewards.model import LatentRewardModel
    from poseloop.rewards.loading import load_reward_model
    from poseloop.config.reward import RewardModelConfig

    config, weights = reward_folder / "config.json", reward_folder / "weights.safetensors"
    good_config, good_weights = config.read_text(), weights.read_bytes()
    assert load_reward_model(reward_folder).ensemble_size == 2
    # The quick cases first; the values that would exhaust memory without the check come last.
    cases: list[tuple[dict[str, object] | str | bytes, Path, str]] = [
        ({"model.bogus": 1}, config, "model.bogus"),
        ({"model.dropout": "0.2"}, config, "model.dropout"),
        ({"latent_shape": "4x8x8"}, config, "latent_shape"),
        ({"model": None}, config, "model"),
        ("{not json", config, "not valid JSON"),
        ('{"a":' * 100_000 + "1" + "}" * 100_000, config, "nested too deeply"),
        (b"\x80\x02not a safetensors file", weights, "not a readable safetensors file"),
        ("widths", weights, "tensor"),  # weights of another width than config.json says
        ({"ensemble_size": 3}, weights, "lacks tensor"),
        ({"ensemble_size": 10**9}, config, "ensemble_size"),
        ({"latent_shape": [10**6, 8, 8]}, config, "latent_shape"),
        ({"model.width": 10**6}, config, "model.width"),
    ]
    for change, named, words in cases:
        config.write_text(good_config)
        weights.write_bytes(good_weights)
        if isinstance(change, dict):
            _edit(reward_folder, **change)
        elif isinstance(change, bytes):
            weights.write_bytes(change)
        elif change == "widths":
            other = LatentRewardModel(RewardModelConfig(width=16, hidden=8), (4, 8, 8), 2)
            save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
        else:
            config.write_text(change)
        with pytest.raises(ValueError) as info:
            load_reward_model(reward_folder)
        msg = one_line(str(info.value))
        assert str(named) in msg and words in msg, (change if not isinstance(change, str) else change[:30], msg)
        # What train_policy.py / evaluate.py print: the same line after 'reward: '.
        with pytest.raises(ConfigError, match=r"^reward: ") as info2:
            resolve_reward(f"latent:version={reward_folder}")
        assert str(named) in one_line(str(info2.value))


# ---------------------------------------------------------------- 8. deeply nested JSON


def test_deeply_nested_keypoint_json_is_one_line(tiny_cfg: GenerateConfig, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    tiny_cfg.data.poses, tiny_cfg.data.keypoints = [], [str(deep)]
    with pytest.raises(InputError) as info:
        generate(tiny_cfg)
    assert one_line(str(info.value)).startswith(f"{deep}: JSON nested too deeply")
    # The same inside a dataset line, and as a --set list value.
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": ' * 50_000 + '"x"' + "}" * 50_000 + "\n")
    tiny_cfg.data.keypoints, tiny_cfg.data.dataset = [], str(data)
    with pytest.raises(InputError, match=rf"^{re.escape(str(data))}:1: JSON nested too deeply"):
        generate(tiny_cfg)
    with pytest.raises(SystemExit):
        generate_script.main(["--set", "data.poses=" + "[" * 50_000 + "]" * 50_000])
    err = capsys.readouterr().err
    assert "data.poses" in err and "nested too deeply" in err and "Traceback" not in err
    assert files_under(Path(tiny_cfg.store.samples_dir)) == []


# ---------------------------------------------------------------- 9. blank and weak tokens


@pytest.mark.parametrize("token, words", [(" " * 8, "blank"), ("\t" * 12, "blank"), ("abc def ghi", "whitespace"),
                                          ("tok\x00en-12345", "control"), ("aaaaaaaaaaaa", "distinct"),
                                          ("abababab", "distinct"), ("short", "at least 8")])
def test_blank_or_weak_tokens_are_refused_at_start_up(env: Env, token: str, words: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from webapp.config import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(["--samples_dir", str(env.samples_dir), "--host", "0.0.0.0", "--token", token])
    assert info.value.code == 2
    msg = one_line(capsys.readouterr().err.strip().splitlines()[-1])
    assert msg.startswith("python -m webapp: error: token: ") and words in msg and "secrets.token_urlsafe" in msg


def test_a_blank_token_from_the_environment_is_refused(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from webapp.config import parse_args

    monkeypatch.setenv("POSELOOP_TOKEN", " " * 10)
    with pytest.raises(SystemExit) as info:
        parse_args(["--samples_dir", str(env.samples_dir), "--host", "0.0.0.0"])
    assert info.value.code == 2 and "error: token: is blank" in capsys.readouterr().err
    assert os.environ["POSELOOP_TOKEN"] == " " * 10
