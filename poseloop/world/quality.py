"""Does the embedded model follow the pose and the prompt, and do images of a group differ?

Measured on fresh samples with the world's own instruments: the heatmap pose detector (OKS against
the condition's keypoints and against another pose's), the renderer's regions (which colour and
background appear) and simple image statistics (within- vs across-group spread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from poseloop.metrics.scores import oks
from poseloop.data.openpose import render_pose
from poseloop.data.poses import BUILTIN_POSES, Pose
from poseloop.metrics.stats import mean_and_ci
from poseloop.world.render import COLOURS, BACKGROUNDS, Attributes, measure_attributes, parse_prompt


def vocabulary_prompts() -> list[str]:
    """12 prompts in which every colour is a shirt twice and trousers twice, and every background thrice."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    out = []
    for i in range(12):
        shirt = colours[i % 6]
        trousers = colours[(i + 1 + i // 6) % 6]  # never the shirt's colour, every colour twice
        out.append(Attributes(shirt, trousers, backgrounds[i % 4]).prompt())
    return out


def image_stats(images: np.ndarray) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, 5] statistics: mean R, G, B, brightness, red minus blue (0..1 units)."""
    x = np.asarray(images, dtype=np.float64) / 255.0
    rgb = x.mean(axis=(1, 2))
    return np.concatenate([rgb, rgb.mean(axis=1, keepdims=True), rgb[:, :1] - rgb[:, 2:]], axis=1)


def within_across_ratio(stats: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per statistic: pooled within-group std / std of the group means ([N, S], [N] -> [S])."""
    ids = np.unique(groups)
    within = np.sqrt(np.mean([stats[groups == g].var(axis=0, ddof=1) for g in ids], axis=0))
    across = np.array([stats[groups == g].mean(axis=0) for g in ids]).std(axis=0, ddof=1)
    return within / np.maximum(across, 1e-12)


@dataclass
class GeneratorReport:
    """What evaluate_generator measured, per image and summarised."""

    oks: list[float] = field(default_factory=list)
    oks_shuffled: list[float] = field(default_factory=list)
    hits: dict[str, list[bool]] = field(default_factory=lambda: {"shirt": [], "trousers": [], "background": []})
    stats: np.ndarray | None = None
    groups: np.ndarray | None = None
    images: list[Any] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Means with 95% bootstrap intervals and the within/across ratios."""
        out: dict[str, Any] = {"n_images": len(self.oks), "seconds": self.seconds}
        out["oks"] = mean_and_ci(self.oks)
        out["oks_shuffled"] = mean_and_ci(self.oks_shuffled)
        every = [h for k in self.hits for h in self.hits[k]]
        out["attribute_accuracy"] = mean_and_ci(every)
        for k, v in self.hits.items():
            out[f"{k}_accuracy"] = mean_and_ci(v)
        if self.stats is not None and self.groups is not None and len(self.groups) > len(np.unique(self.groups)):
            ratio = within_across_ratio(self.stats, self.groups)
            out["within_across"] = dict(zip(("red", "green", "blue", "brightness", "warmth"), ratio.round(3).tolist()))
            out["within_across_mean"] = float(ratio.mean())
        return out


def builtin_poses() -> list[Pose]:
    """The 12 built-in poses, in name order."""
    return [BUILTIN_POSES[n] for n in sorted(BUILTIN_POSES)]


def placed_poses(n: int = 12, seed: int = 0) -> list[Pose]:
    """Built-in poses jittered, mirrored, scaled and moved as the world's training poses are."""
    from poseloop.world.render import jitter_pose

    rng = np.random.default_rng(seed)
    base = builtin_poses()
    return [jitter_pose(base[i % len(base)], rng) for i in range(n)]


def shuffled_ceiling(poses: Sequence[Pose], size: int = 64) -> float:
    """Mean OKS of each pose's true keypoints against the next pose's: what a perfect generator scores
    in the shuffled baseline (the built-in poses share a standing body, so this is far above 0)."""
    n = len(poses)
    return float(np.mean([oks(poses[(i + 1) % n], poses[i], width=size, height=size) for i in range(n)]))


def evaluate_generator(comp: Any, detector: Any, prompts: Sequence[str], poses: Sequence[Pose],
                       images_per_group: int, sample_cfg: Any, size: int = 64, seed: int = 0,
                       batch: int = 16, progress: bool = False) -> GeneratorReport:
    """Sample every (prompt, pose) group and measure pose, attributes and within-group variation.

    The shuffled baseline scores each image against the next pose of ``poses``.
    """
    import time

    import torch

    from poseloop.sampling import sampler as sampling

    conds = [render_pose(p, size, size) for p in poses]
    jobs = [(gi, prompt, pi) for gi, (prompt, pi) in enumerate((pr, i) for pr in prompts for i in range(len(poses)))]
    items = [(g, pr, pi, k) for g, pr, pi in jobs for k in range(images_per_group)]
    rep = GeneratorReport()
    stats, groups = [], []
    start = time.time()
    it = range(0, len(items), batch)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="sampling", unit="batch")
    for i in it:
        chunk = items[i:i + batch]
        seeds = [seed * 1_000_003 + g * 101 + k for g, _, _, k in chunk]
        with torch.no_grad():
            out = sampling.sample(comp, [c[1] for c in chunk], [conds[c[2]] for c in chunk], seeds, sample_cfg,
                                  size, size)
        arr = np.stack([np.asarray(im.convert("RGB")) for im in out.images])
        found = detector.detect(arr)
        for j, (g, prompt, pi, _k) in enumerate(chunk):
            pose, other = poses[pi], poses[(pi + 1) % len(poses)]
            rep.oks.append(oks(pose, found[j][0], width=size, height=size))
            rep.oks_shuffled.append(oks(other, found[j][0], width=size, height=size))
            got, want = measure_attributes(arr[j], pose), parse_prompt(prompt)
            for key in rep.hits:
                rep.hits[key].append(getattr(got, key) == getattr(want, key))
            groups.append(g)
        stats.append(image_stats(arr))
        rep.images.extend(out.images)
    rep.seconds = time.time() - start
    rep.stats, rep.groups = np.concatenate(stats), np.asarray(groups)
    return rep


def reference_spread(vae: Any, prompts: Sequence[str], poses: Sequence[Pose], images_per_group: int,
                     size: int = 64, seed: int = 0) -> dict[str, float]:
    """Within/across-group spread of true renders (random looks) in evaluate_generator's design, and of
    their round trips through ``vae``: what a generator that draws the world's looks, or a perfect UNet
    behind this VAE, would score."""
    from poseloop.world.render import Look, render_person
    from poseloop.world.training import encode_all

    rng = np.random.default_rng(seed)
    images = np.stack([render_person(pose, parse_prompt(prompt), Look.random(rng), size).image
                       for prompt in prompts for pose in poses for _ in range(images_per_group)])
    groups = np.repeat(np.arange(len(prompts) * len(poses)), images_per_group)
    _, trips = encode_all(vae, images, n_recon=len(images), batch=64)
    return {"renders": float(within_across_ratio(image_stats(images), groups).mean()),
            "vae_roundtrip": float(within_across_ratio(image_stats(trips), groups).mean())}
