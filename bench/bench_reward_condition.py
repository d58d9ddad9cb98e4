"""Benchmark: does seeing the prompt and the pose make the learned reward model judge as a rater does?

Runs poseloop.checks.scripted_condition.run_condition_check (what tests/test_learning.py runs, smaller): a scripted
rater who prefers pose-faithful and prompt-faithful images (the world's detector OKS against the condition plus
the share of the prompt's colours the world's reader finds) labels a round at ControlNet scale 0.4 through the
rating app's JSON API, and so does the warm-light rater; the unconditioned (latent) and the conditioned reward
model are trained on each; then, on rounds no model saw, within-group Spearman with the rule (95% intervals
resampling groups; the paired conditioned - latent difference over the same groups):
(a) a fresh round (new prompts, new seeds, the labelled poses), (b) new prompts on poses the labelled round did not
have; the same conditioned model with each group's condition shuffled; the warm-light rater's taste on the fresh
round; and with --policy (c) the gain of DDPO on each reward model on a shared-seed comparison round of fresh
prompts: the rule's mean (OKS + attributes) / 2, OKS and attributes separately, paired bootstrap intervals.

    python bench/bench_reward_condition.py                 # the test's budget, without (c)
    python bench/bench_reward_condition.py --policy        # with (c): one DDPO run per reward model
    python bench/bench_reward_condition.py --budget large  # twice the labelled prompts and poses
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
    "large": dict(train_prompts=12, train_poses=6, heldout_poses=6, fresh_prompts=6),
}


def _ci(v: dict) -> str:
    return f"{v['mean']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] ({v['groups']} groups)"


def _diff(v: dict) -> str:
    return f"{v['diff']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}] (n {v['n']})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check, print one line per measurement with its interval, write bench/out/reward_condition.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", default="test", choices=sorted(BUDGETS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--policy", action="store_true", help="also (c): DDPO on each reward model (slow)")
    p.add_argument("--policy-set", nargs="+", default=[], metavar="KEY=VALUE", help="train_policy.py overrides")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--work", default="", help="keep the rounds and models in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    from poseloop.checks.scripted_condition import ConditionBudget, run_condition_check
    from poseloop.models.embedded import ensure_embedded

    embedded = ensure_embedded(ROOT / "models" / "tiny-sd15")
    budget = ConditionBudget(threads=args.threads, policy=args.policy,
                             policy_overrides=[x for kv in args.policy_set for x in ("--set", kv)],
                             **BUDGETS[args.budget])  # type: ignore[arg-type]
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        r = run_condition_check(Path(args.work), embedded, budget)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_condition_check(Path(tmp), embedded, budget)
    print(f"\ncondition check ({args.budget} budget, {args.threads} thread(s), {r['seconds']:.0f} s); "
          f"labels {r.get('labels')} (warm-light {r.get('warm_labels')}), poses trained {r['train_pose_names']}, held out {r['heldout_pose_names']}")
    for kind in ("latent", "conditioned"):
        h = r.get(f"heldout_{kind}")
        if h:
            line = f"  held-out groups of the labelled round, {kind}: accuracy {h['accuracy']:.3f}, Spearman {h['spearman']:.3f}"
            if h.get("condition_shuffled"):
                s = h["condition_shuffled"]
                line += f"; condition shuffled: accuracy {s['heldout_pairwise_accuracy']:.3f}, Spearman {s['heldout_spearman']:.3f}"
            print(line)
    for name, title in (("fresh", "(a) fresh round"), ("heldout_poses", "(b) held-out poses")):
        for part, rows in r.get(name, {}).items():
            for key, v in rows.items():
                text = _diff(v) if key == "conditioned_minus_latent" else _ci(v)
                print(f"  {title}, within-group Spearman with {part}, {key}: {text}")
    if "warm_fresh" in r:
        for key, v in r["warm_fresh"].items():
            print(f"  warm-light rater, fresh round, within-group Spearman, {key}: "
                  + (_diff(v) if key == "conditioned_minus_latent" else _ci(v)))
    for kind, metrics in r.get("policy", {}).items():
        for name, m in metrics.items():
            if isinstance(m, dict):
                print(f"  (c) DDPO on the {kind} reward model, {name}: base {m['baseline']:.3f} -> {m['candidate']:.3f}, "
                      f"{m['diff']:+.3f} [{m['ci'][0]:+.3f}, {m['ci'][1]:+.3f}] over {m['n']} pairs")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_condition.json").write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
