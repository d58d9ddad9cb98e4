"""Benchmark: the latent CNN reward model vs a head on frozen CLIP features, trained on the same labels.

The scripted rater (poseloop.checks.scripted: a warm light; bright images before 2026-11-30) labels a round of the embedded world through the
rating app's JSON API (scores and every within-group pair); train_reward.py fits both kinds on exactly those
labels with their defaults (--model.kind latent; --model.kind clip --model.clip ...); each is then checked on a
FRESH round of other prompts: within-group pairwise agreement with the rater, 95% group-bootstrap intervals, and
the paired difference (clip - latent) resampled over the same groups. The held-out report of each training run
(train_reward's own split) is printed beside it.

Without --clip, the CLIP is open_clip's ViT-B-32 architecture with RANDOM weights (seeded), saved as a checkpoint
file: no CLIP weights can be downloaded here. Its features are random projections of the pixels, so the
comparison measures the head machinery (features, cache, training, scoring), not what a real CLIP knows. With
real weights (--clip FOLDER for a transformers CLIPModel such as PickScore_v1, or --clip FILE --clip-arch ARCH
for an open_clip checkpoint such as HPS_v2.1_compressed.pt) the same comparison runs unchanged.

    python bench/bench_reward_heads.py --threads 1                 # ~5 min on 1 thread (random ViT-B-32)
    python bench/bench_reward_heads.py --clip models/pickscore/PickScore_v1 --clip-processor models/pickscore/proc
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", default="", help="a CLIPModel folder or an open_clip checkpoint file; default: a random "
                   "ViT-B-32 built here")
    p.add_argument("--clip-arch", default="ViT-B-32", help="open_clip architecture of --clip (a file) or of the random CLIP")
    p.add_argument("--clip-processor", default="", help="processor folder of a CLIPModel --clip (default: the folder)")
    p.add_argument("--train-prompts", type=int, default=2, help="prompts of the labelled round (x 12 poses x 4 images)")
    p.add_argument("--fresh-prompts", type=int, default=2, help="prompts of the fresh round")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--work", default="", help="keep rounds and models in this folder (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"), help="folder for reward_heads.json")
    return p.parse_args(argv)


def random_clip(folder: Path, arch: str) -> Path:
    """open_clip `arch` with seeded random weights saved as a {'state_dict'} checkpoint (as HPS ships its weights)."""
    import open_clip
    import torch

    path = folder / f"{arch}-random-seed0.pt"
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model(arch, pretrained=None)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": model.state_dict()}, path)
    return path


def paired_diff(a: list[list[bool]], b: list[list[bool]], seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a over all pairs with a 95% interval resampling whole groups (the same groups for both)."""
    fa = np.array([x for g in a for x in g], dtype=float)
    fb = np.array([x for g in b for x in g], dtype=float)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(2000):
        pick = rng.integers(0, len(a), len(a))
        boots.append(np.mean([y for i in pick for y in b[i]]) - np.mean([x for i in pick for x in a[i]]))
    return float(fb.mean() - fa.mean()), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def run(work: Path, args: argparse.Namespace) -> dict:
    """Generate, label, train both kinds, measure on the fresh round."""
    import torch

    import generate
    import train_reward
    from poseloop.checks.scripted import _prompts, label_round, reward_pair_accuracy, reward_pair_agreement
    from poseloop.models.embedded import ensure_embedded
    from webapp import create_app

    torch.set_num_threads(args.threads)
    embedded = ensure_embedded(ROOT / "models" / "tiny-sd15")
    samples, models = work / "samples", work / "models"
    base = ["--model.base", str(embedded), "--model.controlnet", str(embedded / "controlnet"),
            "--model.models_dir", str(models), "--model.threads", str(args.threads), "--store.samples_dir", str(samples)]
    t0 = time.time()
    out: dict = {"labels": "labelled in an earlier run of this --work folder", "runs": {}}
    for name, n, offset in (("labelled", args.train_prompts, 0), ("fresh", args.fresh_prompts, 6)):
        if not (samples / name).is_dir():  # a --work folder is reused as it is: labels are posted once
            assert generate.main([*base, "--store.round", name, "--data.prompts", *_prompts(n, offset)]) == 0
            if name == "labelled":
                out["labels"] = label_round(create_app({"samples_dir": samples}).test_client(), samples, name)
    print(f"[{time.time() - t0:.0f} s] rounds generated and labelled: {out['labels']}", flush=True)

    if args.clip:
        clip, arch, note = Path(args.clip), args.clip_arch, f"CLIP {args.clip}"
    else:
        clip, arch = random_clip(work / "clip", args.clip_arch), args.clip_arch
        note = (f"CLIP = open_clip {arch} with RANDOM weights (seed 0): its features are random projections of the "
                "pixels; this measures the head machinery, not a real CLIP")
    kinds = {
        "latent": [],
        "clip": ["--model.kind", "clip", "--model.clip", str(clip)]
        + (["--model.clip_processor", args.clip_processor] if args.clip_processor else [])
        + (["--model.clip_arch", arch] if clip.is_file() else []),
    }
    agreement = {}
    for kind, extra in kinds.items():
        start = time.process_time()
        version = f"rm-{kind}"
        if not (models / "reward" / version).is_dir():
            assert train_reward.main(["--data.samples_dir", str(samples), "--data.rounds", "labelled",
                                      "--output.models_dir", str(models), "--output.version", version, *extra]) == 0
        train_cpu = time.process_time() - start
        folder = models / "reward" / version
        start = time.process_time()
        mean, lo, hi, pairs = reward_pair_accuracy(folder, samples, "fresh")
        score_cpu = time.process_time() - start
        agreement[kind] = reward_pair_agreement(folder, samples, "fresh")
        m = json.loads((folder / "metrics.json").read_text())
        out["runs"][kind] = {"fresh_accuracy": mean, "fresh_ci": [lo, hi], "fresh_pairs": pairs,
                             "heldout_accuracy": m["heldout_pairwise_accuracy"], "heldout_pairs": m["heldout_pairs"],
                             "heldout_linear_baseline": m["baselines"]["linear_channel_stats"]["heldout_pairwise_accuracy"],
                             "train_cpu_s": train_cpu, "fresh_scoring_cpu_s": score_cpu}
        print(f"[{time.time() - t0:.0f} s] {kind}: fresh {mean:.3f} [{lo:.3f}, {hi:.3f}]", flush=True)
    d = paired_diff(agreement["latent"], agreement["clip"])
    out["clip_minus_latent"] = {"diff": d[0], "ci": [d[1], d[2]]}
    out["note"] = note
    out["seconds"] = time.time() - t0
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run, print the side-by-side table, write bench/out/reward_heads.json."""
    args = parse_args(argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        r = run(Path(args.work), args)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(Path(tmp), args)
    print(f"\nreward heads on the same labels ({args.threads} thread(s), {r['seconds']:.0f} s); {r['note']}")
    print(f"{'kind':8s} {'fresh-round pairwise accuracy (95% CI)':40s} {'held-out acc':>12s} {'(linear)':>9s} "
          f"{'train CPU s':>11s} {'score CPU s':>11s}")
    for kind, x in r["runs"].items():
        ci = f"{x['fresh_accuracy']:.3f} [{x['fresh_ci'][0]:.3f}, {x['fresh_ci'][1]:.3f}] of {x['fresh_pairs']}"
        print(f"{kind:8s} {ci:40s} {x['heldout_accuracy']:12.3f} {x['heldout_linear_baseline']:9.3f} "
              f"{x['train_cpu_s']:11.1f} {x['fresh_scoring_cpu_s']:11.1f}")
    d = r["clip_minus_latent"]
    print(f"clip - latent (paired, same groups): {d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_heads.json").write_text(json.dumps(r, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
