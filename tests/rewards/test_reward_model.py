"""The learned reward model: learns a hidden rule from labels on real tiny-model latents, split, save/load, errors.

One round is generated once per module with the embedded tiny SD1.5 model (12 groups x 4 images, 64 px,
2 steps). Labels follow a HIDDEN RULE: the mean of latent channel 0 of the final latent. Two raters score
it on 5 levels, one harsh (level - 3) and one generous (level + 3); a third gives preferences (with ties
and skips). Every test is CPU-only and offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sqlalchemy import delete, select

from poseloop.data import db
from poseloop.config.reward import TrainRewardConfig
from poseloop.rewards.labels import LabelDataError, MissingTrajectoryError, load_labels, split_groups
from poseloop.rewards.model import LatentRewardModel, LatentShapeError, suggest_pairs
from poseloop.rewards.loading import load_reward_model
from poseloop.config.reward import RewardModelConfig
from poseloop.rewards.training import fit_ensemble, train_reward
from poseloop.data.store import SampleStore, load_trajectory


def hidden_rule(latent: torch.Tensor) -> float:
    """The quality the labels encode: mean of channel 0 of the final latent [C, h, w]."""
    return float(latent[0].float().mean())


def _label_round(samples_dir: Path) -> dict[int, float]:
    """Add harsh/generous scores and rule-derived preferences to every sample; return {sample id: rule}."""
    store = SampleStore(samples_dir)
    factory = db.open_db(db.default_db_url(samples_dir))
    with db.session_scope(factory) as s:
        samples = s.scalars(select(db.Sample).order_by(db.Sample.id)).all()
        rule = {x.id: hidden_rule(load_trajectory(store.abs(x.trajectory_path)).latents[-1]) for x in samples}
        vals = torch.tensor(list(rule.values()))
        mean, std = float(vals.mean()), float(vals.std())
        harsh, generous, pref = (db.get_or_create_rater(s, n) for n in ("harsh", "generous", "pref"))
        for x in samples:
            level = max(-2, min(2, round(1.5 * (rule[x.id] - mean) / std)))  # 5 levels, no clipping below
            s.add(db.Rating(rater_id=harsh.id, sample_id=x.id, score=float(level - 3)))
            s.add(db.Rating(rater_id=generous.id, sample_id=x.id, score=float(level + 3)))
        by_group: dict[int, list[int]] = {}
        for x in samples:
            by_group.setdefault(x.group_id, []).append(x.id)
        for k, ids in enumerate(by_group.values()):
            for i in range(len(ids)):
                for j in range(i + 1, len(ids)):
                    a, b = ids[i], ids[j]
                    d = rule[a] - rule[b]
                    choice = "tie" if abs(d) < 0.01 else ("a" if d > 0 else "b")
                    if k == 0 and (i, j) == (0, 1):
                        choice = "skip"
                    s.add(db.Preference(rater_id=pref.id, sample_a_id=a, sample_b_id=b, choice=choice))
    return rule


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A generated, labelled tiny round: {"samples_dir", "rule"}."""
    from poseloop.config.generation import tiny
    from poseloop.sampling.round import generate
    from poseloop.models.embedded import ensure_embedded

    root = tmp_path_factory.mktemp("reward")
    ensure_embedded(root / "tiny-sd15")
    cfg = tiny()
    cfg.model.base = str(root / "tiny-sd15")
    cfg.model.controlnet = str(root / "tiny-sd15" / "controlnet")
    cfg.sample.width = cfg.sample.height = 64
    cfg.sample.steps = 2
    cfg.sample.images_per_group = 4
    cfg.sample.batch_size = 16
    cfg.data.prompts = ["a dancer", "an astronaut"]
    cfg.data.poses = ["all"]
    cfg.data.max_groups = 12
    cfg.store.samples_dir = str(root / "samples")
    generate(cfg)
    rule = _label_round(root / "samples")
    return {"samples_dir": root / "samples", "rule": rule, "root": root}


