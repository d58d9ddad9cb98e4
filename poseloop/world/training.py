"""Training the embedded pose world: VAE, pose detector, UNet + OpenPose ControlNet + text encoder, LCM-LoRA.

scripts/train_world.py runs it. Every stage is seeded, so a rebuild with the same config and thread
count gives the same weights; each stage's result is kept in the run folder and a re-run skips
finished stages. The result is written in fp16 to poseloop/models/world_weights (what ships) and
poseloop.models.embedded turns it into the diffusers folder models/tiny-sd15.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from poseloop.config.lib import ConfigError, to_dict
from poseloop.world.train_config import WorldConfig
from poseloop.data.poses import Pose
from poseloop.models.embedded import world_modules
from poseloop.world.render import WorldBatch, make_examples, measure_attributes, parse_prompt
from poseloop.world.common import Ema, atomic_save, plot_losses, to_tensor
from poseloop.world.detector import KeypointNet, save_detector, soft_argmax


# ---- stages --------------------------------------------------------------------------------------


def train_vae(cfg: WorldConfig, data: WorldBatch, vae: torch.nn.Module, run: Path) -> dict[str, float]:
    """Fit the VAE on renders: L1 + MSE + image-gradient L1 + a tiny KL, as a soft SD-style autoencoder."""
    if cfg.vae_logvar_bias is not None:
        with torch.no_grad():
            vae.quant_conv.bias[vae.quant_conv.out_channels // 2:] = cfg.vae_logvar_bias  # [means, log-variances]
    torch.manual_seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    curve: list[float] = []
    vae.train()
    bar = tqdm(range(cfg.vae_steps), desc="world 1/3: VAE", unit="step", mininterval=2.0)
    for step in bar:
        x = to_tensor(data.images[rng.integers(0, len(data.images), cfg.vae_batch)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode() if cfg.vae_posterior == "mean" else post.sample()).sample
        grad = (F.l1_loss(rec.diff(dim=-1), x.diff(dim=-1)) + F.l1_loss(rec.diff(dim=-2), x.diff(dim=-2)))
        mse = F.mse_loss(rec, x)
        loss = mse + F.l1_loss(rec, x) + 0.5 * grad + 1e-6 * post.kl().mean()
        for g in opt.param_groups:  # cosine decay: the last steps sharpen
            g["lr"] = cfg.vae_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.vae_steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        curve.append(float(mse.detach()))
        if step % 50 == 0:
            bar.set_postfix(mse=f"{np.mean(curve[-50:]):.4f}")
    bar.close()
    vae.eval()
    if cfg.vae_posterior == "mean":
        fix_log_variance(vae)
    plot_losses({"mse (-1..1)": curve}, run / "vae_loss.png", "VAE reconstruction")
    x = to_tensor(data.images[-256:])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    psnr = float(10 * torch.log10(4.0 / F.mse_loss(rec, x)))
    print(f"VAE: {cfg.vae_steps} steps, PSNR {psnr:.1f} dB on 256 renders")
    return {"vae_psnr_db": psnr}


# exp(-20 / 2) = 4.5e-5: far below fp16's resolution of the latents (std ~1), so sample() returns the mean.
DETERMINISTIC_LOG_VARIANCE = -20.0


@torch.no_grad()
def fix_log_variance(vae: torch.nn.Module) -> None:
    """Make the posterior's log-variance a constant: a decoder trained on means never saw its samples."""
    half = vae.quant_conv.out_channels // 2  # [means, log-variances] along channels
    vae.quant_conv.weight[half:] = 0.0
    vae.quant_conv.bias[half:] = DETERMINISTIC_LOG_VARIANCE


