"""Start-up time of the scripts, whole processes measured side by side in one run (issue 36 item 4).

    python bench/bench_startup.py                    # 3 repeats, 1 thread, ~5 min on 1 thread
    python bench/bench_startup.py --repeats 5 --threads 2
    python bench/bench_startup.py --skip-generate    # --help rows and the import breakdown only
    python bench/bench_startup.py --baseline /tmp/main-export   # also time another checkout's scripts, interleaved

Measures, with OMP_NUM_THREADS and --model.threads set to --threads:
  * `<script> --help` for generate.py, train_reward.py, train_policy.py, evaluate.py: whole-process wall
    seconds (median of --repeats) and whether torch was imported (python -X importtime); goal < 2 s, no torch.
  * `generate.py` (the default round: tiny preset, 10 DDIM steps) against `generate.py --preset tiny-lcm`
    (4 LCM steps, no CFG, preview decoder), each in a fresh temporary samples folder, interleaved (which goes
    first alternates); the ratio of each adjacent pair, median [min, max]; goal >= 3x.
  * Where one process's time goes, for each of the two rounds (one extra run each, in process): interpreter
    start, imports, argument parsing and exit (everything outside generate()), load_components (the models, with the diffusers/transformers/peft imports
    it triggers), the first sample() call, the other sample() calls, and the rest (pose images, PNGs,
    trajectories, database); and the start-up floor, a process that only imports what loading the models
    needs (torch, diffusers, transformers, peft) and exits.
  * The import breakdown of the tiny-lcm round (python -X importtime): total and the top packages by self time.

With --baseline DIR (another checkout, e.g. `git archive <commit> | tar -x -C DIR`) every --help and round
runs for both checkouts, interleaved, each with its own folder on PYTHONPATH.

Wall-clock times on a shared machine swing; the ratios are of runs next to each other, and each round's CPU
seconds (user + system, from rusage) are printed beside its wall time, with their ratio, for information; the
phase breakdown is in CPU seconds (time.process_time in the child), steadier under other load. Exit 0 when every
--help is under 2 s without torch and the round ratio is >= 3x, else 1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("generate.py", "train_reward.py", "train_policy.py", "evaluate.py")
ROUNDS = {"default": [], "tiny-lcm": ["--preset", "tiny-lcm"]}
# What loading the models imports whatever a script does: the floor of a round's start-up.
FLOOR = ("import torch, diffusers, transformers, peft; from diffusers import UNet2DConditionModel, ControlNetModel, "
         "AutoencoderKL; from transformers import CLIPTextModel, CLIPTokenizer")

# In-process phase timer: runs generate.py's main with load_components and sample wrapped.
PHASES = """
import json, sys, time
clock = time.process_time if "--cpu" in sys.argv else time.perf_counter
sys.argv = [a for a in sys.argv if a != "--cpu"]
t_start = clock()
sys.argv = ["generate.py", *sys.argv[1:]]
sys.path.insert(0, ".")
import generate as script
spent = {"load_components": 0.0, "sample_calls": []}
marks = {}
import poseloop.sampling.round as gen
real_load, real_sample, real_generate = gen.load_components, gen.sample, gen.generate
def load(*a, **k):
    t = clock(); out = real_load(*a, **k); spent["load_components"] += clock() - t; return out
def sample(*a, **k):
    t = clock(); out = real_sample(*a, **k); spent["sample_calls"].append(clock() - t); return out
def generate(cfg):
    marks["generate"] = clock(); out = real_generate(cfg); marks["end"] = clock(); return out
gen.load_components, gen.sample, gen.generate = load, sample, generate
code = script.main()
calls = spent["sample_calls"]
print("PHASES " + json.dumps({"code": code, "before_generate": marks["generate"] - t_start,
      "load_components": spent["load_components"], "first_sample": calls[0], "other_samples": sum(calls[1:]),
      "sample_calls": len(calls), "in_generate": marks["end"] - marks["generate"]}))
