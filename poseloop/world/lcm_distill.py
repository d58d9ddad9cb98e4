"""Latent consistency distillation of the embedded world into an LCM-LoRA (4-step rounds).

As diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py: a DDIM solver is the
teacher (the frozen UNet + ControlNet with CFG at a guidance w drawn per example); the student is the
same UNet with a LoRA, asked to map a noisy latent at a timestep t_n of the 50-step grid straight to the
boundary-conditioned x0 that its own (no-grad) prediction gives at the teacher's next point t_n - skip;
pseudo-Huber loss. The ControlNet is frozen and gets the pose in every call, so the LoRA learns
consistency under pose conditioning. One difference from the example, measured on the world
(docs/WORLD.md): the teacher jumps `skip` = 250 timesteps (about the 4-step sampler's own jump) instead
of one 20-timestep grid step, because with a CPU budget of hundreds of steps, not thousands, the
20-step skip left the loss flat and rounds worse, while longer jumps need fewer bootstrapped links
between the boundary and t = 999. train_world's last stage (poseloop.world.training.distill_lcm) runs it
and ships the LoRA (peft lora_A/lora_B keys, fp16) as poseloop/models/world_weights/lcm_lora.safetensors, which
the tiny-lcm preset fuses into the UNet; scripts/train_lcm_lora.py runs it alone for experiments.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from poseloop.config.lib import ConfigError, field

# What the student's LoRA covers: every linear/conv layer of the blocks plus the timestep projections
# (the published LCM-LoRAs train attention, feed-forward, conv and time_emb_proj).
LCM_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_shortcut", "time_emb_proj")


@dataclass
class LcmDistillConfig:
    """Latent consistency distillation of the embedded model (deterministic for a thread count)."""

    model: str = field("models/tiny-sd15", help="the diffusers folder of the teacher (UNet + ControlNet + text encoder)")
    examples: int = field(2048, help="rendered training examples (random poses, attributes and looks)")
    steps: int = field(600, help="optimiser steps")
    batch: int = field(16, help="examples per step")
    lr: float = field(1e-3, help="AdamW learning rate of the LoRA")
    lora_rank: int = field(16, help="LoRA rank (alpha = rank: strength 1)")
    ddim_steps: int = field(50, help="the grid of training timesteps (k * 1000 / ddim_steps - 1): the LCM sampler's "
                            "default grid is 50 (its original_inference_steps)")
    skip: int = field(250, help="timesteps one teacher DDIM step jumps (t -> t - skip): 250 is about the 4-step LCM "
                      "sampler's own jump (999, 759, 499, 259) and learned fastest here; 0: one grid step, "
                      "1000 // ddim_steps, as diffusers' example (which trains thousands of steps)")
    w_min: float = field(2.0, help="lowest guidance w drawn for the teacher (CFG scale = w + 1)")
    w_max: float = field(5.0, help="highest guidance w drawn for the teacher")
    huber_c: float = field(1e-3, help="Huber loss constant")
    seed: int = field(0, help="seed of the renders, the LoRA init and the data order")
    threads: int = field(2, help="torch threads")
    out: str = field("models/lcm_experiment/lcm_lora.safetensors", help="LoRA file to write (train_world's stage "
                     "writes its own into its run folder)")

    def validate(self) -> None:
        """Check fields before any work starts."""
        if not self.out:
            raise ConfigError("out: empty; name the LoRA file to write, e.g. models/lcm_experiment/lcm_lora.safetensors")
        for name in ("examples", "steps", "batch", "lora_rank", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if not 1 <= self.ddim_steps <= 1000 or 1000 % self.ddim_steps:
            raise ConfigError(f"ddim_steps: must divide 1000 (got {self.ddim_steps}); the published value is 50")
        if self.skip < 0 or self.skip >= 1000:
            raise ConfigError(f"skip: must be 0 (one grid step) or 1..999 timesteps (got {self.skip})")
        if not 0 <= self.w_min <= self.w_max:
            raise ConfigError(f"w_min/w_max: need 0 <= w_min <= w_max (got {self.w_min}, {self.w_max})")


class DdimSolver:
    """The teacher's solver: `steps` DDIM timesteps (k*T/steps - 1) and one deterministic step of `skip` from each."""

    def __init__(self, alphas_cumprod: torch.Tensor, steps: int, num_train_timesteps: int = 1000, skip: int = 0
                 ) -> None:
        """Precompute the timesteps, where each step lands (t - skip, at least 0) and alpha_bar there."""
        ratio = num_train_timesteps // steps
        self.timesteps = torch.arange(1, steps + 1) * ratio - 1  # [steps]: 19, 39, ..., 999 for 50
        # diffusers' solver lands on the previous grid point and, from the first, on alpha_bar_0: the same as t - skip
        # clamped at 0 when skip is one grid step.
        self.next_timesteps = (self.timesteps - (skip or ratio)).clamp(min=0)  # [steps]
        self.alpha_prev = alphas_cumprod[self.next_timesteps]

    def step(self, x0: torch.Tensor, eps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """DDIM (eta 0) from timesteps[index] to next_timesteps[index]: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps."""
        a_prev = self.alpha_prev[index].view(-1, 1, 1, 1)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def _x0(eps: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Predicted x0 of an epsilon model [B, C, h, w]; alpha is alpha_bar_t [B]."""
    a = alpha.view(-1, 1, 1, 1)
    return (x - (1 - a).sqrt() * eps) / a.sqrt()


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Pseudo-Huber loss sqrt((pred - target)^2 + c^2) - c, mean over everything (diffusers' loss_type huber)."""
    return (torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c).mean()


def _renders(cfg: LcmDistillConfig, vae: Any, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Scaled VAE latents [N, 4, h, w], condition images [N, 3, H, W] in 0..1 and prompts of fresh renders."""
    from poseloop.world.render import make_examples

    data = make_examples(cfg.examples, size, seed=cfg.seed + 5000, progress=True)
    lat = []
    with torch.no_grad():
        for i in range(0, cfg.examples, 256):
            x = torch.from_numpy(data.images[i:i + 256]).permute(0, 3, 1, 2).float() / 127.5 - 1
            lat.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    conds = torch.from_numpy(data.conditions).permute(0, 3, 1, 2).float() / 255.0
    return torch.cat(lat), conds, list(data.prompts)


def distill(cfg: LcmDistillConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Train the LCM-LoRA, write it (peft lora_A/lora_B keys, fp16) and a loss plot; return a summary."""
    from diffusers import (AutoencoderKL, ControlNetModel, DDPMScheduler, LCMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTokenizer

    from poseloop.models.embedded import ensure_embedded

    cfg.validate()
    torch.set_num_threads(cfg.threads)
    root = ensure_embedded(cfg.model)
    out = Path(cfg.out)
    run = run_dir or out.parent
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 2)

    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    controlnet = ControlNetModel.from_pretrained(root / "controlnet")
    vae = AutoencoderKL.from_pretrained(root / "vae")
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    sched = DDPMScheduler.from_pretrained(root / "scheduler")
    for m in (unet, controlnet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()
    size = vae.config.sample_size
    latents, conds, prompts = _renders(cfg, vae, size)
    with torch.no_grad():
        ids = tokenizer(prompts + [""], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        ctx_all = torch.cat([text_encoder(ids[i:i + 512])[0] for i in range(0, len(ids), 512)])
    ctx, empty = ctx_all[:-1], ctx_all[-1:]

    unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, init_lora_weights="gaussian",
                                target_modules=list(LCM_LORA_MODULES)))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    acp = sched.alphas_cumprod.float()
    solver = DdimSolver(acp, cfg.ddim_steps, sched.config.num_train_timesteps, skip=cfg.skip)
    # The boundary scalings the LCM sampler will use at inference (same config: same timestep_scaling).
    boundary = LCMScheduler.from_config(sched.config).get_scalings_for_boundary_condition_discrete

    def eps_of(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, pose: torch.Tensor, adapters: bool
               ) -> torch.Tensor:
        with torch.no_grad():
            down, mid = controlnet(x, t, encoder_hidden_states=c, controlnet_cond=pose, return_dict=False)
        (unet.enable_adapters if adapters else unet.disable_adapters)()
        return unet(x, t, encoder_hidden_states=c, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid).sample

    curve: list[float] = []
    t0 = time.time()
    bar = tqdm(range(cfg.steps), desc="LCM distillation", unit="step", mininterval=2.0)
    for step in bar:
        idx = torch.from_numpy(rng.integers(0, len(latents), cfg.batch))
        x0, c, pose = latents[idx], ctx[idx], conds[idx]
        b = len(idx)
        index = torch.randint(0, cfg.ddim_steps, (b,), generator=gen)
        t_start = solver.timesteps[index]  # [B]
        t_next = solver.next_timesteps[index]  # [B]
        noise = torch.randn(x0.shape, generator=gen)
        x_t = sched.add_noise(x0, noise, t_start)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=gen)
        skip_s, out_s = boundary(t_start)  # [B] each
        skip_n, out_n = boundary(t_next)
        # Student: consistency function at (x_t, t_start).
        eps_s = eps_of(x_t, t_start, c, pose, adapters=True)
        pred = skip_s.view(-1, 1, 1, 1) * x_t + out_s.view(-1, 1, 1, 1) * _x0(eps_s, x_t, acp[t_start])
        with torch.no_grad():
            # Teacher: one guided DDIM step t_start -> t_next (CFG with the pose in both branches).
            eps_t = eps_of(torch.cat([x_t, x_t]), torch.cat([t_start, t_start]), torch.cat([c, empty.expand(b, -1, -1)]),
                           torch.cat([pose, pose]), adapters=False)
            e_c, e_u = eps_t.chunk(2)
            x0_c, x0_u = _x0(e_c, x_t, acp[t_start]), _x0(e_u, x_t, acp[t_start])
            wv = w.view(-1, 1, 1, 1)
            x_prev = solver.step(x0_c + wv * (x0_c - x0_u), e_c + wv * (e_c - e_u), index)
            # Target: the student's own consistency function at the teacher's next point.
            eps_n = eps_of(x_prev, t_next, c, pose, adapters=True)
            target = skip_n.view(-1, 1, 1, 1) * x_prev + out_n.view(-1, 1, 1, 1) * _x0(eps_n, x_prev, acp[t_next])
        loss = consistency_loss(pred, target, cfg.huber_c)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 50)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(float(loss.detach()))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(curve[-25:]):.4f}")
    bar.close()
    unet.enable_adapters()
    # peft's lora_A/lora_B keys: diffusers drops attention layers saved in its older '.lora.down' form.
    lora = get_peft_model_state_dict(unet)
    lora = {k: v.detach().to(torch.float16).contiguous() for k, v in lora.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp_dir = tmp.with_suffix("")
    StableDiffusionPipeline.save_lora_weights(str(tmp_dir), unet_lora_layers=lora, safe_serialization=True)
    os.chmod(tmp_dir / "pytorch_lora_weights.safetensors", 0o644)  # shipped: readable by everyone
    os.replace(tmp_dir / "pytorch_lora_weights.safetensors", out)
    tmp_dir.rmdir()
    from poseloop.world.common import plot_losses

    plot_losses({"consistency loss (huber)": curve}, run / "lcm_loss.png", "LCM-LoRA distillation")
    summary = {"steps": cfg.steps, "seconds": round(time.time() - t0, 1), "loss_first_50": float(np.mean(curve[:50])),
               "loss_last_50": float(np.mean(curve[-50:])), "file": str(out)}
    (run / "lcm_distill.json").write_text(json.dumps(summary, indent=2))
    tqdm.write(f"LCM-LoRA: {cfg.steps} steps in {summary['seconds']:.0f} s, loss {summary['loss_first_50']:.4f} -> "
               f"{summary['loss_last_50']:.4f}; wrote {out}")
    return summary



def full() -> LcmDistillConfig:
    """What train_world's LCM stage runs: 600 steps of 16 renders (about 10 minutes on 2 cores)."""
    return LcmDistillConfig()


def smoke() -> LcmDistillConfig:
    """A few steps on a few renders: checks the script end to end in well under a minute."""
    return LcmDistillConfig(examples=64, steps=3, batch=4, out="models/world_run_smoke/lcm/lcm_lora.safetensors")


PRESETS = {"full": full, "smoke": smoke}
