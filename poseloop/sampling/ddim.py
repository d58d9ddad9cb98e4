"""DDIM's step as a Gaussian policy: the step's mean, its log-probability, and the scheduler settings it models.

The step follows diffusers' DDIMScheduler.step (eta > 0); the log-probability is ddpo-pytorch's
ddim_step_with_logprob. The LCM step (poseloop.sampling.lcm) shares the x0 / eps prediction.
"""

from __future__ import annotations

import math

import torch

from poseloop.config.lib import ConfigError

STORE_DTYPE = torch.float16  # the trajectories' storage precision: latents are rounded to it as they are sampled

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_scheduler(scheduler: object) -> None:
    """Refuse DDIM settings this sampler does not model (ConfigError naming the scheduler field)."""
    c = scheduler.config  # type: ignore[attr-defined]
    where = "in the model's scheduler/scheduler_config.json"
    pred = c.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES:
        raise ConfigError(f"scheduler.prediction_type: {pred!r} {where} is not supported; use one of "
                          f"{', '.join(PREDICTION_TYPES)}")
    if c.get("rescale_betas_zero_snr", False) and pred == "epsilon":
        # At zero terminal SNR alpha_bar_T = 0 and x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) divides by 0.
        raise ConfigError(f"scheduler.rescale_betas_zero_snr: true {where} needs prediction_type v_prediction "
                          "(an epsilon model cannot predict x0 at zero SNR); set one of them accordingly")
    if c.get("thresholding", False):
        # Dynamic thresholding (Imagen) rescales x0 by a per-image quantile; it is meant for pixel-space
        # models, not latents, and its mean is not modelled here.
        raise ConfigError(f"scheduler.thresholding: true {where} is not supported (dynamic thresholding is for "
                          "pixel-space models); set it to false")
    if c.get("clip_sample", False) and not c.get("clip_sample_range", 1.0) > 0:
        raise ConfigError(f"scheduler.clip_sample_range: must be > 0 when clip_sample is true (got "
                          f"{c.get('clip_sample_range')}) {where}")


def sigma_and_alphas(scheduler: object, timestep: torch.Tensor, eta: float, num_steps: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha_bar_t, alpha_bar_{t-1} and sigma_t for DDIM (scheduler's own schedule), as float32 [B].

    num_steps: the sampling steps; None = the scheduler's current num_inference_steps.
    """
    alphas = scheduler.alphas_cumprod.to(torch.float32)  # type: ignore[attr-defined]
    num_steps = num_steps or scheduler.num_inference_steps  # type: ignore[attr-defined]
    # diffusers' DDIMScheduler.step takes the previous timestep as t - T_train // steps whatever the spacing.
    step = scheduler.config.num_train_timesteps // num_steps  # type: ignore[attr-defined]
    t = timestep.to("cpu", torch.long)
    prev_t = t - step
    alpha_t = alphas[t]
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)  # type: ignore[attr-defined]
    alpha_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], final)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    # variance is exactly 0 only when alpha_bar_{t-1} = 1 (set_alpha_to_one's final step); clamp(0) removes
    # a rounding-negative value elsewhere so that sqrt never gives NaN.
    return alpha_t, alpha_prev, eta * variance.clamp(min=0).sqrt()


def predicted_x0_and_eps(prediction_type: str, model_output: torch.Tensor, sample: torch.Tensor,
                         alpha_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) [B, C, h, w] from the model output, as diffusers' DDIMScheduler.step derives them.

    alpha_t is alpha_bar_t broadcastable to the sample ([B, 1, 1, 1]).
    """
    beta_t = 1 - alpha_t
    if prediction_type == "epsilon":
        return (sample - beta_t.sqrt() * model_output) / alpha_t.sqrt(), model_output
    if prediction_type == "sample":
        return model_output, (sample - alpha_t.sqrt() * model_output) / beta_t.sqrt()
    if prediction_type == "v_prediction":
        v = model_output
        return alpha_t.sqrt() * sample - beta_t.sqrt() * v, alpha_t.sqrt() * v + beta_t.sqrt() * sample
    raise ConfigError(f"scheduler.prediction_type: {prediction_type!r} is not supported; use one of "
                      f"{', '.join(PREDICTION_TYPES)}")


def ddim_step_with_logprob(
    scheduler: object,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step x_t -> x_{t-1} and its Gaussian log-probability (mean over C, H, W).

    Follows diffusers' DDIMScheduler.step for every prediction type and clip_sample (eps is not
    re-derived from a clipped x0, as the pipelines call it). With prev_sample given, scores that
    recorded transition instead of sampling one. The new sample is rounded to float16, the precision
    trajectories are stored in. A step with sigma_t = 0 (see stochastic_steps) has log-probability 0.
    Returns (prev_sample [B, C, h, w] float32, log_prob [B] float32).
    """
    if not eta > 0:
        raise ValueError(f"eta must be > 0 to compute log-probabilities (got {eta}); DDIM with eta = 0 is deterministic")
    if eta > 1:
        raise ValueError(f"eta must be <= 1 (got {eta}): above 1 sigma_t^2 exceeds 1 - alpha_bar_{{t-1}}")
    check_scheduler(scheduler)
    c = scheduler.config  # type: ignore[attr-defined]
    batch = sample.shape[0]
    t = torch.as_tensor(timestep).reshape(-1).expand(batch) if torch.as_tensor(timestep).numel() == 1 \
        else torch.as_tensor(timestep)
    alpha_t, alpha_prev, sigma = (x.to(sample.device).view(batch, 1, 1, 1) for x in sigma_and_alphas(scheduler, t, eta))
    x_t = sample.float()
    pred_x0, eps = predicted_x0_and_eps(c.get("prediction_type", "epsilon"), model_output.float(), x_t, alpha_t)
    if c.get("clip_sample", False):
        pred_x0 = pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range)
    direction = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * eps
    mean = alpha_prev.sqrt() * pred_x0 + direction  # [B, C, h, w]
    if prev_sample is None:
        if noise is None:
            raise ValueError("pass either prev_sample (to score a transition) or noise (to sample one)")
        prev_sample = (mean + sigma * noise.to(mean)).to(STORE_DTYPE).float()
    prev_sample = prev_sample.float()
    # Gaussian log-density of the recorded x_{t-1}; gradients flow through the mean only. Where sigma = 0
    # the density does not exist: compute with sigma 1 (finite values, so no NaN reaches the gradient
    # through torch.where) and report 0, the log of the probability 1 of the only possible outcome.
    stochastic = sigma > 0  # [B, 1, 1, 1]
    safe_sigma = torch.where(stochastic, sigma, torch.ones_like(sigma))
    log_prob = (
        -((prev_sample.detach() - mean) ** 2) / (2 * safe_sigma**2)
        - torch.log(safe_sigma)
        - math.log(math.sqrt(2 * math.pi))
    )
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))
