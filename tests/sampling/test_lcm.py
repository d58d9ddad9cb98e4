"""The LCM sampler as a Gaussian policy (RLCM): diffusers' LCMScheduler step, exact re-scoring on SD1.5 and
SDXL, the w-embedding as timestep_cond, the not-an-LCM warning, an LCM-LoRA fused at load, a generated LCM
round, --algo rlcm (runs, exports, resumes) and D3PO over stored LCM trajectories."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from safetensors.torch import load_file

from poseloop.sampling import lcm
from poseloop.sampling import sampler as sampling
from poseloop.config.generation import SampleConfig
from poseloop.config.lib import ConfigError
from poseloop.models.policy_files import kohya_lora_name
from poseloop.models.loading import Components
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose
from poseloop.policy.trainer import PolicyTrainer

# The policy tests' tiny config and synthetic reward (tests/ is on sys.path under pytest's import mode).
from tiny_helpers import RATIO_TOL, Brightness, fixed_seed_rewards, policy_cfg  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def sd_lcm_scheduler(steps: int, **overrides: object) -> LCMScheduler:
    """LCMScheduler from an SD1.5 DDIM config, as the sampler builds it from a model's scheduler."""
    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, **overrides)
    return lcm.lcm_scheduler(ddim, steps)


def test_timestep_grids_of_diffusers_and_rlcm() -> None:
    assert sd_lcm_scheduler(4).timesteps.tolist() == [999, 759, 499, 259]
    assert sd_lcm_scheduler(8).timesteps.tolist() == [999, 879, 759, 639, 499, 379, 259, 139]
    # RLCM's own grid (every 50 // n of (1..50) * 20 - 1) ends elsewhere: documented in docs/POLICY.md.
    assert lcm.rlcm_timesteps(8).tolist() == [999, 879, 759, 639, 519, 399, 279, 159]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_step_equals_diffusers_lcm_scheduler_step(prediction_type: str) -> None:
    ours_sched = sd_lcm_scheduler(4, prediction_type=prediction_type)
    theirs = LCMScheduler.from_config(ours_sched.config)
    theirs.set_timesteps(4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    for i, t in enumerate(theirs.timesteps):
        out = torch.randn(3, 4, 8, 8, generator=gen)
        seed = 100 + i
        ref = theirs.step(out, t, x, generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))  # what step() draws
        ours, lp = lcm.lcm_step_with_logprob(ours_sched, out, t, x, noise=noise)
        # The same float32 operations in the same order, then our float16 storage rounding: equal up to
        # that rounding (2^-11 relative); a wrong alpha or boundary scaling is off by O(0.1).
        torch.testing.assert_close(ours, ref.prev_sample.to(torch.float16).float(), atol=1e-6, rtol=1e-3)
        if i == 3:  # diffusers' last step returns denoised: deterministic, log-probability 0
            torch.testing.assert_close(ours, ref.denoised.to(torch.float16).float(), atol=1e-6, rtol=1e-3)
            assert lp.tolist() == [0.0, 0.0, 0.0]
        else:
            assert torch.isfinite(lp).all() and (lp < 0).all()
        x = ref.prev_sample


def test_lcm_log_prob_is_the_gaussian_density_of_the_renoising_step() -> None:
    sched = sd_lcm_scheduler(4)
    t, prev_t = 759, 499
    a = sched.alphas_cumprod.double()
    a_t, a_prev = float(a[t]), float(a[prev_t])
    c_skip, c_out = (float(v) for v in sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t)))
    x, eps = 1.0, 0.5
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * (c_out * x0 + c_skip * x)
    std = math.sqrt(1 - a_prev)
    recorded = torch.full((2, 4, 2, 2), mean + std)  # one standard deviation above the mean everywhere
    _, lp = lcm.lcm_step_with_logprob(sched, torch.full((2, 4, 2, 2), eps), t, torch.full((2, 4, 2, 2), x),
                                      prev_sample=recorded)
    assert lp[0].item() == pytest.approx(-0.5 - math.log(std) - 0.5 * math.log(2 * math.pi), abs=1e-4)
    with pytest.raises(ValueError, match="not on the LCM grid"):
        lcm.lcm_step_with_logprob(sched, recorded, 500, recorded, prev_sample=recorded)


