"""Benchmark: bytes stored per sample by poseloop's trajectory files versus D3PO's pickle dump.

D3PO (github.com/yk7333/d3po, scripts/sample.py) pickles, per image, `latents` (x_T .. x_1) and
`next_latents` (x_{T-1} .. x_0), so every latent but two is stored twice, plus `prompt_embeds`
[77, 768] and `timesteps`, all as torch tensors (fp16 under mixed precision). We rebuild that dict with
random tensors of those shapes and dtypes (log_probs added as well, as the brief asks, although
D3PO's file omits them; they are 4*T bytes) and compare len(pickle.dumps(...)) with the size on disk
of a file written by poseloop.data.store.save_trajectory with the metadata generate.py writes.

    python bench/bench_storage.py            # SD1.5 (4x64x64, 512 px), tiny (4x16x16); 20 and 50 steps
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from poseloop.data.store import Trajectory, save_trajectory

TARGET = 0.5
MIB = 1024 * 1024
D3PO_TEXT = (77, 768)  # SD1.5 CLIP text embedding D3PO stores per image
REFERENCE_D3PO_MIB = 1.36  # per image at 20 steps, 4x64x64 fp16


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="images per simulated sampler batch")
    p.add_argument("--no-images", action="store_true",
                   help="skip generating 128 px images with the tiny model to measure PNG sizes")
    return p.parse_args(argv)


def d3po_dict(steps: int, latent: tuple[int, int, int], batch: int = 1) -> dict[str, torch.Tensor]:
    """The dict D3PO's sample.py pickles, for `batch` images, with random tensors of its shapes/dtypes."""
    states = torch.randn(batch, steps + 1, *latent).half()  # x_T .. x_0, as the sampler produced them
    return {
        # torch.cat in D3PO makes these fresh tensors, so each is pickled with its own storage
        "prompt_embeds": torch.randn(batch, *D3PO_TEXT).half(),
        "timesteps": torch.arange(steps, 0, -1, dtype=torch.int64).repeat(batch, 1) * (1000 // steps),
        "latents": states[:, :-1].clone(),
        "next_latents": states[:, 1:].clone(),
        "log_probs": torch.randn(batch, steps, dtype=torch.float32),
    }


def d3po_bytes_per_image(steps: int, latent: tuple[int, int, int], batch: int = 1) -> float:
    """len(pickle.dumps(dict)) / batch."""
    return len(pickle.dumps(d3po_dict(steps, latent, batch))) / batch


def realistic_metadata(seed: int, steps: int, size: int) -> dict[str, str]:
    """The metadata generate.py writes into every trajectory file."""
    meta = {"seed": seed, "prompt": "a dancer in a red dress, studio photo", "negative_prompt": "",
            "guidance_scale": 5.0, "controlnet_scale": 1.0, "eta": 1.0, "steps": steps, "width": size,
            "height": size, "round": "r0001", "base_model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            "controlnet": "lllyasviel/sd-controlnet-openpose", "lora": "", "lora_scale": 1.0}
    return {k: str(v) for k, v in meta.items()}


def ours_bytes_per_image(steps: int, latent: tuple[int, int, int], batch: int, folder: Path
                         ) -> tuple[float, float]:
    """Mean (file size, allocated disk size) of save_trajectory files for one simulated batch.

    Each file is written from a slice out.latents[j] of a [B, T+1, C, h, w] batch tensor, exactly as
    generate.py does, so a format that wrote the whole shared storage would show here.
    """
    latents = torch.randn(batch, steps + 1, *latent).half()
    log_probs = torch.randn(batch, steps)
    timesteps = torch.arange(steps, 0, -1, dtype=torch.int64) * (1000 // steps)
    sizes, alloc = [], []
    for j in range(batch):
        path = folder / f"g00000_s{j}_{steps}_{latent[-1]}.safetensors"
        save_trajectory(Trajectory(latents[j], log_probs[j], timesteps,
                                   realistic_metadata(1234567 + j, steps, latent[-1] * 8)), path)
        st = os.stat(path)
        sizes.append(st.st_size)
        alloc.append(st.st_blocks * 512)
    return sum(sizes) / batch, sum(alloc) / batch


def png_bytes(image: object) -> int:
    """Size of a PIL image saved as PNG (as store.save_png writes it)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # type: ignore[attr-defined]
    return buf.tell()


def measure_pngs(batch: int) -> None:
    """Print PNG bytes of generated images and pose images at 128 px with the tiny model (and pose at 512)."""
    from poseloop.config.generation import tiny
    from poseloop.models.loading import load_components
    from poseloop.data.openpose import render_pose
    from poseloop.data.poses import get_builtin_pose
    from poseloop.sampling.sampler import sample

    cfg = tiny()
    pose128 = render_pose(get_builtin_pose("standing"), 128, 128)
    pose512 = render_pose(get_builtin_pose("standing"), 512, 512)
    comp = load_components(cfg.model)
    out = sample(comp, ["a dancer in a red dress, studio photo"] * batch, [pose128] * batch, list(range(batch)),
                 cfg.sample, 128, 128)
    img = sum(png_bytes(im) for im in out.images) / batch
    print("\nPNG files per sample (information; the pose image is stored once per group, shared by its images):")
    print(f"  image 128 px, tiny model (random weights: noise, compresses poorly): {img / 1024:8.1f} KiB")
    print(f"  pose image 128 px:                                                  {png_bytes(pose128) / 1024:8.1f} KiB")
    print(f"  pose image 512 px:                                                  {png_bytes(pose512) / 1024:8.1f} KiB")


def main(argv: Sequence[str] | None = None) -> int:
    """Print the storage table and the PASS/FAIL line (SD1.5 latents, 20 steps); return 0 on PASS."""
    args = parse_args(argv)
    cases = [("SD1.5 512 px", (4, 64, 64), 20), ("SD1.5 512 px", (4, 64, 64), 50),
             ("tiny 128 px", (4, 16, 16), 20), ("tiny 128 px", (4, 16, 16), 50)]
    print(f"{'case':<14}{'latent':>10}{'T':>4}{'D3PO pickle/img':>18}{'D3PO amortised':>16}"
          f"{'ours file':>14}{'ours on disk':>14}{'ours/D3PO':>11}")
    headline = None
    with tempfile.TemporaryDirectory() as tmp:
        for name, latent, steps in cases:
            d3po = d3po_bytes_per_image(steps, latent)
            d3po_batch = d3po_bytes_per_image(steps, latent, args.batch)
            ours, ours_alloc = ours_bytes_per_image(steps, latent, args.batch, Path(tmp))
            ratio = ours / d3po
            if latent == (4, 64, 64) and steps == 20:
                headline = (d3po, ours, ratio)
            print(f"{name:<14}{'x'.join(map(str, latent)):>10}{steps:>4}{d3po / MIB:>14.3f} MiB"
                  f"{d3po_batch / MIB:>12.3f} MiB{ours / MIB:>10.3f} MiB{ours_alloc / MIB:>10.3f} MiB{ratio:>10.3f}x")
    print("(D3PO amortised: one pickle of a batch of", args.batch, "images divided by", args.batch,
          "; 'on disk' = allocated blocks)")
    assert headline is not None
    d3po, ours, ratio = headline
    print(f"\nSD1.5, 4x64x64 latents, 20 steps: D3PO {d3po:,.0f} B ({d3po / MIB:.3f} MiB; reference "
          f"~{REFERENCE_D3PO_MIB} MiB), ours {ours:,.0f} B ({ours / MIB:.3f} MiB)")
    if abs(d3po / MIB - REFERENCE_D3PO_MIB) > 0.05:
        print(f"WARNING: D3PO reconstruction differs from the reference figure {REFERENCE_D3PO_MIB} MiB")
    if not args.no_images:
        measure_pngs(args.batch)
    ok = ratio <= TARGET
    print(f"storage ratio (ours/D3PO): {ratio:.2f}x (target <= {TARGET:.1f}x): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
