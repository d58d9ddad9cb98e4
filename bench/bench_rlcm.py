"""Benchmark: RLCM (PPO over 4-step LCM trajectories) against DDPO (10-step DDIM, CFG) on the same reward.

RLCM's headline claim is the same reward gain in less wall-clock time. Both runs start from the
embedded world with the tiny preset's settings (LoRA on every layer, lr 2e-3, clip 0.2, 8 groups x 4
images an epoch); RLCM is the tiny-rlcm preset: the world's LCM-LoRA fused in, 4 LCM steps without CFG,
all 3 stochastic steps of each trajectory trained (the 4th returns the denoised latent). Each run's gain
is measured with its own sampler, on 48 fixed fresh (group, seed) items before and after training, as a
paired bootstrap 95% interval; training time is wall-clock in this process.

    python bench/bench_rlcm.py                     # brightness (the scripted rater's rule), 8 epochs
    python bench/bench_rlcm.py --epochs 4 --reward jpeg_compressibility
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: Sequence[str] | None = None) -> int:
    """Train DDPO and RLCM in turn, print gains, times and gain per second; write bench/out/rlcm.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward", default="", help="reward spec (default: the scripted rater's rule)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from poseloop.rewards.spec import build_reward
    from poseloop.checks.scripted import RULE
    from poseloop.config.policy import tiny_on, tiny_rlcm
    from poseloop.models.embedded import ensure_embedded
    from poseloop.config.generation import LCM_LORA_FILE
    from poseloop.policy.trainer import PolicyTrainer
    from poseloop.metrics.stats import mean_and_ci
    from poseloop.world.quality import vocabulary_prompts

    root = ensure_embedded(ROOT / "models" / "tiny-sd15")
    reward = build_reward(args.reward or RULE)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("ddpo", "rlcm"):
            torch.manual_seed(0)
            cfg = tiny_on(str(root), f"{tmp}/{name}", args.threads)
            cfg.data.prompts = vocabulary_prompts()[:6]
            if name == "rlcm":  # the tiny-rlcm preset on the same folder: the world's LCM-LoRA fused in
                rlcm = tiny_rlcm()
                cfg.algo, cfg.sample, cfg.train, cfg.optim = rlcm.algo, rlcm.sample, rlcm.train, rlcm.optim
                cfg.model.lcm_lora = str(root / LCM_LORA_FILE)
            cfg.train.epochs = args.epochs
            cfg.train.resume = False
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the trainer's guard / KL notes are not the point here
                tr = PolicyTrainer(cfg, reward=reward, progress=False)
                n = 48
                groups = [(i * 7) % len(tr.specs) for i in range(n)]
                seeds = [20_000 + i for i in range(n)]
                _, before, _ = tr.sample_groups(groups, seeds, reward)
                t0 = time.perf_counter()
                res = tr.run()
                seconds = time.perf_counter() - t0
                _, after, _ = tr.sample_groups(groups, seeds, reward)
            d = (after - before).numpy()
            m, lo, hi = mean_and_ci(d.tolist())
            results[name] = {"before": float(before.mean()), "after": float(after.mean()), "gain": [m, lo, hi],
                             "train_seconds": seconds, "gain_per_second": [m / seconds, lo / seconds, hi / seconds],
                             "win_rate": float((d > 0).mean()),
                             "epoch_reward": [h.get("reward_mean") for h in res.history if "reward_mean" in h]}
            print(f"{name}: {json.dumps(results[name])}", flush=True)
    print(f"\nreward {args.reward or RULE}, {args.epochs} epochs, {args.threads} thread(s); gains on 48 fixed fresh items")
    for name, label in (("ddpo", "DDPO, DDIM 10 steps, CFG 5"), ("rlcm", "RLCM, LCM 4 steps (LoRA), no CFG")):
        r = results[name]
        g, lo, hi = r["gain"]
        print(f"{label:28s} {r['before']:.4f} -> {r['after']:.4f}: {g:+.4f} [{lo:+.4f}, {hi:+.4f}], "
              f"win {r['win_rate']:.0%}, {r['train_seconds']:.0f} s, {g / r['train_seconds']:.2e} per s")
    speed = results["ddpo"]["train_seconds"] / results["rlcm"]["train_seconds"]
    print(f"wall-clock DDPO / RLCM for {args.epochs} epochs: {speed:.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rlcm.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
