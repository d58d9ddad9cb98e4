"""Benchmark: 4-step LCM rounds against the default DDIM round on the embedded world.

Samples the same (prompt, pose, seed) items on one base model: the default round (generate.py's tiny
preset: DDIM, 10 steps, CFG 5, the world's VAE), the tiny-lcm preset's 4-step round (the world's shipped
LCM-LoRA fused in, LCM sampler, no CFG pass, decoded by the world's preview decoder), the same round
decoded by the VAE, the default round decoded by the preview decoder (so that each decoder is also
compared with itself), the same 4 steps on the undistilled UNet, and, with --lora, on another LCM-LoRA
(scripts/train_lcm_lora.py makes one). The rounds are timed batch by batch, interleaved (each batch
rotates which goes first); pose OKS comes from the world's detector.

Targets (issue 13 item 4): the tiny-lcm round at least 4x faster than the default round, its mean OKS
within 0.1 of the default's. Printed: seconds per image of each (median over batches, min/max of the
per-batch ratios), the time ratios (preset against preset, and at equal decoders), OKS and attribute
accuracy (shirt, trousers, background read in the renderer's regions) of each with 95% bootstrap
intervals, and the paired differences against the default round.

    python bench/bench_lcm.py                      # 12 prompts x 12 poses x 2 seeds, 1 thread
    python bench/bench_lcm.py --lora models/lcm_experiment/lcm_lora.safetensors --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> int:
    """Run both samplers on the same items, print the table, write bench/out/lcm.json and a grid."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", default="", help="also sample with this LCM-LoRA fused in (an extra row)")
    p.add_argument("--prompts", type=int, default=12, help="vocabulary prompts (x 12 built-in poses)")
    p.add_argument("--images", type=int, default=2, help="seeds per (prompt, pose)")
    p.add_argument("--steps", type=int, default=4, help="LCM steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from poseloop.config import generation as gen_presets
    from poseloop.sampling import sampler as sampling
    from poseloop.metrics.scores import oks
    from poseloop.models.loading import load_components
    from poseloop.data.openpose import render_pose
    from poseloop.models.embedded import ensure_embedded
    from poseloop.world.detector import load_detector
    from poseloop.world.render import measure_attributes, parse_prompt
    from poseloop.metrics.stats import mean_and_ci
    from poseloop.world.quality import builtin_poses, vocabulary_prompts

    base_cfg, lcm_cfg, shipped = gen_presets.tiny(), gen_presets.tiny(), gen_presets.tiny_lcm()
    root = ensure_embedded(ROOT / base_cfg.model.base)
    for c in (base_cfg, lcm_cfg, shipped):
        c.model.base, c.model.controlnet = str(root), str(root / "controlnet")
    shipped.model.lcm_lora = str(ROOT / shipped.model.lcm_lora)
    shipped.model.vae = str(ROOT / shipped.model.vae)
    for c in (lcm_cfg, shipped):
        c.sample.sampler, c.sample.steps, c.sample.guidance_scale = "lcm", args.steps, 1.0
    with_vae = replace(shipped.model, vae="")  # the tiny-lcm round decoded by the world's VAE
    with_preview = replace(base_cfg.model, vae=shipped.model.vae)  # the default round, preview-decoded
    # The undistilled UNet under the LCM sampler (it warns that it is no LCM: on purpose here).
    comps = {"ddim": load_components(base_cfg.model), "tiny_lcm": load_components(shipped.model),
             "tiny_lcm_vae": load_components(with_vae), "ddim_preview": load_components(with_preview)}
    comps["lcm"] = comps["ddim"]
    samples = {"ddim": base_cfg.sample, "tiny_lcm": shipped.sample, "tiny_lcm_vae": shipped.sample,
               "ddim_preview": base_cfg.sample, "lcm": lcm_cfg.sample}
    if args.lora:
        lcm_cfg.model.lcm_lora = args.lora
        comps["lcm_lora"], samples["lcm_lora"] = load_components(lcm_cfg.model), lcm_cfg.sample
    detector = load_detector(root / "pose_detector")
    size = base_cfg.sample.width
    poses = builtin_poses()
    conds = [render_pose(q, size, size) for q in poses]
    items = [(pr, pi, k) for pr in vocabulary_prompts()[:args.prompts] for pi in range(len(poses))
             for k in range(args.images)]
    sides = tuple(comps)
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    scores: dict[str, list[float]] = {k: [] for k in sides}
    hits: dict[str, list[float]] = {k: [] for k in sides}
    images: dict[str, list] = {k: [] for k in sides}
    batch = 16
    for b, i in enumerate(range(0, len(items), batch)):
        chunk = items[i:i + batch]
        seeds = [10_000 + i + j for j in range(len(chunk))]
        order = sides[b % len(sides):] + sides[:b % len(sides)]
        for side in order:
            t0 = time.perf_counter()
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = sampling.sample(comps[side], [c[0] for c in chunk], [conds[c[1]] for c in chunk], seeds,
                                      samples[side], size, size)
            seconds[side].append((time.perf_counter() - t0) / len(chunk))
            arr = np.stack([np.asarray(im.convert("RGB")) for im in out.images])
            found = detector.detect(arr)
            scores[side] += [oks(poses[c[1]], found[j][0], width=size, height=size) for j, c in enumerate(chunk)]
            for j, c in enumerate(chunk):
                got, want = measure_attributes(arr[j], poses[c[1]]), parse_prompt(c[0])
                hits[side].append(float(np.mean([getattr(got, k) == getattr(want, k)
                                                 for k in ("shirt", "trousers", "background")])))
            images[side] += out.images
    ratios = [a / b for a, b in zip(seconds["ddim"], seconds["tiny_lcm"])]
    speed = statistics.median(seconds["ddim"]) / statistics.median(seconds["tiny_lcm"])
    # At equal decoders: what the 4 steps alone buy, with either decoder.
    equal = {dec: [a / b for a, b in zip(seconds[d], seconds[l])]
             for dec, d, l in (("preview", "ddim_preview", "tiny_lcm"), ("vae", "ddim", "tiny_lcm_vae"))}
    diff = np.asarray(scores["tiny_lcm"]) - np.asarray(scores["ddim"])
    res = {
        "images": len(items), "threads": args.threads, "lcm_steps": args.steps,
        "seconds_per_image": {k: statistics.median(v) for k, v in seconds.items()},
        "speedup": speed, "speedup_min_max": [min(ratios), max(ratios)],
        **{f"speedup_equal_{dec}_decoder": statistics.median(r) for dec, r in equal.items()},
        **{f"speedup_equal_{dec}_decoder_min_max": [min(r), max(r)] for dec, r in equal.items()},
        "oks": {k: mean_and_ci(v) for k, v in scores.items()}, "oks_diff": mean_and_ci(diff.tolist()),
        "attributes": {k: mean_and_ci(v) for k, v in hits.items()},
        **{f"{what}_diff_{k}": mean_and_ci((np.asarray(v[k]) - np.asarray(v["ddim"])).tolist())
           for what, v in (("oks", scores), ("attributes", hits)) for k in sides[1:]},
        # What the distillation did: the shipped LoRA against the undistilled UNet, both 4 LCM steps, VAE-decoded.
        **{f"{what}_distilled_minus_undistilled": mean_and_ci((np.asarray(v["tiny_lcm_vae"]) -
                                                                     np.asarray(v["lcm"])).tolist())
           for what, v in (("oks", scores), ("attributes", hits))},
        # What the preview decoder costs in quality, on the same latents' rounds (same seeds).
        **{f"{what}_preview_minus_vae_{name}": mean_and_ci((np.asarray(v[a]) - np.asarray(v[b])).tolist())
           for what, v in (("oks", scores), ("attributes", hits))
           for name, a, b in (("lcm", "tiny_lcm", "tiny_lcm_vae"), ("ddim", "ddim_preview", "ddim"))},
    }
    fast, close = speed >= 4.0, res["oks_diff"][0] >= -0.1
    print(f"\n{len(items)} images (12 built-in poses x {args.prompts} prompts x {args.images} seeds), "
          f"{args.threads} thread(s), batches of {batch}, interleaved")
    for side, label in (("ddim", f"DDIM {base_cfg.sample.steps} steps, CFG {base_cfg.sample.guidance_scale:g}"),
                        ("ddim_preview", "  the same, preview decoder"),
                        ("tiny_lcm", f"tiny-lcm: LCM {args.steps} steps + LoRA, preview"),
                        ("tiny_lcm_vae", "  the same, the world's VAE"),
                        ("lcm", f"LCM {args.steps} steps, undistilled UNet"),
                        ("lcm_lora", f"same + LCM-LoRA {Path(args.lora).name}")):
        if side not in comps:
            continue
        m, lo, hi = res["oks"][side]
        am, alo, ahi = res["attributes"][side]
        print(f"{label:40s} {res['seconds_per_image'][side] * 1000:7.1f} ms/image   OKS {m:.3f} [{lo:.3f}, {hi:.3f}]"
              f"   attributes {am:.3f} [{alo:.3f}, {ahi:.3f}]")
    m, lo, hi = res["oks_diff"]
    print(f"speed-up DDIM / tiny-lcm: {speed:.2f}x (per-batch min {min(ratios):.2f}, max {max(ratios):.2f}; target >= 4) "
          f"{'PASS' if fast else 'FAIL'}")
    for dec, r in equal.items():
        print(f"  at equal decoders ({dec}): {statistics.median(r):.2f}x (per-batch min {min(r):.2f}, max {max(r):.2f})")
    print(f"OKS tiny-lcm - DDIM: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (target: within 0.1) {'PASS' if close else 'FAIL'}")
    for key in (k for k in res if k.startswith(("oks_diff_", "attributes_diff_"))
                or "distilled" in k or "preview_minus" in k):
        m, lo, hi = res[key]
        print(f"{key}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lcm.json").write_text(json.dumps(res, indent=2))
    _grid(images, conds, items, out / "lcm_grid.png")
    return 0 if fast and close else 1


def _grid(images: dict[str, list], conds: list, items: list, path: Path, n: int = 12) -> None:
    """Condition, then each side's image, for the first prompt's 12 poses (first seed), 2x upscaled."""
    from PIL import Image

    s = images["ddim"][0].width * 2
    canvas = Image.new("RGB", (n * s, (1 + len(images)) * s), "white")
    picks = [i for i, (_, _, k) in enumerate(items) if k == 0][:n]
    for col, i in enumerate(picks):
        for row, im in enumerate((conds[items[i][1]], *(v[i] for v in images.values()))):
            canvas.paste(im.convert("RGB").resize((s, s), Image.Resampling.NEAREST), (col * s, row * s))
    canvas.save(path)


if __name__ == "__main__":
    sys.exit(main())
