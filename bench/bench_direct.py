"""Benchmark: learned-reward gain per CPU-second of ReFL, DRaFT-1 and DDPO, with the rater's own rule beside it.

The scripted rater (poseloop.checks.scripted: likes a warm light; bright images before 2026-11-30) labels a round through the rating app's
JSON API and a reward model is trained on its labels (what tests/test_learning.py and
bench/bench_learning.py do). Then ReFL, DRaFT-1 and DDPO each train a LoRA against that LEARNED
reward model (`--reward latent:<model>`, tiny preset defaults otherwise), in this process, on one
thread, timed in process CPU seconds. Each policy is compared with the base model by evaluate.py on
one fresh shared-seed round (prompts and seeds none of the runs trained on; image k of a group has
the same seed on both sides) on two metrics:

* the learned reward (what was optimised), and
* the held-out reward: the rater's rule itself (`brightness`, mean pixel value), which the policies
  never saw; when the learned reward rises and this falls, the policy over-optimised the reward model.

Each difference is the paired mean with a paired bootstrap 95% interval (2000 resamples);
"per CPU-s" divides it (and its interval) by the run's training CPU seconds (taken as fixed).

    python bench/bench_direct.py --threads 1             # ~10-15 min on a busy 2-core machine
    python bench/bench_direct.py --epochs 4 --work /tmp/direct   # keep rounds and models
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> train_policy.py arguments (besides the model, the reward and the epochs)
RUNS: dict[str, list[str]] = {
    "ReFL": ["--algo", "refl"],
    "DRaFT-1": ["--algo", "draft", "--draft.k", "1"],
    "DDPO": ["--algo", "ddpo"],
    # DRaFT-1 with the held-out guard: the rater's rule scored every epoch on the fixed-seed grid
    # (4 images of the training groups), stop at the first epoch it falls 5% below its best and export
    # the best epoch's weights (guard.restore_best). Guards are not in the config hash: without its own
    # run name this run would resume DRaFT-1's run.
    "DRaFT-1 + guard": ["--algo", "draft", "--draft.k", "1", "--guard.heldout_reward", "brightness",
                        "--guard.heldout_drop", "0.05", "--guard.stop", "true", "--guard.patience", "1",
                        "--output.grid_every", "1", "--output.run_name", "draft-1-guarded"],
}


def run(work: Path, threads: int, epochs: int, eval_prompts: int, eval_images: int, runs: Sequence[str],
        log: Any = print) -> dict[str, Any]:
    """Label, train the reward model, train each policy against it, compare each with the base model.

    With a kept --work folder a second call reuses its labelled round, reward model and fresh baseline
    round and adds its runs to the earlier ones (work/direct.json).
    """
    import torch

    import train_policy as train_policy_script
    from poseloop.config.lib import parse_config
    from poseloop.evaluation.compare import evaluate
    from poseloop.config.evaluation import PRESETS as EVAL_PRESETS
    from poseloop.config.evaluation import EvaluateConfig
    from poseloop.checks.scripted import RULE, LearningBudget, _latest, _prompts, run_learning_check
    from poseloop.models.embedded import ensure_embedded

    torch.set_num_threads(threads)
    embedded = ensure_embedded(ROOT / "models" / "tiny-sd15")
    t0 = time.time()
    state = work / "direct.json"
    if state.is_file():
        base = json.loads(state.read_text())
    else:
        base = run_learning_check(work, embedded, LearningBudget(threads=threads, policies=()), log=log)
    samples, models = work / "samples", work / "models"
    rm = models / "reward" / "rm"
    model = ["--model.base", str(embedded), "--model.controlnet", str(embedded / "controlnet"),
             "--model.models_dir", str(models), "--model.threads", str(threads)]
    learned = f"latent:{rm}"
    out: dict[str, Any] = {"reward_fresh_pair_accuracy": base["reward_fresh_pair_accuracy"], "labels": base["labels"],
                           "threads": threads, "epochs": epochs, "runs": base.get("runs", {})}
    for name in runs:
        args = RUNS[name]
        cpu0, wall0 = time.process_time(), time.perf_counter()
        # each run from the base model: the runs are compared side by side, not stacked
        assert train_policy_script.main([*model, "--parent", "base", *args, "--reward", learned, "--set",
                                         f"train.epochs={epochs}"]) == 0
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        version = _latest(models / "policies")
        argv = [*model, "--store.samples_dir", str(samples), "--data.prompts", *_prompts(eval_prompts, 3),
                "--set", f"sample.images_per_group={eval_images}", "--eval.policy", version,
                "--eval.name", f"direct-{version}", "--eval.metrics", learned, RULE, "--set", "eval.bootstrap=2000",
                "--set", "eval.seeds=direct-bench"]  # one fresh baseline round shared by every comparison
        cfg, _ = parse_config(EvaluateConfig, EVAL_PRESETS, "tiny", argv, description="", prog="evaluate.py")
        res = evaluate(cfg)
        metrics = {("heldout" if RULE in (m.spec, m.name) else "learned"): {
            "baseline": m.baseline_mean, "candidate": m.candidate_mean, "diff": m.diff_mean, "ci": list(m.diff_ci),
            "win_rate": m.win_rate, "n": m.n} for m in res.metrics}
        out["runs"][name] = {"train_cpu_seconds": cpu, "train_wall_seconds": wall, "version": version, **metrics}
        if "--guard.stop" in args:
            import csv

            rows = list(csv.DictReader((models / "policy_runs" / version.rsplit("-e", 1)[0] / "metrics.csv").open()))
            out["runs"][name]["epochs_done"] = int(float(rows[-1]["epoch"]))
            heldout = [(float(r["heldout_reward"]), int(float(r["epoch"]))) for r in rows if r.get("heldout_reward")]
            out["runs"][name]["grid_heldout"] = [h for h, _ in heldout]
            out["runs"][name]["best_epoch"] = max(heldout)[1]  # what guard.restore_best exported
        log(f"[{time.time() - t0:.0f} s] {name}: " + json.dumps(out["runs"][name], default=float))
        state.write_text(json.dumps(out, indent=2, default=float))
    out["seconds"] = time.time() - t0
    return out


def table(r: dict[str, Any]) -> str:
    """The markdown result table."""
    lines = ["| run | train CPU s | learned reward diff [95% CI] | learned gain per CPU-s | held-out: rater's rule "
             "diff [95% CI] | held-out win rate |", "|---|---|---|---|---|---|"]
    for name, m in r["runs"].items():
        cpu, le, he = m["train_cpu_seconds"], m["learned"], m["heldout"]
        stopped = (f" (stopped after epoch {m['epochs_done']}, exported epoch {m['best_epoch']}'s weights)"
                   if m.get("epochs_done", r["epochs"]) < r["epochs"] else "")
        lines.append(f"| {name}{stopped} | {cpu:.0f} | {le['diff']:+.4f} [{le['ci'][0]:+.4f}, {le['ci'][1]:+.4f}] | "
                     f"{le['diff'] / cpu:+.2e} [{le['ci'][0] / cpu:+.2e}, {le['ci'][1] / cpu:+.2e}] | "
                     f"{he['diff']:+.4f} [{he['ci'][0]:+.4f}, {he['ci'][1]:+.4f}] | {he['win_rate']:.0%} of {he['n']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, write bench/out/direct.json; exit 0 (a comparison, no target)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of every run (tiny preset: 8)")
    p.add_argument("--eval-prompts", type=int, default=2, help="prompts of the fresh round (x 12 poses)")
    p.add_argument("--eval-images", type=int, default=2, help="images per (prompt, pose) group of the fresh round")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (default: all)")
    p.add_argument("--work", default="", help="keep the rounds, models and reports here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        r = run(Path(args.work), args.threads, args.epochs, args.eval_prompts, args.eval_images, args.runs)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            r = run(Path(tmp), args.threads, args.epochs, args.eval_prompts, args.eval_images, args.runs)
    acc = r["reward_fresh_pair_accuracy"]
    print(f"\ndirect reward fine-tuning vs DDPO ({args.threads} thread(s), {args.epochs} epochs, {r['seconds']:.0f} s); "
          f"reward model fresh-round pairwise accuracy {acc['mean']:.3f} [{acc['ci'][0]:.3f}, {acc['ci'][1]:.3f}]")
    print(table(r))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "direct.json").write_text(json.dumps(r, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
