"""Benchmark: does active pair choice (--pair_order active) need fewer labels than coverage order?

On the embedded world (models/tiny-sd15): a "pool" round and a FRESH round are generated with generate.py
(vocabulary prompts x 12 poses x 4 images). A scripted rater (poseloop.checks.scripted.image_taste: a warmer
light; brighter images before 2026-11-30) labels pairs of the pool round through the rating app's JSON API in
batches of k pairs; after every batch the reward model (poseloop.rewards.training.fit_ensemble: improved
CNN, 3-member bootstrap ensemble) is retrained on all labels so far and written to the run's
<models>/reward/latest, and the app chooses the next batch by

    (a) coverage order   (--pair_order coverage, the default), or
    (b) active order     (--pair_order active: the latest reward model's ensemble disagreement).

The first batch of both is the same (no reward model yet: active falls back to coverage). After every
batch: within-group pairwise accuracy of the reward model against the rater on the fresh round (all its
within-group pairs). Over several seeds (seed = rater name, training seed); 95% intervals resample seeds
and fresh-round groups together (2,000 bootstrap draws), also for the paired difference active - coverage.

Training recipe (kept fast on 1 thread): every label trains (no held-out group: with 12 labels a held-out
group would take a large share of them), a fixed number of optimisation steps per member (`--steps`, the
epoch count follows from the number of labels), and the epoch with the best training accuracy (ties:
lowest loss) is kept. train_reward.py itself holds out 10% of the groups and stops early on them.

    python bench/bench_active.py                       # 3 seeds, batches of 12 pairs, ~10 min on 1 thread
    python bench/bench_active.py --seeds 5 --batches 12

Prints a table and writes bench/out/active.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STRATEGIES = ("coverage", "active")


def _round_rows(samples: Path, round_name: str) -> list[tuple[int, int, Path, str]]:
    """(sample id, group id, image path, trajectory path) of a round, by sample id."""
    from sqlalchemy import select

    from poseloop.data import db

    engine = db.open_db(db.default_db_url(samples))
    with db.session_scope(engine) as s:
        rows = s.execute(select(db.Sample.id, db.Sample.group_id, db.Sample.image_path, db.Sample.trajectory_path)
                         .join(db.Round, db.Sample.round_id == db.Round.id)
                         .where(db.Round.name == round_name).order_by(db.Sample.id)).all()
    engine.kw["bind"].dispose()
    return [(int(i), int(g), samples / p, t) for i, g, p, t in rows]


class FreshRound:
    """The fresh round's latents, the rater's taste and its within-group pairs, per group."""

    def __init__(self, samples: Path, round_name: str) -> None:
        import torch

        from poseloop.checks.scripted import image_taste
        from poseloop.data.store import SampleStore, load_trajectory

        rows = _round_rows(samples, round_name)
        store = SampleStore(samples)
        self.latents = torch.stack([load_trajectory(store.abs(t)).latents[-1].float() for *_, t in rows])
        taste = [image_taste(p) for _, _, p, _ in rows]
        groups: dict[int, list[int]] = {}
        for i, (_, gid, _, _) in enumerate(rows):
            groups.setdefault(gid, []).append(i)
        # Per group: (a, b) with the rater preferring a (pairs of equal taste are left out).
        self.pairs = [[(a, b) if taste[a] > taste[b] else (b, a) for a, b in itertools.combinations(idx, 2)
                       if taste[a] != taste[b]] for idx in groups.values()]
        self.n_pairs = sum(len(g) for g in self.pairs)

    def per_group_accuracy(self, model: Any) -> list[float]:
        """Fraction of each group's pairs the model orders as the rater does (equal scores count half)."""
        import torch

        with torch.no_grad():
            r = model.score(self.latents).float().numpy()
        return [float(np.mean([1.0 if r[a] > r[b] else 0.5 if r[a] == r[b] else 0.0 for a, b in g])) for g in self.pairs]

    def weights(self) -> np.ndarray:
        return np.array([len(g) for g in self.pairs], dtype=np.float64)