def _cfg(samples_dir: Path, models_dir: Path, **train: object) -> TrainRewardConfig:
    cfg = TrainRewardConfig()
    cfg.data.samples_dir = str(samples_dir)
    cfg.output.models_dir = str(models_dir)
    cfg.train.epochs = 40
    cfg.train.patience = 40
    cfg.train.holdout_fraction = 0.25
    cfg.train.ensemble_size = 2
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.fixture(scope="module")
def trained(labelled: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """train_reward.main run end to end once: {"models_dir", "out"}."""
    import train_reward

    models_dir = tmp_path_factory.mktemp("models")
    rc = train_reward.main(["--data.samples_dir", str(labelled["samples_dir"]), "--output.models_dir", str(models_dir),
                            "--output.version", "v1", "--set", "train.epochs=40", "--set", "train.patience=40",
                            "--train.holdout_fraction", "0.25", "--train.ensemble_size", "3"])
    assert rc == 0
    return {"models_dir": models_dir}


def test_main_writes_a_complete_version(trained: dict, capsys: pytest.CaptureFixture[str]) -> None:
    folder = trained["models_dir"] / "reward" / "v1"
    names = {p.name for p in folder.iterdir()}
    assert {"weights.safetensors", "config.json", "metrics.json", "training_curve.png", "calibration.png"} <= names
    for png in ("training_curve.png", "calibration.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((trained["models_dir"] / "reward" / "latest").read_text()) == {"version": "v1"}
    config = json.loads((folder / "config.json").read_text())
    assert config["latent_shape"] == [4, 16, 16] and config["ensemble_size"] == 3  # 64 px, VAE x4
    assert config["training"]["train"]["holdout_fraction"] == 0.25  # the config that made it
    assert not any(p.name.startswith(".tmp") for p in (trained["models_dir"] / "reward").iterdir())


def test_learns_hidden_rule_well_above_baseline(trained: dict) -> None:
    m = json.loads((trained["models_dir"] / "reward" / "v1" / "metrics.json").read_text())
    assert m["n_groups"] == 12 and m["n_heldout_groups"] == 3
    assert m["n_scores"] == 96 and m["n_skipped_preferences"] == 1 and m["n_preferences"] == 71
    assert m["heldout_pairs"] >= 30
    assert m["heldout_pairwise_accuracy"] > 0.8
    assert m["heldout_pairwise_accuracy"] > m["baselines"]["constant"]["heldout_pairwise_accuracy"] + 0.25
    assert m["heldout_spearman"] > 0.7


def test_reload_latest_gives_identical_scores_and_gradients(trained: dict, labelled: dict) -> None:
    labels = load_labels(_cfg(labelled["samples_dir"], trained["models_dir"]).data)
    a = load_reward_model("latest", models_dir=trained["models_dir"])
    b = load_reward_model(trained["models_dir"] / "reward" / "v1")
    assert a.latent_shape == (4, 16, 16) and a.version == "v1"
    x = labels.latents[:8].clone().requires_grad_(True)
    s = a.score(x)
    assert s.shape == (8,)
    # Two loads of the same weights scored in separate passes: fp32 noise at most.
    torch.testing.assert_close(s.detach(), b.score(labels.latents[:8]), atol=1e-6, rtol=1e-6)
    s.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable wrt the input latent
    mean, std = a.score_with_uncertainty(labels.latents[:8])
    assert torch.allclose(mean, s.detach()) and (std > 0).all()
    # rank() scores again: a near-tie may swap under fp32 noise, so check the order it gives, not the indices.
    ranked = s.detach()[a.rank(labels.latents[:8])]
    assert (ranked[:-1] >= ranked[1:] - 1e-6).all() and sorted(a.rank(labels.latents[:8]).tolist()) == list(range(8))


def test_wrong_channel_count_is_a_clear_error(trained: dict) -> None:
    model = load_reward_model("v1", models_dir=trained["models_dir"])
    with pytest.raises(LatentShapeError, match=r"trained on 4-channel latents.*16-channel"):
        model.score(torch.zeros(2, 16, 8, 8))


def test_group_split_has_no_group_on_both_sides(labelled: dict, tmp_path: Path) -> None:
    labels = load_labels(_cfg(labelled["samples_dir"], tmp_path).data)
    for seed in range(5):
        split = split_groups(labels, 0.25, seed)
        assert not set(split.train_groups) & set(split.heldout_groups)
        assert len(split.heldout_groups) == 3 and len(split.train_groups) == 9
        train, held = split.sample_mask(labels, False), split.sample_mask(labels, True)
        assert not (train & held).any() and (train | held).all()
        # No (prompt, pose) on both sides, whatever the sample.
        assert not {labels.group_keys[g] for g in labels.group_of[train].tolist()} & \
            {labels.group_keys[g] for g in labels.group_of[held].tolist()}
    assert len(split_groups(labels, 0.01, 0).heldout_groups) == 1  # at least one group held out


def test_labels_ties_and_skips(labelled: dict, tmp_path: Path) -> None:
    labels = load_labels(_cfg(labelled["samples_dir"], tmp_path).data)
    assert set(labels.pref_target.tolist()) <= {0.0, 0.5, 1.0}
    assert labels.skipped_prefs == 1 and labels.pref_a.numel() == 12 * 6 - 1
    # Per-rater z-scores: the harsh and the generous rater's targets coincide sample by sample.
    harsh = labels.score_z[labels.score_raw < 0]
    generous = labels.score_z[labels.score_raw > 0]
    assert torch.allclose(harsh, generous, atol=1e-5)


def test_harsh_and_generous_rater_give_the_same_ranking(labelled: dict, tmp_path: Path) -> None:
    rankings = []
    for rater in ("harsh", "generous"):
        cfg = _cfg(labelled["samples_dir"], tmp_path, ensemble_size=1, epochs=15, patience=15)
        cfg.data.raters = [rater]
        cfg.data.labels = "scores"
        labels = load_labels(cfg.data)
        split = split_groups(labels, 0.25, 0)
        model, _ = fit_ensemble(labels, split, cfg, progress=False)
        held = split.sample_mask(labels, True)
        rankings.append(model.rank(labels.latents[held]))
    assert torch.equal(rankings[0], rankings[1])


def test_no_labels_is_a_clear_error(labelled: dict, tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(labelled["samples_dir"], samples)
    factory = db.open_db(db.default_db_url(samples))
    with db.session_scope(factory) as s:
        s.execute(delete(db.Rating))
        s.execute(delete(db.Preference))
    with pytest.raises(LabelDataError, match=r"python -m webapp"):
        train_reward(_cfg(samples, tmp_path / "models"), progress=False)
    with pytest.raises(LabelDataError, match=r"python -m webapp"):
        load_labels(_cfg(tmp_path / "nowhere", tmp_path).data)  # no database at all
    assert not (tmp_path / "models" / "reward").exists()


def test_missing_trajectory_names_the_file(labelled: dict, tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(labelled["samples_dir"], samples)
    victim = sorted((samples / "round-0001" / "trajectories").iterdir())[5]
    victim.unlink()
    with pytest.raises(MissingTrajectoryError, match=victim.name) as err:
        train_reward(_cfg(samples, tmp_path / "models"), progress=False)
    assert "generate.py" in str(err.value) and "--data.rounds" in str(err.value)


def test_too_few_groups_is_a_clear_error(labelled: dict, tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(labelled["samples_dir"], samples)
    factory = db.open_db(db.default_db_url(samples))
    with db.session_scope(factory) as s:
        first = s.scalar(select(db.Group.id).order_by(db.Group.id))
        keep = select(db.Sample.id).where(db.Sample.group_id == first)
        s.execute(delete(db.Rating).where(db.Rating.sample_id.not_in(keep)))
        s.execute(delete(db.Preference).where(db.Preference.sample_a_id.not_in(keep)))
    with pytest.raises(LabelDataError, match=r"too few groups.*1 \(prompt, pose\) group"):
        train_reward(_cfg(samples, tmp_path / "models"), progress=False)


def test_suggest_pairs_sorted_by_uncertainty() -> None:
    torch.manual_seed(0)
    model = LatentRewardModel(RewardModelConfig(), (4, 8, 8), ensemble_size=4).eval()
    x = torch.randn(6, 4, 8, 8)
    pairs = [(0, 1), (2, 3), (4, 5), (1, 4)]
    out = suggest_pairs(model, x, pairs)
    assert sorted((p.a, p.b) for p in out) == sorted(pairs)
    stds = [p.std for p in out]
    assert stds == sorted(stds, reverse=True) and stds[0] > 0
    with torch.no_grad():
        p, std = model.prefer_prob(x[[out[0].a]], x[[out[0].b]])
    assert abs(float(p) - out[0].p_a) < 1e-5 and abs(float(std) - out[0].std) < 1e-5
    assert len(suggest_pairs(model, x, pairs, top_k=2)) == 2


def test_score_images_encodes_with_the_vae(labelled: dict) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(labelled["root"] / "tiny-sd15" / "vae")).eval()
    model = LatentRewardModel(RewardModelConfig(), (4, 8, 8), ensemble_size=2).eval()
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        assert torch.allclose(model.score_images(images, vae), model.score(latents), atol=1e-5)


def test_images_without_trajectory_are_vae_encoded(labelled: dict, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from poseloop.rewards.model import encode_images

    samples = tmp_path / "samples"
    shutil.copytree(labelled["samples_dir"], samples)
    factory = db.open_db(db.default_db_url(samples))
    with db.session_scope(factory) as s:
        row = s.scalar(select(db.Sample).order_by(db.Sample.id))
        row.trajectory_path = None  # an imported image: only the PNG is known
        sid, image_path = row.id, row.image_path
    (samples / "round-0001" / "trajectories" / "g00000_s0.safetensors").unlink()
    # vae=None: the VAE of the model that made the round is loaded from the round's config.
    labels = load_labels(_cfg(samples, tmp_path).data)
    got = labels.latents[labels.sample_ids.index(sid)]
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(labelled["root"] / "tiny-sd15" / "vae")).eval()
    img = torch.from_numpy(np.asarray(Image.open(samples / image_path).convert("RGB"), dtype=np.float32) / 255)
    with torch.no_grad():
        want = encode_images(vae, img.permute(2, 0, 1)[None])[0]
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-4)


def test_a_handful_of_held_out_pairs_is_flagged_as_unreliable(labelled: dict, tmp_path: Path) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(labelled["samples_dir"], samples)
    factory = db.open_db(db.default_db_url(samples))
    with db.session_scope(factory) as s:
        two_groups = select(db.Sample.id).join(db.Group).where(db.Group.index < 2)
        s.execute(delete(db.Rating).where(db.Rating.sample_id.not_in(two_groups)))
        s.execute(delete(db.Preference).where(db.Preference.sample_a_id.not_in(two_groups)))
    result = train_reward(_cfg(samples, tmp_path / "models", ensemble_size=1, epochs=3), progress=False)
    metrics = json.loads((result.folder / "metrics.json").read_text())
    assert metrics["heldout_pairs"] < 20
    assert "not reliable" in metrics["warning"]


# ---- objective weights and the overfitting advice (no model run needed) ----------------------------------


def test_score_weight_scales_the_score_loss(tmp_path: Path) -> None:
    from fake_samples import make_samples
    from poseloop.rewards.training import _items_loss, make_items

    make_samples(tmp_path / "samples")
    cfg = _cfg(tmp_path / "samples", tmp_path / "models")
    labels = load_labels(cfg.data)
    everything = torch.ones(len(labels.sample_ids), dtype=torch.bool)
    scores = torch.randn(len(labels.sample_ids), generator=torch.Generator().manual_seed(0))

    def objective(score_weight: float, kind: str) -> float:
        cfg.train.score_weight, cfg.train.score_loss = score_weight, kind
        cfg.data.labels = "scores"
        return _items_loss(scores, make_items(load_labels(cfg.data), everything, cfg.train))

    for kind in ("mse", "ranking"):  # the default (mse) used to ignore the weight entirely
        base = objective(1.0, kind)
        assert base > 0
        assert objective(0.1, kind) == pytest.approx(0.1 * base, rel=1e-5), kind
        assert objective(5.0, kind) == pytest.approx(5.0 * base, rel=1e-5), kind

    # With preferences too, the objective is linear in score_weight with the score term as slope.
    cfg.data.labels = "both"
    cfg.train.score_loss = "mse"
    values = []
    for w in (0.1, 1.0, 5.0):
        cfg.train.score_weight = w
        values.append(_items_loss(scores, make_items(labels, everything, cfg.train)))
    assert (values[2] - values[1]) / 4.0 == pytest.approx((values[1] - values[0]) / 0.9, rel=1e-4)
    assert values[2] > values[1] > values[0]


def _overfitting_metrics(arch: str) -> dict:
    """reward_report.evaluate on labels where the model orders every training pair right and every held-out one wrong."""
    from poseloop.rewards.labels import GroupSplit, LabelSet
    from poseloop.rewards.report import evaluate as evaluate_reward
    from poseloop.rewards.fit_data import MemberHistory

    n = 8  # 4 groups x 2 samples; value of sample i = i
    latents = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 4, 2, 2).clone()
    latents += 0.01 * torch.randn(n, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    a, b = torch.tensor([0, 2, 4, 6]), torch.tensor([1, 3, 5, 7])
    target = torch.tensor([0.0, 0.0, 0.0, 1.0])  # b wins in the training groups 0-2; a "wins" in held-out group 3
    labels = LabelSet(sample_ids=list(range(n)), latents=latents, group_of=torch.arange(n) // 2,
                      group_keys=[(f"p{g}", "pose") for g in range(4)], score_idx=torch.zeros(0, dtype=torch.long),
                      score_rater=torch.zeros(0, dtype=torch.long), score_raw=torch.zeros(0), score_z=torch.zeros(0),
                      pref_a=a, pref_b=b, pref_target=target, pref_rater=torch.zeros(4, dtype=torch.long),
                      rounds=["r"], raters=["x"])

    class ByValue(torch.nn.Module):
        def score(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 0].mean(dim=(1, 2))

    cfg = TrainRewardConfig()
    cfg.model.arch = arch
    if arch == "almostperfect":
        cfg.train.weight_decay = 0.0
    hist = [MemberHistory([1.0], [1.0], [1.0], [0.0], 0, 0.1)]
    return evaluate_reward(ByValue(), labels, GroupSplit([0, 1, 2], [3]), hist, cfg)  # type: ignore[arg-type]


def test_overfitting_advice_names_fields_that_help() -> None:
    m = _overfitting_metrics("improved")
    assert m["train_pairwise_accuracy"] == 1.0 and m["heldout_pairwise_accuracy"] == 0.0
    warning = m["warning"]
    assert warning.startswith("overfitting:")
    # improved is the default: advising it would change nothing.
    assert "--model.arch" not in warning
    for advice in ("Label more images", "--model.width 16 --model.hidden 32", "--model.dropout 0.4",
                   "--train.weight_decay 0.001", "--train.patience 7"):
        assert advice in warning, advice
    ap = _overfitting_metrics("almostperfect")["warning"]
    # AlmostPerfect's net has no width/dropout; the improved net is what is smaller there.
    assert "--model.arch improved" in ap and "--model.width" not in ap and "--train.weight_decay 0.001" in ap
