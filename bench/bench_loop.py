"""Loop latency (issue 31 item 7): from "Train next round" to the next round visible in the app, side by side with
the three commands run as separate processes on the same labels.

    python bench/bench_loop.py                      # embedded world, every default, 2 threads, ~10 min quiet
    python bench/bench_loop.py --threads 1 --preset quick --groups 4    # a smoke run in ~2 min

One round-0001 is generated (the default plan: 24 (prompt, pose) groups x 4 images; --groups N keeps N) and
labelled through the app's JSON API by a scripted rater (a score per image and every pair of each group, by a
rule on the final latents: channel 0's mean). Then, from two identical copies of that samples folder, each
with an empty models folder:

  * processes: `train_reward.py`, `train_policy.py <the loop preset's policy args>`, `generate.py
    --model.policy latest <generate args>` one after another (what a person types; each imports torch and
    loads its models);
  * app + worker: the rating app in loop mode with its local worker (started and idle, torch imported); the
    clock starts at POST /api/loop/jobs (the button) and stops when GET /api/rounds lists round-0002
    finished, what the page's selector shows; the job's later stages (blind A/B rounds, scoring) are timed
    separately.

Both sides run with OMP_NUM_THREADS and torch threads = --threads, one after the other (processes first).
Prints each step's seconds, both latencies and their ratio; exit 0 when the app's latency is <= --target s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> float:
    """Run a script to completion; its wall seconds (its output is kept in a log beside the samples)."""
    t0 = time.perf_counter()
    with open(cwd / "bench.log", "ab") as log:
        subprocess.run(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def label_round(samples: Path) -> tuple[int, int]:
    """A scripted rater's scores and pairs on round-0001 through the app's API (rule: final latents' channel-0 mean)."""
    from sqlalchemy import select

    from poseloop.data import db
    from poseloop.data.store import SampleStore, load_trajectory
    from webapp import create_app

    store = SampleStore(samples)
    with db.session_scope(db.open_db(db.default_db_url(samples))) as s:
        rows = [(x.id, x.group_id, load_trajectory(store.abs(x.trajectory_path)).latents[-1, 0].float().mean().item())
                for x in s.scalars(select(db.Sample))]
    app = create_app({"samples_dir": samples})
    c = app.test_client()
    ranked = sorted(rows, key=lambda r: r[2])
    for rank, (sid, _g, _v) in enumerate(ranked):
        score = round(-5 + 10 * rank / max(1, len(ranked) - 1))
        assert c.post("/api/scores", json={"rater": "bench", "sample_id": sid, "score": score}).status_code == 201
    by_group: dict[int, list[tuple[int, float]]] = {}
    for sid, gid, v in rows:
        by_group.setdefault(gid, []).append((sid, v))
    pairs = 0
    for members in by_group.values():
        for i, (a, va) in enumerate(members):
            for b, vb in members[i + 1:]:
                r = c.post("/api/preferences", json={"rater": "bench", "left_id": a, "right_id": b,
                                                     "choice": "left" if va > vb else "right"})
                assert r.status_code == 201
                pairs += 1
    app.extensions["poseloop_store"].dispose()
    return len(rows), pairs


def processes(work: Path, plan: object, env: dict[str, str], threads: int) -> dict[str, float]:
    """The three scripts as separate processes."""
    py = sys.executable
    models = ["--output.models_dir", "models"]
    t = {"reward": run([py, str(ROOT / "train_reward.py"), *plan.reward, "--data.samples_dir", "samples", *models],
                       env, work)}
    t["policy"] = run([py, str(ROOT / "train_policy.py"), *plan.policy, "--model.models_dir", "models",
                       "--model.threads", str(threads)], env, work)
    t["generate"] = run([py, str(ROOT / "generate.py"), *plan.generate, *GENERATE_DATA, "--store.samples_dir",
                         "samples", "--model.models_dir", "models", "--model.policy", "latest", "--model.threads",
                         str(threads)], env, work)
    t["total"] = t["reward"] + t["policy"] + t["generate"]
    return t


def app_and_worker(work: Path, args: argparse.Namespace, threads: int) -> dict[str, float]:
    """The app in loop mode with its local worker: button -> round visible, and -> job done."""
    from webapp import create_app

    os.chdir(work)  # the embedded model's default path (models/tiny-sd15) is relative
    app = create_app({"samples_dir": work / "samples", "models_dir": work / "models", "loop": True,
                      "loop_preset": args.preset, "loop_min_labels": 0, "loop_worker_threads": threads})
    worker = app.extensions["poseloop_loop_worker"]
    log = work / "samples" / ".loop-worker.log"
    deadline = time.monotonic() + 300
    while "imported in" not in (log.read_text() if log.exists() else ""):
        assert time.monotonic() < deadline and worker.pid is not None, "the worker did not start"
        time.sleep(0.2)
    c = app.test_client()
    t0 = time.perf_counter()
    r = c.post("/api/loop/jobs", json={})
    assert r.status_code == 202, r.get_json()
    out: dict[str, float] = {}
    stage_start: dict[str, float] = {}
    while True:
        state = c.get("/api/loop").get_json()
        job = state["job"]
        stage_start.setdefault(job["stage"], time.perf_counter() - t0)
        if "visible" not in out:
            rounds = c.get("/api/rounds").get_json()["rounds"]
            if any(x["name"] == "round-0002" and x["finished"] for x in rounds):
                out["visible"] = time.perf_counter() - t0
        if job["state"] in ("done", "failed", "cancelled"):
            out["done"] = time.perf_counter() - t0
            assert job["state"] == "done", job
            break
        time.sleep(0.25)
    for name, start in stage_start.items():
        if name:
            out[f"stage {name} from"] = start
    worker.stop()
    app.extensions["poseloop_store"].dispose()
    return out


GENERATE_DATA: list[str] = []


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--preset", default="default", help="loop preset (its blind A/B rounds come after the round is "
                   "visible, so they count in 'done', not in the latency)")
    p.add_argument("--groups", type=int, default=0, help="keep N groups of the default plan (0 = all 24)")
    p.add_argument("--target", type=float, default=180.0, help="seconds the app's latency must stay under")
    p.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = p.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from poseloop.config.loop import make_plan

    plan = make_plan(args.preset)
    if args.groups:
        GENERATE_DATA.extend(["--data.max_groups", str(args.groups)])
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_loop-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    seed = root / "seed"
    seed.mkdir(parents=True, exist_ok=True)
    t_gen = run([sys.executable, str(ROOT / "generate.py"), *plan.generate, *GENERATE_DATA, "--store.samples_dir",
                 "samples", "--model.threads", str(args.threads)], env, seed)
    n_scores, n_pairs = label_round(seed / "samples")
    print(f"round-0001: generated in {t_gen:.0f} s (embedded model built on first use), {n_scores} scores + "
          f"{n_pairs} pairs by the scripted rater; preset {args.preset}, {args.threads} thread(s)", flush=True)
    sides = {}
    for name in ("processes", "app"):
        work = root / name
        shutil.copytree(seed / "samples", work / "samples")
        if (seed / "models" / "tiny-sd15").exists():  # the embedded model, not any trained output
            (work / "models").mkdir()
            shutil.copytree(seed / "models" / "tiny-sd15", work / "models" / "tiny-sd15")
        sides[name] = (processes(work, plan, env, args.threads) if name == "processes"
                       else app_and_worker(work, args, args.threads))
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in sides[name].items()), flush=True)
    before, after = sides["processes"]["total"], sides["app"]["visible"]
    ok = after <= args.target
    print(json.dumps({"processes_s": round(before, 1), "app_visible_s": round(after, 1),
                      "app_done_s": round(sides["app"]["done"], 1), "ratio": round(after / before, 3)}))
    print(f"loop latency, button -> round visible: {after:.0f} s with the worker vs {before:.0f} s as three processes "
          f"({after / before:.2f}x); target <= {args.target:.0f} s: {'pass' if ok else 'miss'}")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
