"""The latent consistency model (LCM) sampler step as a Gaussian policy (RLCM), with diffusers' semantics.

An LCM step at timestep t predicts x0, applies the consistency boundary condition
denoised = c_out(t) * x0 + c_skip(t) * x_t, and (except at the last step) re-noises to the next timestep
of the grid: x_prev = sqrt(alpha_bar_prev) * denoised + sqrt(1 - alpha_bar_prev) * z. With z ~ N(0, I)
that is a Gaussian policy N(sqrt(alpha_bar_prev) * denoised, (1 - alpha_bar_prev) I), and its
log-density (mean over C, H, W, as for DDIM) is what RLCM trains with PPO.

Everything follows diffusers' LCMScheduler (built from the model's scheduler config): the timestep grid
(set_timesteps with original_inference_steps), alphas_cumprod, the boundary scalings and the last step,
which returns `denoised` itself. That last step is deterministic: log-probability 0 and never trained
(poseloop.sampling.sampler.stochastic_steps), exactly as DDIM's set_alpha_to_one step. RLCM instead injects
noise at its last step too (prev = the current timestep) and decodes the image from `denoised`; that
noise never reaches the image, so its step's expected policy gradient is zero (it only adds variance),
and keeping diffusers' step means the stored x_0 is the clean latent every reward, the reward model and
the rating app read. RLCM's own grid ((1..50) * 20 - 1 every 50 // n: 8 steps end at 159) differs
from diffusers' (floor of evenly spaced indices: 8 steps end at 139); this module uses diffusers'.

Guidance as LCMs take it: a model distilled with a guidance embedding (unet.config.time_cond_proj_dim)
gets w = guidance_scale - 1 as `timestep_cond` and no CFG pass; any other model (an LCM-LoRA fused into
a base) gets ordinary classifier-free guidance (LCM-LoRAs: guidance_scale 1-2).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from poseloop.config.lib import ConfigError
from poseloop.sampling.ddim import STORE_DTYPE, check_scheduler, predicted_x0_and_eps


LCM_LORA_HINT = ("load an LCM checkpoint (e.g. --model.base SimianLuo/LCM_Dreamshaper_v7) or pass --model.lcm_lora "
                 "with an LCM-LoRA (latent-consistency/lcm-lora-sdv1-5, SDXL: latent-consistency/lcm-lora-sdxl)")


def lcm_scheduler(scheduler: Any, steps: int, device: torch.device | str | None = None) -> Any:
    """diffusers' LCMScheduler built from the model's scheduler config, with its timesteps set for `steps`."""
    from diffusers import LCMScheduler

    sched = LCMScheduler.from_config(scheduler.config)
    original = int(sched.config.original_inference_steps)
    if not 1 <= steps <= original:
        raise ConfigError(f"sample.steps: the LCM sampler takes 1..{original} steps (the scheduler's "
                          f"original_inference_steps) (got {steps}); LCMs are meant for 2-8")
    sched.set_timesteps(steps, device=device)
    return sched


def rlcm_timesteps(steps: int, original_steps: int = 50, num_train_timesteps: int = 1000) -> torch.Tensor:
    """RLCM's own timestep grid, for comparison: (1..original) * k - 1 reversed, every original // steps."""
    k = num_train_timesteps // original_steps
    origin = torch.arange(original_steps, 0, -1) * k - 1  # 999, 979, ..., 19
    return origin[:: original_steps // steps][:steps]


def guidance_embedding(guidance_scale: float, dim: int, batch: int, dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor:
    """The w-embedding [B, dim] of w = guidance_scale - 1 (LatentConsistencyModelPipeline.get_guidance_scale_embedding)."""
    w = torch.full((batch,), guidance_scale - 1.0) * 1000.0
    half = dim // 2
    # The constant as a float32 tensor, exactly as diffusers computes it: sin(7000 * f) amplifies any rounding.
    freq = torch.exp(torch.arange(half, dtype=dtype) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w.to(dtype)[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:  # zero pad, as diffusers does
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def uses_guidance_embedding(unet: Any) -> bool:
    """Whether the UNet was distilled with a guidance embedding (takes w as timestep_cond instead of CFG)."""
    return getattr(unet.config, "time_cond_proj_dim", None) is not None


def check_lcm_model(comp: Any, stacklevel: int = 2) -> None:
    """Warn when the LCM sampler runs a model that is neither an LCM nor has an LCM-LoRA: say what to load."""
    if uses_guidance_embedding(comp.unet) or getattr(comp, "lcm_lora", ""):
        return
    warnings.warn("sample.sampler lcm: this model is not an LCM (its UNet has no time_cond_proj_dim) and no "
                  f"LCM-LoRA is loaded, so a few LCM steps give poor images; {LCM_LORA_HINT}", stacklevel=stacklevel)


def _step_alphas(sched: Any, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha_bar_t, alpha_bar_prev [B] float32 and whether each step is the grid's last one (bool [B])."""
    grid = sched.timesteps.to("cpu", torch.long)  # [T]
    t = t.to("cpu", torch.long)
    match = t[:, None] == grid[None, :]  # [B, T]
    if not match.any(dim=1).all():
        raise ValueError(f"timesteps {t.tolist()} are not on the LCM grid {grid.tolist()} of {len(grid)} steps")
    index = match.float().argmax(dim=1)  # [B]
    last = index == len(grid) - 1
    prev = grid[(index + 1).clamp(max=len(grid) - 1)]
    alphas = sched.alphas_cumprod.to(torch.float32)
    # The last step has no next timestep: diffusers takes prev = t there (its alpha is unused: no noise).
    prev = torch.where(last, t, prev)
    return alphas[t], alphas[prev], last


def lcm_step_with_logprob(
    sched: Any,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LCM step x_t -> x_prev (LCMScheduler.step) and its Gaussian log-probability (mean over C, H, W).

    sched is an LCMScheduler whose timesteps are set (lcm_scheduler). With prev_sample given, scores that
    recorded transition; otherwise samples one with `noise`. The new sample is rounded to float16, the
    trajectories' precision. The last step returns denoised: deterministic, log-probability 0.
    Returns (prev_sample [B, C, h, w] float32, log_prob [B] float32).
    """
    check_scheduler(sched)
    c = sched.config
    batch = sample.shape[0]
    t = torch.as_tensor(timestep).reshape(-1)
    t = t.expand(batch) if t.numel() == 1 else t
    alpha_t, alpha_prev, last = _step_alphas(sched, t)
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t.to("cpu", torch.long))  # [B] each
    view = (batch, 1, 1, 1)
    alpha_t, alpha_prev, c_skip, c_out = (x.to(sample.device, torch.float32).view(view)
                                          for x in (alpha_t, alpha_prev, c_skip, c_out))
    last = last.to(sample.device).view(view)
    x_t = sample.float()
    pred_x0, _ = predicted_x0_and_eps(c.get("prediction_type", "epsilon"), model_output.float(), x_t, alpha_t)
    if c.get("clip_sample", False):
        pred_x0 = pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range)
    denoised = c_out * pred_x0 + c_skip * x_t
    mean = torch.where(last, denoised, alpha_prev.sqrt() * denoised)
    std = torch.where(last, torch.zeros_like(alpha_prev), (1 - alpha_prev).sqrt())
    if prev_sample is None:
        if noise is None:
            raise ValueError("pass either prev_sample (to score a transition) or noise (to sample one)")
        prev_sample = (mean + std * noise.to(mean)).to(STORE_DTYPE).float()
    prev_sample = prev_sample.float()
    # As for DDIM: the density of the recorded x_prev, gradient through the mean only; the deterministic
    # last step is computed with std 1 (no NaN through torch.where) and reported as log 1 = 0.
    stochastic = std > 0
    safe_std = torch.where(stochastic, std, torch.ones_like(std))
    log_prob = (-((prev_sample.detach() - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std)
                - math.log(math.sqrt(2 * math.pi)))
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def stochastic_lcm_steps(num_steps: int) -> torch.Tensor:
    """Which LCM steps [T] (bool) have a log-probability: all but the last (which returns denoised)."""
    mask = torch.ones(num_steps, dtype=torch.bool)
    mask[-1] = False
    return mask
