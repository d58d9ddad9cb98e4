"""Benchmark: how much of a DDPO gradient is signal? Cosine between independent policy-gradient estimates.

DDPO's update direction is sum_i A_i grad log p(trajectory_i): a Monte-Carlo estimate whose noise
falls with the number of trajectories N behind it. Two estimates from disjoint samples share only the
true gradient g, so with each estimate = g + noise, E[cos(est_1, est_2)] ~ |g|^2 / (|g|^2 + noise^2 / N)
grows with N towards 1. Printed for N = the tiny preset's 32 trajectories an epoch and multiples of it
(sums of disjoint epochs' estimates), as the mean over pairs with its min and max.

    python bench/bench_gradient_noise.py                       # brightness, 8 epochs' worth of estimates
    python bench/bench_gradient_noise.py --shared-start --steps 0 4   # the tiny preset's DDPO: one start
                                                                 # per group, the first 4 steps scored
    python bench/bench_gradient_noise.py --reward latent:models/reward/latest --epochs 8
    python bench/bench_gradient_noise.py --reward pose_accuracy:weights=models/tiny-sd15/pose_detector \
        --controlnet-scale 0.4 --target controlnet        # the pose reward where the base model has headroom

Every stochastic step of each trajectory is scored (train.timestep_fraction 1; --steps picks a range), and every
image has its own start (--shared-start gives a group's images one), on the embedded world with
the tiny preset's settings (LoRA on every layer, per-group normalised advantages as the trainer computes them), fp32, no update in between.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> int:
    """Estimate one gradient per epoch's samples; print cosines between sums of disjoint estimates."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward", default="", help="reward spec (default: the scripted rater's rule)")
    p.add_argument("--epochs", type=int, default=8, help="independent 32-trajectory estimates to draw")
    p.add_argument("--controlnet-scale", type=float, default=1.0, help="sample.controlnet_scale of the rollouts")
    p.add_argument("--target", choices=("unet_lora", "controlnet"), default="unet_lora",
                   help="trained weights: the tiny preset's UNet LoRA or the full ControlNet")
    p.add_argument("--shared-start", action="store_true",
                   help="train.shared_start: a group's images start from one x_T (its baseline then removes the "
                        "start's share)")
    p.add_argument("--steps", type=int, nargs=2, default=None, metavar=("FIRST", "END"),
                   help="score only sampling steps FIRST..END-1 (0 = the noisiest), e.g. 0 5 for the first half")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args(argv)

    import tempfile

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from poseloop.policy.advantages import PerPromptStatTracker
    from poseloop.rewards.spec import build_reward
    from poseloop.sampling.sampler import stochastic_steps
    from poseloop.checks.scripted import RULE
    from poseloop.models.embedded import ensure_embedded
    from poseloop.config.policy import tiny_on
    from poseloop.policy.trainer import PolicyTrainer

    root = ensure_embedded(ROOT / "models" / "tiny-sd15")
    reward = build_reward(args.reward or RULE)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = tiny_on(str(root), tmp, args.threads)
        cfg.sample.controlnet_scale, cfg.target.kind = args.controlnet_scale, args.target
        cfg.train.shared_start = args.shared_start
        tr = PolicyTrainer(cfg, reward=reward, progress=False)
        params = [q for q in tr.policy.parameters() if q.requires_grad]
        estimates = []
        for epoch in range(args.epochs):
            groups, seeds, keys = tr.epoch_items(epoch)
            batch, rewards, _ = tr.sample_groups(groups, seeds, reward, start_seeds=tr.start_seeds(epoch, groups))
            assert rewards is not None
            # Each group's own images of this epoch set its baseline (the tiny preset's stat_buffer 0), which also
            # keeps the estimates independent.
            adv = torch.from_numpy(PerPromptStatTracker(buffer_size=0).update(keys, rewards.numpy()))  # [N]
            steps = stochastic_steps(tr.comp.scheduler, batch.timesteps, cfg.sample.eta).nonzero().flatten().tolist()
            if args.steps:
                steps = [j for j in steps if args.steps[0] <= j < args.steps[1]]
            for q in params:
                q.grad = None
            n = adv.numel()
            for s0 in range(0, n, 8):
                idx = torch.arange(s0, min(n, s0 + 8))
                cond, lat = batch.cond.select(idx), batch.latents[idx]
                for j in steps:
                    lp = tr.rescore(cond, lat, batch.timesteps, j, batch.sample_cfg)  # [b]
                    (-(adv[idx] * lp).sum() / n).backward()
            estimates.append(-torch.cat([q.grad.flatten() for q in params]))  # ascent direction [P]
            print(f"epoch {epoch}: {n} trajectories, reward {float(rewards.mean()):.4f}", flush=True)
    results = {}
    per = cfg.train.groups_per_epoch * cfg.sample.images_per_group
    for m in (1, 2, 4):
        if 2 * m > len(estimates):
            break
        sums = [torch.stack(estimates[i:i + m]).sum(0) for i in range(0, len(estimates) - m + 1, m)]
        cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in itertools.combinations(sums, 2)]
        results[per * m] = {"mean": float(np.mean(cos)), "min": min(cos), "max": max(cos), "pairs": len(cos)}
    print(f"\nreward {args.reward or RULE}, ControlNet scale {args.controlnet_scale}, {args.target}, "
          f"{'one start per group' if args.shared_start else 'independent starts'}, "
          f"steps {'all' if not args.steps else f'{args.steps[0]}..{args.steps[1] - 1}'}; cosine between "
          f"gradient estimates from disjoint samples ({args.threads} thread(s)):")
    for n, c in results.items():
        print(f"  {n:4d} trajectories each: mean {c['mean']:+.3f} (min {c['min']:+.3f}, max {c['max']:+.3f}) "
              f"over {c['pairs']} pairs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_noise.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