def _inputs(n: int) -> tuple[list[str], list]:
    pose = render_pose(get_builtin_pose("t_pose"), 64, 64)
    # Different backgrounds: images whose x0 predictions differ (a swapped x_prev must score lower, below).
    places = ("on a beach", "at night", "in a studio", "in a forest")
    return [f"a person in a red shirt and blue trousers, {places[i % 4]}" for i in range(n)], [pose] * n


def _sample_and_rescore(comp: Components, cfg: SampleConfig) -> sampling.SampleOutput:
    prompts, controls = _inputs(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny models are not LCMs (tested below)
        out = sampling.sample(comp, prompts, controls, [11, 12, 13], cfg, 64, 64)
    assert out.log_probs.shape == (3, cfg.steps) and torch.isfinite(out.log_probs).all()
    assert out.log_probs[:, -1].tolist() == [0.0, 0.0, 0.0] and (out.log_probs[:, :-1] < 0).all()
    for step in range(cfg.steps):
        with torch.no_grad():
            lp = sampling.rescore(comp, out.cond, out.latents, out.timesteps, step, cfg)
        # Same weights, batch and threads: the same kernels on the same inputs (bit-equal here); fp32
        # log-probs of size ~1 leave room for op-order noise far below 1e-5, a wrong x_prev scores > 0.25 lower (below).
        torch.testing.assert_close(lp, out.log_probs[:, step], atol=1e-5, rtol=1e-5)
    swapped = out.latents.clone()
    # Another image's x_prev at the last stochastic step (the smallest variance, 1 - alpha_bar_prev ~ 0.3).
    k = cfg.steps - 2
    swapped[:, k + 1] = swapped[[1, 2, 0], k + 1]
    with torch.no_grad():
        wrong = sampling.rescore(comp, out.cond, swapped, out.timesteps, k, cfg)
    # A log-prob is the mean over the latent's 1,024 elements of a Gaussian log-density: for the right x_prev its
    # eps^2 / 2 part varies by ~0.02 between images (sqrt(2 / 1024) / 2), so 0.25 lower is > 10 of those. The drop
    # is how far apart the two images' x0 predictions are: on the light-modes world another background's x_prev
    # scored 0.85-2.74 lower (0.29 for night against forest, both dark, hence beach / night / studio here; the
    # 2-head world: 0.40-1.19 with prompts that named no background).
    assert (wrong < out.log_probs[:, k] - 0.25).all(), (wrong, out.log_probs[:, k])
    return out


@pytest.mark.parametrize("components", ["sd15_components", "sdxl_components"])
def test_rescoring_a_recorded_lcm_trajectory_reproduces_its_log_probs(components: str,
                                                                      request: pytest.FixtureRequest) -> None:
    comp = request.getfixturevalue(components)
    cfg = SampleConfig(sampler="lcm", steps=4, guidance_scale=1.5)  # CFG, as for an LCM-LoRA
    out = _sample_and_rescore(comp, cfg)
    assert out.timesteps.tolist() == [999, 759, 499, 259]
    assert out.cond.negative_embeds is not None
    assert sampling.stochastic_steps(comp.scheduler, out.timesteps, cfg.eta, "lcm").tolist() == [True] * 3 + [False]


@pytest.fixture(scope="module", params=["sd15_components", "sdxl_components"])
def lcm_components(request: pytest.FixtureRequest) -> Components:
    """A tiny pipeline (SD1.5 / SDXL) with a UNet distilled LCM-style: time_cond_proj_dim set (random weights)."""
    from diffusers import UNet2DConditionModel

    base: Components = request.getfixturevalue(request.param)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(base.unet.config, time_cond_proj_dim=32).eval()
    unet.requires_grad_(False)
    pipe = type(base.pipe)(**{**base.pipe.components, "unet": unet})
    return Components(pipe=pipe, arch=base.arch, device=base.device, dtype=base.dtype)


def test_an_lcm_with_a_guidance_embedding_gets_w_as_timestep_cond_and_no_cfg(
        lcm_components: Components, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import LatentConsistencyModelPipeline

    comp = lcm_components
    calls: list[tuple[int, torch.Tensor | None]] = []
    real = type(comp.unet).forward

    def spy(self, x, t, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((x.shape[0], kwargs.get("timestep_cond")))
        return real(self, x, t, *args, **kwargs)

    monkeypatch.setattr(type(comp.unet), "forward", spy)
    cfg = SampleConfig(sampler="lcm", steps=3, guidance_scale=8.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an LCM: no warning
        out = _sample_and_rescore(comp, cfg)
    assert out.cond.negative_embeds is None  # no CFG pass: one UNet call per image
    batch, cond = calls[0]
    assert batch == 3 and cond is not None
    expected = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.tensor([7.0] * 3), 32)
    assert torch.equal(cond, expected)  # w = guidance_scale - 1, computed exactly as diffusers' LCM pipeline
    # The embedding is what guides: another w gives another image from the same seeds.
    monkeypatch.setattr(type(comp.unet), "forward", real)
    prompts, controls = _inputs(3)
    other = sampling.sample(comp, prompts, controls, [11, 12, 13], SampleConfig(sampler="lcm", steps=3,
                                                                                guidance_scale=2.0), 64, 64)
    assert (other.latents[:, -1].float() - out.latents[:, -1].float()).abs().max() > 1e-3


def test_lcm_sampler_on_a_model_that_is_no_lcm_warns_what_to_load(sd15_components: Components) -> None:
    prompts, controls = _inputs(1)
    with pytest.warns(UserWarning, match=r"not an LCM .* --model\.lcm_lora"):
        sampling.sample(sd15_components, prompts, controls, [1], SampleConfig(sampler="lcm", steps=2), 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the DDIM sampler on the same model: no warning
        sampling.sample(sd15_components, prompts, controls, [1], SampleConfig(steps=2), 64, 64)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_an_lcm_lora_is_fused_into_the_unet_at_load(arch: str, models_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig

    from poseloop.config.generation import tiny, tiny_sdxl
    from poseloop.policy.export import save_diffusers_lora, save_kohya_lora
    from poseloop.models.loading import load_components
    from tiny_helpers import eps_of

    def model_cfg(models_dir: Path, **overrides: object):  # -> ModelConfig
        cfg = (tiny() if arch == "sd15" else tiny_sdxl()).model
        cfg.base = str(models_dir / f"tiny-{arch}")
        cfg.controlnet = str(models_dir / f"tiny-{arch}" / "controlnet")
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    torch.manual_seed(0)
    comp = load_components(model_cfg(models_dir))
    base_eps = eps_of(comp)
    # A random LoRA (B != 0) of rank 2, alpha 4 (strength 2): its effect is the expected "LCM" model.
    comp.unet.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    with torch.no_grad():
        for name, p in comp.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    expected = eps_of(comp)
    kohya = save_kohya_lora(comp.unet, tmp_path / "lcm_kohya.safetensors")
    diffusers_file = save_diffusers_lora(comp.pipe, comp.unet, tmp_path / "lcm_diffusers")
    assert (expected - base_eps).abs().max() > 1e-2  # the LoRA changes the prediction
    # One format per architecture (each load costs seconds): SD1.5 the diffusers folder, SDXL the kohya
    # file (whose key names need the SDXL UNet config to map).
    for source in [str(diffusers_file.parent) if arch == "sd15" else str(kohya)]:
        fused = load_components(model_cfg(models_dir, lcm_lora=source))
        assert fused.lcm_lora == source
        assert not any("lora" in n for n, _ in fused.unet.named_parameters())  # merged, no adapter left
        # W x + B A x vs (W + B A) x: float32 rounding only (~1e-6 of values ~1).
        torch.testing.assert_close(eps_of(fused), expected, atol=1e-4, rtol=1e-4)
        prompts, controls = _inputs(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # an LCM-LoRA is loaded: no warning
            sampling.sample(fused, prompts, controls, [1], SampleConfig(sampler="lcm", steps=2), 64, 64)


def test_lcm_config_errors_name_the_field() -> None:
    from poseloop.config.generation import ModelConfig, validate_model
    from poseloop.config.policy import tiny

    cases = [({"algo": "rlcm"}, "sample.sampler: --algo rlcm"),
             ({"algo": "refl", "sampler": "lcm"}, "sample.sampler: --algo refl"),
             ({"algo": "rlcm", "sampler": "lcm", "steps": 1}, "sample.steps: ")]
    for settings, message in cases:
        cfg = tiny()
        cfg.algo = str(settings.get("algo", "ddpo"))
        cfg.sample.sampler = str(settings.get("sampler", "ddim"))
        cfg.sample.steps = int(settings.get("steps", 4))  # type: ignore[call-overload]
        with pytest.raises(ConfigError, match=f"^{message}") as exc:
            cfg.validate()
        assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="^model.lcm_lora: file"):
        validate_model(ModelConfig(lcm_lora="missing_lcm_lora.safetensors"))
    with pytest.raises(ConfigError, match=r"^sample.steps: the LCM sampler takes 1\.\.50"):
        sd_lcm_scheduler(51)


def test_generate_with_the_lcm_sampler_writes_a_round(models_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import generate as generate_script
    from poseloop.data.store import SampleStore, load_trajectory

    samples = tmp_path / "s"
    argv = ["--model.base", str(models_dir / "tiny-sd15"), "--model.controlnet",
            str(models_dir / "tiny-sd15" / "controlnet"), "--store.samples_dir", str(samples),
            "--sample.sampler", "lcm", "--sample.steps", "4", "--set", "sample.width=64", "--set", "sample.height=64",
            "--data.poses", "jumping", "--data.prompts", "a jumping kid", "--set", "sample.images_per_group=2"]
    with pytest.warns(UserWarning, match="not an LCM"):
        assert generate_script.main(argv) == 0
    assert "round-0001: 2 new images" in capsys.readouterr().out
    trajs = sorted((SampleStore(samples).root / "round-0001" / "trajectories").glob("*.safetensors"))
    assert len(trajs) == 2
    traj = load_trajectory(trajs[0])
    assert traj.metadata["sampler"] == "lcm" and traj.timesteps.tolist() == [999, 759, 499, 259]
    assert traj.latents.shape[0] == 5 and traj.log_probs[-1].item() == 0.0


def rlcm_cfg(models_dir: Path, tmp: Path, **overrides: object):  # -> PolicyConfig
    # 3 LCM steps (2 trained), one group of 2 images an epoch: the smallest run that has advantages.
    settings = {"algo": "rlcm", "sample__sampler": "lcm", "sample__steps": 3, "sample__guidance_scale": 1.5,
                "train__groups_per_epoch": 1, "optim__lr": 1e-2, "train__clip_range": 0.2, "train__timestep_fraction": 1.0}
    return policy_cfg(models_dir, tmp, **{**settings, **overrides})


def test_rlcm_first_ratio_is_one_trains_never_the_last_step_exports_and_resumes(
        models_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trained: list[int] = []
    real = PolicyTrainer.choose_steps

    def spy(self, batch, gen):  # type: ignore[no-untyped-def]
        steps = real(self, batch, gen)
        trained.extend(steps)
        return steps

    monkeypatch.setattr(PolicyTrainer, "choose_steps", spy)
    warnings.simplefilter("ignore")  # the tiny model is not an LCM (tested above)

    def run(epochs: int, name: str, **extra: object) -> tuple[dict[str, torch.Tensor], object]:
        cfg = rlcm_cfg(models_dir, tmp_path, train__epochs=epochs, **extra)
        cfg.output.run_name = name
        trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
        result = trainer.run()
        assert result.epochs_done == epochs and result.algo == "rlcm"
        # The sampled log-probs, re-scored before any update: ratio 1 (test_policy's tolerance).
        assert trainer.first_ratio is not None and trainer.first_ratio < RATIO_TOL
        return load_file(str(result.run_dir / "checkpoint" / "weights.safetensors")), result

    # Re-scoring stored LCM steps.
    straight, result = run(2, "straight", output__export_every=1)
    assert set(trained) == {0, 1}  # 3 LCM steps: the deterministic last one (index 2) never
    export_dir = result.export_dir  # type: ignore[attr-defined]
    assert export_dir is not None and (export_dir / kohya_lora_name(export_dir.name)).is_file()
    assert all(np.isfinite(row["loss"]) for row in result.history)  # type: ignore[attr-defined]
    assert any(v.abs().max() > 0 for k, v in straight.items() if "lora_B" in k), "training changed nothing"
    run(1, "split")
    resumed, _ = run(2, "split")
    for key in straight:  # as test_policy's resume test: fp32 noise only
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)


def test_rlcm_raises_the_reward_on_fresh_seeds(models_dir: Path, tmp_path: Path) -> None:
    from poseloop.metrics.stats import bootstrap_ci

    # The trained embedded world (undistilled: the LCM sampler warns), 4 LCM steps without CFG, the tiny
    # preset's lr and clip, 4 groups x 4 images an epoch; bench/bench_rlcm.py runs it 8 epochs (+0.28).
    warnings.simplefilter("ignore")
    cfg = policy_cfg(models_dir, tmp_path, algo="rlcm", sample__sampler="lcm", sample__steps=4,
                     sample__guidance_scale=1.0, train__timestep_fraction=1.0, train__epochs=3,
                     train__groups_per_epoch=4, sample__images_per_group=4, train__batch_size=4)
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    before = fixed_seed_rewards(trainer)  # 16 seeds no epoch sampled (training draws its own)
    result = trainer.run()
    after = fixed_seed_rewards(trainer)
    lo, hi = bootstrap_ci(after.numpy(), paired=before.numpy())
    assert lo > 0, (lo, hi, float(before.mean()), float(after.mean()), [round(r["reward_mean"], 3) for r in result.history])


def test_rlcm_faithful_preset_has_the_published_settings() -> None:
    from poseloop.config.policy import PRESETS

    cfg = PRESETS["rlcm-faithful"]()
    cfg.validate()
    assert (cfg.algo, cfg.sample.sampler, cfg.sample.steps) == ("rlcm", "lcm", 8)
    assert (cfg.train.clip_range, cfg.train.adv_clip_max, cfg.optim.lr) == (1e-4, 10.0, 1e-4)
    assert cfg.target.lora_modules == ["to_q", "to_k", "to_v", "to_out.0"]


def test_d3po_over_stored_lcm_trajectories(models_dir: Path, tmp_path: Path) -> None:
    from sqlalchemy import select

    from poseloop.data import db
    from poseloop.config.generation import tiny as gen_tiny
    from poseloop.sampling.round import generate
    from poseloop.data.store import SampleStore

    warnings.simplefilter("ignore")
    gcfg = gen_tiny()
    gcfg.model.base = str(models_dir / "tiny-sd15")
    gcfg.model.controlnet = str(models_dir / "tiny-sd15" / "controlnet")
    gcfg.sample.width = gcfg.sample.height = 64
    gcfg.sample.sampler, gcfg.sample.steps, gcfg.sample.guidance_scale = "lcm", 3, 1.5
    gcfg.sample.images_per_group, gcfg.sample.batch_size = 3, 8
    gcfg.data.prompts, gcfg.data.poses = ["a dancer"], ["standing"]
    gcfg.store.samples_dir = str(tmp_path / "samples")
    generate(gcfg)
    store = SampleStore(tmp_path / "samples")
    factory = db.open_db(db.default_db_url(store.root))
    with db.session_scope(factory) as session:
        rater = db.get_or_create_rater(session, "r")
        s = list(session.scalars(select(db.Sample).order_by(db.Sample.id)))
        for a, b in ((s[0], s[1]), (s[0], s[2]), (s[1], s[2])):
            session.add(db.Preference(rater_id=rater.id, sample_a_id=a.id, sample_b_id=b.id, choice="a"))
    cfg = policy_cfg(models_dir, tmp_path, algo="d3po", train__batch_size=3, optim__lr=3e-3, sample__steps=3)
    cfg.d3po.samples_dir = str(store.root)
    trainer = PolicyTrainer(cfg, progress=False)
    batches = trainer.algorithm._load_pair_data()
    assert [b.sample_cfg.sampler for b in batches] == ["lcm"]
    # The stored log-probs are the reference, and re-scoring with the LCM step reproduces them.
    assert torch.allclose(batches[0].extra["ref"], trainer.reference_log_probs(batches[0]), atol=RATIO_TOL, rtol=0)
    from poseloop.data.store import load_trajectory

    meta = dict(load_trajectory(trainer.algorithm.pairs[0].winner_path).metadata)
    assert meta["sampler"] == "lcm" and trainer.algorithm._sampled_by_reference(meta)
    # A round made with another LCM-LoRA was not sampled by this reference: its stored log-probs are not used.
    assert not trainer.algorithm._sampled_by_reference({**meta, "lcm_lora": "other_lcm_lora.safetensors"})
    row = trainer.algorithm.epoch(0)
    assert np.isfinite(row["loss"]) and trainer.first_ratio is not None and trainer.first_ratio < RATIO_TOL
