"""The trajectory-recording DDIM sampler shared by generation and policy training.

A DDIM step with eta > 0 is a Gaussian policy, x_{t-1} ~ N(mu_theta(x_t, t), sigma_t^2 I) (DDPO).
The sampler records every latent and the log-probability of every transition. Latents are rounded
to float16 as they are produced, so the stored trajectory is exactly the one that was sampled and
re-scoring a stored step with the same weights reproduces its stored log-probability.

The step follows diffusers' DDIMScheduler.step for epsilon, v_prediction and sample prediction and
for clip_sample; other scheduler settings are refused (check_scheduler). A step with sigma_t = 0
(set_alpha_to_one's last step) is deterministic: log-probability 0, never trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from poseloop.config.generation import SampleConfig
from poseloop.sampling.ddim import STORE_DTYPE, sigma_and_alphas, check_scheduler, ddim_step_with_logprob
from poseloop.sampling.lcm import (
    check_lcm_model,
    guidance_embedding,
    lcm_scheduler,
    lcm_step_with_logprob,
    stochastic_lcm_steps,
    uses_guidance_embedding,
)
from poseloop.models.loading import Components



@dataclass
class Conditioning:
    """Text and pose conditioning of a batch of B images."""

    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_embeds: torch.Tensor | None  # [B, L, D]; None when CFG is off
    control: torch.Tensor  # [B, 3, H, W], pose images in 0..1
    added: dict[str, torch.Tensor] | None = None  # SDXL: text_embeds [B, P], time_ids [B, 6]
    negative_added: dict[str, torch.Tensor] | None = None

    def select(self, index: torch.Tensor | slice) -> Conditioning:
        """The conditioning of a subset of the batch."""
        def pick(d: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
            return None if d is None else {k: v[index] for k, v in d.items()}

        return Conditioning(
            prompt_embeds=self.prompt_embeds[index],
            negative_embeds=None if self.negative_embeds is None else self.negative_embeds[index],
            control=self.control[index], added=pick(self.added), negative_added=pick(self.negative_added),
        )


@dataclass
class SampleOutput:
    """What one sampler call produced for B images over T steps."""

    latents: torch.Tensor  # [B, T+1, C, h, w] float16: x_T ... x_0
    log_probs: torch.Tensor  # [B, T] float32: log p(x_{t-1} | x_t)
    timesteps: torch.Tensor  # [T] int64
    images: list[Image.Image]
    cond: Conditioning  # what the batch was conditioned on, for re-scoring it (policy training)


# DDIM fields whose step the log-probability models. diffusers' DDIMScheduler.step is the reference:
# the policy mean must be exactly the mean of the step that produced the sample.
def stochastic_steps(scheduler: object, timesteps: torch.Tensor, eta: float, sampler: str = "ddim") -> torch.Tensor:
    """Which steps [T] (bool) have sigma_t > 0, i.e. a log-probability that can be trained on.

    With set_alpha_to_one=True the last step lands on alpha_bar = 1: its variance is 0 and x_0 is the
    predicted x0 itself, a deterministic map with no density. Such a step is sampled but not trained on.
    The LCM sampler's last step returns its denoised latent (diffusers' LCMScheduler): likewise.
    """
    t = torch.as_tensor(timesteps).reshape(-1)  # [T], as recorded by sample()
    if sampler == "lcm":
        return stochastic_lcm_steps(t.numel())
    return sigma_and_alphas(scheduler, t, eta, num_steps=t.numel())[2] > 0


def encode_prompts(comp: Components, prompts: Sequence[str], negative_prompt: str, do_cfg: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor] | None,
                              dict[str, torch.Tensor] | None]:
    """Text embeddings for a batch (and the negative ones for CFG); SDXL also pooled embeds."""
    pipe = comp.pipe
    negatives = [negative_prompt] * len(prompts)
    with torch.no_grad():
        if comp.arch == "sd15":
            pos, neg = pipe.encode_prompt(list(prompts), comp.device, 1, do_cfg, negative_prompt=negatives)
            return pos, (neg if do_cfg else None), None, None
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt=list(prompts), device=comp.device, num_images_per_prompt=1,
            do_classifier_free_guidance=do_cfg, negative_prompt=negatives,
        )
    return pos, (neg if do_cfg else None), {"text_embeds": pooled}, ({"text_embeds": neg_pooled} if do_cfg else None)


def sdxl_time_ids(batch: int, height: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """SDXL's added time ids (original size, crop top-left, target size): [B, 6]."""
    ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
    return ids.repeat(batch, 1)