def _train(db_url: str, samples: Path, rater: str, models: Path, version: str, seed: int, args: argparse.Namespace
           ) -> tuple[Any, float]:
    """Fit the ensemble on every label of `rater` so far, save it as `version` and point latest at it."""
    from poseloop.rewards.versions import save_reward_model, write_latest
    from poseloop.config.reward import RewardDataConfig, TrainRewardConfig
    from poseloop.rewards.labels import GroupSplit, load_labels
    from poseloop.rewards.training import fit_ensemble

    t0 = time.perf_counter()
    labels = load_labels(RewardDataConfig(samples_dir=str(samples), db_url=db_url, rounds=["pool"], raters=[rater],
                                          labels="prefs"))
    cfg = TrainRewardConfig()
    cfg.data.labels = "prefs"
    cfg.model.width, cfg.model.hidden = args.width, args.hidden
    t = cfg.train
    t.ensemble_size, t.seed, t.lr, t.batch_size = args.ensemble, seed, args.lr, args.train_batch
    t.epochs = max(1, math.ceil(args.steps / math.ceil(labels.n_labels / t.batch_size)))
    t.patience = t.epochs
    cfg.validate()
    everything = list(range(len(labels.group_keys)))
    model, _ = fit_ensemble(labels, GroupSplit(everything, everything), cfg, version=version, progress=False)
    save_reward_model(model, models / "reward" / version)
    write_latest(models, version)
    return model, time.perf_counter() - t0


