"""A preview decoder: diffusers' AutoencoderTiny (TAESD's architecture) distilled from a model's VAE.

A 64 px decode through the embedded world's AutoencoderKL costs about 15 ms an image on one thread: a
quarter of a 4-step LCM round. This decoder, plain 3x3 convolutions without group norms or attention,
takes about a third of that. It learns to reproduce the VAE's decoded images (L1 + MSE) from the
latents it will be given: encoder latents of the world's renders and final latents of the model's own
DDIM and LCM rounds. Its encoder learns the VAE's scaled latents (posterior mode), so the result is a
complete AutoencoderTiny: `--model.vae` loads it as it loads madebyollin/taesd, and it encodes too.

Like TAESD it decodes latents as the UNet produces them (scaling_factor 1.0: no unscaling first).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from poseloop.models.embedded import preview_module
from poseloop.world.common import to_tensor

@dataclass
class PreviewData:
    """What the preview autoencoder learns from."""

    latents: torch.Tensor  # [N, C, h, w] float32, scaled as the UNet produces them
    decoded: np.ndarray  # [N, H, W, 3] uint8: the teacher VAE's decode of each latent
    renders: np.ndarray  # [M, H, W, 3] uint8: images for the encoder (the first M latents encode them)


@torch.no_grad()
def teacher_decode(vae: Any, latents: torch.Tensor, batch: int = 128) -> np.ndarray:
    """Scaled latents [N, C, h, w] -> the VAE's images [N, H, W, 3] uint8."""
    out = []
    for i in range(0, len(latents), batch):
        x = vae.decode(latents[i:i + batch] / vae.config.scaling_factor).sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


@torch.no_grad()
def teacher_encode(vae: Any, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Images [N, H, W, 3] uint8 -> the VAE's scaled latents (posterior mode) [N, C, h, w]."""
    out = []
    for i in range(0, len(images), batch):
        out.append(vae.encode(to_tensor(images[i:i + batch])).latent_dist.mode() * vae.config.scaling_factor)
    return torch.cat(out)


def world_preview_data(model_dir: Path, renders: int, generated: int, seed: int = 0, size: int = 64,
                       threads: int = 2, batch: int = 32) -> PreviewData:
    """Latents to learn from: the VAE's encodings of `renders` fresh renders, then the final latents of
    `generated` items sampled in the tiny preset's DDIM round and as many in the tiny-lcm round (the
    LCM-LoRA in model_dir); each with the VAE's decode of it."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from poseloop.config import generation as presets
    from poseloop.sampling import sampler as sampling
    from poseloop.models.loading import load_components
    from poseloop.config.generation import LCM_LORA_FILE
    from poseloop.world.render import make_examples

    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval().requires_grad_(False)
    shown = make_examples(renders, size, seed=seed + 101)
    latents = [teacher_encode(vae, shown.images)]
    items = make_examples(generated, size, seed=seed + 102)
    rounds = [presets.tiny()] + ([presets.tiny_lcm()] if (model_dir / LCM_LORA_FILE).is_file() else [])
    bar = tqdm(total=len(rounds) * generated, desc="preview decoder: sampling", unit="img", mininterval=2.0)
    for k, cfg in enumerate(rounds):
        cfg.model.base, cfg.model.controlnet = str(model_dir), str(model_dir / "controlnet")
        cfg.model.vae, cfg.model.threads = "", threads  # the round's latents are what matters here
        if cfg.model.lcm_lora:
            cfg.model.lcm_lora = str(model_dir / LCM_LORA_FILE)
        comp = load_components(cfg.model)
        for i in range(0, generated, batch):
            n = min(batch, generated - i)
            out = sampling.sample(comp, items.prompts[i:i + n], [Image.fromarray(c) for c in items.conditions[i:i + n]],
                                  [seed + 100_000 * (k + 1) + i + j for j in range(n)], cfg.sample, size, size)
            latents.append(out.latents[:, -1].float())  # [n, C, h, w], the round's final latents
            bar.update(n)
    bar.close()
    z = torch.cat(latents)
    return PreviewData(latents=z, decoded=teacher_decode(vae, z), renders=shown.images)


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of images in -1..1 (peak-to-peak 2)."""
    mse = float(((pred.clamp(-1, 1) - target) ** 2).mean())
    return 10 * math.log10(4 / max(mse, 1e-12))


def distill_preview(data: PreviewData, steps: int, batch: int = 32, lr: float = 2e-3, seed: int = 0,
                    encoder_steps: int | None = None, held_out: int = 20
                    ) -> tuple[Any, dict[str, float], dict[str, list[float]]]:
    """Train a preview AutoencoderTiny on data; every `held_out`-th example is kept out and measured.

    Returns the module (eval mode, frozen), metrics (held-out PSNR of its decodes against the teacher's,
    the encoder's latent RMSE relative to the latents' spread, seconds) and the loss curves.
    """
    torch.manual_seed(seed)
    model = preview_module(latent_channels=int(data.latents.shape[1]))
    gen = torch.Generator().manual_seed(seed)
    keep = np.arange(len(data.latents)) % held_out != 0
    train_idx, test_idx = np.flatnonzero(keep), np.flatnonzero(~keep)
    start = time.time()
    curves: dict[str, list[float]] = {"decoder": [], "encoder": []}
    enc_steps = steps // 4 if encoder_steps is None else encoder_steps
    parts = (("decoder", model.decoder, steps), ("encoder", model.encoder, enc_steps))
    bar = tqdm(total=steps + enc_steps, desc="preview decoder", unit="step", mininterval=2.0)
    n_renders = len(data.renders)
    render_idx = train_idx[train_idx < n_renders]  # the encoder learns from the renders' latents only
    for name, net, n in parts:
        net.train()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        for step in range(n):
            for g in opt.param_groups:  # short warm-up, then cosine decay
                g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / max(1, n)))
            if name == "decoder":
                idx = train_idx[torch.randint(len(train_idx), (batch,), generator=gen).numpy()]
                pred, target = net(data.latents[idx]), to_tensor(data.decoded[idx])
                loss = (pred - target).abs().mean() + ((pred - target) ** 2).mean()
            else:
                idx = render_idx[torch.randint(len(render_idx), (batch,), generator=gen).numpy()]
                # EncoderTiny takes images in -1..1 (it maps them to 0..1 itself) and gives scaled latents.
                loss = F.mse_loss(net(to_tensor(data.renders[idx])), data.latents[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curves[name].append(loss.item())
            bar.update(1)
        net.eval()
    bar.close()
    with torch.no_grad():
        test = torch.from_numpy(test_idx)
        decoded = torch.cat([model.decoder(data.latents[test[i:i + 256]]) for i in range(0, len(test), 256)])
        metrics = {"preview_psnr_db": psnr(decoded, to_tensor(data.decoded[test_idx]))}
        enc_test = test_idx[test_idx < n_renders]
        if len(enc_test):
            z = model.encoder(to_tensor(data.renders[enc_test]))
            want = data.latents[enc_test]
            metrics["preview_encoder_rel_rmse"] = float(((z - want) ** 2).mean().sqrt() / want.std())
    metrics.update({"preview_seconds": time.time() - start, "preview_decoder_loss_last_50":
                    float(np.mean(curves["decoder"][-50:])) if curves["decoder"] else float("nan")})
    model.eval().requires_grad_(False)
    return model, metrics, curves