"""


def env(threads: int, root: Path) -> dict[str, str]:
    """The children's environment: the thread count, the checkout first on the path, offline."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def timed(cmd: list[str], threads: int, root: Path = ROOT) -> tuple[float, subprocess.CompletedProcess]:
    """Wall seconds of one whole process (start to exit) in checkout `root` and its result; a failure stops the bench.
    The process's CPU seconds (user + system, from the children's rusage) go to CPU[-1]."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env(threads, root))
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return seconds, proc


CPU: list[float] = []  # each timed() process's CPU seconds, in order


def import_breakdown(stderr: str) -> tuple[float, list[tuple[str, float]], bool]:
    """From python -X importtime output: total import seconds, top-level packages by self seconds, torch imported."""
    per: collections.Counter[str] = collections.Counter()
    total = 0.0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        per[m[4].split(".")[0]] += int(m[1]) / 1e6
        if len(m[3]) <= 1:  # a top-level import (one space after the bar): its cumulative time holds its children's
            total += int(m[2]) / 1e6
    return total, per.most_common(), "torch" in per


def generate_argv(args: argparse.Namespace, round_name: str, folder: str) -> list[str]:
    """generate.py's arguments for one round in its own samples folder."""
    return [*ROUNDS[round_name], "--store.samples_dir", folder, "--model.threads", str(args.threads)]


