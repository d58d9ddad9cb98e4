"""ReFL (--algo refl) on the tiny model: gradient through the last step only, non-differentiable rewards
refused, the reward rises on fixed seeds, checkpoint/resume and export files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from poseloop.config.lib import ConfigError
from poseloop.models.policy_files import kohya_lora_name
from poseloop.rewards.builtin import JpegCompressibilityReward
from poseloop.metrics.stats import bootstrap_ci
from poseloop.config.policy import PolicyConfig
from poseloop.policy.trainer import PolicyTrainer, train

# The policy tests' helpers: the tiny config, the differentiable latent-preview Brightness reward and
# the paired fixed-seed rewards (tests/ is on sys.path under pytest's default import mode).
from tiny_helpers import Brightness, fixed_seed_rewards, policy_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def refl_cfg(models_dir: Path, tmp: Path, **overrides: object) -> PolicyConfig:
    """tests/test_policy.py's tiny config with --algo refl."""
    return policy_cfg(models_dir, tmp, algo="refl", **overrides)


def test_gradient_flows_only_through_the_stop_step(models_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from poseloop.sampling import sampler as sampling

    trainer = PolicyTrainer(refl_cfg(models_dir, tmp_path), reward=Brightness(), progress=False)
    algo = trainer.algorithm
    calls: list[tuple[bool, bool]] = []  # (grad enabled, input latents require grad) per noise prediction
    real = sampling.predict_noise

    def spy(comp, latents, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((torch.is_grad_enabled(), latents.requires_grad))
        return real(comp, latents, *args, **kwargs)

    monkeypatch.setattr(sampling, "predict_noise", spy)
    from poseloop.sampling.sampler import make_conditioning

    gs, seeds = [0, 1], [5, 6]
    cond = make_conditioning(trainer.comp, ["a dancer"] * 2, [trainer.group_image(g) for g in gs],
                             trainer.cfg.sample, trainer.width, trainer.height)
    stop = 3
    x, timesteps = algo.rollout_to(cond, seeds, stop)
    assert not x.requires_grad and x.grad_fn is None  # the rolled-out part carries no graph
    x = x.requires_grad_(True)
    x0 = algo.predicted_x0(cond, x, timesteps[stop])
    r = algo.score(x0, ["a dancer"] * 2, [trainer.group_metadata(g) for g in gs])
    from poseloop.policy.losses import refl_loss

    refl_loss(r, 2.0, 1.0).backward()
    # stop no-grad steps, then exactly one prediction with gradient
    assert [c[0] for c in calls] == [False] * stop + [True]
    params = [p for p in trainer.policy.parameters() if p.requires_grad]
    assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert x.grad is not None  # the gradient reaches the stop step's input and stops there (it is a leaf)


def test_non_differentiable_reward_is_refused(models_dir: Path, tmp_path: Path) -> None:
    trainer = PolicyTrainer(refl_cfg(models_dir, tmp_path), reward=JpegCompressibilityReward(), progress=False)
    with pytest.raises(ConfigError, match=r"jpeg_compressibility.*not differentiable.*--algo ddpo"):
        trainer.algorithm.epoch(0)

    class Declared(Brightness):
        name = "declared"
        differentiable = False

    trainer.reward = Declared()
    with pytest.raises(ConfigError, match=r"'declared'.*--algo ddpo"):
        trainer.algorithm.epoch(0)


def test_refl_raises_the_reward(models_dir: Path, tmp_path: Path) -> None:
    cfg = refl_cfg(models_dir, tmp_path, train__epochs=6, train__groups_per_epoch=4, sample__images_per_group=2)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    before = fixed_seed_rewards(trainer)
    t0 = time.perf_counter()
    result = trainer.run()
    seconds = time.perf_counter() - t0
    after = fixed_seed_rewards(trainer)
    lo, hi = bootstrap_ci(after.numpy(), paired=before.numpy())
    print(f"refl gain {float((after - before).mean()):+.4f} [{lo:+.4f}, {hi:+.4f}] in {seconds:.1f} s; "
          f"before {float(before.mean()):.4f}")
    assert lo > 0, (lo, hi, float(before.mean()), float(after.mean()), [round(r["reward_mean"], 3) for r in result.history])


def test_resume_and_export_files(models_dir: Path, tmp_path: Path) -> None:
    cfg = refl_cfg(models_dir, tmp_path, train__epochs=2)
    cfg.output.run_name = "refl-run"
    result = train(cfg, reward=Brightness(), progress=False)
    assert result.epochs_done == 2
    assert result.export_dir is not None and (result.export_dir / kohya_lora_name(result.export_dir.name)).is_file()
    assert (result.run_dir / "metrics.csv").read_text().startswith("epoch,reward_mean,reward_std")
    weights = load_file(str(result.run_dir / "checkpoint" / "weights.safetensors"))
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k), "training changed nothing"
    for name in ("state.json", "weights.safetensors", "optimizer.pt", "rng.pt"):
        assert (result.run_dir / "checkpoint" / name).is_file(), name
    cfg.train.epochs = 3
    resumed = train(cfg, reward=Brightness(), progress=False)
    # resumed after epoch 2: its first two rows are the restored ones, one new epoch was run
    assert resumed.epochs_done == 3 and [r["epoch"] for r in resumed.history] == [1.0, 2.0, 3.0]
    assert resumed.history[:2] == result.history


def test_latent_reward_scores_x0_latents_without_decoding(models_dir: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from poseloop.policy.algos import refl
    from poseloop.rewards.model import LatentRewardModel
    from poseloop.config.reward import RewardModelConfig
    from poseloop.rewards.builtin import LatentReward

    model = LatentRewardModel(RewardModelConfig(), (4, 16, 16), ensemble_size=2).eval().requires_grad_(False)
    trainer = PolicyTrainer(refl_cfg(models_dir, tmp_path), reward=LatentReward(model=model), progress=False)

    def no_decode(*args: object) -> None:
        raise AssertionError("a latent reward must not decode")

    monkeypatch.setattr(refl, "decode_with_grad", no_decode)
    before = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    row = trainer.algorithm.epoch(0)
    assert torch.isfinite(torch.tensor(row["loss"]))
    after = trainer.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the optimizer step changed nothing"
