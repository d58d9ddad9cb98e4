"""Benchmark of the learned reward model: held-out quality per architecture, training time, scoring throughput.

quality: a round is generated with the embedded tiny SD1.5 model (random weights, 64 px) and labelled from a
    hidden rule (harsh and generous raters' scores on 5 levels + rule-derived preferences); each recipe is
    trained on the same labels for several group splits and its held-out pairwise accuracy / Spearman is
    printed beside the baselines (constant: 0.5; ridge on per-channel latent mean/std).
speed: training seconds per 1,000 labelled latents per epoch, and scoring throughput (latents/s) of our
    model on stored latents against AlmostPerfect's path (decode each latent with the VAE, re-encode the
    image with the VAE, then score), on the tiny VAE at 64 px and on an SD-sized VAE (block_out_channels
    128-256-512-512, random weights) at 512 px.

    python bench/bench_reward.py                       # both parts (a few minutes on 2 CPU cores)
    python bench/bench_reward.py --skip-quality        # speed only
    python bench/bench_reward.py --groups 24 --splits 3 --rules latent_c0 image_brightness
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from sqlalchemy import select

from poseloop.data import db
from poseloop.config.reward import TrainRewardConfig, almostperfect
from poseloop.rewards.labels import load_labels, split_groups
from poseloop.rewards.model import LatentRewardModel, encode_images
from poseloop.config.reward import RewardModelConfig
from poseloop.rewards.report import evaluate
from poseloop.rewards.training import fit_ensemble
from poseloop.data.store import SampleStore, load_trajectory


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=24, help="(prompt, pose) groups in the generated round (max 24)")
    p.add_argument("--splits", type=int, default=3, help="group splits (seeds) per recipe")
    p.add_argument("--epochs", type=int, default=60, help="max epochs per member")
    p.add_argument("--rules", nargs="*", default=["latent_c0", "image_brightness", "image_contrast"],
                   help="hidden rules the labels follow")
    p.add_argument("--skip-quality", action="store_true", help="only the speed part")
    p.add_argument("--skip-speed", action="store_true", help="only the quality part")
    p.add_argument("--sd-batch", type=int, default=1, help="batch of the SD-sized VAE path")
    return p.parse_args(argv)


def tiny_components():  # -> Components
    """The embedded tiny SD1.5 model (built under models/ on first use)."""
    from poseloop.config.generation import tiny
    from poseloop.models.loading import load_components

    return load_components(tiny().model)


def make_round(samples_dir: Path, groups: int) -> None:
    """Generate groups x 4 images at 64 px, 2 steps."""
    from poseloop.config.generation import tiny
    from poseloop.sampling.round import generate

    cfg = tiny()
    cfg.sample.width = cfg.sample.height = 64
    cfg.sample.steps = 2
    cfg.sample.images_per_group = 4
    cfg.sample.batch_size = 16
    cfg.data.prompts = ["a dancer", "an astronaut"]
    cfg.data.poses = ["all"]
    cfg.data.max_groups = groups
    cfg.store.samples_dir = str(samples_dir)
    generate(cfg)


def rule_values(samples_dir: Path, rule: str, comp) -> dict[int, float]:  # noqa: ANN001
    """{sample id: hidden-rule value}."""
    from poseloop.sampling.sampler import decode_latents

    store = SampleStore(samples_dir)
    factory = db.open_db(db.default_db_url(samples_dir))
    with db.session_scope(factory) as s:
        rows = [(x.id, x.trajectory_path) for x in s.scalars(select(db.Sample).order_by(db.Sample.id))]
    lat = torch.stack([load_trajectory(store.abs(p)).latents[-1].float() for _, p in rows])  # [N, C, h, w]
    if rule == "latent_c0":
        v = lat[:, 0].mean(dim=(1, 2))
    else:
        img = decode_latents(comp, lat)  # [N, 3, H, W]
        v = img.mean(dim=(1, 2, 3)) if rule == "image_brightness" else img.std(dim=(1, 2, 3))
    return {sid: float(v[i]) for i, (sid, _) in enumerate(rows)}


def relabel(samples_dir: Path, rule: dict[int, float]) -> None:
    """Replace every label by harsh/generous scores (5 levels) and rule preferences."""
    factory = db.open_db(db.default_db_url(samples_dir))
    vals = torch.tensor(list(rule.values()))
    mean, std = float(vals.mean()), float(vals.std())
    with db.session_scope(factory) as s:
        from sqlalchemy import delete

        s.execute(delete(db.Rating))
        s.execute(delete(db.Preference))
        harsh, generous, pref = (db.get_or_create_rater(s, n) for n in ("harsh", "generous", "pref"))
        by_group: dict[int, list[int]] = {}
        for x in s.scalars(select(db.Sample).order_by(db.Sample.id)):
            level = max(-2, min(2, round(1.5 * (rule[x.id] - mean) / std)))
            s.add(db.Rating(rater_id=harsh.id, sample_id=x.id, score=float(level - 3)))
            s.add(db.Rating(rater_id=generous.id, sample_id=x.id, score=float(level + 3)))
            by_group.setdefault(x.group_id, []).append(x.id)
        for ids in by_group.values():
            for i in range(len(ids)):
                for j in range(i + 1, len(ids)):
                    d = rule[ids[i]] - rule[ids[j]]
                    choice = "tie" if abs(d) < 1e-3 * std else ("a" if d > 0 else "b")
                    s.add(db.Preference(rater_id=pref.id, sample_a_id=ids[i], sample_b_id=ids[j], choice=choice))


def recipes(epochs: int) -> dict[str, Callable[[], TrainRewardConfig]]:
    """The compared training recipes; all use the same labels and group splits."""
    def base(**kw: object) -> Callable[[], TrainRewardConfig]:
        def make() -> TrainRewardConfig:
            cfg = TrainRewardConfig()
            cfg.train.ensemble_size = 1
            cfg.train.bootstrap = False
            for k, v in kw.items():
                section, name = k.split("__")
                setattr(getattr(cfg, section), name, v)
            return cfg
        return make

    def ap(**kw: object) -> Callable[[], TrainRewardConfig]:
        def make() -> TrainRewardConfig:
            cfg = almostperfect()
            for k, v in kw.items():
                section, name = k.split("__")
                setattr(getattr(cfg, section), name, v)
            return cfg
        return make

    out = {
        "almostperfect (AP CNN, MSE on scores)": ap(),
        "almostperfect CNN, scores+prefs": ap(data__labels="both"),
        "improved, scores only": base(data__labels="scores"),
        "improved, scores+prefs": base(),
        "improved, no input norm": base(model__normalize_input=False),
        "improved, no dropout": base(model__dropout=0.0),
        "improved, no flips": base(train__flip_augment=False),
        "improved, ranking score loss": base(train__score_loss="ranking"),
        "improved, ensemble 3 (bootstrap)": base(train__ensemble_size=3, train__bootstrap=True),
    }
    def with_epochs(make: Callable[[], TrainRewardConfig]) -> Callable[[], TrainRewardConfig]:
        def inner() -> TrainRewardConfig:
            cfg = make()
            cfg.train.epochs = epochs
            cfg.train.patience = 15
            cfg.train.holdout_fraction = 0.25
            return cfg
        return inner

    return {k: with_epochs(v) for k, v in out.items()}


def quality(args: argparse.Namespace, comp, root: Path) -> None:  # noqa: ANN001
    """Held-out numbers of every recipe on every rule."""
    samples = root / "samples"
    make_round(samples, args.groups)
    for rule in args.rules:
        relabel(samples, rule_values(samples, rule, comp))
        print(f"\n== rule {rule}: {args.groups} groups x 4 images, 25% of groups held out, "
              f"{args.splits} splits (mean +- sd) ==")
        print(f"{'recipe':42s} {'held-out acc':>14s} {'Spearman':>14s} {'train acc':>10s} {'s/member':>9s}")
        base_rows: dict[str, list[float]] = {"lin_acc": [], "lin_sp": []}
        for name, make in recipes(args.epochs).items():
            accs, sps, tr, secs = [], [], [], []
            for seed in range(args.splits):
                cfg = make()
                cfg.train.seed = seed
                cfg.data.samples_dir = str(samples)
                labels = load_labels(cfg.data)
                split = split_groups(labels, cfg.train.holdout_fraction, seed)
                model, hist = fit_ensemble(labels, split, cfg, progress=False)
                m = evaluate(model, labels, split, hist, cfg)
                accs.append(m["heldout_pairwise_accuracy"])
                sps.append(m["heldout_spearman"])
                tr.append(m["train_pairwise_accuracy"])
                secs.append(m["train_seconds"] / cfg.train.ensemble_size)
                if name.startswith("improved, scores+prefs"):
                    base_rows["lin_acc"].append(m["baselines"]["linear_channel_stats"]["heldout_pairwise_accuracy"])
                    base_rows["lin_sp"].append(m["baselines"]["linear_channel_stats"]["heldout_spearman"])
            print(f"{name:42s} {fmt(accs):>14s} {fmt(sps):>14s} {statistics.mean(tr):10.3f} {statistics.mean(secs):9.1f}")
        print(f"{'baseline: constant':42s} {'0.500':>14s} {'0.000':>14s}")
        print(f"{'baseline: ridge on channel mean/std':42s} {fmt(base_rows['lin_acc']):>14s} {fmt(base_rows['lin_sp']):>14s}")


def fmt(xs: list[float]) -> str:
    """mean +- sd."""
    return f"{statistics.mean(xs):.3f}+-{statistics.pstdev(xs):.3f}"


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Best wall time of repeats calls (after one warm-up unless warmup=False)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def scoring_speed(vae, latent_hw: int, batch: int, repeats: int, label: str, warmup: bool = True  # noqa: ANN001
                  ) -> tuple[float, float]:
    """(ours latents/s, AlmostPerfect path latents/s) at one latent size."""
    c = vae.config.latent_channels
    x = torch.randn(batch, c, latent_hw, latent_hw)
    ours = LatentRewardModel(RewardModelConfig(), (c, latent_hw, latent_hw), ensemble_size=3).eval()
    ap = LatentRewardModel(RewardModelConfig(arch="almostperfect"), (c, latent_hw, latent_hw), 1).eval()

    def ap_path() -> None:
        img = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)  # decode
        ap.score(encode_images(vae, img))  # re-encode, then score

    t_ours = timed(lambda: ours.score(x), repeats)
    t_ours_ap = timed(lambda: ap.score(x), repeats)
    # The VAE path dominates; on the SD-sized VAE one cold call is all 2 CPU cores can afford.
    t_ap = timed(ap_path, repeats, warmup)
    print(f"{label:34s} {batch:6d} {batch / t_ours:14.1f} {batch / t_ours_ap:14.1f} {batch / t_ap:16.2f} "
          f"{t_ap / t_ours:10.0f}x")
    return batch / t_ours, batch / t_ap


def speed(args: argparse.Namespace, comp, root: Path) -> None:  # noqa: ANN001
    """Training time per 1,000 labelled latents and scoring throughput."""
    from diffusers import AutoencoderKL

    import os

    print(f"\n== training time (CPU, torch threads: {torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) ==")
    n = 1000
    for arch, hw in (("improved", 8), ("almostperfect", 8), ("improved", 64), ("almostperfect", 64)):
        x = torch.randn(n, 4, hw, hw)
        cfg = TrainRewardConfig()
        cfg.model.arch = arch
        net = LatentRewardModel(cfg.model, (4, hw, hw), 1).members[0].train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
        y = torch.randn(n)
        steps = n // cfg.train.batch_size if hw <= 8 else 4  # 64x64: time a few steps and extrapolate
        net(x[:32]).sum().backward()  # warm-up (allocator, kernels)
        t = time.perf_counter()
        for i in range(steps):
            xb = x[i * 32:(i + 1) * 32]
            loss = torch.nn.functional.mse_loss(net(xb), y[i * 32:(i + 1) * 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
        per_label = (time.perf_counter() - t) / (steps * cfg.train.batch_size)
        print(f"{arch:14s} latents 4x{hw}x{hw}: {per_label * 1000:7.2f} s per epoch over 1,000 labels "
              f"(batch 32, 1 member)")

    print("\n== scoring throughput (latents/s; ours = improved 3-member ensemble on stored latents) ==")
    print(f"{'setting':34s} {'batch':>6s} {'ours':>14s} {'AP net only':>14s} {'AP decode+enc':>16s} {'speed-up':>10s}")
    scoring_speed(comp.vae.float().eval(), 8, 32, 5, "tiny VAE, 64 px (latent 4x8x8)")
    torch.manual_seed(0)
    sd_vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                           norm_num_groups=32, sample_size=512, scaling_factor=0.18215).eval()
    scoring_speed(sd_vae, 64, args.sd_batch, 1, "SD-size VAE (random), 512 px", warmup=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark parts and print their tables."""
    args = parse_args(argv)
    comp = tiny_components()
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_quality:
            quality(args, comp, Path(tmp))
        if not args.skip_speed:
            speed(args, comp, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
