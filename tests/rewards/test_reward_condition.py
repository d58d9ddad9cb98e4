"""The conditioned reward model kind: training, the folder format, score() with conditions, every caller, errors.

One tiny round (8 groups x 4 images, 64 px, 2 steps) labelled by a rule on the latents (test_reward_model's hidden
rule); whether the condition helps a rater is the learning check's question (tests/test_learning.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlalchemy import select, update

from poseloop.data import db
from poseloop.rewards.conditioned import ConditionMissingError, ConditionedRewardModel, pose_map
from poseloop.rewards.model import suggest_pairs
from poseloop.rewards.loading import load_reward_model
from poseloop.rewards.versions import reward_model_kind
from poseloop.data.store import SampleStore, load_trajectory
from test_reward_model import _label_round


@pytest.fixture(scope="module")
def round_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated tiny round with harsh/generous scores and preferences; returns its root."""
    from poseloop.config.generation import tiny
    from poseloop.sampling.round import generate
    from poseloop.models.embedded import ensure_embedded

    root = tmp_path_factory.mktemp("cond")
    ensure_embedded(root / "tiny-sd15")
    cfg = tiny()
    cfg.model.base = str(root / "tiny-sd15")
    cfg.model.controlnet = str(root / "tiny-sd15" / "controlnet")
    cfg.sample.steps = 2
    cfg.sample.images_per_group = 4
    cfg.data.prompts = ["a person in a red shirt and blue trousers, on a beach",
                        "a person in a green shirt and white trousers, in a forest"]
    cfg.data.poses = ["all"]
    cfg.data.max_groups = 8
    cfg.store.samples_dir = str(root / "samples")
    generate(cfg)
    _label_round(root / "samples")
    return root


@pytest.fixture(scope="module")
def trained(round_dir: Path) -> Path:
    """train_reward.main with --model.kind conditioned, end to end: the version folder."""
    import train_reward

    assert train_reward.main(["--data.samples_dir", str(round_dir / "samples"), "--output.models_dir",
                              str(round_dir / "models"), "--output.version", "c1", "--model.kind", "conditioned",
                              "--set", "train.epochs=6", "--train.ensemble_size", "2",
                              "--train.holdout_fraction", "0.25"]) == 0
    return round_dir / "models" / "reward" / "c1"


def _round_inputs(round_dir: Path) -> tuple[torch.Tensor, list[str], list[dict]]:
    store = SampleStore(round_dir / "samples")
    with db.session_scope(db.open_db(db.default_db_url(round_dir / "samples"))) as s:
        rows = s.execute(select(db.Sample.trajectory_path, db.Group.prompt, db.Group.keypoints_json, db.Sample.width,
                                db.Sample.height).join(db.Group, db.Sample.group_id == db.Group.id)
                         .order_by(db.Sample.id)).all()
    lat = torch.stack([load_trajectory(store.abs(r[0])).latents[-1].float() for r in rows])
    return lat, [r[1] for r in rows], [{"keypoints": json.loads(r[2]), "width": r[3], "height": r[4]} for r in rows]


def test_a_conditioned_version_has_the_folder_format_and_the_shuffled_report(trained: Path) -> None:
    assert reward_model_kind(trained) == "conditioned"
    config = json.loads((trained / "config.json").read_text())
    assert config["format"] == "poseloop.reward/1" and config["kind"] == "conditioned"
    assert config["latent_shape"] == [4, 16, 16] and config["ensemble_size"] == 2 and config["vae_scale"] == 4
    assert Path(config["text_model"]["base"]).is_absolute() and len(config["text_probe"]) == 16
    m = json.loads((trained / "metrics.json").read_text())
    assert m["kind"] == "conditioned" and m["heldout_pairs"] > 0
    shuffled = m["condition_shuffled"]
    assert 0 <= shuffled["heldout_pairwise_accuracy"] <= 1 and -1 <= shuffled["heldout_spearman"] <= 1


