"""Benchmark: poseloop's trajectory-recording sampler against diffusers' own ControlNet pipeline.

Both run on the SAME loaded model with the same steps, batch, resolution, CFG scale, eta and
ControlNet scale, and both decode to PIL at the end. Runs are interleaved (A, B, A, B, ...) so that
load from other processes hits both alike; the result is the median per-repeat time ratio. With
`--preset tiny-lcm` both sides run the LCM sampler (the world's LCM-LoRA fused in, no CFG): ours
records its trajectory, diffusers' pipeline runs with its LCMScheduler.

    python bench/bench_sampler.py --preset tiny --steps 20 --batch 8 --size 128 --repeats 5
    python bench/bench_sampler.py --preset tiny-lcm --steps 4
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from poseloop.config.generation import PRESETS
from poseloop.models.loading import Components, load_components
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose
from poseloop.sampling.sampler import sample

TARGET = 1.05  # issue 14: within 1.05x of diffusers' pipeline
PROMPTS = ("a dancer in a red dress, studio photo", "an astronaut in a white suit on the moon")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=("tiny", "tiny-sdxl", "tiny-lcm"),
                   help="embedded model and sampler (tiny-lcm: the LCM sampler on the world's LCM-LoRA)")
    p.add_argument("--steps", type=int, default=0, help="sampler steps (default: 20 DDIM, 4 LCM)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--batch", type=int, default=8, help="images per call")
    p.add_argument("--size", type=int, default=128, help="width = height in pixels")
    p.add_argument("--repeats", type=int, default=5, help="interleaved A/B repetitions after one warm-up each")
    p.add_argument("--profile", action="store_true", help="after timing, cProfile one call of each and print the top")
    return p.parse_args(argv)


def make_runners(comp: Components, cfg: Any, batch: int, size: int
                 ) -> tuple[Callable[[], list[Image.Image]], Callable[[], list[Image.Image]]]:
    """Two zero-argument callables: ours and diffusers', each generating one batch of PIL images."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    pose = render_pose(get_builtin_pose("standing"), size, size)
    controls = [pose] * batch
    seeds = list(range(batch))
    s = cfg.sample

    def ours() -> list[Image.Image]:
        return sample(comp, prompts, controls, seeds, s, size, size).images

    ddim = comp.pipe.scheduler
    pipe_scheduler = ddim
    if s.sampler == "lcm":
        from diffusers import LCMScheduler

        pipe_scheduler = LCMScheduler.from_config(ddim.config)

    def theirs() -> list[Image.Image]:
        gens = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        # Our sampler reads the model's DDIM scheduler (and builds its own LCMScheduler); the pipeline gets
        # diffusers' LCMScheduler for this call only. eta reaches only a step() that takes it (DDIM's).
        comp.pipe.scheduler = pipe_scheduler
        try:
            with torch.no_grad():
                out = comp.pipe(prompt=prompts, negative_prompt=[s.negative_prompt] * batch, image=controls,
                                num_inference_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta,
                                controlnet_conditioning_scale=s.controlnet_scale, height=size, width=size,
                                generator=gens, output_type="pil")
        finally:
            comp.pipe.scheduler = ddim
        return list(out.images)

    return ours, theirs


def timed(fn: Callable[[], list[Image.Image]]) -> tuple[float, float, list[Image.Image]]:
    """Wall-clock seconds, process CPU seconds (all threads) of one call, and its output."""
    start, cpu = time.perf_counter(), time.process_time()
    images = fn()
    return time.perf_counter() - start, time.process_time() - cpu, images


def mean_abs_diff(a: list[Image.Image], b: list[Image.Image]) -> float:
    """Mean absolute pixel difference (0..255) between two image lists."""
    return float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean() for x, y in zip(a, b)]))


