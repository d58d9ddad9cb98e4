"""Benchmark: does the embedded model draw the condition's pose and the prompt's colours, with variety?

Samples every built-in pose (12) x the vocabulary prompts (each colour twice as a shirt and twice as
trousers, each background three times) x seeds with the default sampler (generate.py's tiny preset),
and measures with the world's own instruments:

* OKS of the pose detected in each image against its condition's keypoints;              >= 0.6
* the shuffled baseline: OKS against another pose's keypoints;                           <= 0.25
  The 12 built-in poses all stand centred at one scale, so their true keypoints already score 0.45
  against each other: the baseline is measured on the same poses jittered, mirrored, scaled and
  moved (as in the world's training data), where it can say whether the figure follows the pose;
  the built-in poses' shuffled value is printed beside its ceiling
* attribute accuracy: shirt, trousers and background read in the condition's regions;  >= 80%
  beside it, the same read on VAE round trips of fresh renders: what a perfect UNet would score
  through this VAE (its decoder shifts small regions' colours)
* within-group / across-group spread of mean R, G, B, brightness and warmth;            >= 0.30
  beside it, the same on true renders (random looks) and on their VAE round trips
* the pose detector's OKS on fresh renders;                                             >= 0.90
* the README's main command (`python generate.py`, 96 images) in a child process;      <= 90 s

Every number comes with a 95% bootstrap interval. Writes bench/out/world_grid.png (a generated
round: pose, then its images) for the README.

    python bench/bench_world.py                      # 12 prompts x 12 poses x 2 seeds
    python bench/bench_world.py --images 4 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2, help="images per (prompt, pose) group")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly: results and speed depend on it)")
    p.add_argument("--skip-generate", action="store_true", help="do not time `python generate.py`")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="folder for the grid and the JSON results")
    return p.parse_args(argv)


def time_main_command(threads: int) -> float:
    """Seconds of `python generate.py` (the default round) in a fresh process and samples folder."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "generate.py"), "--store.samples_dir", str(Path(tmp) / "s")],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - start


def save_grid(images: list, names: Sequence[str], per_group: int, path: Path, groups: int = 12) -> None:
    """One column per group: its pose image, then its images below, 2x enlarged."""
    from PIL import Image

    from poseloop.data.openpose import render_pose
    from poseloop.data.poses import BUILTIN_POSES

    s = images[0].size[0] * 2
    canvas = Image.new("RGB", (groups * s, (per_group + 1) * s), "white")
    for g in range(groups):
        canvas.paste(render_pose(BUILTIN_POSES[names[g % len(names)]], s, s), (g * s, 0))
        for k in range(per_group):
            canvas.paste(images[g * per_group + k].resize((s, s), Image.Resampling.NEAREST), (g * s, (k + 1) * s))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, print one line per target with PASS/FAIL, exit 1 if any fails."""
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from poseloop.config.generation import tiny
    from poseloop.models.loading import load_components
    from poseloop.data.poses import BUILTIN_POSES
    from poseloop.models.embedded import ensure_embedded
    from poseloop.world.detector import load_detector
    from poseloop.world.quality import (builtin_poses, evaluate_generator, placed_poses, shuffled_ceiling,
                                     reference_spread, vocabulary_prompts)
    from poseloop.world.training import detector_heldout_oks, roundtrip_attributes

    cfg = tiny()
    root = ensure_embedded(ROOT / cfg.model.base)
    cfg.model.base, cfg.model.controlnet = str(root), str(root / "controlnet")
    comp = load_components(cfg.model)
    detector = load_detector(root / "pose_detector")
    names = sorted(BUILTIN_POSES)
    prompts = vocabulary_prompts()
    size = cfg.sample.width
    rep = evaluate_generator(comp, detector, prompts, builtin_poses(), args.images, cfg.sample, size=size,
                             progress=True)
    s = rep.summary()
    placed = placed_poses(12, seed=7)
    rep2 = evaluate_generator(comp, detector, prompts[:6], placed, args.images, cfg.sample, size=size, seed=1,
                              progress=True)
    s2 = rep2.summary()
    det = detector_heldout_oks(detector.net, size, n=256, seed=424242)
    vae32 = copy.deepcopy(comp.vae).float()  # the round trips in fp32, whatever the pipeline's dtype
    with torch.no_grad():
        ceiling_vae = roundtrip_attributes(vae32, size, n=192, seed=424243)
        spread_ref = reference_spread(vae32, prompts, builtin_poses(), args.images, size, seed=424244)
    rt_parts = [ceiling_vae[f"{k}_acc"] for k in ("shirt", "trousers", "background")]
    out = Path(args.out)
    save_grid(rep.images, names, args.images, out / "world_grid.png")
    ceiling = shuffled_ceiling(builtin_poses(), size)
    rows = [
        ("pose OKS vs own condition (built-in poses)", s["oks"], ">=", 0.6),
        (f"  vs the next built-in pose (ceiling {ceiling:.2f})", s["oks_shuffled"], "", None),
        ("pose OKS vs own condition (placed poses)", s2["oks"], ">=", 0.6),
        (f"pose OKS vs another placed pose (ceiling {shuffled_ceiling(placed, size):.2f})", s2["oks_shuffled"],
         "<=", 0.25),
        ("attribute accuracy (shirt, trousers, background)", s["attribute_accuracy"], ">=", 0.8),
        ("  shirt", s["shirt_accuracy"], "", None),
        ("  trousers", s["trousers_accuracy"], "", None),
        ("  background", s["background_accuracy"], "", None),
        ("  VAE round trips of 192 renders (ceiling)", (sum(rt_parts) / 3,) * 3, "", None),
        ("within/across-group spread (mean of 5 stats)", (s["within_across_mean"],) * 3, ">=", 0.3),
        ("  the renders themselves, same design", (spread_ref["renders"],) * 3, "", None),
        ("  VAE round trips of those renders", (spread_ref["vae_roundtrip"],) * 3, "", None),
        ("pose detector OKS on fresh renders", (det["detector_oks"],) * 3, ">=", 0.9),
    ]
    if not args.skip_generate:
        sec = time_main_command(args.threads)
        rows.append(("`python generate.py` (96 images), seconds", (sec,) * 3, "<=", 90.0))
    ok = True
    print(f"embedded world: {s['n_images']} images ({len(prompts)} prompts x {len(names)} built-in poses x "
          f"{args.images}) + {s2['n_images']} on placed poses, {rep.seconds + rep2.seconds:.0f} s sampling, "
          f"{args.threads} thread(s)")
    for label, (mean, lo, hi), op, target in rows:
        verdict = ""
        if target is not None:
            good = mean >= target if op == ">=" else mean <= target
            ok &= good
            verdict = f"(target {op} {target}) {'PASS' if good else 'FAIL'}"
        ci = f" [{lo:.3f}, {hi:.3f}]" if hi != lo else ""
        print(f"{label:52s} {mean:7.3f}{ci:18s} {verdict}")
    print("VAE round trips, shirt / trousers / background: " + " / ".join(f"{v:.3f}" for v in rt_parts)
          + f" (PSNR {ceiling_vae['psnr_db']:.1f} dB)")
    print("within/across per statistic: " + json.dumps(s["within_across"]))
    (out / "world.json").write_text(json.dumps({"builtin": s, "placed": s2, "detector": det, "ceiling": ceiling,
                                                "vae_roundtrip": ceiling_vae, "reference_spread": spread_ref},
                                               indent=2, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
