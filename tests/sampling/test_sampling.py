"""The DDIM policy step, and the trajectory-recording sampler on the tiny SD1.5 and SDXL models."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from poseloop.sampling import ddim
from poseloop.sampling import sampler as sampling
from poseloop.config.generation import SampleConfig
from poseloop.config.lib import ConfigError
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose


def sd_scheduler(steps: int = 20) -> DDIMScheduler:
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    return sched


def alpha_bar(t: int) -> float:
    """SD's alphas_cumprod computed by hand in float64."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    return float(np.prod(1 - betas[: t + 1]))


@pytest.mark.parametrize(("t", "prev_t"), [(951, 901), (1, None)])
def test_ddim_step_matches_hand_computed_mean_and_log_prob(t: int, prev_t: int | None) -> None:
    sched = sd_scheduler(20)
    a_t = alpha_bar(t)
    a_prev = alpha_bar(prev_t) if prev_t is not None else alpha_bar(0)  # set_alpha_to_one=False
    sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x, eps = 1.0, 0.5
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    sample = torch.full((2, 4, 2, 2), x)
    noise_pred = torch.full((2, 4, 2, 2), eps)
    # A recorded x_{t-1} one standard deviation above the mean in every element.
    recorded = torch.full((2, 4, 2, 2), mean + sigma, dtype=torch.float64).float()
    _, log_prob = ddim.ddim_step_with_logprob(sched, noise_pred, t, sample, 1.0, prev_sample=recorded)
    expected = -0.5 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    assert log_prob.shape == (2,)
    assert log_prob[0].item() == pytest.approx(expected, abs=2e-3 if prev_t is None else 1e-4)
    # Sampling with zero noise lands on the mean (rounded to float16).
    prev, lp0 = ddim.ddim_step_with_logprob(sched, noise_pred, t, sample, 1.0, noise=torch.zeros_like(sample))
    assert prev[0, 0, 0, 0].item() == pytest.approx(mean, rel=1e-3)
    assert lp0[0].item() == pytest.approx(-math.log(sigma) - 0.5 * math.log(2 * math.pi), abs=0.05)


def test_ddim_step_agrees_with_diffusers_scheduler_step() -> None:
    sched = sd_scheduler(10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    for t in sched.timesteps[:3]:
        ours, _ = ddim.ddim_step_with_logprob(sched, eps, t, x, 1.0, noise=noise)
        theirs = sched.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs.to(torch.float16).float(), atol=2e-3, rtol=0)


# Scheduler settings found in real model configs. Each must sample what diffusers' DDIMScheduler.step
# samples and score it with DDPO's log-probability; clip ranges are small enough to clip at high t.
VARIANTS: dict[str, dict[str, object]] = {
    "epsilon": {},
    "v_prediction": {"prediction_type": "v_prediction"},
    "sample": {"prediction_type": "sample"},
    "clip_sample": {"clip_sample": True, "clip_sample_range": 1.0},
    "v_prediction_clip": {"prediction_type": "v_prediction", "clip_sample": True, "clip_sample_range": 1.5},
    "set_alpha_to_one": {"set_alpha_to_one": True},
    "trailing": {"timestep_spacing": "trailing", "steps_offset": 0},
    "zero_snr_v": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                   "steps_offset": 0},
}


def variant_scheduler(steps: int, **overrides: object) -> DDIMScheduler:
    """SD's DDIM scheduler with config overrides, timesteps set."""
    sched = DDIMScheduler.from_config(sd_scheduler().config, **overrides)
    sched.set_timesteps(steps)
    return sched