def main(argv: list[str] | None = None) -> int:
    """Run every measurement, print the tables and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="whole-process runs of each command; medians reported")
    ap.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of every child")
    ap.add_argument("--skip-generate", action="store_true", help="only the --help rows and their imports")
    ap.add_argument("--baseline", default="", help="another checkout whose scripts are timed beside this one's")
    args = ap.parse_args(argv)
    py = sys.executable
    ok = True
    roots = {"": ROOT, **({"baseline ": Path(args.baseline).resolve()} if args.baseline else {})}
    for root in roots.values():  # build the embedded models before any timing
        timed([py, "-c", "from poseloop.models.embedded import ensure_embedded; ensure_embedded('models/tiny-sd15')"],
              args.threads, root)

    print(f"start-up, whole processes, {args.threads} thread(s), median [min, max] of {args.repeats} runs")
    print(f"{'command':<34}{'wall s':>8}{'min':>8}{'max':>8}{'imports s':>11}  torch imported")
    for script in SCRIPTS:
        times: dict[str, list[float]] = {tag: [] for tag in roots}
        for _ in range(args.repeats):
            for tag, root in roots.items():
                times[tag].append(timed([py, script, "--help"], args.threads, root)[0])
        for tag, root in roots.items():
            _, proc = timed([py, "-X", "importtime", script, "--help"], args.threads, root)
            total, _, torch = import_breakdown(proc.stderr)
            med = statistics.median(times[tag])
            if not tag:
                ok &= med < 2.0 and not torch
            print(f"{tag + script + ' --help':<34}{med:>8.2f}{min(times[tag]):>8.2f}{max(times[tag]):>8.2f}"
                  f"{total:>11.2f}  {'yes' if torch else 'no'}")
        if args.baseline:
            rs = [b / a for a, b in zip(times[""], times["baseline "])]
            print(f"  baseline / this checkout = {statistics.median(rs):.2f}x [{min(rs):.2f}, {max(rs):.2f}]")
    floor = [timed([py, "-c", FLOOR], args.threads)[0] for _ in range(args.repeats)]
    floor_cpu = CPU[-args.repeats:]
    print(f"{'floor: import torch+diffusers+...':<34}{statistics.median(floor):>8.2f}{min(floor):>8.2f}"
          f"{max(floor):>8.2f}   CPU s {statistics.median(floor_cpu):.2f}")
    print("goal: every --help < 2 s without torch")
    if args.skip_generate:
        return 0 if ok else 1

    runs: dict[str, list[float]] = {tag + name: [] for tag in roots for name in ROUNDS}
    cpu: dict[str, list[float]] = {key: [] for key in runs}
    with tempfile.TemporaryDirectory(prefix="bench_startup-") as tmp:
        for r in range(args.repeats):
            order = list(ROUNDS) if r % 2 == 0 else list(ROUNDS)[::-1]
            for tag, root in roots.items():
                for name in order:
                    folder = f"{tmp}/{tag.strip()}{name}-{r}"
                    runs[tag + name].append(timed([py, "generate.py", *generate_argv(args, name, folder)],
                                                  args.threads, root)[0])
                    cpu[tag + name].append(CPU[-1])
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in runs.items()),
                  flush=True)
        phases = {}
        for name in ROUNDS:  # CPU seconds (process_time in the child, rusage for the whole): steadier under load
            _, proc = timed([py, "-c", PHASES, *generate_argv(args, name, f"{tmp}/{name}-phases"), "--cpu"],
                            args.threads)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PHASES ")][-1]
            phases[name] = {"whole": CPU[-1], **json.loads(line[7:])}
        _, proc = timed([py, "-X", "importtime", "generate.py", *generate_argv(args, "tiny-lcm", f"{tmp}/lcm-imports")],
                        args.threads)
        total, top, _ = import_breakdown(proc.stderr)

    print(f"\n{'generate.py round (96 images)':<34}{'wall s':>8}{'min':>8}{'max':>8}{'CPU s':>8}{'min':>8}{'max':>8}")
    for name, times in runs.items():
        c = cpu[name]
        print(f"{name:<34}{statistics.median(times):>8.2f}{min(times):>8.2f}{max(times):>8.2f}"
              f"{statistics.median(c):>8.2f}{min(c):>8.2f}{max(c):>8.2f}")
    for tag in roots:
        ratios = [d / lcm for d, lcm in zip(runs[tag + "default"], runs[tag + "tiny-lcm"])]
        ratio = statistics.median(ratios)
        if not tag:
            ok &= ratio >= 3.0
        print(f"{tag}whole process default / tiny-lcm = {ratio:.2f}x [{min(ratios):.2f}, {max(ratios):.2f}] "
              f"(goal >= 3x): {'PASS' if ratio >= 3.0 else 'FAIL'}")
        cr = [d / lcm for d, lcm in zip(cpu[tag + "default"], cpu[tag + "tiny-lcm"])]
        print(f"{tag}  the same in CPU seconds (information; less sensitive to other load): "
              f"{statistics.median(cr):.2f}x [{min(cr):.2f}, {max(cr):.2f}]")
    if args.baseline:
        for name in ROUNDS:
            rs = [b / a for a, b in zip(runs[name], runs["baseline " + name])]
            print(f"{name}: baseline / this checkout = {statistics.median(rs):.2f}x [{min(rs):.2f}, {max(rs):.2f}]")

    print(f"\nwhere one process's CPU time goes (one run each), s{'':<4}{'default':>10}{'tiny-lcm':>10}")
    d, lcm = phases["default"], phases["tiny-lcm"]
    for p in phases.values():
        p["outside"] = p["whole"] - p["in_generate"]
    rows = [("interpreter, imports, arguments, exit", "outside"), ("load_components (+ its imports)",
            "load_components"), ("first sample() call", "first_sample"), ("other sample() calls", "other_samples")]
    for label, key in rows:
        print(f"  {label:<47}{d[key]:>10.2f}{lcm[key]:>10.2f}")
    rest = {n: p["in_generate"] - p["load_components"] - p["first_sample"] - p["other_samples"] for n, p in phases.items()}
    print(f"  {'rest: poses, PNGs, trajectories, database':<47}{rest['default']:>10.2f}{rest['tiny-lcm']:>10.2f}")
    print(f"  {'whole process':<47}{d['whole']:>10.2f}{lcm['whole']:>10.2f}")
    per_call = {n: p["other_samples"] / max(1, p["sample_calls"] - 1) for n, p in phases.items()}
    print(f"  sample() per call after the first: default / tiny-lcm = {per_call['default'] / per_call['tiny-lcm']:.2f}x; "
          f"first-call extra (first - later mean): {d['first_sample'] - per_call['default']:.2f} / "
          f"{lcm['first_sample'] - per_call['tiny-lcm']:.2f} s")
    # The ratio a process could reach if its start-up were only the floor (everything else as measured).
    fixed = statistics.median(floor_cpu)
    work = {n: p["in_generate"] - p["load_components"] for n, p in phases.items()}
    print(f"  with start-up cut to the import floor ({fixed:.2f} CPU s, model weights loading not counted): "
          f"default / tiny-lcm <= {(fixed + work['default']) / (fixed + work['tiny-lcm']):.2f}x; "
          f"with no start-up at all: {work['default'] / work['tiny-lcm']:.2f}x")

    print(f"\nimports of generate.py --preset tiny-lcm: {total:.2f} s in all; top packages by self time:")
    print("  " + ", ".join(f"{name} {s:.2f}" for name, s in top[:12]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