def profile_one(name: str, fn: Callable[[], list[Image.Image]], top: int = 25) -> None:
    """Print the functions with the most cumulative time for one call of fn."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print(f"\n---- cProfile of {name} (sorted by own time) ----")
    print(buf.getvalue())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the interleaved benchmark, print the table and the PASS/FAIL line; return 0 on PASS."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]()
    lcm = cfg.sample.sampler == "lcm"
    cfg.sample.steps = args.steps or (4 if lcm else 20)
    cfg.sample.batch_size = args.batch
    cfg.sample.width = cfg.sample.height = args.size
    comp = load_components(cfg.model)
    comp.pipe.set_progress_bar_config(disable=True)
    ours, theirs = make_runners(comp, cfg, args.batch, args.size)

    print(f"preset={args.preset} sampler={cfg.sample.sampler} steps={cfg.sample.steps} batch={args.batch} size={args.size} "
          f"cfg={cfg.sample.guidance_scale} eta={cfg.sample.eta} dtype={comp.dtype} device={comp.device} "
          f"torch threads={torch.get_num_threads()} repeats={args.repeats}", flush=True)
    t_ours, _, img_ours = timed(ours)
    t_theirs, _, img_theirs = timed(theirs)
    print(f"warm-up: ours {t_ours:.2f}s, diffusers {t_theirs:.2f}s; mean |pixel diff| between the two "
          f"outputs (same seeds): {mean_abs_diff(img_ours, img_theirs):.2f}/255", flush=True)

    a_times: list[float] = []
    b_times: list[float] = []
    a_cpu: list[float] = []
    b_cpu: list[float] = []
    for r in range(args.repeats):
        # Alternate which one goes first so that a slow phase of the machine does not favour either.
        order = [("ours", ours), ("diffusers", theirs)] if r % 2 == 0 else [("diffusers", theirs), ("ours", ours)]
        got: dict[str, tuple[float, float]] = {}
        for name, fn in order:
            got[name] = timed(fn)[:2]
        a_times.append(got["ours"][0])
        b_times.append(got["diffusers"][0])
        a_cpu.append(got["ours"][1])
        b_cpu.append(got["diffusers"][1])
        print(f"repeat {r + 1}/{args.repeats}: wall ours {a_times[-1]:.2f}s diffusers {b_times[-1]:.2f}s "
              f"ratio {a_times[-1] / b_times[-1]:.3f} | cpu ours {a_cpu[-1]:.2f}s diffusers {b_cpu[-1]:.2f}s "
              f"ratio {a_cpu[-1] / b_cpu[-1]:.3f}", flush=True)

    ratios = [a / b for a, b in zip(a_times, b_times)]
    cpu_ratios = [a / b for a, b in zip(a_cpu, b_cpu)]
    med_a, med_b = statistics.median(a_times), statistics.median(b_times)
    ratio = statistics.median(ratios)
    print()
    print(f"{'sampler':<28}{'median s/batch':>16}{'images/s':>12}")
    print(f"{'poseloop.sampling.sampler.sample':<28}{med_a:>16.3f}{args.batch / med_a:>12.3f}")
    print(f"{'diffusers pipe(...)':<28}{med_b:>16.3f}{args.batch / med_b:>12.3f}")
    print(f"{'ratio ours/diffusers':<28}{ratio:>16.3f}   (min {min(ratios):.3f}, max {max(ratios):.3f}, "
          f"n={len(ratios)})")
    print(f"{'CPU-time ratio (info)':<28}{statistics.median(cpu_ratios):>16.3f}   (min {min(cpu_ratios):.3f}, "
          f"max {max(cpu_ratios):.3f}; process CPU seconds, less sensitive to other load)")
    ok = ratio <= TARGET
    print(f"sampler/diffusers time ratio: {ratio:.2f}x (target <= {TARGET:.2f}x): {'PASS' if ok else 'FAIL'}")
    if args.profile:
        profile_one("poseloop.sampling.sampler.sample", ours)
        profile_one("diffusers pipe(...)", theirs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