def _run(strategy: str, seed: int, samples: Path, work: Path, fresh: FreshRound, taste: dict[int, float],
         args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """One labelling run: batches chosen by `strategy`, retraining after each; accuracy on the fresh round."""
    from webapp import create_app

    run_dir = work / f"{strategy}-seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    db_file = run_dir / "feedback.sqlite"
    shutil.copy(samples / "feedback.sqlite", db_file)  # every run starts from the unlabelled database
    db_url = f"sqlite:///{db_file}"
    models = run_dir / "models"
    app = create_app({"samples_dir": samples, "db_url": db_url, "models_dir": models, "pair_order": strategy})
    client = app.test_client()
    rid = next(r["id"] for r in client.get("/api/rounds").json["rounds"] if r["name"] == "pool")
    rater = f"likes-bright-{seed}"
    out: dict[str, Any] = {"strategy": strategy, "seed": seed, "labels": [], "per_group": [], "accuracy": [],
                           "orders": [], "reward_models": [], "batch_groups": [], "batch_taste_gap": [],
                           "train_seconds": []}
    n = 0
    for batch in range(args.batches):
        picked: list[dict[str, Any]] = []
        orders, versions = set(), set()
        while len(picked) < args.batch:
            ex = ",".join(f"{p['left']['sample_id']}-{p['right']['sample_id']}" for p in picked)
            r = client.get(f"/api/rounds/{rid}/pairs", query_string={"rater": rater, "count": min(10, args.batch - len(picked)),
                                                                      "exclude": ex})
            assert r.status_code == 200, r.json
            if not r.json["pairs"]:
                break
            picked += r.json["pairs"]
            orders.add(r.json["order"])
            versions.add(r.json["reward_model"] or "-")
        if not picked:
            break
        for p in picked:
            a, b = p["left"]["sample_id"], p["right"]["sample_id"]
            choice = "left" if taste[a] > taste[b] else "right"
            res = client.post("/api/preferences", json={"rater": rater, "left_id": a, "right_id": b, "choice": choice})
            assert res.status_code == 201, res.json
        n += len(picked)
        model, secs = _train(db_url, samples, rater, models, f"b{batch + 1:02d}", seed * 1000 + batch, args)
        per_group = fresh.per_group_accuracy(model)
        acc = float(np.average(per_group, weights=fresh.weights()))
        out["labels"].append(n)
        out["per_group"].append(per_group)
        out["accuracy"].append(acc)
        out["orders"].append(sorted(orders))
        out["reward_models"].append(sorted(versions))
        # What the batch asked about: how many groups, and how far apart the two images are in the rater's
        # taste (a small gap = a close call).
        out["batch_groups"].append(len({p["group_id"] for p in picked}))
        out["batch_taste_gap"].append(float(np.mean([abs(taste[p["left"]["sample_id"]] - taste[p["right"]["sample_id"]])
                                                     for p in picked])))
        out["train_seconds"].append(secs)
        log(f"  {strategy:8s} seed {seed} batch {batch + 1:2d}: {n:3d} labels ({'/'.join(sorted(orders))} order, "
            f"model {'/'.join(sorted(versions))}; {out['batch_groups'][-1]} groups, taste gap "
            f"{out['batch_taste_gap'][-1]:.3f}) -> fresh-round accuracy {acc:.3f} (train {secs:.1f} s)")
    app.extensions["poseloop_store"].dispose()
    return out


def _boot(per_seed_group: np.ndarray, weights: np.ndarray, n_boot: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% interval of the weighted mean accuracy, resampling seeds and fresh-round groups together.

    per_seed_group: [seeds, groups] accuracies (or paired differences); weights: pairs per group."""
    s, g = per_seed_group.shape
    si = rng.integers(0, s, size=(n_boot, s))
    gi = rng.integers(0, g, size=(n_boot, g))
    vals = per_seed_group[si[:, :, None], gi[:, None, :]]  # [B, s, g]
    w = weights[gi][:, None, :]
    means = (vals * w).sum(axis=(1, 2)) / (w.sum(axis=(1, 2)) * s)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def _first_reaching(labels: list[int], acc: list[float], threshold: float) -> int | None:
    return next((n for n, a in zip(labels, acc) if a >= threshold), None)


def summarize(runs: list[dict[str, Any]], weights: np.ndarray, thresholds: Sequence[float], n_boot: int = 2000
              ) -> dict[str, Any]:
    """Curves with intervals, paired differences and labels needed to reach each threshold."""
    rng = np.random.default_rng(0)
    by = {s: sorted((r for r in runs if r["strategy"] == s), key=lambda r: r["seed"]) for s in STRATEGIES}
    n_steps = min(len(r["labels"]) for r in runs)
    rows = []
    for i in range(n_steps):
        row: dict[str, Any] = {"labels": by["coverage"][0]["labels"][i]}
        mats = {}
        for s in STRATEGIES:
            mats[s] = np.array([r["per_group"][i] for r in by[s]])
            row[s] = {"mean": float(np.mean([r["accuracy"][i] for r in by[s]])), "ci": _boot(mats[s], weights, n_boot, rng),
                      "per_seed": [r["accuracy"][i] for r in by[s]]}
        diff = mats["active"] - mats["coverage"]
        row["active_minus_coverage"] = {"mean": row["active"]["mean"] - row["coverage"]["mean"],
                                        "ci": _boot(diff, weights, n_boot, rng)}
        rows.append(row)
    # One number per strategy: mean accuracy over every label count after the first batch (the area
    # under the learning curve; the first batch is the same for both).
    area: dict[str, Any] = {}
    mats = {s: np.array([[r["per_group"][i] for i in range(1, n_steps)] for r in by[s]]).mean(axis=1) for s in STRATEGIES}
    for s in STRATEGIES:
        area[s] = {"mean": float(np.mean([np.mean(r["accuracy"][1:n_steps]) for r in by[s]])),
                   "ci": _boot(mats[s], weights, n_boot, rng)}
    area["active_minus_coverage"] = {"mean": area["active"]["mean"] - area["coverage"]["mean"],
                                     "ci": _boot(mats["active"] - mats["coverage"], weights, n_boot, rng)}
    reach: dict[str, Any] = {}
    for th in thresholds:
        reach[f"{th:g}"] = {}
        for s in STRATEGIES:
            per_seed = [_first_reaching(r["labels"], r["accuracy"], th) for r in by[s]]
            mean_curve = _first_reaching([row["labels"] for row in rows], [row[s]["mean"] for row in rows], th)
            reach[f"{th:g}"][s] = {"per_seed": per_seed, "mean_curve": mean_curve}
    return {"curve": rows, "mean_over_label_counts": area, "labels_to_reach": reach}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--batch", type=int, default=4, help="pairs labelled between two retrainings")
    p.add_argument("--batches", type=int, default=12, help="batches per run (the pool round has 6 pairs per group)")
    p.add_argument("--pool-prompts", type=int, default=3, help="prompts of the labelled round (x 12 poses x 4 images)")
    p.add_argument("--fresh-prompts", type=int, default=2, help="prompts of the fresh round (other prompts)")
    p.add_argument("--steps", type=int, default=60, help="optimisation steps per ensemble member and retraining")
    p.add_argument("--ensemble", type=int, default=3)
    p.add_argument("--width", type=int, default=16, help="reward CNN width (model.width)")
    p.add_argument("--hidden", type=int, default=32, help="reward CNN head width (model.hidden)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-batch", type=int, default=16, help="labels per optimisation step")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.8, 0.85])
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--work", default="", help="keep rounds and runs here; existing rounds are reused")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:5.0f} s] {msg}", flush=True)

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_active_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = _bench(args, work, log)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "active.json").write_text(json.dumps(result, indent=1))
    _print_table(result)
    print(f"\nwrote {out / 'active.json'} ({result['seconds']:.0f} s)")
    return 0


def _bench(args: argparse.Namespace, work: Path, log: Any) -> dict[str, Any]:
    import generate as generate_script
    from poseloop.checks.scripted import image_taste
    from poseloop.models.embedded import ensure_embedded
    from poseloop.world.quality import vocabulary_prompts

    embedded = ensure_embedded(ROOT / "models" / "tiny-sd15")
    samples = work / "samples"
    vocab = vocabulary_prompts()
    existing = {name for name in ("pool", "fresh") if (samples / name).is_dir()}
    for name, prompts in (("pool", vocab[:args.pool_prompts]),
                          ("fresh", vocab[args.pool_prompts:args.pool_prompts + args.fresh_prompts])):
        if name in existing:
            continue
        assert generate_script.main(["--model.base", str(embedded), "--model.controlnet", str(embedded / "controlnet"),
                                     "--model.threads", str(args.threads), "--store.samples_dir", str(samples),
                                     "--store.round", name, "--data.prompts", *prompts]) == 0
        log(f"generated round {name!r}: {len(prompts)} prompts x 12 poses x 4 images")
    pool = _round_rows(samples, "pool")
    taste = {sid: image_taste(path) for sid, _, path, _ in pool}
    fresh = FreshRound(samples, "fresh")
    n_pool_pairs = sum(len(list(itertools.combinations(range(sum(1 for r in pool if r[1] == g)), 2)))
                       for g in {r[1] for r in pool})
    log(f"pool: {len(pool)} images, {n_pool_pairs} pairs; fresh: {len(fresh.pairs)} groups, {fresh.n_pairs} pairs")
    runs = []
    for seed in range(args.seeds):
        for strategy in STRATEGIES:
            runs.append(_run(strategy, seed, samples, work / "runs", fresh, taste, args, log))
    summary = summarize(runs, fresh.weights(), args.thresholds)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    return {"settings": settings, "pool_pairs": n_pool_pairs, "fresh_pairs": fresh.n_pairs,
            "fresh_groups": len(fresh.pairs), **summary,
            "runs": runs}


def _print_table(res: dict[str, Any]) -> None:
    s = res["settings"]
    print(f"\nactive vs coverage pair order: {s['seeds']} seeds, batches of {s['batch']} pairs, pool {res['pool_pairs']} "
          f"pairs, fresh round {res['fresh_pairs']} pairs; 95% intervals over seeds x fresh groups")
    print(f"{'labels':>6}  {'coverage':>22}  {'active':>22}  {'active - coverage':>24}")
    for row in res["curve"]:
        def f(d: dict[str, Any]) -> str:
            return f"{d['mean']:.3f} [{d['ci'][0]:.3f}, {d['ci'][1]:.3f}]"
        d = row["active_minus_coverage"]
        print(f"{row['labels']:>6}  {f(row['coverage']):>22}  {f(row['active']):>22}  "
              f"{d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
    a = res["mean_over_label_counts"]
    print(f"{'mean':>6}  " + "  ".join(f"{a[k]['mean']:.3f} [{a[k]['ci'][0]:.3f}, {a[k]['ci'][1]:.3f}]".rjust(22)
                                      for k in STRATEGIES)
          + f"  {a['active_minus_coverage']['mean']:+.3f} [{a['active_minus_coverage']['ci'][0]:+.3f}, "
            f"{a['active_minus_coverage']['ci'][1]:+.3f}]   (over {res['curve'][1]['labels']}..{res['curve'][-1]['labels']} labels)")
    for th, v in res["labels_to_reach"].items():
        print(f"labels to reach {th}: " + "; ".join(
            f"{k} {v[k]['mean_curve'] if v[k]['mean_curve'] is not None else 'not reached'} (mean curve), per seed "
            f"{v[k]['per_seed']}" for k in STRATEGIES))


if __name__ == "__main__":
    sys.exit(main())
