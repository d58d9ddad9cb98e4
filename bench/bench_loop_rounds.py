"""Benchmark: does the loop iterate and learn? The rater's statistic per loop round, with 95% intervals.

Runs poseloop.checks.scripted_loop.run_loop_check (what tests/test_learning.py runs): a scripted rater (by default one who
likes vivid colour, not the warm light the embedded world was built around) labels each loop round through the
rating app's JSON API; train_reward.py, train_policy.py --reward latest (continuing the newest policy) and
generate.py --model.policy latest run with their defaults. Each round's policy is compared with the base model on
one shared-seed set no training saw. Prints the statistic per round, round k+1 - round k with paired bootstrap
intervals, pose OKS and the prompt's attributes against the base model; writes
bench/out/loop_rounds_<mode>_<reward>.json and bench/out/loop_rounds_<mode>.png (the plot for README).
Exit status 1 when a condition of issue 31 (6) fails: round 2 > round 1 (interval above 0), round 3 not below
round 2 (upper bound above 0), OKS and prompt attributes at most 0.05 below the base model's.

    python bench/bench_loop_rounds.py                      # the test's loop: 3 rounds, RLCM on the world's LCM
    python bench/bench_loop_rounds.py --reward keep --also bench/out/loop_rounds_rlcm_latest.json  # README's plot
    python bench/bench_loop_rounds.py --mode ddpo          # the README's DDPO loop (10 DDIM steps; slower)
    python bench/bench_loop_rounds.py --reward keep        # the policy's reward also keeps the pose and the prompt
    python bench/bench_loop_rounds.py --rater likes-bright-light --rounds 4
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loop check, print one line per round, write the JSON and the plot."""
    from poseloop.checks.scripted_loop import (DEFAULT_RATER, KEEP_CONDITION_REWARD, MODES, RATERS, LoopBudget, plot_rounds,
                                        run_loop_check)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="rlcm", choices=sorted(MODES), help="the loop's presets and algorithm")
    p.add_argument("--rater", default=DEFAULT_RATER, choices=sorted(RATERS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reward", default=LoopBudget.reward,
                   help="train_policy.py --reward of every round ({detector}: the world's pose detector folder); "
                   f"'keep' = {KEEP_CONDITION_REWARD}")
    p.add_argument("--eval-images", type=int, default=4, help="images per (prompt, pose) of the shared-seed set")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--policy-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="train_policy.py overrides for every round, e.g. train.seed=1")
    p.add_argument("--reward-set", nargs="+", default=[], metavar="KEY=VALUE", help="train_reward.py overrides")
    p.add_argument("--also", nargs="*", default=[], metavar="JSON",
                   help="earlier runs' JSON (this bench's output) drawn in the same plot, e.g. another --reward")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--work", default="", help="keep the rounds and models in this folder (default: a temporary one)")
    args = p.parse_args(argv)
    from poseloop.models.embedded import ensure_embedded

    embedded = ensure_embedded(ROOT / "models" / "tiny-sd15")
    reward = KEEP_CONDITION_REWARD if args.reward == "keep" else args.reward
    budget = LoopBudget(rounds=args.rounds, reward=reward, rater=args.rater, mode=args.mode,
                        eval_images=args.eval_images, threads=args.threads,
                        policy_overrides=[x for kv in args.policy_set for x in ("--set", kv)],
                        reward_overrides=[x for kv in args.reward_set for x in ("--set", kv)])
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        r = run_loop_check(Path(args.work), embedded, budget)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            r = run_loop_check(Path(tmp), embedded, budget)
    print(f"\nthe loop ({args.mode}, {args.rounds} rounds, rater {args.rater}, {args.threads} thread(s)): "
          f"{r['seconds']:.0f} s")
    print(f"base model   {args.rater} {r['base_statistic']:.4f} [{r['base_ci'][0]:.4f}, {r['base_ci'][1]:.4f}]")
    ok = True
    for e in r["rounds"]:
        line = (f"round {e['round']}      {e['statistic']:.4f} [{e['statistic_ci'][0]:.4f}, {e['statistic_ci'][1]:.4f}]"
                f"  vs base {_fmt(e['vs_base'])}")
        if "vs_previous" in e:
            v = e["vs_previous"]
            # round 2 must beat round 1 (interval above 0); later rounds must not fall back (upper bound above 0)
            good = v["ci"][0] > 0 if e["round"] == 2 else v["ci"][1] > 0
            ok &= good
            line += f"  vs round {e['round'] - 1} {_fmt(v)} {'PASS' if good else 'FAIL'}"
        print(line)
        for name, m in e["metrics"].items():
            good = m["diff"] >= -0.05  # a collapse is a loss; a gain in the condition's measures is none
            ok &= good
            print(f"{'':13s}{name:17s} {m['baseline']:.4f} -> {m['candidate']:.4f}: {m['diff']:+.4f} "
                  f"[{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}] (at most 0.05 below base: {'PASS' if good else 'FAIL'})")
        if "reward_on_next_round" in e:
            a = e["reward_on_next_round"]
            print(f"{'':13s}its reward model on the next round (made by this policy): within-group agreement with the "
                  f"rater {a['mean']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] over {a['pairs']} pairs (chance 0.5)")
        print(f"{'':13s}labels {e['labels']} on {e['labelled']}, policy {e['policy']} (parent {e.get('parent')}), "
              f"trained in {e['train_seconds']:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{args.mode}_{'latest' if reward == 'latest' else 'keep' if reward == KEEP_CONDITION_REWARD else 'custom'}"
    (out / f"loop_rounds_{tag}.json").write_text(json.dumps(r, indent=2, default=float))
    plot_rounds([r, *(json.loads(Path(f).read_text()) for f in args.also)], out / f"loop_rounds_{args.mode}.png")
    print(f"wrote {out / f'loop_rounds_{tag}.json'} and {out / f'loop_rounds_{args.mode}.png'}")
    return 0 if ok else 1


def _fmt(d: dict) -> str:
    return f"{d['diff']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] (wins {d['win_rate']:.0%} of {d['n']})"


if __name__ == "__main__":
    sys.exit(main())