def reference_step(sched: DDIMScheduler, model_output: torch.Tensor, t: int, x: torch.Tensor, eta: float,
                   prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DDPO's DDIM policy (ddpo-pytorch's ddim_step_with_logprob math) in float64: (mean, sigma, log p [B]).

    Uses the scheduler's own alphas_cumprod (float32, as diffusers computes it) so that only the step's
    arithmetic is compared, and diffusers' final alpha for t - T_train // steps < 0.
    """
    c = sched.config
    a = sched.alphas_cumprod.double()
    prev_t = t - c.num_train_timesteps // sched.num_inference_steps
    a_t = a[t]
    a_prev = a[prev_t] if prev_t >= 0 else torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
    out, x = model_output.double(), x.double()
    if c.prediction_type == "epsilon":
        x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
    elif c.prediction_type == "sample":
        x0, eps = out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
    else:  # v_prediction
        x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * out, a_t.sqrt() * out + (1 - a_t).sqrt() * x
    if c.clip_sample:
        x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    log_prob = -((prev.double() - mean) ** 2) / (2 * std**2) - std.log() - 0.5 * math.log(2 * math.pi)
    return mean, std, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ddim_step_matches_diffusers_and_ddpo_log_prob_for_every_scheduler_variant(variant: str, eta: float) -> None:
    sched = variant_scheduler(10, **VARIANTS[variant])
    plain = variant_scheduler(10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    out = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    stochastic = sampling.stochastic_steps(sched, sched.timesteps, eta)
    differs = False  # whether the variant changes any step: the test could tell it from plain epsilon
    for i, t in enumerate(sched.timesteps):
        theirs = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample  # [3, 4, 8, 8] float32
        ours, _ = ddim.ddim_step_with_logprob(sched, out, t, x, eta, noise=noise)
        # Ours is rounded to float16 (the stored precision): equal up to one float16 ulp (2^-10 relative).
        torch.testing.assert_close(ours, theirs.to(torch.float16).float(), atol=1e-5, rtol=1e-3)
        plain_prev = plain.step(out, plain.timesteps[i], x, eta=eta, variance_noise=noise).prev_sample
        differs |= not torch.allclose(theirs, plain_prev, atol=1e-2)
        # The log-probability of diffusers' own (unrounded) sample, against DDPO's math in float64.
        _, lp = ddim.ddim_step_with_logprob(sched, out, t, x, eta, prev_sample=theirs)
        assert torch.isfinite(lp).all()
        if not stochastic[i]:  # set_alpha_to_one's last step: variance 0, a deterministic map
            assert variant == "set_alpha_to_one" and i == len(sched.timesteps) - 1
            assert lp.abs().max() == 0  # log of probability 1; never NaN
            continue
        mean, std, ref = reference_step(sched, out, int(t), x, eta, theirs)
        # The reference is diffusers' step too: its mean plus sigma times the same noise. float32 vs 64:
        # at zero SNR with eta 1, 1 - a_prev - sigma^2 cancels to 0 and its square root turns fp32's
        # 1e-7 into ~3e-4 (times |eps| <= 4); elsewhere they agree to ~1e-6.
        torch.testing.assert_close(theirs.double(), mean + std * noise.double(), atol=2e-3, rtol=0)
        # float32 vs float64 arithmetic: the mean is off by ~1e-7 relative; at sigma >= 0.02 (the
        # smallest step here) and |z| <= 4 that moves the averaged log-prob by < 1e-4.
        torch.testing.assert_close(lp.double(), ref, atol=1e-4, rtol=0)
    assert stochastic.all() == (variant != "set_alpha_to_one")
    assert differs == bool(VARIANTS[variant])


def test_eta_zero_is_refused_where_log_probs_are_needed() -> None:
    sched = sd_scheduler(10)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim.ddim_step_with_logprob(sched, x, sched.timesteps[0], x, 0.0, noise=x)


def _inputs(n: int, size: int) -> tuple[list[str], list[Image.Image]]:
    pose = render_pose(get_builtin_pose("t_pose"), size, size)
    return [f"prompt number {i}" for i in range(n)], [pose] * n


@pytest.mark.parametrize("components", ["sd15_components", "sdxl_components"])
def test_rescoring_a_recorded_transition_reproduces_its_log_prob(components: str,
                                                                 request: pytest.FixtureRequest) -> None:
    comp = request.getfixturevalue(components)
    cfg = SampleConfig(steps=5, guidance_scale=4.0)
    prompts, controls = _inputs(3, 64)
    out = sampling.sample(comp, prompts, controls, [11, 12, 13], cfg, 64, 64)
    side = 64 // comp.vae_scale_factor  # tiny-sd15 downsamples by 4, tiny-sdxl by 8
    assert out.latents.shape == (3, 6, 4, side, side)
    assert out.latents.dtype == torch.float16
    assert out.log_probs.shape == (3, 5)
    assert torch.isfinite(out.log_probs).all()
    assert len(out.images) == 3 and out.images[0].size == (64, 64)
    cond = sampling.make_conditioning(comp, prompts, controls, cfg, 64, 64)
    for step in range(5):
        with torch.no_grad():
            lp = sampling.rescore(comp, cond, out.latents, out.timesteps, step, cfg)
        # Same weights, batch and threads: the same kernels on the same inputs, so fp32 log-probs of
        # size ~1-10 agree far below 1e-5 (bit-equal here), while a wrong transition scores far lower (below).
        torch.testing.assert_close(lp, out.log_probs[:, step], atol=1e-5, rtol=0)
    # A different recorded x_{t-1} (another image's) scores lower: the check can fail. A log-prob is the mean over the
    # latent's elements (1,024 for sd15, 256 for sdxl) of a Gaussian log-density, so for the right x_{t-1} its
    # eps^2 / 2 part varies by ~0.02-0.04 between images; 0.25 lower is > 5 of those. Measured: 0.76-1.70 lower on
    # the 2-head world's sd15.
    swapped = out.latents.clone()
    swapped[:, 3] = swapped[[1, 2, 0], 3]
    with torch.no_grad():
        lp_wrong = sampling.rescore(comp, cond, swapped, out.timesteps, 2, cfg)
    assert (lp_wrong < out.log_probs[:, 2] - 0.25).all(), (lp_wrong, out.log_probs[:, 2])


def test_an_image_depends_on_its_seed_not_its_batch(sd15_components) -> None:  # type: ignore[no-untyped-def]
    cfg = SampleConfig(steps=3)
    prompts, controls = _inputs(3, 64)
    batch = sampling.sample(sd15_components, prompts, controls, [5, 6, 7], cfg, 64, 64)
    alone = sampling.sample(sd15_components, prompts[1:2], controls[1:2], [6], cfg, 64, 64)
    again = sampling.sample(sd15_components, prompts[1:2], controls[1:2], [6], cfg, 64, 64)
    # Same seed, same batch: the same computation, bit-equal in practice. MKL guarantees identical GEMM
    # results only for identical memory alignment, and one flipped float16 rounding (2^-10 relative,
    # |x| < 4) may carry through the next steps; another seed differs by O(1) (checked below).
    torch.testing.assert_close(alone.latents.float(), again.latents.float(), atol=1e-2, rtol=0)
    # Across batch sizes only float16 rounding of matmul differences may flip.
    torch.testing.assert_close(batch.latents[1].float(), alone.latents[0].float(), atol=0.1, rtol=0)
    assert not torch.allclose(batch.latents[0].float(), batch.latents[1].float(), atol=0.1)


def test_start_seeds_give_one_start_and_each_image_its_own_step_noise(sd15_components) -> None:  # type: ignore[no-untyped-def]
    cfg = SampleConfig(steps=3)
    prompts, controls = _inputs(3, 64)
    own = sampling.sample(sd15_components, prompts, controls, [5, 6, 7], cfg, 64, 64)
    shared = sampling.sample(sd15_components, prompts, controls, [5, 6, 7], cfg, 64, 64, start_seeds=[9, 9, 9])
    x_t = shared.latents[:, 0].float()
    # x_T is a CPU generator's draw, no model compute: generators seeded alike give the same bits anywhere.
    torch.testing.assert_close(x_t[1], x_t[0], atol=0, rtol=0)
    torch.testing.assert_close(x_t[2], x_t[0], atol=0, rtol=0)
    assert not torch.allclose(own.latents[0, 0].float(), own.latents[1, 0].float(), atol=0.1)
    # The step noise is still each image's: the same start ends in different images (O(1) apart, where
    # float16 rounding is < 1e-2).
    assert (shared.latents[0, -1].float() - shared.latents[1, -1].float()).abs().max() > 0.1
    # An image's steps do not depend on where its start came from: the first step's noise is its seed's.
    alone = sampling.sample(sd15_components, prompts[:1], controls[:1], [5], cfg, 64, 64, start_seeds=[9])
    torch.testing.assert_close(alone.latents[0].float(), shared.latents[0].float(), atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="start_seeds: 1 given for 3 seeds"):
        sampling.sample(sd15_components, prompts, controls, [5, 6, 7], cfg, 64, 64, start_seeds=[9])


def test_sampler_refuses_a_resolution_the_model_cannot_take(sd15_components) -> None:  # type: ignore[no-untyped-def]
    prompts, controls = _inputs(1, 72)
    with pytest.raises(ValueError, match="multiples of 16"):
        sampling.sample(sd15_components, prompts, controls, [1], SampleConfig(steps=2), 72, 72)


def test_sdxl_conditioning_has_pooled_embeds_and_time_ids(sdxl_components) -> None:  # type: ignore[no-untyped-def]
    prompts, controls = _inputs(2, 64)
    cond = sampling.make_conditioning(sdxl_components, prompts, controls, SampleConfig(), 64, 64)
    assert cond.prompt_embeds.shape == (2, 77, 64)  # both text encoders concatenated
    assert cond.added is not None and cond.added["text_embeds"].shape == (2, 32)
    assert cond.added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2


def test_controlnet_scale_zero_skips_the_controlnet_and_matches_its_zero_residuals(
    sd15_components, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    prompts, controls = _inputs(2, 64)
    cfg = SampleConfig(guidance_scale=3.0)
    cond = sampling.make_conditioning(sd15_components, prompts, controls, cfg, 64, 64)
    side = 64 // sd15_components.vae_scale_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(501)
    with torch.no_grad():
        tiny_scale = sampling.predict_noise(sd15_components, x, t, cond, 3.0, 1e-12)
        calls = []
        real = type(sd15_components.controlnet).forward
        monkeypatch.setattr(type(sd15_components.controlnet), "forward",
                            lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
        skipped = sampling.predict_noise(sd15_components, x, t, cond, 3.0, 0.0)
    assert calls == []
    torch.testing.assert_close(skipped, tiny_scale, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["v_prediction", "sample", "clip_sample", "set_alpha_to_one", "zero_snr_v"])
def test_sampler_steps_like_diffusers_and_rescoring_is_exact_under_scheduler_variants(
    variant: str, sd15_components, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    comp = sd15_components
    sched = DDIMScheduler.from_config(comp.scheduler.config, **VARIANTS[variant])
    monkeypatch.setattr(comp.pipe, "scheduler", sched)  # restored after the test: the fixture is shared
    cfg = SampleConfig(steps=4, guidance_scale=3.0)
    prompts, controls = _inputs(2, 64)
    seeds = [21, 22]
    out = sampling.sample(comp, prompts, controls, seeds, cfg, 64, 64)
    assert torch.isfinite(out.log_probs).all() and torch.isfinite(out.latents.float()).all()
    # The first transition is diffusers' step of the same model output with the same noise: each
    # image's generator draws x_T first, then the noise of step 0.
    shape = tuple(out.latents.shape[2:])
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    noise = torch.stack([(torch.randn(shape, generator=g), torch.randn(shape, generator=g))[1] for g in gens])
    x_t, t = out.latents[:, 0].float(), out.timesteps[0]
    with torch.no_grad():
        eps = sampling.predict_noise(comp, x_t, t, out.cond, cfg.guidance_scale, cfg.controlnet_scale)
    theirs = sched.step(eps, t, x_t, eta=cfg.eta, variance_noise=noise).prev_sample
    torch.testing.assert_close(out.latents[:, 1].float(), theirs.to(torch.float16).float(), atol=1e-5, rtol=1e-3)
    for step in range(cfg.steps):
        with torch.no_grad():
            lp = sampling.rescore(comp, out.cond, out.latents, out.timesteps, step, cfg)
        torch.testing.assert_close(lp, out.log_probs[:, step], atol=1e-5, rtol=0)  # as in the test above
    if variant == "set_alpha_to_one":
        assert out.log_probs[:, -1].tolist() == [0.0, 0.0]  # the deterministic last step: log 1, not NaN
        assert sampling.stochastic_steps(sched, out.timesteps, cfg.eta).tolist() == [True, True, True, False]


@pytest.mark.parametrize(("overrides", "field"), [
    ({"thresholding": True}, "scheduler.thresholding"),
    ({"prediction_type": "flow_prediction"}, "scheduler.prediction_type"),
    ({"rescale_betas_zero_snr": True}, "scheduler.rescale_betas_zero_snr"),
    ({"clip_sample": True, "clip_sample_range": 0.0}, "scheduler.clip_sample_range"),
])
def test_unsupported_scheduler_settings_are_refused_in_one_line_naming_the_field(
    overrides: dict[str, object], field: str, sd15_components, monkeypatch: pytest.MonkeyPatch  # type: ignore[no-untyped-def]
) -> None:
    sched = variant_scheduler(4, **overrides)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: ") as exc:
        ddim.ddim_step_with_logprob(sched, x, sched.timesteps[0], x, 1.0, noise=x)
    assert "\n" not in str(exc.value)
    # The sampler refuses before it encodes a prompt or runs the model.
    monkeypatch.setattr(sd15_components.pipe, "scheduler", sched)
    monkeypatch.setattr(sampling, "make_conditioning", lambda *a, **k: pytest.fail("sampled despite the error"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(field)}: "):
        sampling.sample(sd15_components, *_inputs(1, 64), [1], SampleConfig(steps=4), 64, 64)


def test_eta_above_one_is_refused_by_the_step() -> None:
    sched = sd_scheduler(10)
    x = torch.zeros(1, 4, 2, 2)
    ddim.ddim_step_with_logprob(sched, x, sched.timesteps[0], x, 1.0, noise=x)  # the upper bound is fine
    with pytest.raises(ValueError, match="eta must be <= 1"):
        ddim.ddim_step_with_logprob(sched, x, sched.timesteps[0], x, 1.5, noise=x)
