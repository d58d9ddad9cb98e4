"""LCM-LoRA distillation of the embedded world: the teacher's DDIM step, field errors, and a smoke
distillation whose LoRA file fuses into the UNet through --model.lcm_lora."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file

from poseloop.config.generation import tiny
from poseloop.config.lib import ConfigError
from poseloop.world.lcm_distill import DdimSolver, LcmDistillConfig, distill
from poseloop.models.loading import load_components

pytestmark = pytest.mark.usefixtures("one_thread")


def sd_ddim() -> DDIMScheduler:
    """SD1.5's DDIM schedule (the embedded model's)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False)


def test_teacher_step_is_diffusers_ddim_with_eta_0() -> None:
    ddim = sd_ddim()
    ddim.set_timesteps(50)  # only num_inference_steps matters to step(): prev = t - 1000 // 50
    solver = DdimSolver(ddim.alphas_cumprod, 50)
    assert solver.timesteps[:3].tolist() == [19, 39, 59] and solver.timesteps[-1] == 999
    g = torch.Generator().manual_seed(0)
    x_t, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    for index in (0, 17, 49):  # index 0 steps to the final alpha (alpha_bar_0, set_alpha_to_one=False)
        t = int(solver.timesteps[index])
        a = ddim.alphas_cumprod[t]
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        ours = solver.step(x0, eps, torch.full((3,), index))
        ref = ddim.step(eps, t, x_t, eta=0.0).prev_sample
        # float32, the same few operations in another order: a few ulps of values of order 1-10.
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_a_longer_skip_is_diffusers_ddim_over_that_many_timesteps() -> None:
    # Training timesteps stay on the 50-step grid (the LCM sampler's), the teacher jumps 100 of them:
    # diffusers' DDIM with 10 inference steps steps t -> t - 100 (and 99 -> alpha_bar_0 via clamping).
    ddim = sd_ddim()
    ddim.set_timesteps(10)
    solver = DdimSolver(ddim.alphas_cumprod, 50, skip=100)
    assert solver.next_timesteps[[0, 4, 5, 49]].tolist() == [0, 0, 19, 899]
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for index in (49, 24):  # t = 999 -> 899 and 499 -> 399: both on DDIM's 10-step grid
        t = int(solver.timesteps[index])
        a = ddim.alphas_cumprod[t]
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        ours = solver.step(x0, eps, torch.full((2,), index))
        torch.testing.assert_close(ours, ddim.step(eps, t, x_t, eta=0.0).prev_sample, rtol=1e-5, atol=1e-5)


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ConfigError, match="ddim_steps"):
        LcmDistillConfig(ddim_steps=30).validate()
    with pytest.raises(ConfigError, match="w_min"):
        LcmDistillConfig(w_min=4, w_max=2).validate()
    with pytest.raises(ConfigError, match="skip"):
        LcmDistillConfig(skip=1000).validate()


def test_a_smoke_distillation_writes_an_lcm_lora_that_fuses(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lcm_lora.safetensors"
    cfg = LcmDistillConfig(model=str(models_dir / "tiny-sd15"), examples=16, steps=2, batch=4, out=str(out),
                           threads=1)
    summary = distill(cfg, run_dir=tmp_path / "run")
    assert np.isfinite(summary["loss_last_50"]) and (tmp_path / "run" / "lcm_loss.png").is_file()
    keys = load_file(out)
    assert keys and all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert any("time_emb_proj" in k for k in keys) and any("conv1" in k for k in keys)
    m = tiny().model
    m.base, m.controlnet = str(models_dir / "tiny-sd15"), str(models_dir / "tiny-sd15" / "controlnet")
    base = load_components(m).unet.state_dict()
    m.lcm_lora = str(out)
    fused = load_components(m).unet.state_dict()
    assert fused.keys() == base.keys()  # fused into the weights: no LoRA layers left
    moved = [k for k in base if not torch.equal(base[k], fused[k])]
    # Every layer of the file is fused (diffusers silently skipped attention layers in the '.lora.down' form).
    assert len(moved) == len(keys) // 2 and any("to_q" in k for k in moved)
    # The same tensors under diffusers' older '.lora.down/.lora.up' names (as policy exports and many
    # published LoRAs store them) fuse completely too: diffusers alone applied 68 of 124 layers of such a file.
    old_form = tmp_path / "old_form.safetensors"
    save_file({k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in keys.items()},
              str(old_form))
    m.lcm_lora = str(old_form)
    again = load_components(m).unet.state_dict()
    for k in base:
        torch.testing.assert_close(again[k], fused[k], rtol=1e-6, atol=1e-7, msg=k)  # same tensors, same fp32 math

