"""GPU check: the project's sampler and policy trainers at real SD1.5 size (random weights) on one GPU.

For a lent GPU machine (issue 10 item 10, issue 14 item 4). It builds SD1.5-size UNet, VAE, CLIP text
encoder and OpenPose ControlNet with random weights from the configs shipped in poseloop/models/configs
(no download), saves them with save_pretrained, loads them back through poseloop.models.loading, and runs at
512 px in fp16:

  sampler      poseloop.sampling.sampler.sample vs diffusers' StableDiffusionControlNetPipeline, same model,
               steps, batch, CFG, eta and seeds; images/s of each, measured interleaved
  ddpo         one DDPO epoch (a second if time allows) with the sd15 preset: published clip range
               1e-4, fp16 mixed precision; first-epoch clip fraction, peak GPU memory, GPU-s/sample
  d3po         one D3PO epoch, winners and losers picked by a reward (no database); seconds per pair
  policy_ours  bench_policy.py's row at SD1.5 size: our DDPO with trl's settings ...
  policy_trl   ... and trl's DDPOTrainer (when its wheel was carried); ratio ours / trl

Each part runs in its own process (its peak memory is its own, a crash or an out-of-memory stops only
that part) under a time budget: a part that would not fit is skipped with a note, and the whole run
stays under --budget seconds (default 420: 7 minutes). Results: one JSON line per result,
a summary table, and bench/out/gpu_check.json.

Before a device call, on this machine:   bash scripts/gpu_wheels.sh     (-> .gpu_wheels/, carried)
On the device (see bench/README.md):      python bench/gpu_check.py
Here, on the CPU, the same code on the embedded tiny model:   python bench/gpu_check.py --device cpu --tiny
SDXL (1024 px; only when time and memory allow):              python bench/gpu_check.py --arch sdxl

The parts live in bench/gpu_parts.py, the wheel installation in bench/gpu_wheels.py; this file plans
them under the budget and prints the summary. Missing packages (the device has torch, transformers,
accelerate and peft, not diffusers or trl) are installed from the carried wheels with `pip install --no-deps --no-index` into a temporary target
directory that only this run's processes see.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_parts import (GOAL_GPU_S_PER_SAMPLE, GOAL_MEM_GB, POLICY_TARGET, SAMPLER_TARGET, emit, fmt,
                       run_part)
from gpu_wheels import find_wheel_dir, install_missing, pandas_stub

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"
# Seconds each part may take at most (the global budget caps them further). Sized for an H100 at
# 512 px, 20 steps, 8 samples: build ~30 s, sampler ~45 s, each policy part ~50-70 s.
PART_CAPS = {"build": 120, "sampler": 90, "ddpo": 120, "d3po": 100, "policy_ours": 90, "policy_trl": 110}
PARTS = tuple(PART_CAPS)
MIN_PART_SECONDS = 25  # a part with less time than this left is skipped: imports alone take ~10 s


# ---- the parent: plan, budget, summary -----------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; --tiny and --device cpu pick small defaults."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where to run (default cuda)")
    ap.add_argument("--tiny", action="store_true",
                    help="the embedded tiny model (models/tiny-sd15, 64 px) instead of random SD1.5-size models")
    ap.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15",
                    help="sdxl: SDXL-size models at 1024 px (sampler and DDPO only; needs time and memory)")
    ap.add_argument("--model-source", choices=("build", "embedded"), default=None,
                    help="build = random weights from poseloop/models/configs/<arch> (default, and with --tiny the "
                    "tiny-sd15 configs); embedded = models/tiny-sd15 (default with --tiny)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps (default 20; tiny 10)")
    ap.add_argument("--samples", type=int, default=None, help="trajectories per policy epoch (default 8; tiny 4)")
    ap.add_argument("--batch", type=int, default=None, help="images per sampler call (default 4)")
    ap.add_argument("--size", type=int, default=None, help="pixels (default 512, sdxl 1024, tiny 64)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved sampler repeats after one warm-up each "
                    "(fewer when the part's time runs out)")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 420 on cuda: 7 minutes; 150 on cpu)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu, 4 on cuda)")
    ap.add_argument("--wheels", default="", help="carried wheel folder (default .gpu_wheels or shared_wheels)")
    ap.add_argument("--no-trl", action="store_true", help="skip the trl side even when its wheel is there")
    ap.add_argument("--json", default="", help="results file (default bench/out/gpu_check.json; "
                    "gpu_check_tiny_cpu.json with --tiny)")
    ap.add_argument("--keep-models", action="store_true", help="keep the built models folder (GBs) after the run")
    # Internal: how the parent starts a part process.
    for name in ("--part", "--models", "--results", "--configs"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    small = args.tiny or args.device == "cpu"
    if args.tiny and args.arch == "sdxl":
        ap.error("--tiny runs the embedded SD1.5-architecture model; drop --arch sdxl")
    args.model_source = args.model_source or ("embedded" if args.tiny else "build")
    args.steps = args.steps or (10 if small else 20)
    args.samples = args.samples or (4 if small else (4 if args.arch == "sdxl" else 8))
    args.batch = args.batch or (2 if args.arch == "sdxl" else 4)
    args.size = args.size or (64 if args.tiny else (1024 if args.arch == "sdxl" else 512))
    args.budget = args.budget or (150.0 if args.device == "cpu" else 420.0)
    args.threads = args.threads or (1 if args.device == "cpu" else 4)
    args.configs = args.configs or ("tiny-sd15" if args.tiny else args.arch)
    return args


def summary_rows(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(part, measure, value, goal/target with verdict) for the table."""
    out: list[tuple[str, str, str, str]] = []
    by_side = {r.get("side"): r for r in rows if r.get("metric") == "policy" and "error" not in r}
    for r in rows:
        part = r.get("part", "?")
        if "error" in r or "skipped" in r:
            out.append((part, "error" if "error" in r else "skipped", str(r.get("error") or r.get("skipped"))[:90], ""))
            continue
        m = r.get("metric")
        mem = f"{r['peak_alloc_gb']:.2f} GB" if "peak_alloc_gb" in r else f"{r.get('peak_rss_gb', 0):.2f} GB RSS"
        if m == "models":
            out.append((part, "params (M)", json.dumps(r["params_m"]), ""))
        elif m == "sampler":
            ratio = r["ratio_ours_over_diffusers"]
            out.append((part, "images/s ours | diffusers",
                        f"{r['ours_images_per_s']:.3g} | {r['diffusers_images_per_s']:.3g}", ""))
            out.append((part, "time ratio ours/diffusers", f"{ratio:.3f} (n={r['repeats']})",
                        f"<= {SAMPLER_TARGET}: {'PASS' if ratio <= SAMPLER_TARGET else 'FAIL'}"))
        elif m == "ddpo":
            out.append((part, "first-epoch clip fraction", fmt(r["first_epoch_clipfrac"]),
                        f"clip range {r['clip_range']:g}; max |r-1| first step {fmt(r['first_step_max_abs_ratio_minus_1'])}"))
            out.append((part, "peak memory", mem, r.get("goal_mem", "(goal applies to SD1.5 on a GPU)")))
            out.append((part, "GPU-s per sample" if "peak_alloc_gb" in r else "s per sample",
                        f"{r['s_per_sample']:.3f} ({r['s_per_sample_source']})",
                        r.get("goal_speed", "(goal applies to SD1.5 on a GPU)")))
        elif m == "d3po":
            out.append((part, "s per pair", f"{r['s_per_pair']:.3f} ({r['s_per_pair_source']})", ""))
            out.append((part, "peak memory", mem, ""))
        elif m == "policy":
            out.append((part, f"{r['side']} s per sample", f"{r['s_per_sample']:.3f} ({r['source']})", mem))
    if "ours" in by_side and "trl" in by_side:
        ratio = by_side["ours"]["s_per_sample"] / by_side["trl"]["s_per_sample"]
        out.append(("policy", "time ratio ours/trl", f"{ratio:.3f}",
                    f"<= {POLICY_TARGET}: {'PASS' if ratio <= POLICY_TARGET else 'FAIL'}"))
    return out


