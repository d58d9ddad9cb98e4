"""Policy training on the tiny model: first PPO ratio 1 (fp32 and bf16), DDPO and D3PO learn, resume, bad input."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from poseloop.policy.algos import Trainer
from poseloop.config.lib import ConfigError
from poseloop.evaluation.compare import bootstrap_ci
from poseloop.models.policy_files import kohya_lora_name
from poseloop.data.inputs import InputError
from poseloop.config.policy import PolicyConfig
from poseloop.policy.trainer import PolicyTrainer, train

from tiny_helpers import RATIO_TOL, Brightness, fixed_seed_rewards, policy_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")



# ---- DDPO ----------------------------------------------------------------------------------------


def test_first_ppo_ratio_is_one(models_dir: Path, tmp_path: Path) -> None:
    trainer = PolicyTrainer(policy_cfg(models_dir, tmp_path), reward=Brightness(), progress=False)
    row = trainer.algorithm.epoch(0)
    assert trainer.first_ratio is not None and trainer.first_ratio < RATIO_TOL  # the sampled log-probs, re-scored
    assert np.isfinite(row["loss"]) and row["samples"] == 4


def ratio_spy(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Collects r = exp(logp - logp_old) [B] of every PPO loss call."""
    from poseloop.policy import losses

    ratios: list[torch.Tensor] = []
    real = losses.ppo_clip_loss

    def spy(lp: torch.Tensor, old: torch.Tensor, *rest: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ratios.append(torch.exp(lp.detach() - old))
        return real(lp, old, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(losses, "ppo_clip_loss", spy)
    return ratios


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """accelerate keeps one process-wide state and refuses another mixed_precision: reset around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_first_ppo_epoch_is_not_clipped_under_bf16_autocast(models_dir: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 trajectories sampled in one batch of 4, trained in shuffled minibatches of 2 whose gradients
    # accumulate into one optimizer step at the end: every ratio is taken before any update.
    cfg = policy_cfg(models_dir, tmp_path, optim__mixed_precision="bf16", train__clip_range=1e-4,
                     sample__batch_size=4, train__batch_size=2, train__grad_accum=2)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    assert isinstance(trainer, Trainer)  # every attribute and operation the algorithms' contract names
    assert trainer.accelerator.mixed_precision == "bf16"
    ratios = ratio_spy(monkeypatch)
    row = trainer.algorithm.epoch(0)
    r = torch.cat(ratios)  # [4 trajectories x the chosen steps]
    assert r.numel() == 4 * max(1, round(cfg.train.timestep_fraction * 4)) and trainer.global_step == 1
    # Sampling outside autocast and re-scoring inside gave mean |r - 1| 2.7e-3 and clip fraction 1.0.
    # Both run the same bf16 kernels on the same inputs now, so only the fp32 noise above remains.
    assert row["clipfrac"] == 0.0
    assert (r - 1).abs().max() < RATIO_TOL


def test_a_deterministic_last_step_is_never_trained_and_gives_no_nan(models_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import DDIMScheduler

    # Minibatches of 2 accumulated into one optimizer step at the end: every ratio is taken before any update.
    cfg = policy_cfg(models_dir, tmp_path, train__grad_accum=2, train__timestep_fraction=1.0)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    # set_alpha_to_one: the last step lands on alpha_bar = 1 with variance 0 (x_0 = predicted x0).
    trainer.comp.pipe.scheduler = DDIMScheduler.from_config(trainer.comp.scheduler.config, set_alpha_to_one=True)
    trained: list[int] = []
    real = trainer.rescore
    monkeypatch.setattr(trainer, "rescore",
                        lambda cond, lat, ts, j, scfg: trained.append(j) or real(cond, lat, ts, j, scfg))
    ratios = ratio_spy(monkeypatch)
    row = trainer.algorithm.epoch(0)
    assert sorted(set(trained)) == [0, 1, 2]  # every step but the last of 4
    assert all(np.isfinite(v) for v in row.values()), row
    assert (torch.cat(ratios) - 1).abs().max() < RATIO_TOL


def test_shared_start_and_first_steps_shape_what_an_epoch_samples_and_trains(models_dir: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # grad_accum 2: one optimizer step, so every ratio is taken before any update.
    cfg = policy_cfg(models_dir, tmp_path, train__grad_accum=2, train__timestep_fraction=1.0,
                     train__shared_start=True, train__first_steps=2)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    trained: list[int] = []
    real = trainer.rescore
    monkeypatch.setattr(trainer, "rescore",
                        lambda cond, lat, ts, j, scfg: trained.append(j) or real(cond, lat, ts, j, scfg))
    batches = []
    real_sample = trainer.sample_groups
    monkeypatch.setattr(trainer, "sample_groups", lambda *a, **k: batches.append(real_sample(*a, **k)) or batches[-1])
    ratios = ratio_spy(monkeypatch)
    trainer.algorithm.epoch(0)
    assert sorted(set(trained)) == [0, 1]  # the first 2 of 4 stochastic steps
    assert (torch.cat(ratios) - 1).abs().max() < RATIO_TOL
    groups, _, _ = trainer.epoch_items(0)
    starts = batches[0][0].latents[:, 0].float()  # [N, C, h, w]: x_T, a group's images next to each other
    assert groups == [groups[0]] * 2 + [groups[2]] * 2 and groups[0] != groups[2]
    assert torch.equal(starts[0], starts[1]) and torch.equal(starts[2], starts[3])
    assert not torch.allclose(starts[0], starts[2], atol=0.1)
    assert not torch.allclose(batches[0][0].latents[0, -1].float(), batches[0][0].latents[1, -1].float(), atol=0.1)
    assert trainer.start_seeds(1, groups) != trainer.start_seeds(0, groups)  # a new start every epoch
    trainer.cfg.train.shared_start = False
    assert trainer.start_seeds(0, groups) is None


def test_ddpo_raises_the_reward(models_dir: Path, tmp_path: Path) -> None:
    # The trained embedded world with the tiny preset's settings, 32 trajectories an epoch.
    cfg = policy_cfg(models_dir, tmp_path, train__epochs=6, train__groups_per_epoch=4, sample__images_per_group=8,
                     train__batch_size=8)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    before = fixed_seed_rewards(trainer)
    result = trainer.run()
    after = fixed_seed_rewards(trainer)
    lo, hi = bootstrap_ci(after.numpy(), paired=before.numpy())
    assert lo > 0, (lo, hi, float(before.mean()), float(after.mean()), [round(r["reward_mean"], 3) for r in result.history])
    assert result.export_dir is not None and (result.export_dir / kohya_lora_name(result.export_dir.name)).is_file()
    assert (result.run_dir / "metrics.csv").read_text().startswith("epoch,reward_mean,reward_std")
    assert (result.run_dir / "metrics.png").is_file()


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(models_dir: Path, tmp_path: Path) -> None:
    def run(epochs: int, name: str) -> dict[str, torch.Tensor]:
        cfg = policy_cfg(models_dir, tmp_path, train__epochs=epochs, optim__lr=1e-2)
        cfg.output.run_name = name
        result = train(cfg, reward=Brightness(), progress=False)
        assert result.epochs_done == epochs
        return load_file(str(result.run_dir / "checkpoint" / "weights.safetensors"))

    straight = run(4, "straight")
    run(2, "split")  # stands in for a run interrupted after epoch 2
    resumed = run(4, "split")
    assert straight.keys() == resumed.keys()
    assert any(v.abs().max() > 0 for k, v in straight.items() if "lora_B" in k), "training changed nothing"
    # The same computations in the same order: equal in practice. MKL only guarantees bit-equal GEMMs
    # for identical memory alignment, so allow fp32 noise; a resume bug (other samples, lost optimizer
    # state, RNG) moves the LoRA weights by as much as training does, ~1e-2.
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)


# ---- D3PO ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rated_round(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated tiny round (2 groups x 4 images) with every pair rated: the brighter image wins."""
    from sqlalchemy import select

    from poseloop.data import db
    from poseloop.config.generation import tiny as gen_tiny
    from poseloop.sampling.round import generate
    from poseloop.data.store import SampleStore, load_trajectory

    root = tmp_path_factory.mktemp("rated")
    cfg = gen_tiny()
    cfg.model.base = str(models_dir / "tiny-sd15")
    cfg.model.controlnet = str(models_dir / "tiny-sd15" / "controlnet")
    cfg.sample.width = cfg.sample.height = 64
    cfg.sample.steps, cfg.sample.images_per_group, cfg.sample.batch_size = 4, 4, 8
    cfg.data.prompts, cfg.data.poses = ["a dancer"], ["standing", "sitting"]
    cfg.store.samples_dir = str(root / "samples")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    generate(cfg)
    torch.set_num_threads(before)
    store = SampleStore(root / "samples")
    factory = db.open_db(db.default_db_url(store.root))
    with db.session_scope(factory) as session:
        rater = db.get_or_create_rater(session, "synthetic")
        samples = list(session.scalars(select(db.Sample).order_by(db.Sample.id)))
        bright = {s.id: float(Brightness()(None, load_trajectory(store.abs(s.trajectory_path)).latents[-1:],
                                            ["p"], [{}])) for s in samples}
        for a in samples:
            for b in samples:
                if a.group_id == b.group_id and a.id < b.id:
                    session.add(db.Preference(rater_id=rater.id, sample_a_id=a.id, sample_b_id=b.id,
                                              choice="a" if bright[a.id] > bright[b.id] else "b"))
        # A tie and a skip: must be ignored.
        a, b, c = samples[0], samples[1], samples[2]
        other = db.get_or_create_rater(session, "other")
        session.add(db.Preference(rater_id=other.id, sample_a_id=a.id, sample_b_id=b.id, choice="tie"))
        session.add(db.Preference(rater_id=other.id, sample_a_id=a.id, sample_b_id=c.id, choice="skip"))
    return root / "samples"


def d3po_cfg(models_dir: Path, tmp: Path, samples: Path, **overrides: object) -> PolicyConfig:
    # Every one of the round's 12 pairs each epoch (the tiny preset takes 8 of a larger round's pairs), at the tiny
    # preset's lr: on the 2-head world 3e-3 overshot (approx KL 4.8 in the 4th epoch, its loss above the first's);
    # 1e-3 took the loss 0.677 -> 0.574 -> 0.531 -> 0.501 with all 12 margins positive.
    settings: dict[str, object] = {"algo": "d3po", "train__epochs": 4, "optim__lr": 1e-3, "train__batch_size": 4,
                                   "d3po__pairs_per_epoch": 16}
    cfg = policy_cfg(models_dir, tmp, **{**settings, **overrides})
    cfg.d3po.samples_dir = str(samples)
    return cfg


def test_d3po_from_human_preferences_favours_the_winners(models_dir: Path, tmp_path: Path, rated_round: Path) -> None:
    trainer = PolicyTrainer(d3po_cfg(models_dir, tmp_path, rated_round), progress=False)
    assert len(trainer.algorithm.pairs) == 12  # 2 groups x C(4, 2); the tie and the skip are ignored
    start = trainer.algorithm.pair_margins()
    assert start.abs().max() < 1e-6  # the policy starts as the reference
    result = trainer.run()
    margins = trainer.algorithm.pair_margins()
    assert trainer.first_ratio is not None and trainer.first_ratio < RATIO_TOL  # policy = reference at first
    assert margins.mean() > 0 and (margins > 0).float().mean() >= 0.75, margins
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_d3po_shows_progress_per_batch_of_pairs_and_ends_with_a_summary(
        models_dir: Path, tmp_path: Path, rated_round: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = PolicyTrainer(d3po_cfg(models_dir, tmp_path, rated_round, train__epochs=1), progress=True)
    capsys.readouterr()
    trainer.algorithm.epoch(0)
    out, err = capsys.readouterr()
    # 12 pairs in batches of 4: the bar moves with each batch instead of sitting at epoch 0/1. The round
    # was sampled by the reference model, so no reference pass (and no bar for it) is needed.
    assert "d3po reference log-probs" not in err
    assert all(f"{k}/12" in err for k in (4, 8, 12)), err
    assert "d3po epoch 1/1: 12 pairs in 3 batches, loss " in out
    # When a reference pass is needed (another model or dtype sampled the round), it shows progress too.
    assert trainer.algorithm.pair_data is not None
    batch = trainer.algorithm.pair_data[0]
    trainer.reference_log_probs(batch, steps=[0])
    # tqdm redraws at most every 0.1 s and clears the bar (leave=False), so the last count may not show.
    assert "d3po reference log-probs" in (err := capsys.readouterr().err) and "/24" in err, err


def test_d3po_takes_the_reference_log_probs_from_the_stored_trajectories(
        models_dir: Path, tmp_path: Path, rated_round: Path) -> None:
    trainer = PolicyTrainer(d3po_cfg(models_dir, tmp_path, rated_round), progress=False)
    batches = trainer.algorithm._load_pair_data()
    for batch in batches:
        # The same fp16 latents under the same weights: only kernel-order noise separates the two.
        assert torch.allclose(batch.extra["ref"], trainer.reference_log_probs(batch), atol=RATIO_TOL, rtol=0)
    from poseloop.data.store import load_trajectory

    meta = dict(load_trajectory(trainer.algorithm.pairs[0].winner_path).metadata)
    assert trainer.algorithm._sampled_by_reference(meta)
    for key, value in (("lora", "other.safetensors"), ("policy", "ddpo-x"), ("dtype", "torch.float16"),
                       ("base_model", "stabilityai/sdxl"), ("controlnet", "some/controlnet")):
        assert not trainer.algorithm._sampled_by_reference({**meta, key: value}), key
    trainer.cfg.optim.mixed_precision = "bf16"  # the training pass runs in another numeric context
    assert not trainer.algorithm._sampled_by_reference(meta)


def test_d3po_faithful_defaults_cannot_move_the_loss(models_dir: Path, tmp_path: Path, rated_round: Path) -> None:
    cfg = d3po_cfg(models_dir, tmp_path, rated_round, d3po__beta=0.1, d3po__clamp_eps=0.1, train__epochs=2)
    result = train(cfg, progress=False)
    for row in result.history:
        assert 0.6832 <= row["loss"] <= 0.7032  # the published clamp bounds the loss (REFERENCE.md)


# ---- bad input -----------------------------------------------------------------------------------


def test_no_preferences_yet(models_dir: Path, tmp_path: Path, rated_round: Path) -> None:
    from poseloop.data import db

    samples = tmp_path / "samples"
    shutil.copytree(rated_round, samples)
    factory = db.open_db(db.default_db_url(samples))
    with db.session_scope(factory) as session:
        session.query(db.Preference).delete()
    with pytest.raises(InputError, match="no preferences yet"):
        PolicyTrainer(d3po_cfg(models_dir, tmp_path, samples), progress=False)
    with pytest.raises(InputError, match="no database"):
        PolicyTrainer(d3po_cfg(models_dir, tmp_path, tmp_path / "empty"), progress=False)


def test_missing_trajectory_is_named(models_dir: Path, tmp_path: Path, rated_round: Path) -> None:
    samples = tmp_path / "samples"
    shutil.copytree(rated_round, samples)
    victim = sorted(samples.glob("*/trajectories/*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(InputError, match=victim.name):
        PolicyTrainer(d3po_cfg(models_dir, tmp_path, samples), progress=False)


def test_unknown_reward_name(models_dir: Path, tmp_path: Path) -> None:
    cfg = policy_cfg(models_dir, tmp_path, reward="no_such_reward")
    with pytest.raises(ConfigError, match="no_such_reward"):
        PolicyTrainer(cfg, progress=False)


def test_reward_model_for_another_latent_shape(models_dir: Path, tmp_path: Path) -> None:
    class OtherLatents(Brightness):
        latent_shape = (16, 8, 8)  # e.g. a reward model trained on SD3 / Flux latents

    with pytest.raises(ConfigError, match="16 channels"):
        PolicyTrainer(policy_cfg(models_dir, tmp_path), reward=OtherLatents(), progress=False)


def test_cli_reports_bad_input_without_traceback(models_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import train_policy

    argv = ["--algo", "d3po", "--model.base", str(models_dir / "tiny-sd15"),
            "--model.controlnet", str(models_dir / "tiny-sd15" / "controlnet"),
            "--d3po.samples_dir", str(tmp_path / "nothing"), "--output.runs_dir", str(tmp_path / "runs")]
    with pytest.raises(SystemExit) as e:
        train_policy.main(argv)
    assert e.value.code == 2
    assert "no database" in capsys.readouterr().err


def test_a_weighted_reward_logs_each_member(models_dir: Path, tmp_path: Path) -> None:
    from poseloop.rewards.builtin import WeightedReward

    class Constant:
        name, needs_images = "constant", False

        def __call__(self, images, latents, prompts, metadata):  # type: ignore[no-untyped-def]
            return torch.full((len(prompts),), 2.0)

    mix = WeightedReward([(Brightness(), 1.0), (Constant(), 0.5)])
    trainer = PolicyTrainer(policy_cfg(models_dir, tmp_path), reward=mix, progress=False)
    row = trainer.algorithm.epoch(0)
    assert row["reward_constant"] == pytest.approx(2.0)
    assert row["reward_mean"] == pytest.approx(row["reward_test_brightness"] + 1.0, abs=1e-5)
