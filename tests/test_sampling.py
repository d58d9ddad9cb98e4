"""The DDIM policy step, and the trajectory-recording sampler on the tiny SD1.5 and SDXL models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from poseloop import sampling
from poseloop.config import SampleConfig
from poseloop.poses import get_builtin_pose, render_pose


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
    _, log_prob = sampling.ddim_step_with_logprob(sched, noise_pred, t, sample, 1.0, prev_sample=recorded)
    expected = -0.5 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    assert log_prob.shape == (2,)
    assert log_prob[0].item() == pytest.approx(expected, abs=2e-3 if prev_t is None else 1e-4)
    # Sampling with zero noise lands on the mean (rounded to float16).
    prev, lp0 = sampling.ddim_step_with_logprob(sched, noise_pred, t, sample, 1.0, noise=torch.zeros_like(sample))
    assert prev[0, 0, 0, 0].item() == pytest.approx(mean, rel=1e-3)
    assert lp0[0].item() == pytest.approx(-math.log(sigma) - 0.5 * math.log(2 * math.pi), abs=0.05)


def test_ddim_step_agrees_with_diffusers_scheduler_step() -> None:
    sched = sd_scheduler(10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    eps = torch.randn(3, 4, 8, 8, generator=gen)
    noise = torch.randn(3, 4, 8, 8, generator=gen)
    for t in sched.timesteps[:3]:
        ours, _ = sampling.ddim_step_with_logprob(sched, eps, t, x, 1.0, noise=noise)
        theirs = sched.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours, theirs.to(torch.float16).float(), atol=2e-3, rtol=0)


def test_eta_zero_is_refused_where_log_probs_are_needed() -> None:
    sched = sd_scheduler(10)
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta must be > 0"):
        sampling.ddim_step_with_logprob(sched, x, sched.timesteps[0], x, 0.0, noise=x)


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
    assert out.latents.shape == (3, 6, 4, 8, 8)
    assert out.latents.dtype == torch.float16
    assert out.log_probs.shape == (3, 5)
    assert torch.isfinite(out.log_probs).all()
    assert len(out.images) == 3 and out.images[0].size == (64, 64)
    cond = sampling.make_conditioning(comp, prompts, controls, cfg, 64, 64)
    for step in range(5):
        with torch.no_grad():
            lp = sampling.rescore(comp, cond, out.latents, out.timesteps, step, cfg)
        torch.testing.assert_close(lp, out.log_probs[:, step], atol=1e-5, rtol=0)
    # A different recorded x_{t-1} (another image's) scores lower: the check can fail.
    swapped = out.latents.clone()
    swapped[:, 3] = swapped[[1, 2, 0], 3]
    with torch.no_grad():
        lp_wrong = sampling.rescore(comp, cond, swapped, out.timesteps, 2, cfg)
    assert (lp_wrong < out.log_probs[:, 2] - 1.0).all()


def test_an_image_depends_on_its_seed_not_its_batch(sd15_components) -> None:  # type: ignore[no-untyped-def]
    cfg = SampleConfig(steps=3)
    prompts, controls = _inputs(3, 64)
    batch = sampling.sample(sd15_components, prompts, controls, [5, 6, 7], cfg, 64, 64)
    alone = sampling.sample(sd15_components, prompts[1:2], controls[1:2], [6], cfg, 64, 64)
    again = sampling.sample(sd15_components, prompts[1:2], controls[1:2], [6], cfg, 64, 64)
    assert torch.equal(alone.latents, again.latents)  # same seed, same batch: bit-identical
    # Across batch sizes only float16 rounding of matmul differences may flip.
    torch.testing.assert_close(batch.latents[1].float(), alone.latents[0].float(), atol=0.1, rtol=0)
    assert not torch.allclose(batch.latents[0].float(), batch.latents[1].float(), atol=0.1)


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
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
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
