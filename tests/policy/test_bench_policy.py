"""bench/bench_policy.py compares like with like: our DDPO sides do exactly trl's work, whatever the presets say.

Builds both sides' configs and their work descriptions (no trl, no training loop); the trained-step count is
the trainer's own choice on the model's scheduler.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():  # -> the bench_policy module
    spec = importlib.util.spec_from_file_location("bench_policy", ROOT / "bench" / "bench_policy.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_policy"] = module
    spec.loader.exec_module(module)
    return module


def test_ours_sides_do_trls_work(bench, models_dir: Path, tmp_path: Path) -> None:
    """Every field that sets the work is the same on our side as on trl's, all 10 steps trained."""
    args = bench.parse_args(["--model", str(models_dir / "tiny-sd15")])
    trl = bench.work_trl(bench.trl_config_kwargs(args), args.model)
    assert trl["trained steps per trajectory"] == 10 and trl["x_T per trajectory"] == "its own"
    for side in bench.LIKE_TRL:
        ours = bench.work_ours(bench.ours_config(args, side, str(tmp_path)))
        assert bench.work_differences(ours, trl) == [], side
        assert ours["trained steps per trajectory"] == 10
    # Other step counts and sample sizes follow on both sides.
    args = bench.parse_args(["--model", str(models_dir / "tiny-sd15"), "--steps", "6", "--samples", "4"])
    ours = bench.work_ours(bench.ours_config(args, "ours", str(tmp_path)))
    assert bench.work_differences(ours, bench.work_trl(bench.trl_config_kwargs(args), args.model)) == []
    assert ours["trained steps per trajectory"] == 6 and ours["trajectories per epoch"] == 4


def test_the_check_sees_the_old_setup(bench, models_dir: Path, tmp_path: Path) -> None:
    """The bench's former ours side (the tiny preset with trl's LoRA modules and timestep_fraction set) trained
    4 of 10 steps from one x_T per group: the work comparison names exactly that."""
    from poseloop.config.policy import tiny_on

    args = bench.parse_args(["--model", str(models_dir / "tiny-sd15")])
    old = bench.ours_config(args, "ours", str(tmp_path))
    preset = tiny_on(args.model, str(tmp_path))
    old.train.first_steps, old.train.shared_start = preset.train.first_steps, preset.train.shared_start
    diffs = bench.work_differences(bench.work_ours(old), bench.work_trl(bench.trl_config_kwargs(args), args.model))
    assert any(d.startswith("trained steps per trajectory: ours 4 / trl 10") for d in diffs), diffs
    assert any(d.startswith("x_T per trajectory: ours 'one per group'") for d in diffs), diffs
    old.train.first_steps, old.train.timestep_fraction = 0, 0.5
    assert bench.work_ours(old)["trained steps per trajectory"] == 5  # the trainer's choice, not the config's


def test_a_preset_change_does_not_leak_in(bench, models_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """The tiny preset changed in every field that sets the work: the bench's ours side still does trl's work."""
    import poseloop.config.policy as pc

    real = pc.tiny

    def changed():  # type: ignore[no-untyped-def]
        cfg = real()
        cfg.train.first_steps, cfg.train.timestep_fraction, cfg.train.shared_start = 3, 0.5, True
        cfg.train.grad_accum, cfg.train.inner_epochs, cfg.train.batch_size = 2, 2, 2
        cfg.target.lora_rank, cfg.target.lora_alpha, cfg.target.lora_modules = 8, 16.0, ["conv1"]
        cfg.target.gradient_checkpointing, cfg.optim.mixed_precision = True, "bf16"
        cfg.sample.guidance_scale, cfg.sample.eta, cfg.sample.negative_prompt = 3.0, 0.5, "blurry"
        cfg.model.lora, cfg.optim.lr, cfg.train.stat_buffer = "some.safetensors", 1e-2, 0
        return cfg

    monkeypatch.setattr(pc, "tiny", changed)
    args = bench.parse_args(["--model", str(models_dir / "tiny-sd15")])
    trl = bench.work_trl(bench.trl_config_kwargs(args), args.model)
    assert pc.tiny_on(args.model, str(tmp_path)).train.first_steps == 3  # the change is in effect
    for side in bench.LIKE_TRL:
        assert bench.work_differences(bench.work_ours(bench.ours_config(args, side, str(tmp_path))), trl) == []