def test_score_reads_the_condition_is_differentiable_and_refuses_none(trained: Path, round_dir: Path) -> None:
    model = load_reward_model(trained)
    assert isinstance(model, ConditionedRewardModel) and model.conditioned
    lat, prompts, meta = _round_inputs(round_dir)
    x = lat[:6].clone().requires_grad_(True)
    r = model.score(x, prompts[:6], meta[:6])
    assert r.shape == (6,)
    r.sum().backward()  # ReFL / DRaFT: gradients reach the latents
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    with torch.no_grad():
        # Another group's pose and prompt give another score (the members read them).
        other = model.score(lat[:6], prompts[-6:], meta[-6:])
        assert not torch.allclose(other, r.detach(), atol=1e-6)
        mean, std = model.score_with_uncertainty(lat[:6], prompts[:6], meta[:6])
        assert torch.allclose(mean, r.detach(), atol=1e-5) and bool((std >= 0).all())
    with pytest.raises(ConditionMissingError, match="needs each sample's prompt and metadata"):
        model.score(lat[:2])
    out = suggest_pairs(model, lat[:4], [(0, 1), (2, 3)], prompts=prompts[:4], metadata=meta[:4])
    assert len(out) == 2 and out[0].std >= out[1].std


def test_the_latent_reward_spec_passes_prompts_and_poses(trained: Path, round_dir: Path) -> None:
    from poseloop.rewards.spec import build_reward

    lat, prompts, meta = _round_inputs(round_dir)
    reward = build_reward(f"latent:{trained}")
    with torch.no_grad():
        got = reward(None, lat[:4], prompts[:4], meta[:4])
        want = load_reward_model(trained).score(lat[:4], prompts[:4], meta[:4])
    assert torch.allclose(got, want, atol=1e-5)


def test_pose_map_is_the_condition_image_on_the_latent_grid(round_dir: Path) -> None:
    _, _, meta = _round_inputs(round_dir)
    m = pose_map(meta[0]["keypoints"], 64, 64, (16, 16))
    assert m.shape == (3, 16, 16) and float(m.max()) > 0.2 and float(m.min()) == 0.0
    assert float(pose_map(None, 64, 64, (16, 16)).abs().sum()) == 0.0
    # The trainer passes dicts, the DB a JSON string, a caller may pass Poses: one map (the same rendering).
    from poseloop.data.poses import Pose

    poses = [Pose.from_dict(d) for d in meta[0]["keypoints"]]
    assert torch.equal(pose_map(poses, 64, 64, (16, 16)), m)
    assert torch.equal(pose_map(json.dumps(meta[0]["keypoints"]), 64, 64, (16, 16)), m)


def test_samples_without_stored_poses_are_named_and_the_latent_kind_still_trains(
        round_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    import train_reward

    samples = tmp_path / "samples"
    shutil.copytree(round_dir / "samples", samples)
    with db.session_scope(db.open_db(db.default_db_url(samples))) as s:  # a round from a version before keypoints
        s.execute(update(db.Group).values(keypoints_json=None))
    with pytest.raises(SystemExit) as exc:
        train_reward.main(["--data.samples_dir", str(samples), "--output.models_dir", str(tmp_path / "m"),
                           "--model.kind", "conditioned", "--set", "train.epochs=1", "--train.ensemble_size", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "32 of 32 labelled samples have no stored pose keypoints" in err
    assert "--model.kind latent" in err
    assert not (tmp_path / "m" / "reward").exists() or not any((tmp_path / "m" / "reward").iterdir())
    assert train_reward.main(["--data.samples_dir", str(samples), "--output.models_dir", str(tmp_path / "m"),
                              "--model.kind", "latent", "--set", "train.epochs=1", "--train.ensemble_size", "1",
                              "--output.version", "l1"]) == 0
    assert reward_model_kind(tmp_path / "m" / "reward" / "l1") == "latent"


def test_a_changed_text_encoder_is_refused_on_load(trained: Path, tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "c1"
    shutil.copytree(trained, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_probe"] = [v + 0.5 for v in config["text_probe"]]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not the one it was trained with"):
        load_reward_model(folder)


def test_conditioned_needs_the_improved_network() -> None:
    from poseloop.config.lib import ConfigError
    from poseloop.config.reward import RewardModelConfig

    with pytest.raises(ConfigError, match="model.arch: the conditioned kind builds on the improved network"):
        RewardModelConfig(kind="conditioned", arch="almostperfect").validate()