def make_conditioning(comp: Components, prompts: Sequence[str], control_images: Sequence[Image.Image],
                      cfg: SampleConfig, width: int, height: int) -> Conditioning:
    """Encode prompts and preprocess pose images for one batch."""
    if len(prompts) != len(control_images):
        raise ValueError(f"{len(prompts)} prompts but {len(control_images)} pose images")
    # An LCM distilled with a guidance embedding takes w through timestep_cond, not a CFG pass (diffusers'
    # LCM and ControlNet pipelines: do_classifier_free_guidance is False when time_cond_proj_dim is set).
    do_cfg = cfg.guidance_scale > 1.0 and not (cfg.sampler == "lcm" and uses_guidance_embedding(comp.unet))
    pos, neg, added, neg_added = encode_prompts(comp, prompts, cfg.negative_prompt, do_cfg)
    if comp.arch == "sdxl":
        ids = sdxl_time_ids(len(prompts), height, width, pos.dtype, comp.device)
        assert added is not None
        added["time_ids"] = ids
        if neg_added is not None:
            neg_added["time_ids"] = ids
    control = comp.pipe.control_image_processor.preprocess(list(control_images), height=height, width=width)
    return Conditioning(prompt_embeds=pos, negative_embeds=neg,
                        control=control.to(comp.device, comp.dtype), added=added, negative_added=neg_added)


def predict_noise(comp: Components, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning,
                  guidance_scale: float, controlnet_scale: float, timestep_cond: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """ControlNet + UNet noise prediction with classifier-free guidance: [B, C, h, w].

    timestep_cond: an LCM's guidance embedding [B, D] (lcm_timestep_cond), given to the UNet only, as
    diffusers' ControlNet pipelines do (a ControlNet has no time_cond_proj_dim).
    """
    do_cfg = cond.negative_embeds is not None
    x = latents.to(comp.dtype)
    if do_cfg:
        assert cond.negative_embeds is not None
        x = torch.cat([x, x])  # [2B, C, h, w]: uncond half first, as diffusers does
        context = torch.cat([cond.negative_embeds, cond.prompt_embeds])
        control = torch.cat([cond.control, cond.control])
        added = None if cond.added is None else {
            k: torch.cat([cond.negative_added[k], v]) for k, v in cond.added.items()  # type: ignore[index]
        }
    else:
        context, control, added = cond.prompt_embeds, cond.control, cond.added
    x = comp.scheduler.scale_model_input(x, timestep)
    down, mid = None, None
    if controlnet_scale != 0:  # at scale 0 its residuals are all zero: skip the whole forward pass
        down, mid = comp.controlnet(x, timestep, encoder_hidden_states=context, controlnet_cond=control,
                                    conditioning_scale=controlnet_scale, added_cond_kwargs=added, return_dict=False)
    if timestep_cond is not None and do_cfg:
        timestep_cond = torch.cat([timestep_cond, timestep_cond])
    eps = comp.unet(x, timestep, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, added_cond_kwargs=added, timestep_cond=timestep_cond,
                    return_dict=False)[0]
    if do_cfg:
        uncond, text = eps.chunk(2)
        eps = uncond + guidance_scale * (text - uncond)
    return eps


def lcm_timestep_cond(comp: Components, cfg: SampleConfig, batch: int) -> torch.Tensor | None:
    """The w-embedding [B, D] for an LCM with a guidance embedding under the LCM sampler; else None."""
    if cfg.sampler != "lcm" or not uses_guidance_embedding(comp.unet):
        return None
    emb = guidance_embedding(cfg.guidance_scale, int(comp.unet.config.time_cond_proj_dim), batch)
    return emb.to(comp.device, comp.dtype)


def _step_scheduler(comp: Components, cfg: SampleConfig) -> object:
    """The scheduler whose timesteps drive cfg's sampler: the model's DDIM, or an LCMScheduler from its config."""
    if cfg.sampler == "lcm":
        return lcm_scheduler(comp.scheduler, cfg.steps, device=comp.device)
    comp.scheduler.set_timesteps(cfg.steps, device=comp.device)
    return comp.scheduler


def _step(cfg: SampleConfig, scheduler: object, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor,
          prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of cfg's sampler with its log-probability: (prev_sample, log_prob [B])."""
    if cfg.sampler == "lcm":
        return lcm_step_with_logprob(scheduler, model_output, t, x, prev_sample=prev_sample, noise=noise)
    return ddim_step_with_logprob(scheduler, model_output, t, x, cfg.eta, prev_sample=prev_sample, noise=noise)


def initial_noise(seeds: Sequence[int], shape: tuple[int, int, int], start_seeds: Sequence[int] | None = None
                  ) -> tuple[torch.Tensor, list[torch.Generator]]:
    """x_T for each image from its own CPU generator, so an image depends on its seed alone.

    start_seeds: x_T from these seeds' generators instead (images given one start seed start alike and
    differ only by their step noise, which still comes from `seeds`).
    Returns (x_T [B, C, h, w] float32 rounded to float16, the generators for the step noise).
    """
    gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if start_seeds is None:
        x = torch.stack([torch.randn(shape, generator=g) for g in gens])
    else:
        if len(start_seeds) != len(seeds):
            raise ValueError(f"start_seeds: {len(start_seeds)} given for {len(seeds)} seeds")
        x = torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in start_seeds])
    return x.to(STORE_DTYPE).float(), gens


