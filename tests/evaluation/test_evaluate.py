"""evaluate.py: both sides on the same seeds, metrics with intervals, report, blind results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

import evaluate as evaluate_script
from poseloop.data import db
from poseloop.evaluation.compare import win_rate
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose
from poseloop.metrics.stats import bootstrap_ci
from poseloop.data.store import SampleStore


def test_win_rate_counts_ties_half() -> None:
    assert win_rate(np.array([1.0, 2.0, 3.0, 4.0]), np.array([0.0, 2.0, 5.0, 1.0])) == pytest.approx(2.5 / 4)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.normal(size=20), rng.normal(size=2000)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo) / 4
    assert bootstrap_ci(np.array([3.0]), n_resamples=100) == (3.0, 3.0)


def make_policy(models_dir: Path, tiny_model_cfg, version: str) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    from poseloop.policy.export import save_kohya_lora
    from poseloop.models.loading import load_components

    comp = load_components(tiny_model_cfg)
    torch.manual_seed(len(version))
    comp.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    save_kohya_lora(comp.unet, models_dir / "policies" / version / "lora_kohya.safetensors")
    (models_dir / "policies" / "latest").write_text(version)


def test_evaluate_end_to_end_on_the_tiny_model(tiny_cfg, tmp_path: Path, models_dir: Path,  # type: ignore[no-untyped-def]
                                               capsys: pytest.CaptureFixture[str]) -> None:
    trained = tmp_path / "trained"
    make_policy(trained, tiny_cfg.model, "run-0001")
    render_pose(get_builtin_pose("waving"), 64, 64).save(tmp_path / "cond.png")
    Image.new("RGB", (96, 96), (200, 40, 40)).save(tmp_path / "photo.png")
    lines = [json.dumps({"image": "photo.png", "condition_image": "cond.png", "text": t}) for t in ("a man", "a woman")]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["--model.base", tiny_cfg.model.base, "--model.controlnet", tiny_cfg.model.controlnet,
            "--model.models_dir", str(trained), "--store.samples_dir", tiny_cfg.store.samples_dir,
            "--data.dataset", str(tmp_path / "eval.jsonl"), "--set", "sample.steps=3", "--set", "sample.width=64",
            "--set", "sample.height=64", "--eval.metrics", "brightness", "jpeg_compressibility", "lpips",
            "--set", "eval.bootstrap=200", "--policy", "latest"]
    assert evaluate_script.main(argv) == 0
    summary = capsys.readouterr().out
    assert "eval-run-0001-vs-base: run-0001 vs base on 4 pairs" in summary

    report_dir = trained / "policies" / "run-0001" / "eval" / "eval-run-0001-vs-base"
    for name in ("report.md", "metrics.json", "metrics.png", "grid.png"):
        assert (report_dir / name).is_file(), name
    data = json.loads((report_dir / "metrics.json").read_text())
    metrics = {m["name"]: m for m in data["metrics"]}
    assert set(metrics) == {"brightness", "jpeg_compressibility", "lpips_to_source"}
    assert "random AlexNet backbone" in metrics["lpips_to_source"]["note"]

    # The reported brightness equals the mean brightness of the stored images, side by side.
    store = SampleStore(tiny_cfg.store.samples_dir)
    factory = db.open_db(db.default_db_url(store.root))
    with db.session_scope(factory) as s:
        rounds = {r.name: r for r in s.scalars(select(db.Round))}
        comparison = s.scalar(select(db.Comparison))
        assert comparison is not None and comparison.name == "eval-run-0001-vs-base"
        means = {}
        for side in ("baseline", "candidate"):
            rnd = rounds[f"eval-run-0001-vs-base-{side}"]
            assert rnd.policy_version == (None if side == "baseline" else "run-0001")
            values = [np.asarray(Image.open(store.abs(x.image_path)).convert("RGB"), dtype=np.float32).mean() / 255
                      for x in rnd.samples]
            means[side] = float(np.mean(values))
        b_sample = rounds["eval-run-0001-vs-base-baseline"].samples[0]
        c_sample = next(x for x in rounds["eval-run-0001-vs-base-candidate"].samples
                        if (x.group.index, x.index) == (b_sample.group.index, b_sample.index))
        assert b_sample.seed == c_sample.seed
        rater = db.get_or_create_rater(s, "ann")
        s.add(db.BlindJudgement(comparison_id=comparison.id, rater_id=rater.id, baseline_sample_id=b_sample.id,
                                candidate_sample_id=c_sample.id, left_is_candidate=True, outcome="candidate"))
    assert metrics["brightness"]["baseline_mean"] == pytest.approx(means["baseline"], abs=1e-4)
    assert metrics["brightness"]["candidate_mean"] == pytest.approx(means["candidate"], abs=1e-4)
    assert metrics["brightness"]["baseline_mean"] != pytest.approx(metrics["brightness"]["candidate_mean"], abs=1e-5)
    assert "No blind verdicts yet" in (report_dir / "report.md").read_text()

    # A second run reuses both rounds and reports the blind verdict.
    assert evaluate_script.main(argv) == 0
    report = (report_dir / "report.md").read_text()
    assert "1 verdicts in the rating app's blind mode: candidate preferred 1" in report
    assert "| brightness |" in report
    with db.session_scope(factory) as s:
        assert len(s.scalars(select(db.Round)).all()) == 2


def test_evaluate_refuses_bad_input_before_generating(tiny_cfg, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    trained = tmp_path / "trained"
    make_policy(trained, tiny_cfg.model, "run-0001")
    base = ["--model.base", tiny_cfg.model.base, "--model.controlnet", tiny_cfg.model.controlnet,
            "--model.models_dir", str(trained), "--store.samples_dir", str(tmp_path / "s")]
    for extra, needle in ((["--eval.metrics", "moonlight"], "moonlight"),
                          (["--baseline", "run-0001"], "the candidate and the baseline are the same"),
                          (["--policy", "run-0042"], "available: run-0001")):
        with pytest.raises(SystemExit) as exc:
            evaluate_script.main(base + extra)
        assert exc.value.code == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").rglob("*.png"))


def test_pose_accuracy_is_measured_only_where_keypoints_are_known(
    tiny_cfg, tmp_path: Path, openpose_weights: Path  # type: ignore[no-untyped-def]
) -> None:
    from poseloop.evaluation.compare import evaluate
    from poseloop.config.evaluation import EvaluateConfig

    trained = tmp_path / "trained"
    make_policy(trained, tiny_cfg.model, "run-0001")
    pose = get_builtin_pose("t_pose")
    render_pose(pose, 64, 64).save(tmp_path / "cond.png")
    (tmp_path / "kp.json").write_text(json.dumps(pose.to_dict()))
    (tmp_path / "eval.jsonl").write_text(
        json.dumps({"condition_image": "cond.png", "text": "a", "keypoints": "kp.json"}) + "\n"
        + json.dumps({"condition_image": "cond.png", "text": "b"}) + "\n")
    cfg = EvaluateConfig(model=tiny_cfg.model, sample=tiny_cfg.sample, data=tiny_cfg.data, store=tiny_cfg.store)
    cfg.model.models_dir = str(trained)
    cfg.sample.steps = 2
    cfg.data.dataset = str(tmp_path / "eval.jsonl")
    cfg.eval.metrics = [f"pose_accuracy:weights={openpose_weights}"]
    cfg.eval.bootstrap = 100
    result = evaluate(cfg)
    assert result.pairs == 4
    (metric,) = result.metrics
    assert metric.name == "pose_accuracy" and metric.n == 2
    assert "2 of 4 pairs" in metric.note
    assert 0.0 <= metric.baseline_mean <= 1.0


# ---- re-runs: exact command, pinned versions, helpful errors ------------------------------------------------


def test_rerun_command_reproduces_the_config_exactly() -> None:
    import shlex

    from poseloop.config.lib import parse_config
    from poseloop.evaluation.compare import rerun_command
    from poseloop.config.evaluation import PRESETS, EvaluateConfig

    argv = ["--preset", "sd15", "--data.prompts", "a dancer, red dress", "it's \"quoted\"", "--set", "sample.steps=7",
            "--eval.metrics", "brightness", "lpips", "--set", "eval.confidence=0.9", "--eval.policy", "latest"]
    cfg, _ = parse_config(EvaluateConfig, PRESETS, "tiny", argv, description="t")
    command = rerun_command(cfg, "my-eval", "run-0003", "run-0001")
    words = shlex.split(command)
    assert words[:2] == ["python", "evaluate.py"] and "--preset" in words and "sd15" in words
    assert "--eval.policy run-0003 --eval.baseline run-0001 --eval.name my-eval" in command  # concrete, not 'latest'
    again, _ = parse_config(EvaluateConfig, PRESETS, "tiny", words[2:], description="t")
    cfg.eval.policy, cfg.eval.baseline, cfg.eval.name = "run-0003", "run-0001", "my-eval"
    assert again == cfg


def test_learned_reward_specs_are_pinned_to_a_concrete_version(tmp_path: Path) -> None:
    from poseloop.evaluation.compare import pin_reward_versions
    from poseloop.rewards.versions import write_latest

    for v in ("v1", "v2"):
        (tmp_path / "reward" / v).mkdir(parents=True)
        (tmp_path / "reward" / v / "config.json").write_text("{}")
    write_latest(tmp_path, "v2")
    assert pin_reward_versions("latent:latest", tmp_path) == ("latent:version=v2", ["v2"])
    assert pin_reward_versions("latent", tmp_path) == ("latent:version=v2", ["v2"])
    assert pin_reward_versions("0.5*latent + brightness*2", tmp_path) == ("0.5*latent:version=v2 + 2*brightness", ["v2"])
    assert pin_reward_versions("latent:v1", tmp_path) == ("latent:v1", ["v1"])  # already concrete: unchanged
    assert pin_reward_versions("brightness", tmp_path) == ("brightness", [])


def test_a_rerun_keeps_its_versions_and_says_what_to_pass(tiny_cfg, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    from poseloop.rewards.model import LatentRewardModel
    from poseloop.rewards.versions import save_reward_model, write_latest
    from poseloop.config.reward import RewardModelConfig

    trained = tmp_path / "trained"
    make_policy(trained, tiny_cfg.model, "run-0001")

    def reward_version(version: str) -> None:
        torch.manual_seed(len(version))
        save_reward_model(LatentRewardModel(RewardModelConfig(width=4, hidden=4), (4, 16, 16), version=version),
                          trained / "reward" / version)
        write_latest(trained, version)

    reward_version("rm-1")
    argv = ["--model.base", tiny_cfg.model.base, "--model.controlnet", tiny_cfg.model.controlnet,
            "--model.models_dir", str(trained), "--store.samples_dir", tiny_cfg.store.samples_dir,
            "--data.prompts", "a man", "--data.poses", "standing", "--set", "sample.steps=3",
            "--set", "sample.width=64", "--set", "sample.height=64", "--eval.metrics", "brightness", "latent:latest",
            "--set", "eval.bootstrap=100"]
    name = "eval-run-0001-vs-base"
    report_dir = trained / "policies" / "run-0001" / "eval" / name
    assert evaluate_script.main(argv) == 0
    data = json.loads((report_dir / "metrics.json").read_text())
    latent = next(m for m in data["metrics"] if m["name"] == "latent")
    assert latent["reward_model_version"] == "rm-1" and latent["spec"] == "latent:version=rm-1"
    report = (report_dir / "report.md").read_text()
    command = data["command"]
    assert command in report and f"--eval.policy run-0001 --eval.baseline base --eval.name {name}" in command
    capsys.readouterr()

    # Both 'latest' pointers move on; re-running the evaluation by name switches neither.
    make_policy(trained, tiny_cfg.model, "run-0002")
    reward_version("rm-2")
    assert evaluate_script.main([*argv, "--eval.name", name]) == 0
    assert "'latest' is run-0002 now and is not used" in capsys.readouterr().err
    data = json.loads((report_dir / "metrics.json").read_text())
    assert data["candidate"] == "run-0001"
    assert next(m for m in data["metrics"] if m["name"] == "latent")["reward_model_version"] == "rm-1"
    assert not (trained / "policies" / "run-0002" / "eval").exists()
    # The exact command from the report runs as printed.
    assert evaluate_script.main(shlex.split(command)[2:]) == 0
    capsys.readouterr()

    for extra, needles in (
        (["--policy", "run-0002"], ["compares candidate run-0001 with baseline base",
                                    "--eval.policy run-0001 --eval.baseline base"]),
        (["--set", "sample.steps=2"], ["sample.steps is 3 in the evaluation but 2 now", "--set sample.steps=3",
                                       "pick another --eval.name"]),
    ):
        with pytest.raises(SystemExit) as exc:
            evaluate_script.main([*argv, "--eval.name", name, *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "exists with a different plan" not in err, err
        for needle in needles:
            assert needle in err, (needle, err)
    with db.session_scope(db.open_db(db.default_db_url(tiny_cfg.store.samples_dir))) as s:
        assert len(s.scalars(select(db.Round)).all()) == 2  # nothing was generated twice


def test_evaluations_with_one_seed_set_share_the_baseline_round(tiny_cfg, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    trained = tmp_path / "trained"
    make_policy(trained, tiny_cfg.model, "run-0001")
    make_policy(trained, tiny_cfg.model, "run-00002")
    argv = ["--model.base", tiny_cfg.model.base, "--model.controlnet", tiny_cfg.model.controlnet,
            "--model.models_dir", str(trained), "--store.samples_dir", tiny_cfg.store.samples_dir,
            "--data.prompts", "a man", "--data.poses", "standing", "sitting", "--set", "sample.steps=3",
            "--set", "sample.width=64", "--set", "sample.height=64", "--eval.metrics", "brightness",
            "--set", "eval.bootstrap=100", "--set", "eval.seeds=shared"]
    assert evaluate_script.main([*argv, "--eval.policy", "run-0001"]) == 0
    assert evaluate_script.main([*argv, "--eval.policy", "run-00002"]) == 0
    store = SampleStore(tiny_cfg.store.samples_dir)
    with db.session_scope(db.open_db(db.default_db_url(store.root))) as s:
        comps = {c.name: c for c in s.scalars(select(db.Comparison))}
        assert set(comps) == {"eval-run-0001-vs-base", "eval-run-00002-vs-base"}
        assert len(s.scalars(select(db.Round)).all()) == 3  # one baseline round for both
        a, b = comps.values()
        assert a.baseline_round_id == b.baseline_round_id and a.candidate_round_id != b.candidate_round_id
        assert a.baseline_round.name == "shared-baseline-base"
        seeds = [sorted(x.seed for x in r.samples) for r in (a.baseline_round, a.candidate_round, b.candidate_round)]
        assert seeds[0] == seeds[1] == seeds[2] and len(seeds[0]) == 4
    with pytest.raises(SystemExit):
        evaluate_script.main([*argv, "--eval.policy", "run-0001", "--set", "eval.seeds=../x"])
    assert "eval.seeds:" in capsys.readouterr().err
