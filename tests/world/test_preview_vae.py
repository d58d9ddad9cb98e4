"""The embedded world's preview decoder (an AutoencoderTiny distilled from its VAE): it ships, loads through
--model.vae as a TAESD folder would, decodes a round close to the VAE, encodes for train_reward, and its
distillation learns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from poseloop.sampling import sampler as sampling
from poseloop.config.generation import tiny_lcm
from poseloop.models.loading import ModelLoadError, load_components, vae_class
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose
from poseloop.world.preview_distill import PreviewData, distill_preview, psnr, teacher_decode, teacher_encode
from poseloop.models.embedded import PREVIEW_DIR, PREVIEW_FILE, WORLD_WEIGHTS
from poseloop.config.generation import LCM_LORA_FILE
from poseloop.world.render import make_examples

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_lcm(models_dir: Path):  # -> GenerateConfig on the test's built tiny-sd15
    cfg = tiny_lcm()
    root = models_dir / "tiny-sd15"
    cfg.model.base, cfg.model.controlnet = str(root), str(root / "controlnet")
    cfg.model.lcm_lora, cfg.model.vae = str(root / LCM_LORA_FILE), str(root / PREVIEW_DIR)
    return cfg


def test_the_world_ships_a_preview_decoder_and_the_build_writes_its_folder(models_dir: Path) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    assert (WORLD_WEIGHTS / PREVIEW_FILE).is_file()
    root = models_dir / "tiny-sd15"
    cfg = _tiny_lcm(models_dir)
    assert vae_class(cfg.model.vae, cfg.model) is AutoencoderTiny
    assert vae_class(str(root / "vae"), cfg.model) is AutoencoderKL
    assert vae_class(str(root.parent / "elsewhere"), cfg.model) is AutoencoderKL  # _load then names what is missing
    cfg.model.vae = str(root / "no-such-vae")
    with pytest.raises(ModelLoadError, match=r"model\.vae: .*ships no preview decoder; .*train_world\.py"):
        load_components(cfg.model)


def test_a_preview_decoded_round_is_close_to_the_vae_decoded_one(models_dir: Path) -> None:
    cfg = _tiny_lcm(models_dir)
    comp = load_components(cfg.model)
    assert type(comp.vae).__name__ == "AutoencoderTiny" and comp.vae_scale_factor == 4
    prompts = ["a person in a red shirt and blue trousers, on a beach", "a person in a green shirt and black "
               "trousers, in a forest"]
    conds = [render_pose(get_builtin_pose(p), 64, 64) for p in ("t_pose", "walking")]
    out = sampling.sample(comp, prompts, conds, [5, 6], cfg.sample, 64, 64)
    assert [im.size for im in out.images] == [(64, 64)] * 2
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models_dir / "tiny-sd15" / "vae").eval()
    z = out.latents[:, -1].float()
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor).sample
    got = sampling.pil_to_tensor(out.images) * 2 - 1
    # Measured here: 25.4 dB (26.6 on the distillation's held-out latents, docs/WORLD.md); a decoder that had not
    # learnt gives about 6 dB, and uint8 rounding of the PNG costs nothing near 20.
    assert psnr(got, want.clamp(-1, 1)) > 20


def test_the_preview_encoder_gives_the_vae_latents(models_dir: Path) -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    from poseloop.rewards.model import encode_images

    root = models_dir / "tiny-sd15"
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    preview = AutoencoderTiny.from_pretrained(root / PREVIEW_DIR).eval()
    images = make_examples(16, 64, seed=99).images
    want = teacher_encode(vae, images)
    with torch.no_grad():
        got = encode_images(preview, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    # What train_reward does with imported images when a round was decoded by the preview VAE. Measured here:
    # relative RMSE 0.26 (0.25 on the distillation's held-out renders); latents of another image are 1.36 apart.
    rel = float(((got - want) ** 2).mean().sqrt() / want.std())
    assert rel < 0.5, rel


def test_the_distillation_learns_the_vae_decoder(models_dir: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(models_dir / "tiny-sd15" / "vae").eval()
    images = make_examples(96, 64, seed=5).images
    z = teacher_encode(vae, images)
    data = PreviewData(latents=z, decoded=teacher_decode(vae, z), renders=images)
    torch.manual_seed(0)
    model, metrics, curves = distill_preview(data, steps=60, batch=8, encoder_steps=10, held_out=4)
    first, last = np.mean(curves["decoder"][:10]), np.mean(curves["decoder"][-10:])
    assert last < 0.7 * first, (first, last)  # measured: 0.23 of the first loss after 60 steps
    assert len(curves["encoder"]) == 10 and metrics["preview_psnr_db"] > 8  # measured 15.2; untrained: 6.4 dB
    assert not any(p.requires_grad for p in model.parameters())