@torch.no_grad()
def encode_all(vae: torch.nn.Module, images: np.ndarray, n_recon: int, batch: int = 256
               ) -> tuple[torch.Tensor, np.ndarray]:
    """Unscaled latent means [N, 4, h, w] of every image and VAE round trips (uint8) of the first n_recon."""
    lat, rec = [], []
    for i in tqdm(range(0, len(images), batch), desc="encoding renders", unit="batch", mininterval=2.0):
        z = vae.encode(to_tensor(images[i:i + batch])).latent_dist.mode()
        lat.append(z)
        if i < n_recon:  # decoding costs as much as encoding: the detector needs only some
            r = vae.decode(z[: n_recon - i]).sample.clamp(-1, 1)
            rec.append(((r + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return torch.cat(lat), np.concatenate(rec)


@torch.no_grad()
def roundtrip_attributes(vae: torch.nn.Module, size: int, n: int = 192, seed: int = 777) -> dict[str, float]:
    """PSNR and attribute accuracy of VAE round trips of n fresh renders: the ceiling the VAE sets for any
    generator, since a perfect UNet produces exactly these latents."""
    fresh = make_examples(n, size, seed=seed)
    x = to_tensor(fresh.images)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    imgs = ((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    hits: dict[str, list[bool]] = {"shirt": [], "trousers": [], "background": []}
    for i in range(n):
        got, want = measure_attributes(imgs[i], Pose(body=fresh.keypoints[i])), parse_prompt(fresh.prompts[i])
        for k in hits:
            hits[k].append(getattr(got, k) == getattr(want, k))
    return {"psnr_db": float(10 * torch.log10(4.0 / F.mse_loss(rec, x))),
            **{f"{k}_acc": float(np.mean(v)) for k, v in hits.items()}}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and contrast jitter, so the detector also reads the generator's softer images."""
    b = x.shape[0]
    sigma = torch.rand(b, generator=gen) * 1.2
    out = []
    for i in range(b):
        xi = x[i:i + 1]
        if sigma[i] > 0.2:
            k = torch.arange(-2, 3, dtype=torch.float32)
            w = torch.exp(-(k ** 2) / (2 * float(sigma[i]) ** 2))
            w = w / w.sum()
            xi = F.conv2d(F.pad(xi, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
            xi = F.conv2d(F.pad(xi, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
        out.append(xi)
    x = torch.cat(out)
    scale = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=gen)
    shift = 0.2 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
    return (x * scale + shift + 0.04 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)).clamp(-1.2, 1.2)


def train_detector(cfg: WorldConfig, data: WorldBatch, recon: np.ndarray, run: Path) -> tuple[KeypointNet, dict]:
    """Heatmap CNN on renders and their VAE round trips: cross-entropy to a Gaussian target + L1 of soft-argmax."""
    torch.manual_seed(cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 2)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    net = KeypointNet(size=cfg.size)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.detector_lr, weight_decay=1e-4)
    kps = torch.from_numpy(data.keypoints[:, :, :2])
    hm = cfg.size // 2
    grid = (torch.arange(hm, dtype=torch.float32) + 0.5) / hm
    curve: list[float] = []
    net.train()
    bar = tqdm(range(cfg.detector_steps), desc="world 2/3: pose detector", unit="step", mininterval=2.0)
    for step in bar:
        idx = rng.integers(0, len(recon), cfg.detector_batch)  # the round-tripped part of the renders
        use_rec = rng.random(cfg.detector_batch) < 0.5
        imgs = np.where(use_rec[:, None, None, None], recon[idx], data.images[idx])
        x = _augment(to_tensor(imgs), gen)
        target = kps[idx]  # [B, 18, 2]
        logits = net(x)
        # Gaussian target of std 1 heatmap cell around each true point.
        gx = torch.exp(-((grid[None, None, :] - target[..., 0:1]) * hm) ** 2 / 2)
        gy = torch.exp(-((grid[None, None, :] - target[..., 1:2]) * hm) ** 2 / 2)
        tgt = (gy[..., :, None] * gx[..., None, :]).flatten(2)
        tgt = tgt / tgt.sum(-1, keepdim=True).clamp_min(1e-8)
        ce = -(tgt * logits.flatten(2).log_softmax(-1)).sum(-1).mean()
        xy, _ = soft_argmax(logits)
        l1 = (xy - target).abs().mean() * cfg.size
        loss = ce + 0.5 * l1
        for g in opt.param_groups:
            g["lr"] = cfg.detector_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, cfg.detector_steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(float(l1.detach()))
        if step % 50 == 0:
            bar.set_postfix(px_err=f"{np.mean(curve[-50:]):.2f}")
    bar.close()
    net.eval()
    plot_losses({"mean |error| (px)": curve}, run / "detector_loss.png", "pose detector")
    return net, detector_heldout_oks(net, cfg.size, seed=cfg.seed + 1000)


def detector_heldout_oks(net: KeypointNet, size: int, n: int = 256, seed: int = 1000) -> dict[str, float]:
    """Mean OKS of the detector on fresh renders (never seen in training) against their true keypoints."""
    from poseloop.metrics.scores import oks
    from poseloop.world.detector import WorldPoseDetector

    fresh = make_examples(n, size, seed=seed)
    found = WorldPoseDetector(net).detect(fresh.images)
    scores = [oks(Pose(body=fresh.keypoints[i]), found[i][0], width=size, height=size) for i in range(n)]
    result = {"detector_oks": float(np.mean(scores)), "detector_oks_min": float(np.min(scores)), "detector_n": n}
    print(f"pose detector: held-out OKS {result['detector_oks']:.3f} on {n} fresh renders")
    return result


def _ddpm():  # -> DDPMScheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@torch.no_grad()
def sample_world(mods: dict[str, torch.nn.Module], tokenizer: Any, prompts: list[str], conds: np.ndarray,
                 seed: int, steps: int = 20, guidance: float = 5.0) -> np.ndarray:
    """DDIM (eta 1, CFG) samples of the diffusion weights as they are now: uint8 [N, H, W, 3]."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    n = len(prompts)
    ids = tokenizer(list(prompts) + [""] * n, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids
    ctx = mods["text_encoder"](ids)[0]
    cond = torch.from_numpy(conds).permute(0, 3, 1, 2).float() / 255.0
    gen = torch.Generator().manual_seed(seed)
    h = conds.shape[1] // 4
    x = torch.randn(n, 4, h, h, generator=gen)
    for t in sched.timesteps:
        xin = torch.cat([x, x])
        down, mid = mods["controlnet"](xin, t, encoder_hidden_states=ctx, controlnet_cond=torch.cat([cond, cond]),
                                       return_dict=False)
        eps = mods["unet"](xin, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
        e_c, e_u = eps.chunk(2)
        x = sched.step(e_u + guidance * (e_c - e_u), t, x, eta=1.0, generator=gen).prev_sample
    vae = mods["vae"]
    img = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    return ((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _fresh_examples(cfg: WorldConfig) -> WorldBatch:
    """The examples every snapshot and the final measurement sample (never trained on)."""
    return make_examples(cfg.eval_examples, cfg.size, seed=cfg.seed + 2000)


def _snapshot_metrics(images: np.ndarray, fresh: WorldBatch, detector: Any) -> dict[str, float]:
    from poseloop.metrics.scores import oks

    n = len(images)
    found = detector.detect(images)
    own = [oks(Pose(body=fresh.keypoints[i]), found[i][0], width=images.shape[2], height=images.shape[1])
           for i in range(n)]
    other = [oks(Pose(body=fresh.keypoints[(i + 1) % n]), found[i][0], width=images.shape[2], height=images.shape[1])
             for i in range(n)]
    hits = {"shirt": [], "trousers": [], "background": []}
    for i in range(n):
        got, want = measure_attributes(images[i], Pose(body=fresh.keypoints[i])), parse_prompt(fresh.prompts[i])
        for k in hits:
            hits[k].append(getattr(got, k) == getattr(want, k))
    return {"oks": float(np.mean(own)), "oks_shuffled": float(np.mean(other)),
            **{f"{k}_acc": float(np.mean(v)) for k, v in hits.items()}}


def _save_grid(images: np.ndarray, conds: np.ndarray, path: Path, cols: int = 8) -> None:
    from PIL import Image

    n, s = len(images), images.shape[1]
    rows = math.ceil(n / cols)
    canvas = Image.new("RGB", (cols * s * 2, rows * s * 2 * 2))
    for i in range(n):
        r, c = divmod(i, cols)
        canvas.paste(Image.fromarray(conds[i]).resize((2 * s, 2 * s), Image.Resampling.NEAREST), (c * 2 * s, r * 4 * s))
        canvas.paste(Image.fromarray(images[i]).resize((2 * s, 2 * s), Image.Resampling.NEAREST),
                     (c * 2 * s, r * 4 * s + 2 * s))
    canvas.save(path)


def training_noise(shape: torch.Size, offset: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise [B, C, H, W] plus, with offset > 0, a constant per image and channel of std offset."""
    noise = torch.randn(shape, generator=gen)
    if offset:  # no extra draw at 0: a build without offset noise keeps its random stream
        noise = noise + offset * torch.randn(shape[0], shape[1], 1, 1, generator=gen)
    return noise


def train_diffusion(cfg: WorldConfig, data: WorldBatch, latents: torch.Tensor, mods: dict[str, torch.nn.Module],
                    tokenizer: Any, detector: Any, run: Path) -> dict[str, float]:
    """UNet + ControlNet + text encoder on cached latents: epsilon MSE with min-SNR-5 weights, EMA."""
    torch.manual_seed(cfg.seed + 3)
    rng = np.random.default_rng(cfg.seed + 3)
    gen = torch.Generator().manual_seed(cfg.seed + 3)
    sched = _ddpm()
    acp = sched.alphas_cumprod
    snr = acp / (1 - acp)
    weight = torch.clamp(snr, max=5.0) / snr  # min-SNR-5: spend effort on the coarse (colour, layout) steps
    trained = [mods["unet"], mods["controlnet"], mods["text_encoder"]]
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-4)
    ema = Ema(params, cfg.ema)
    ids = tokenizer(data.prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    conds = torch.from_numpy(data.conditions).permute(0, 3, 1, 2)  # uint8, scaled per batch
    fresh = _fresh_examples(cfg)
    curve: list[float] = []
    history: list[dict[str, float]] = []
    for m in trained:
        m.train()
    bar = tqdm(range(cfg.unet_steps), desc="world 3/3: UNet + ControlNet", unit="step", mininterval=2.0)
    for step in bar:
        idx = torch.from_numpy(rng.integers(0, len(latents), cfg.unet_batch))
        x0 = latents[idx]
        noise = training_noise(x0.shape, cfg.noise_offset, gen)
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        tok = ids[idx].clone()
        tok[torch.rand(len(idx), generator=gen) < cfg.prompt_dropout] = empty[0]
        ctx = mods["text_encoder"](tok)[0]
        down, mid = mods["controlnet"](xt, t, encoder_hidden_states=ctx, controlnet_cond=conds[idx].float() / 255.0,
                                       return_dict=False)
        eps = mods["unet"](xt, t, encoder_hidden_states=ctx, down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
        per = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        loss = (per * weight[t]).mean()
        warm = min(1.0, (step + 1) / 100)
        for g in opt.param_groups:
            g["lr"] = cfg.unet_lr * warm * (0.55 + 0.45 * math.cos(math.pi * step / max(1, cfg.unet_steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        curve.append(float(per.mean().detach()))
        if step % 50 == 0:
            bar.set_postfix(eps_mse=f"{np.mean(curve[-50:]):.4f}")
        if (step + 1) % cfg.snapshot_every == 0 or step + 1 == cfg.unet_steps:
            ema.swap()
            for m in trained:
                m.eval()
            imgs = sample_world(mods, tokenizer, fresh.prompts, fresh.conditions, seed=cfg.seed)
            row = {"step": step + 1, **_snapshot_metrics(imgs, fresh, detector)}
            history.append(row)
            _save_grid(imgs[:24], fresh.conditions[:24], run / f"samples_{step + 1:05d}.png")
            write_weights(mods, detector.net, run / "snapshot", {"step": step + 1})
            tqdm.write("snapshot " + json.dumps({k: round(v, 3) for k, v in row.items()}))
            ema.swap()
            for m in trained:
                m.train()
            plot_losses({"epsilon mse": curve}, run / "unet_loss.png", "UNet + ControlNet")
    bar.close()
    ema.swap()  # export the averaged weights
    for m in trained:
        m.eval()
    (run / "snapshots.json").write_text(json.dumps(history, indent=2))
    return history[-1] if history else {}


def write_weights(mods: dict[str, torch.nn.Module], detector: KeypointNet | None, out: Path,
                  meta: dict[str, Any]) -> None:
    """Write the fp16 shipped files (one safetensors per module + world.json), replacing out atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name, m in mods.items():
            atomic_save(m.state_dict(), tmp / f"{name}.safetensors", fp16=True)
        if detector is not None:
            save_detector(detector, tmp / "pose_detector", meta.get("detector"))
        elif (out / "pose_detector").is_dir():
            shutil.copytree(out / "pose_detector", tmp / "pose_detector")
        # The architecture goes with the weights: load_world_modules builds exactly this one.
        arch = {"unet_heads": mods["unet"].config.attention_head_dim,
                "vae_channels": list(mods["vae"].config.block_out_channels)}
        (tmp / "world.json").write_text(json.dumps({"scaling_factor": mods["vae"].config.scaling_factor,
                                                    "architecture": arch, **meta}, indent=2))
        os.chmod(tmp, 0o755)  # shipped files: readable by everyone, as a package's data is
        for f in tmp.rglob("*"):
            os.chmod(f, 0o755 if f.is_dir() else 0o644)
        old = out.with_name(f".{out.name}-old")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# Fields that do not change what a stage computes: a run may resume under other values of these.
_RESUMABLE_FIELDS = ("threads", "run_dir", "out")
# What a run folder written before a field existed was trained with.
_LEGACY_VALUES: dict[str, Any] = {"vae_posterior": "sample", "vae_logvar_bias": None, "noise_offset": 0.0}


def check_run_dir(cfg: WorldConfig, run: Path) -> None:
    """Refuse a run folder whose finished stages were trained under another config: they would be
    reused as they are (a 2-head UNet even loads into an 8-head one without a shape error)."""
    saved_path = run / "config.json"
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError):
        raise ConfigError(f"run_dir: {saved_path} is unreadable; delete {run} or pass another --run_dir") from None
    now = to_dict(cfg)
    saved = {**{k: v for k, v in _LEGACY_VALUES.items() if k not in saved}, **saved}
    changed = [k for k in now if k not in _RESUMABLE_FIELDS and k in saved and saved[k] != now[k]]
    if changed:
        diff = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ConfigError(f"run_dir: {run} holds stages trained with other settings ({diff}); pass another "
                          f"--run_dir, or delete {run} to train every stage again")


def train_world(cfg: WorldConfig) -> dict[str, Any]:
    """Run every stage (skipping those finished in cfg.run_dir) and write the shipped weights."""
    from safetensors.torch import load_file

    from poseloop.models.embedded import _tokenizer

    torch.set_num_threads(cfg.threads)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    check_run_dir(cfg, run)
    (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    start = time.time()
    data = make_examples(cfg.examples, cfg.size, seed=cfg.seed, progress=True)
    torch.manual_seed(cfg.seed)
    arch = {"unet_heads": cfg.unet_heads, "vae_channels": list(cfg.vae_channels)}
    mods = world_modules(1.0, **arch)
    metrics: dict[str, Any] = {}
    vae_file = run / "vae.safetensors"
    if vae_file.is_file():
        mods["vae"].load_state_dict(load_file(str(vae_file)))
        metrics.update(json.loads((run / "vae.json").read_text()))
    else:
        metrics.update(train_vae(cfg, data, mods["vae"], run))
        atomic_save(mods["vae"].state_dict(), vae_file)
        (run / "vae.json").write_text(json.dumps(metrics))
    mods["vae"].eval().requires_grad_(False)
    lat_file = run / "latents.safetensors"
    n_recon = min(len(data.images), 6144)
    if lat_file.is_file():
        saved = load_file(str(lat_file))
        lat, recon = saved["latents"], saved["recon"].numpy()
    else:
        lat, recon = encode_all(mods["vae"], data.images, n_recon)
        atomic_save({"latents": lat, "recon": torch.from_numpy(recon)}, lat_file)
    # What any generator can reach through this VAE: attributes read on round trips of fresh renders.
    metrics.update({f"roundtrip_{k}": v for k, v in roundtrip_attributes(mods["vae"], cfg.size,
                                                                         n=4 * cfg.eval_examples).items()})
    # SD's recipe: scale latents to unit variance so the noise schedule fits them.
    scaling = float(1.0 / lat.std())
    mods["vae"].register_to_config(scaling_factor=scaling)
    det_file = run / "detector.safetensors"
    net = KeypointNet(size=cfg.size)
    if det_file.is_file():
        net.load_state_dict(load_file(str(det_file)))
        net.eval()
        det_metrics = json.loads((run / "detector.json").read_text())
    else:
        net, det_metrics = train_detector(cfg, data, recon, run)
        atomic_save(net.state_dict(), det_file)
        (run / "detector.json").write_text(json.dumps(det_metrics))
    metrics.update(det_metrics)
    from poseloop.world.detector import WorldPoseDetector

    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = _tokenizer(Path(tok_dir), pad_token="<|endoftext|>")
    detector = WorldPoseDetector(net)
    diffusion_file = run / "diffusion.safetensors"
    diffusion = ("unet", "controlnet", "text_encoder")
    if diffusion_file.is_file():
        saved = load_file(str(diffusion_file))
        for name in diffusion:
            mods[name].load_state_dict({k[len(name) + 1:]: v for k, v in saved.items() if k.startswith(name + ".")})
            mods[name].eval()
        # The shipped weights measured on the fresh examples the snapshots use, as the last snapshot did.
        fresh = _fresh_examples(cfg)
        final = {"step": cfg.unet_steps,
                 **_snapshot_metrics(sample_world(mods, tokenizer, fresh.prompts, fresh.conditions, seed=cfg.seed),
                                     fresh, detector)}
    else:
        final = train_diffusion(cfg, data, lat * scaling, mods, tokenizer, detector, run)
        atomic_save({f"{name}.{k}": v for name in diffusion for k, v in mods[name].state_dict().items()},
                     diffusion_file)
        (run / "minutes.json").write_text(json.dumps({"minutes": (time.time() - start) / 60}))
    metrics.update({f"generator_{k}": v for k, v in final.items()})
    # The build time of stages 1-5 is that of the run that finished them, not of a later run that resumed.
    minutes_file = run / "minutes.json"
    metrics["minutes"] = (json.loads(minutes_file.read_text())["minutes"] if minutes_file.is_file()
                          else (time.time() - start) / 60)
    metrics["threads"] = cfg.threads
    write_weights(mods, net, Path(cfg.out), {"detector": det_metrics, "metrics": metrics, "config": to_dict(cfg)})
    if cfg.lcm_steps:
        metrics.update(distill_lcm(cfg, run))
    if cfg.preview_steps:
        metrics.update(distill_preview_stage(cfg, run))
    (run / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def distill_lcm(cfg: WorldConfig, run: Path) -> dict[str, float]:
    """Distil the shipped world into an LCM-LoRA (cached in run/lcm) and ship it as out/lcm_lora.safetensors."""
    from poseloop.world.lcm_distill import LcmDistillConfig, distill
    from poseloop.models.embedded import build_tiny_sd15
    from poseloop.config.generation import LCM_LORA_FILE

    lcm_file, summary_file = run / "lcm" / LCM_LORA_FILE, run / "lcm" / "lcm_distill.json"
    if lcm_file.is_file() and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        # The teacher is the world as shipped (fp16 weights), exactly what users fuse the LoRA into.
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "tiny-sd15"
            build_tiny_sd15(model, weights_dir=Path(cfg.out))
            defaults = LcmDistillConfig()
            lcm_cfg = LcmDistillConfig(model=str(model), steps=cfg.lcm_steps, seed=cfg.seed, threads=cfg.threads,
                                       examples=min(cfg.examples, defaults.examples),
                                       batch=min(cfg.unet_batch, defaults.batch),
                                       out=str(lcm_file))
            summary = distill(lcm_cfg, run_dir=run / "lcm")
    _ship(lcm_file.read_bytes(), Path(cfg.out) / LCM_LORA_FILE)
    return {"lcm_seconds": summary["seconds"], "lcm_loss_first_50": summary["loss_first_50"],
            "lcm_loss_last_50": summary["loss_last_50"]}


def _ship(data: bytes, path: Path) -> None:
    """Write a shipped file atomically (temporary name, then rename), readable by everyone as package data is."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def distill_preview_stage(cfg: WorldConfig, run: Path) -> dict[str, float]:
    """Distil the shipped world's VAE into its preview decoder (cached in run/preview), ship it as
    out/preview_vae.safetensors and record its architecture and measurements in out/world.json."""
    from poseloop.world.preview_distill import distill_preview, world_preview_data
    from poseloop.models.embedded import PREVIEW_ARCH
    from poseloop.models.embedded import PREVIEW_FILE, build_tiny_sd15

    cache = run / "preview"
    weights, summary_file = cache / PREVIEW_FILE, cache / "preview.json"
    if weights.is_file() and summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            model = Path(tmp) / "tiny-sd15"
            build_tiny_sd15(model, weights_dir=Path(cfg.out))  # the world as shipped, LCM-LoRA included
            data = world_preview_data(model, cfg.preview_renders, cfg.preview_generated, seed=cfg.seed,
                                      size=cfg.size, threads=cfg.threads)
        torch.set_num_threads(cfg.threads)
        module, summary, curves = distill_preview(data, cfg.preview_steps, seed=cfg.seed)
        plot_losses({f"{k} loss": v for k, v in curves.items() if v}, cache / "preview_loss.png", "preview decoder")
        atomic_save(module.state_dict(), weights, fp16=True)
        summary_file.write_text(json.dumps(summary, indent=2))
    out = Path(cfg.out)
    _ship(weights.read_bytes(), out / PREVIEW_FILE)
    # Recorded with the weights (and so in the stamp of a built tiny-sd15, which then gets its preview_vae/).
    meta = json.loads((out / "world.json").read_text())
    meta["preview_vae"] = {"architecture": PREVIEW_ARCH, **summary}
    _ship(json.dumps(meta, indent=2).encode(), out / "world.json")
    return summary