def main(argv: list[str] | None = None) -> int:
    """Install what is missing, run the parts under the budget, print the summary, write the JSON."""
    start = time.time()
    args = parse_args(argv)
    if args.part:
        return run_part(args)
    deadline = start + args.budget
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown part(s): {', '.join(unknown)}; choose from {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if args.arch == "sdxl":
        parts = [x for x in parts if x in ("build", "sampler", "ddpo")]  # trl's DDPO handles SD1.5 only
    if args.model_source == "embedded":
        parts = [x for x in parts if x != "build"]
    want_trl = "policy_trl" in parts and not args.no_trl
    if not want_trl:
        parts = [x for x in parts if x != "policy_trl"]
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else OUT_DIR / ("gpu_check_tiny_cpu.json" if args.tiny else "gpu_check.json")
    results = Path(tempfile.mkstemp(prefix="gpu-check-", suffix=".jsonl")[1])
    logs = OUT_DIR / "gpu_check_logs"
    logs.mkdir(exist_ok=True)

    wheel_dir = find_wheel_dir(args.wheels)
    site, notes = install_missing(wheel_dir, want_trl)
    if site is not None:
        sys.path.insert(0, str(site))
    trl_ok = want_trl and importlib.util.find_spec("trl") is not None
    pythonpath = [str(ROOT)] + ([str(site)] if site else [])
    trl_path = list(pythonpath)
    if trl_ok and importlib.util.find_spec("pandas") is None:
        trl_path.append(str(pandas_stub(site or Path(tempfile.mkdtemp()))))
        notes.append("pandas absent: a stand-in module lets trl import (its DDPO code does not use pandas)")
    for note in notes:
        print(f"note: {note}", flush=True)

    created_models = False
    if args.model_source == "embedded":
        models = ROOT / "models" / "tiny-sd15"
        if not (models / "model_index.json").is_file():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), "OMP_NUM_THREADS": str(args.threads)}
            subprocess.run([sys.executable, "-c", "from poseloop.models.embedded import ensure_embedded; "
                            f"ensure_embedded({str(models)!r})"], env=env, check=True, cwd=ROOT)
    else:
        models = Path(tempfile.mkdtemp(prefix=f"gpu-check-models-{args.configs}-"))
        created_models = True
    print(f"gpu_check: device={args.device} arch={args.arch} model={args.model_source}:{args.configs} "
          f"size={args.size} steps={args.steps} samples={args.samples} batch={args.batch} threads={args.threads} "
          f"budget={args.budget:.0f}s parts={','.join(parts)}", flush=True)

    env_base = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"}
    reserve = 10.0  # seconds kept for the summary and for the models folder's removal
    built_ok = args.model_source == "embedded"
    for part in parts:
        remaining = deadline - time.time() - reserve
        if part != "build" and not built_ok:
            emit({"part": part, "skipped": "no models (build failed or skipped)"}, results)
            continue
        if part == "policy_trl" and not trl_ok:
            emit({"part": part, "skipped": "trl is not installed and no trl wheel was carried (scripts/gpu_wheels.sh)"},
                 results)
            continue
        if remaining < MIN_PART_SECONDS:
            emit({"part": part, "skipped": f"time budget: {remaining:.0f} s left of {args.budget:.0f} s"}, results)
            continue
        timeout = min(PART_CAPS[part] * (3 if args.arch == "sdxl" else 1), remaining)
        path = trl_path if part == "policy_trl" else pythonpath
        env = {**env_base, "PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--device", args.device,
               "--arch", args.arch, "--models", str(models), "--results", str(results), "--configs", args.configs,
               "--steps", str(args.steps), "--samples", str(args.samples), "--batch", str(args.batch),
               "--size", str(args.size), "--repeats", str(args.repeats), "--threads", str(args.threads),
               "--wheels", str(wheel_dir or ""), "--deadline", str(time.time() + timeout - 3)]
        if args.tiny:
            cmd.append("--tiny")
        before = len(results.read_text().splitlines())
        log = logs / f"{part}.log"
        print(f"--- {part} (up to {timeout:.0f} s; stderr -> {log.relative_to(ROOT)})", flush=True)
        t0 = time.time()
        with log.open("w") as err:
            try:
                rc = subprocess.run(cmd, env=env, cwd=ROOT, stderr=err, timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = -1
        new = results.read_text().splitlines()[before:]
        if rc == -1:
            emit({"part": part, "error": f"killed after {time.time() - t0:.0f} s (part time budget)"}, results)
        elif rc and not new:
            tail = log.read_text().strip().splitlines()[-3:]
            emit({"part": part, "error": f"exit {rc}: {' | '.join(tail)[-400:]}"}, results)
        if rc:
            print("    last stderr lines:\n      " + "\n      ".join(log.read_text().strip().splitlines()[-12:]),
                  flush=True)
        if part == "build":
            built_ok = rc == 0 and (models / "model_index.json").is_file()
    if created_models and not args.keep_models:
        shutil.rmtree(models, ignore_errors=True)

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    results.unlink()
    table = summary_rows(rows)
    print(f"\nSummary ({args.device}, {args.arch}{' tiny' if args.tiny else ''}, {args.size} px, {args.steps} steps; "
          f"total {time.time() - start:.0f} s of {args.budget:.0f} s budget)")
    widths = [max(len(t[i]) for t in table + [("part", "measure", "value", "goal")]) for i in range(3)]
    print(f"{'part':<{widths[0]}}  {'measure':<{widths[1]}}  {'value':<{widths[2]}}  goal / target")
    for t in table:
        print(f"{t[0]:<{widths[0]}}  {t[1]:<{widths[1]}}  {t[2]:<{widths[2]}}  {t[3]}")
    print(f"goals: SD1.5 LoRA DDPO peak GPU memory <= {GOAL_MEM_GB} GB and < {GOAL_GPU_S_PER_SAMPLE} GPU-seconds "
          f"per trained sample; sampler/diffusers <= {SAMPLER_TARGET}x; ours/trl <= {POLICY_TARGET}x")
    meta = {k: v for k, v in vars(args).items() if k not in ("part", "models", "results", "deadline")}
    json_path.write_text(json.dumps({"meta": {**meta, "notes": notes, "total_s": time.time() - start,
                                              "when": time.strftime("%Y-%m-%d %H:%M:%S")},
                                     "results": rows, "summary": table}, indent=2, default=str))
    print(f"wrote {json_path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