@torch.no_grad()
def decode_latents(comp: Components, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in 0..1 (float32)."""
    vae = comp.vae
    needs_upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if needs_upcast:
        vae.to(torch.float32)
    try:
        z = latents.to(comp.device, vae.dtype) / vae.config.scaling_factor
        image = vae.decode(z, return_dict=False)[0]
    finally:
        if needs_upcast:
            vae.to(torch.float16)
    return (image.float() / 2 + 0.5).clamp(0, 1)


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images (one size) -> [B, 3, H, W] float32 in 0..1."""
    arr = np.stack([np.asarray(im.convert("RGB")) for im in images])  # [B, H, W, 3] uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in 0..1 -> PIL RGB images."""
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def sample(comp: Components, prompts: Sequence[str], control_images: Sequence[Image.Image], seeds: Sequence[int],
           cfg: SampleConfig, width: int, height: int,
           on_step: Callable[[int], None] | None = None,
           autocast: Callable[[], AbstractContextManager[object]] = nullcontext,
           start_seeds: Sequence[int] | None = None) -> SampleOutput:
    """Denoise a batch with cfg.sampler (DDIM with eta > 0, or LCM), recording latents and log-probabilities.

    `autocast` wraps each noise prediction: the policy trainer passes the context its training pass
    runs in (accelerate's autocast), so that re-scoring reproduces the sampled log-probabilities.
    start_seeds: x_T from these seeds instead of `seeds` (initial_noise); the step noise stays the seeds'.
    """
    if not (len(prompts) == len(control_images) == len(seeds)):
        raise ValueError("prompts, control_images and seeds must have the same length")
    if width % comp.resolution_multiple or height % comp.resolution_multiple:
        raise ValueError(f"{width}x{height}: this model needs sizes that are multiples of {comp.resolution_multiple}")
    check_scheduler(comp.scheduler)  # before any work: an unsupported scheduler fails at once
    if cfg.sampler == "lcm":
        check_lcm_model(comp, stacklevel=4)  # points at sample()'s caller (through torch.no_grad's wrapper)
    scheduler = _step_scheduler(comp, cfg)
    cond = make_conditioning(comp, prompts, control_images, cfg, width, height)
    timestep_cond = lcm_timestep_cond(comp, cfg, len(prompts))
    shape = (comp.latent_channels, height // comp.vae_scale_factor, width // comp.vae_scale_factor)
    x, gens = initial_noise(seeds, shape, start_seeds)
    x = x.to(comp.device) * scheduler.init_noise_sigma
    all_latents = [x]
    all_log_probs = []
    for i, t in enumerate(scheduler.timesteps):
        with autocast():
            eps = predict_noise(comp, x, t, cond, cfg.guidance_scale, cfg.controlnet_scale, timestep_cond)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(comp.device)
        x, log_prob = _step(cfg, scheduler, eps, t, x, noise=noise)
        all_latents.append(x)
        all_log_probs.append(log_prob)
        if on_step is not None:
            on_step(i)
    images = decode_latents(comp, x)
    return SampleOutput(
        latents=torch.stack(all_latents, dim=1).to("cpu", STORE_DTYPE),  # [B, T+1, C, h, w]
        log_probs=torch.stack(all_log_probs, dim=1).cpu(),  # [B, T]
        timesteps=scheduler.timesteps.detach().to("cpu", torch.long),  # [T]
        images=to_pil(images),
        cond=cond,
    )


def rescore(comp: Components, cond: Conditioning, latents: torch.Tensor, timesteps: torch.Tensor, step: int,
            cfg: SampleConfig, autocast: Callable[[], AbstractContextManager[object]] = nullcontext) -> torch.Tensor:
    """Log-probability [B] of the recorded transition `step` (x_t -> x_{t-1}) under the current weights.

    latents: [B, T+1, C, h, w] as stored. Differentiable w.r.t. the trainable weights. `autocast`
    wraps the noise prediction only, exactly as in sample(): the step's math stays float32 in both.
    """
    scheduler = _step_scheduler(comp, cfg)
    x_t = latents[:, step].to(comp.device).float()
    x_prev = latents[:, step + 1].to(comp.device).float()
    t = timesteps[step].to(comp.device)
    with autocast():
        eps = predict_noise(comp, x_t, t, cond, cfg.guidance_scale, cfg.controlnet_scale,
                            lcm_timestep_cond(comp, cfg, x_t.shape[0]))
    _, log_prob = _step(cfg, scheduler, eps, t, x_t, prev_sample=x_prev)
    return log_prob
