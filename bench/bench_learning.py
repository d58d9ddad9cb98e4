"""Benchmark: does the loop learn a rater's preference? Effect sizes with 95% intervals on fresh data.

Runs poseloop.checks.scripted.run_learning_check (what tests/test_learning.py runs) with larger budgets: a
scripted rater who likes a warm light labels a round through the rating app's JSON API; then the
reward model's within-group pairwise accuracy on a fresh round, and the paired difference of the
rater's statistic (warmth) between the base model and DDPO (on the reward model) / D3PO (from the
pairs), and of pose OKS for DDPO and RLCM (the tiny-rlcm-pose preset: a ControlNet LoRA at ControlNet
scale 0.4) on pose accuracy alone and on the preset's own reward (half pose accuracy, half the prompt's
attributes), with the prompt's attributes reported beside, on shared-seed rounds none of them saw.
One round each; the loop over rounds (issue 31: does round 2 beat round 1?) is bench/bench_loop_rounds.py.

    python bench/bench_learning.py                       # the test's budget
    python bench/bench_learning.py --budget large        # 4x the labels, 2x the evaluation, longer training
    python bench/bench_learning.py --runs rlcm_pose_accuracy --threads 2   # one run (the pose runs need no labels)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUDGETS = {
    "test": dict(),
    "large": dict(train_prompts=8, fresh_prompts=4, eval_prompts=4, eval_images=4,
                  policy_overrides=["--set", "train.epochs=24"]),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, print one line per effect, write bench/out/learning.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="test", choices=sorted(BUDGETS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--runs", nargs="+", default=None, help="policy runs to train (default: all of POLICY_RUNS)")
    p.add_argument("--policy-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="train_policy.py overrides for every policy run, e.g. train.seed=1 train.first_steps=4")
    p.add_argument("--work", default="", help="keep the rounds, models and reports in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    from poseloop.checks.scripted import POLICY_RUNS, RUN_METRIC, LearningBudget, run_learning_check
    from poseloop.models.embedded import ensure_embedded

    embedded = ensure_embedded(ROOT / "models" / "tiny-sd15")
    budget = LearningBudget(threads=args.threads, policies=tuple(args.runs or POLICY_RUNS),
                            **BUDGETS[args.budget])  # type: ignore[arg-type]
    # a new list: BUDGETS' own lists stay as they are
    budget.policy_overrides = [*budget.policy_overrides, *(x for kv in args.policy_set for x in ("--set", kv))]
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        r = run_learning_check(Path(args.work), embedded, budget)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_learning_check(Path(tmp), embedded, budget)
    print(f"\nlearning check ({args.budget} budget, {args.threads} thread(s), {r['seconds']:.0f} s); "
          f"labels {r.get('labels', 'none (pose runs only)')}")
    ok = True
    if "reward_fresh_pair_accuracy" in r:
        acc = r["reward_fresh_pair_accuracy"]
        print(f"reward model, fresh round: pairwise accuracy {acc['mean']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}] "
              f"on {acc['pairs']} pairs (target >= 0.75) {'PASS' if acc['mean'] >= 0.75 else 'FAIL'}")
        ok = acc["mean"] >= 0.75
    for run, metric in RUN_METRIC.items():
        if run not in r:
            continue
        m = r[run][metric]
        good = m["ci"][0] > 0
        ok &= good
        print(f"{run:20s} {metric:17s} {m['baseline']:.4f} -> {m['candidate']:.4f}: diff {m['diff']:+.4f} "
              f"[{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}], win {m['win_rate']:.0%} of {m['n']}, "
              f"{r[run]['train_seconds']:.0f} s  {'PASS' if good else 'FAIL'}")
        for other, o in r[run].items():  # what else the comparison measured (the pose runs: the prompt's colours)
            if other != metric and isinstance(o, dict):
                print(f"{'':20s} {other:17s} {o['baseline']:.4f} -> {o['candidate']:.4f}: diff {o['diff']:+.4f} "
                      f"[{o['ci'][0]:+.4f}, {o['ci'][1]:+.4f}] (reported, not a target)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"learning_{args.budget}.json").write_text(json.dumps(r, indent=2, default=float))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
