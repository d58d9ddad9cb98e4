"""generate.py end to end on the tiny models: files, rows, resume, every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from sqlalchemy import select

import generate as generate_script
from poseloop.data import db
from poseloop.sampling import round as generation
from poseloop.sampling import sampler as sampling
from poseloop.config.generation import GenerateConfig
from poseloop.config.lib import ConfigError
from poseloop.sampling.round import generate
from poseloop.data.inputs import InputError
from poseloop.models.loading import load_components
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose
from poseloop.data.store import SampleStore, load_trajectory
from tiny_helpers import assert_round_is_consistent, session_for, snapshot


def test_generate_writes_files_then_rows_and_trajectories_rescore_exactly(tiny_cfg: GenerateConfig) -> None:
    result = generate(tiny_cfg)
    assert result.samples_new == result.samples_total == 4
    assert "4 new images" in result.summary() and "s/image" in result.summary()
    assert_round_is_consistent(tiny_cfg, result.round_name, 4)

    store = SampleStore(tiny_cfg.store.samples_dir)
    comp = load_components(tiny_cfg.model)
    with db.session_scope(session_for(tiny_cfg)) as s:
        sample = s.scalars(select(db.Sample).order_by(db.Sample.id)).all()[3]
        group = sample.group
        assert group.pose_name == "sitting"
        assert group.keypoints == [get_builtin_pose("sitting").to_dict()]
        traj = load_trajectory(store.abs(sample.trajectory_path))  # type: ignore[arg-type]
        pose_image = Image.open(store.abs(group.condition_path)).convert("RGB")
        image = Image.open(store.abs(sample.image_path)).convert("RGB")
        prompt = group.prompt
    # The stored final latent decodes to the stored image.
    decoded = sampling.to_pil(sampling.decode_latents(comp, traj.latents[-1:].float()))[0]
    diff = torch.tensor(list(decoded.getdata())) - torch.tensor(list(image.getdata()))
    assert diff.abs().max().item() <= 1
    # Re-scoring a stored transition with the same weights reproduces the stored log-prob.
    cond = sampling.make_conditioning(comp, [prompt], [pose_image], tiny_cfg.sample, 64, 64)
    with torch.no_grad():
        for step in (0, 3):
            lp = sampling.rescore(comp, cond, traj.latents[None], traj.timesteps, step, tiny_cfg.sample)
            assert lp.item() == pytest.approx(traj.log_probs[step].item(), abs=1e-5)


def test_sdxl_generates_and_stores_a_round(tiny_sdxl_cfg: GenerateConfig) -> None:
    tiny_sdxl_cfg.data.poses = ["arms_raised"]
    result = generate(tiny_sdxl_cfg)
    assert_round_is_consistent(tiny_sdxl_cfg, result.round_name, 2)
    with db.session_scope(session_for(tiny_sdxl_cfg)) as s:
        rnd = s.scalar(select(db.Round))
        assert rnd is not None and rnd.arch == "sdxl"


def test_an_interrupted_run_resumes_without_duplicates_or_orphans(
    tiny_cfg: GenerateConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_cfg.sample.batch_size = 2
    real_save = generation.save_trajectory
    calls = {"n": 0}

    def crash_on_third(traj, path):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:  # second batch: its first image file is written, its trajectory is not
            raise KeyboardInterrupt
        real_save(traj, path)

    monkeypatch.setattr(generation, "save_trajectory", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        generate(tiny_cfg)
    counts, files = snapshot(tiny_cfg)
    assert counts["samples"] == 2  # the first batch only
    assert any(f.endswith("g00001_s0.png") for f in files)  # a file without a row
    monkeypatch.setattr(generation, "save_trajectory", real_save)

    resumed = generate(tiny_cfg)
    assert resumed.round_name == "round-0001"
    assert resumed.samples_new == 2
    assert_round_is_consistent(tiny_cfg, "round-0001", 4)

    # The resumed round equals one that was never interrupted (same seeds, same latents).
    tiny_cfg.store.samples_dir = str(tmp_path / "clean")
    generate(tiny_cfg)
    a, b = SampleStore(tmp_path / "samples"), SampleStore(tmp_path / "clean")
    for g in range(2):
        for k in range(2):
            ta = load_trajectory(a.trajectory_path("round-0001", g, k))
            tb = load_trajectory(b.trajectory_path("round-0001", g, k))
            assert ta.metadata["seed"] == tb.metadata["seed"]
            torch.testing.assert_close(ta.latents.float(), tb.latents.float(), atol=0.1, rtol=0)

    # A second plain run starts a new round with new seeds instead of repeating the first.
    again = generate(tiny_cfg)
    assert again.round_name == "round-0002"


def write_jsonl(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_dataset_uses_condition_images_as_given(tiny_cfg: GenerateConfig, tmp_path: Path) -> None:
    render_pose(get_builtin_pose("waving"), 64, 64).save(tmp_path / "cond.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "photo.png")
    tiny_cfg.data.dataset = str(write_jsonl(tmp_path, [
        json.dumps({"image": "photo.png", "condition_image": "cond.png", "text": "a waving man"}),
        "",
        json.dumps({"condition_image": "cond.png", "text": "a waving woman"}),
    ]))
    result = generate(tiny_cfg)
    assert_round_is_consistent(tiny_cfg, result.round_name, 4)
    store = SampleStore(tiny_cfg.store.samples_dir)
    with db.session_scope(session_for(tiny_cfg)) as s:
        groups = s.scalars(select(db.Group).order_by(db.Group.index)).all()
        assert [g.prompt for g in groups] == ["a waving man", "a waving woman"]
        # Relative to the samples folder like every stored path: the photo is copied into the round.
        source = groups[0].source_image_path
        assert source is not None and source.startswith("round-0001/sources/photo-") and source.endswith(".png")
        assert store.abs(source).read_bytes() == (tmp_path / "photo.png").read_bytes()
        assert groups[1].source_image_path is None
        assert groups[0].keypoints is None  # only an image was given
        stored = Image.open(store.abs(groups[0].condition_path)).convert("RGB")
    assert list(stored.getdata()) == list(Image.open(tmp_path / "cond.png").convert("RGB").getdata())
    # The folder can be moved: the copy moves with it (the original photo may be gone by then).
    (tmp_path / "photo.png").unlink()
    moved = tmp_path / "moved"
    Path(tiny_cfg.store.samples_dir).rename(moved)
    assert SampleStore(moved).abs(source).is_file()


def test_a_source_photo_inside_the_samples_folder_is_referenced_not_copied(tiny_cfg: GenerateConfig,
                                                                            tmp_path: Path) -> None:
    samples = Path(tiny_cfg.store.samples_dir)
    (samples / "photos").mkdir(parents=True)
    render_pose(get_builtin_pose("waving"), 64, 64).save(tmp_path / "cond.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(samples / "photos" / "p.png")
    tiny_cfg.data.dataset = str(write_jsonl(tmp_path, [
        json.dumps({"image": str(samples / "photos" / "p.png"), "condition_image": "cond.png", "text": "a man"})]))
    generate(tiny_cfg)
    with db.session_scope(session_for(tiny_cfg)) as s:
        assert s.scalar(select(db.Group.source_image_path)) == "photos/p.png"
    assert not (samples / "round-0001" / "sources").exists()


def test_keypoint_files_become_ground_truth(tiny_cfg: GenerateConfig, tmp_path: Path) -> None:
    body = get_builtin_pose("t_pose").body
    flat = []
    for x, y, c in body.tolist():
        flat += [x * 640, y * 480, c]
    (tmp_path / "kp.json").write_text(json.dumps({"canvas_width": 640, "canvas_height": 480,
                                                  "people": [{"pose_keypoints_2d": flat}]}))
    tiny_cfg.data.poses = []
    tiny_cfg.data.keypoints = [str(tmp_path / "kp.json")]
    generate(tiny_cfg)
    with db.session_scope(session_for(tiny_cfg)) as s:
        group = s.scalar(select(db.Group))
        assert group is not None and group.pose_name == "kp"
        got = torch.tensor(group.keypoints[0]["body"])  # type: ignore[index]
    torch.testing.assert_close(got, torch.tensor(body), atol=1e-4, rtol=0)


def _bad_inputs(tmp_path: Path) -> list[tuple[str, dict[str, object], type[Exception], str]]:
    render_pose(get_builtin_pose("standing"), 64, 64).save(tmp_path / "ok.png")
    (tmp_path / "bad_kp.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [0.5] * 51}]}))
    malformed = write_jsonl(tmp_path, [json.dumps({"condition_image": "ok.png", "text": "x"}), '{"text": "oops"'])
    (tmp_path / "missing.jsonl").write_text(json.dumps({"condition_image": "nope.png", "text": "x"}) + "\n")
    return [
        ("malformed jsonl line", {"dataset": str(malformed)}, InputError, "data.jsonl:2"),
        ("missing condition image", {"dataset": str(tmp_path / "missing.jsonl")}, InputError, "nope.png"),
        ("unknown pose", {"poses": ["moonwalk"]}, InputError, "moonwalk"),
        ("keypoints of the wrong shape", {"poses": [], "keypoints": [str(tmp_path / "bad_kp.json")]},
         InputError, "bad_kp.json"),
    ]


def test_each_bad_input_fails_before_work_and_touches_nothing(tiny_cfg: GenerateConfig, tmp_path: Path) -> None:
    generate(tiny_cfg)
    before = snapshot(tiny_cfg)
    for label, data_overrides, exc, needle in _bad_inputs(tmp_path):
        for key, value in data_overrides.items():
            setattr(tiny_cfg.data, key, value)
        with pytest.raises(exc) as info:
            generate(tiny_cfg)
        assert needle in str(info.value), label
        assert snapshot(tiny_cfg) == before, label
        tiny_cfg.data.dataset, tiny_cfg.data.poses, tiny_cfg.data.keypoints = "", ["standing"], []
    # A resolution the model cannot take (tiny model: multiples of 16).
    tiny_cfg.sample.width = 72
    with pytest.raises(ConfigError, match="sample.width: 72 is not a multiple of 16"):
        generate(tiny_cfg)
    assert snapshot(tiny_cfg) == before


def test_main_runs_in_process_and_reports_errors_cleanly(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--model.base", str(models_dir / "tiny-sd15"), "--model.controlnet",
            str(models_dir / "tiny-sd15" / "controlnet"), "--store.samples_dir", str(tmp_path / "s"),
            "--set", "sample.steps=2", "--set", "sample.width=64", "--set", "sample.height=64",
            "--data.poses", "jumping", "--data.prompts", "a jumping kid", "--set", "sample.images_per_group=2"]
    assert generate_script.main(base) == 0
    assert "round-0001: 2 new images" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        generate_script.main([*base, "--data.poses", "moonwalk"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "moonwalk" in err and "Traceback" not in err


def test_generate_with_a_trained_policy_records_its_version(tiny_cfg: GenerateConfig, tmp_path: Path) -> None:
    from peft import LoraConfig

    from poseloop.policy.export import save_kohya_lora
    from poseloop.models.policy_files import kohya_lora_name

    comp = load_components(tiny_cfg.model)
    torch.manual_seed(0)
    comp.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    version_dir = tmp_path / "models" / "policies" / "run-0001"
    save_kohya_lora(comp.unet, version_dir / kohya_lora_name("run-0001"))
    (tmp_path / "models" / "policies" / "latest").write_text("run-0001\n")
    tiny_cfg.model.models_dir = str(tmp_path / "models")
    tiny_cfg.data.poses = ["standing"]

    tiny_cfg.sample.seed_namespace = "eval"
    tiny_cfg.store.round = "baseline"
    generate(tiny_cfg)
    tiny_cfg.model.policy = "latest"
    tiny_cfg.store.round = "candidate"
    generate(tiny_cfg)
    assert tiny_cfg.model.policy == "latest" and tiny_cfg.model.lora == ""  # caller's config untouched

    store = SampleStore(tiny_cfg.store.samples_dir)
    with db.session_scope(session_for(tiny_cfg)) as s:
        rounds = {r.name: r for r in s.scalars(select(db.Round))}
        assert rounds["baseline"].policy_version is None
        assert rounds["candidate"].policy_version == "run-0001"
        assert rounds["candidate"].lora_path == str(version_dir / kohya_lora_name("run-0001"))
        by_round = {name: sorted((x.group.index, x.index, x.seed, x.trajectory_path) for x in r.samples)
                    for name, r in rounds.items()}
    # Same seed namespace: the same seeds, so the two rounds differ only by the weights.
    assert [x[:3] for x in by_round["baseline"]] == [x[:3] for x in by_round["candidate"]]
    base = load_trajectory(store.abs(by_round["baseline"][0][3]))
    cand = load_trajectory(store.abs(by_round["candidate"][0][3]))
    assert torch.equal(base.latents[0], cand.latents[0])  # same x_T
    assert not torch.allclose(base.latents[-1].float(), cand.latents[-1].float(), atol=1e-2)


def test_an_unknown_policy_version_lists_the_available_ones(tiny_cfg: GenerateConfig, tmp_path: Path) -> None:
    (tmp_path / "models" / "policies" / "run-0001").mkdir(parents=True)
    tiny_cfg.model.models_dir = str(tmp_path / "models")
    tiny_cfg.model.policy = "run-9999"
    with pytest.raises(ConfigError, match="available: run-0001"):
        generate(tiny_cfg)
    tiny_cfg.model.policy = "latest"
    with pytest.raises(ConfigError, match="train one with train_policy.py"):
        generate(tiny_cfg)


def test_rerunning_a_round_regenerates_missing_files_and_keeps_rows(tiny_cfg: GenerateConfig) -> None:
    first = generate(tiny_cfg)
    store = SampleStore(tiny_cfg.store.samples_dir)
    with db.session_scope(session_for(tiny_cfg)) as s:
        sample = s.scalars(select(db.Sample).order_by(db.Sample.id)).first()
        assert sample is not None
        sample_id, traj_rel, image_rel = sample.id, sample.trajectory_path, sample.image_path
        rater = db.get_or_create_rater(s, "ann")
        s.add(db.Rating(rater_id=rater.id, sample_id=sample_id, score=3))
    before = load_trajectory(store.abs(traj_rel))  # type: ignore[arg-type]
    store.abs(traj_rel).unlink()  # type: ignore[arg-type]
    store.abs(image_rel).unlink()
    tiny_cfg.store.round = first.round_name
    again = generate(tiny_cfg)
    assert (again.samples_new, again.samples_repaired) == (0, 1)
    assert "1 missing files regenerated" in again.summary()
    assert_round_is_consistent(tiny_cfg, first.round_name, 4)
    after = load_trajectory(store.abs(traj_rel))  # type: ignore[arg-type]
    torch.testing.assert_close(after.latents.float(), before.latents.float(), atol=0.1, rtol=0)
    with db.session_scope(session_for(tiny_cfg)) as s:
        assert s.scalar(select(db.Rating.sample_id)) == sample_id  # the label survived


# ---- bad environments: encodings, read-only folders, full disks, signals --------------------------------


def _main_argv(models_dir: Path, samples: Path, *extra: str) -> list[str]:
    return ["--model.base", str(models_dir / "tiny-sd15"), "--model.controlnet", str(models_dir / "tiny-sd15" / "controlnet"),
            "--store.samples_dir", str(samples), "--set", "sample.steps=2", "--set", "sample.width=64",
            "--set", "sample.height=64", "--data.poses", "standing", "sitting", "--data.prompts", "a kid",
            "--set", "sample.images_per_group=2", "--set", "sample.batch_size=2", *extra]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_nan_setting_is_refused_before_anything_is_written(tiny_cfg: GenerateConfig) -> None:
    tiny_cfg.sample.guidance_scale = float("nan")  # passed validate() (nan < 1 is False), then broke the rows
    with pytest.raises(ConfigError, match="sample.guidance_scale: must be a finite number"):
        generate(tiny_cfg)
    assert not Path(tiny_cfg.store.samples_dir).exists()


def test_a_prompts_file_that_is_not_utf8_is_one_line_naming_file_and_line(
    models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a dancer\nun caf\u00e9 la nuit\n".encode("latin-1"))
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(b'{"condition_image": "x.png", "text": "caf\xe9"}\n')
    for flag, path, line in (("--data.prompts_file", prompts, 2), ("--data.dataset", jsonl, 1)):
        with pytest.raises(SystemExit) as exc:
            generate_script.main(_main_argv(models_dir, tmp_path / "s", flag, str(path)))
        assert exc.value.code == 2
        msg = _one_error_line(capsys)
        assert f"{path}:{line}:" in msg and "not UTF-8" in msg and "save it as UTF-8" in msg
    assert not (tmp_path / "s").exists()


def test_a_full_disk_stops_with_one_line_keeps_what_was_stored_and_resumes(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno

    samples = tmp_path / "s"
    argv = _main_argv(models_dir, samples)
    assert generate_script.main([*argv, "--store.round", "first"]) == 0
    capsys.readouterr()
    first = SampleStore(samples)
    before = sorted(p for p in (samples / "first").rglob("*") if p.is_file())
    real_save = Image.Image.save
    calls = {"n": 0}

    def fill_up(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] > 3:  # two pose images and the first image fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fill_up)
    with pytest.raises(SystemExit) as exc:
        generate_script.main([*argv, "--store.round", "second"])
    assert exc.value.code == 2
    msg = _one_error_line(capsys)
    assert "no space left" in msg and str(samples) in msg and "run the same command again" in msg
    # The finished round is untouched and no half file or temporary is left anywhere.
    assert sorted(p for p in (samples / "first").rglob("*") if p.is_file()) == before
    assert not list(samples.rglob("*.tmp"))
    with db.session_scope(db.open_db(db.default_db_url(samples))) as s:
        second = s.scalar(select(db.Round).where(db.Round.name == "second"))
        assert second is not None and second.status == "running"
        for row in s.scalars(select(db.Sample).where(db.Sample.round_id == second.id)):
            assert first.abs(row.image_path).is_file()  # a row only for complete files
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert generate_script.main([*argv, "--store.round", "second"]) == 0  # space freed: the same command resumes
    assert "second: 4 new images" in capsys.readouterr().out


def test_a_read_only_samples_folder_is_one_line_and_changes_nothing(
    models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import errno
    import tempfile

    samples = tmp_path / "s"
    argv = _main_argv(models_dir, samples)
    assert generate_script.main(argv) == 0
    capsys.readouterr()
    files = sorted(p for p in samples.rglob("*") if p.is_file() and "feedback" not in p.name)
    samples.chmod(0o555)

    # Tests run as root, where chmod does not stop writes: make file creation fail as it would for a user.
    def denied(*args: object, dir: object = None, **kwargs: object) -> tuple[int, str]:
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    try:
        with pytest.raises(SystemExit) as exc:
            generate_script.main(argv)
    finally:
        samples.chmod(0o755)
    assert exc.value.code == 2
    msg = _one_error_line(capsys)
    assert "cannot write" in msg and "chmod -R u+w" in msg and "nothing stored was changed" in msg
    assert sorted(p for p in samples.rglob("*") if p.is_file() and "feedback" not in p.name) == files


def test_sigterm_cleans_up_and_exits_non_zero(models_dir: Path, tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    samples = tmp_path / "s"
    argv = _main_argv(models_dir, samples, "--set", "sample.steps=500", "--set", "sample.images_per_group=8")
    root = Path(generate_script.__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, str(root / "generate.py"), *argv], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (samples / "round-0001" / "poses").is_dir():  # pose images come right before sampling
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "generate.py did not start sampling"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err  # killed by the signal it would be -15; status 0 would hide the stop
    assert "stopped by SIGTERM" in err and "run the same command again" in err
    assert not list(samples.rglob("*.tmp"))  # atomic writes removed their temporaries on the way out
    with db.session_scope(db.open_db(db.default_db_url(samples))) as s:
        rnd = s.scalar(select(db.Round))
        assert rnd is not None and rnd.status == "running"
        store = SampleStore(samples)
        for row in s.scalars(select(db.Sample)):
            assert store.abs(row.image_path).is_file() and store.abs(row.trajectory_path).is_file()  # type: ignore[arg-type]


def test_a_named_round_with_another_plan_says_what_differs_and_what_to_pass(tiny_cfg: GenerateConfig) -> None:
    from poseloop.sampling.round import PlanMismatchError

    tiny_cfg.data.poses = ["standing"]
    tiny_cfg.store.round = "mine"
    generate(tiny_cfg)
    tiny_cfg.sample.steps = 3
    tiny_cfg.sample.guidance_scale = 7.0
    tiny_cfg.sample.batch_size = 1  # batching does not change the plan and is not reported
    with pytest.raises(PlanMismatchError) as err:
        generate(tiny_cfg)
    msg = str(err.value)
    assert "sample.steps is 4 in the round but 3 now" in msg and "sample.guidance_scale is 5.0 in the round" in msg
    assert "--set sample.steps=4 --set sample.guidance_scale=5.0" in msg and "batch_size" not in msg
    assert "pick a new --store.round name" in msg and "\n" not in msg


def test_loop_rounds_are_numbered_without_evaluation_or_named_rounds(tmp_path: Path) -> None:
    assert db.next_loop_round([]) == 1
    # The loop of issue 31: round 1, two sides of an evaluation, a named round, round 2 -> the next is round 3.
    names = ["round-0001", "eval-a-vs-base-baseline", "eval-a-vs-base-candidate", "labelled", "round-0002"]
    assert db.next_loop_round(names) == 3
    assert [db.loop_round_number(n) for n in ("round-0012", "round-12", "round-0001-x", "eval-round-0003")] == \
        [12, None, None, None]
    factory = db.open_db(db.default_db_url(tmp_path))
    cfg = GenerateConfig()
    with db.session_scope(factory) as s:
        for name in names:
            s.add(db.Round(name=name, status="complete", arch="sd15", base_model="b", controlnet_model="c",
                           plan_hash="0" * 64, config_json="{}"))
    with db.session_scope(factory) as s:
        assert generation.open_round(s, cfg, "1" * 64, 4).name == "round-0003"
