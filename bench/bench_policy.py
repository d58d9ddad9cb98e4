"""DDPO speed and memory: poseloop's trainer vs trl 0.23.1's DDPOTrainer on the same tiny SD model.

    python bench/bench_policy.py                  # every side, interleaved, 2 repeats each
    python bench/bench_policy.py --epochs 3 --steps 10 --samples 8 --sides ours fast trl

Sides: `ours` (re-scoring update, train.fused_update false), `fast` (the fused update, exact here since
an epoch is one optimizer step, by its default route train.fused_route per_sample: each trained step
backpropagated while sampling, per-sample LoRA gradients weighted afterwards), `graphs` (the fused
update's other route: the sampling pass's log-prob graphs held and backpropagated in the update), `trl`,
`pose_std` / `pose_fast` / `pose_graphs` (ours at controlnet_scale 1: the pose-conditioned case trl
cannot run), `d3po` (D3PO with reward-picked pairs, d3po.source reward: one pair per group, samples / 2
groups an epoch so its update minibatch holds as many trajectories as DDPO's; its update time per pair
against `ours`' update time per sample, and with the fresh pairs' reference pass added).

Each side runs in its own child process (so its peak memory is its own): it builds the trainer,
runs one warm-up epoch, then times `--epochs` epochs of sampling + reward + PPO update and reports
seconds per trained sample and the process's peak RSS (resource.getrusage ru_maxrss, which counts
model loading too; the delta over the loaded state is reported beside it).

Same settings on both sides: the embedded tiny SD1.5-architecture UNet/VAE/text encoder at the UNet's
native size (unet sample_size x the VAE's scale factor: 64 px for the embedded world; trl's pipeline
always samples at that size, so ours is set to it and both sides report it), DDIM with eta 1, CFG 5,
LoRA r=4 on to_q/to_k/to_v/to_out.0, all timesteps trained, one inner epoch, per-prompt stat tracking,
brightness reward, one CPU thread.
trl handles a plain StableDiffusionPipeline only, so trl gets a plain pipeline built from the same
components, while poseloop runs its ControlNet pipeline with controlnet_scale 0: the ControlNet
still runs on our side (a cost trl does not pay).

trl is a peer, not a dependency: install it beside the project without touching the venv:
    pip download trl==0.23.1 --no-deps -d /tmp/trl_wheels
    pip install --no-deps --target bench/.peers trl==0.23.1 pandas
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / ".peers"
PROMPTS = ["a dancer", "an astronaut"]


def maxrss_mb() -> float:
    """Peak resident set size of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def native_size(model_dir: str) -> int:
    """The image size a diffusers pipeline samples by default: unet sample_size x 2^(VAE levels - 1)."""
    unet = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def run_ours(args: argparse.Namespace, out: dict) -> None:
    """poseloop's DDPO (or D3PO, side d3po): time epochs after a warm-up, and the update part of them."""
    import torch

    from poseloop.policy_config import tiny_on
    from poseloop.training import PolicyTrainer

    class Brightness:
        name, needs_images = "brightness", True

        def __call__(self, images, latents, prompts, metadata):  # type: ignore[no-untyped-def]
            return images.mean(dim=(1, 2, 3))

    tmp = tempfile.mkdtemp()
    cfg = tiny_on(args.model, tmp)
    cfg.sample.width = cfg.sample.height = out["size"] = native_size(args.model)
    cfg.sample.steps = args.steps
    cfg.sample.controlnet_scale = 1.0 if args.side.startswith("pose") else 0.0
    cfg.train.fused_update = args.side in ("fast", "pose_fast", "graphs", "pose_graphs")
    cfg.train.fused_route = "graphs" if args.side in ("graphs", "pose_graphs") else "per_sample"
    cfg.sample.images_per_group, cfg.sample.batch_size = args.samples // len(PROMPTS), args.samples
    cfg.data.prompts, cfg.data.poses = PROMPTS, ["standing"]
    cfg.train.groups_per_epoch, cfg.train.batch_size = len(PROMPTS), args.samples
    if args.side == "d3po":
        # One pair per group (its best and worst image): samples / 2 groups give samples / 2 pairs, so D3PO's
        # update minibatch holds as many trajectories (winners + losers) as DDPO's, at the same per-row cost.
        cfg.algo, cfg.d3po.source = "d3po", "reward"
        cfg.train.groups_per_epoch = args.samples // 2
    # The same work as trl's side: attention LoRA, every timestep (the tiny preset trains more modules on half).
    cfg.target.lora_modules, cfg.train.timestep_fraction = ["to_q", "to_k", "to_v", "to_out.0"], 1.0
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    loaded = maxrss_mb()
    algo = trainer.algorithm
    spent = {"update": 0.0, "reference": 0.0}
    real_update, real_ref = algo.update, trainer._reference_log_probs

    def timed(key, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    algo.update, trainer._reference_log_probs = timed("update", real_update), timed("reference", real_ref)
    algo.epoch(0)  # warm-up
    spent.update(update=0.0, reference=0.0)
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        algo.epoch(epoch)
    out["seconds_per_sample"] = (time.perf_counter() - t0) / (args.epochs * args.samples)
    # D3PO: per pair (one per group); the fresh pairs' reference pass (once per pair, base model, no gradient)
    # is timed apart from the update: stored human pairs sampled by the reference need none.
    per = cfg.train.groups_per_epoch if args.side == "d3po" else args.samples
    out["update_seconds_per_item"] = spent["update"] / (args.epochs * per)
    out["reference_seconds_per_item"] = spent["reference"] / (args.epochs * per)
    out["update_and_reference_seconds_per_item"] = (spent["update"] + spent["reference"]) / (args.epochs * per)
    out["rss_loaded_mb"], out["rss_peak_mb"] = loaded, maxrss_mb()
    assert torch.get_num_threads() == 1


def run_trl(args: argparse.Namespace, out: dict) -> None:
    """trl's DDPOTrainer on a plain StableDiffusionPipeline built from the same components."""
    sys.path.insert(0, str(PEERS))
    try:
        import pandas  # noqa: F401
    except ImportError:
        # trl's trainer utils import pandas for a type annotation; its DDPO code never calls it.
        stub = Path(tempfile.mkdtemp()) / "pandas"
        stub.mkdir()
        (stub / "__init__.py").write_text("class DataFrame:\n    pass\n")
        sys.path.insert(0, str(stub.parent))
    try:
        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    except Exception as e:  # noqa: BLE001 (any import failure means: peer absent or broken)
        out["error"] = f"trl 0.23.1 not importable from {PEERS} ({type(e).__name__}: {e})"
        return
    from diffusers import StableDiffusionPipeline

    from poseloop.config import ModelConfig
    from poseloop.models import load_components

    comp = load_components(ModelConfig(base=args.model, controlnet=f"{args.model}/controlnet", device="cpu"))
    p = comp.pipe
    plain = tempfile.mkdtemp()
    StableDiffusionPipeline(vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer, unet=p.unet,
                            scheduler=p.scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(plain)
    del comp, p
    from accelerate import PartialState

    PartialState(cpu=True)  # trl's pipeline logs through accelerate before its trainer creates the state
    pipeline = DefaultDDPOStableDiffusionPipeline(plain, use_lora=True)
    cfg = DDPOConfig(num_epochs=args.epochs + 1, sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=5.0,
                     sample_batch_size=args.samples, sample_num_batches_per_epoch=1, train_batch_size=args.samples,
                     train_gradient_accumulation_steps=1, train_timestep_fraction=1.0, train_num_inner_epochs=1,
                     train_learning_rate=3e-4, mixed_precision="no", log_with=None, per_prompt_stat_tracking=True,
                     per_prompt_stat_tracking_buffer_size=16, per_prompt_stat_tracking_min_count=8,
                     save_freq=10**6, logdir=tempfile.mkdtemp(), accelerator_kwargs={"cpu": True})
    counter = {"i": 0}

    def prompt_fn():  # type: ignore[no-untyped-def]
        counter["i"] += 1
        return PROMPTS[counter["i"] % len(PROMPTS)], {}

    def reward_fn(images, prompts, metadata):  # type: ignore[no-untyped-def]
        return images.float().mean(dim=(1, 2, 3)), {}

    trainer = DDPOTrainer(cfg, reward_fn, prompt_fn, pipeline)
    sd = pipeline.sd_pipeline
    out["size"] = sd.unet.config.sample_size * sd.vae_scale_factor  # what trl's pipeline call samples at
    assert out["size"] == native_size(args.model), (out["size"], native_size(args.model))
    loaded = maxrss_mb()
    step = trainer.step(0, 0)  # warm-up
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        step = trainer.step(epoch, step)
    out["seconds_per_sample"] = (time.perf_counter() - t0) / (args.epochs * args.samples)
    out["rss_loaded_mb"], out["rss_peak_mb"] = loaded, maxrss_mb()


def child(side: str, args: argparse.Namespace) -> dict:
    """Run one side in a fresh process and return its JSON report."""
    cmd = [sys.executable, __file__, "--side", side, "--epochs", str(args.epochs), "--steps", str(args.steps),
           "--samples", str(args.samples), "--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": f"{side} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"}
    return json.loads(lines[-1])


SIDES = ("ours", "fast", "graphs", "trl", "pose_std", "pose_fast", "pose_graphs", "d3po")


def main() -> int:
    """Interleave the sides, print a table and ratios measured in this run (median, min and max over repeats)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="sides to run")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per side (after one warm-up epoch)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--samples", type=int, default=8, help="trajectories per epoch (= sample and train batch)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; medians are reported")
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-sd15"), help="tiny model folder")
    ap.add_argument("--log", default="", help="append each child's JSON report to this file")
    args = ap.parse_args()
    if args.side:
        import torch

        torch.set_num_threads(1)
        out: dict = {"side": args.side}
        (run_trl if args.side == "trl" else run_ours)(args, out)
        print(json.dumps(out))
        return 0
    from poseloop.tiny import ensure_embedded

    ensure_embedded(args.model)
    results: dict[str, list[dict]] = {side: [] for side in args.sides}
    for _ in range(args.repeats):
        for side in args.sides:
            results[side].append(child(side, args))
            if args.log:  # each child's report as it arrives: a long run interrupted keeps what it measured
                with open(args.log, "a") as f:
                    f.write(json.dumps(results[side][-1]) + "\n")
    print(f"DDPO on the tiny SD model, {native_size(args.model)} px, {args.steps} steps, {args.samples} samples/epoch, "
          f"{args.epochs} timed epochs, 1 CPU thread, medians [min, max] of {args.repeats} interleaved runs")
    print(f"{'side':<12}{'s/sample':>10}{'update s/item':>15}{'peak RSS MiB':>14}{'RSS over loaded':>17}")
    ok = {side: [r for r in runs if "error" not in r] for side, runs in results.items()}
    for side, runs in results.items():
        if not ok[side]:
            print(f"{side:<12}  unavailable: {runs[0]['error']}")
            continue
        sps = statistics.median(r["seconds_per_sample"] for r in ok[side])
        upd = statistics.median(r.get("update_seconds_per_item", float("nan")) for r in ok[side])
        peak = statistics.median(r["rss_peak_mb"] for r in ok[side])
        delta = statistics.median(r["rss_peak_mb"] - r["rss_loaded_mb"] for r in ok[side])
        print(f"{side:<12}{sps:>10.3f}{upd:>15.3f}{peak:>14.0f}{delta:>17.0f}")

    def ratio(a: str, b: str, key: str, label: str, b_key: str = "") -> None:
        # Repeat k of side a over repeat k of side b: the two ran next to each other (interleaved).
        pairs = [(x[key], y[b_key or key]) for x, y in zip(results.get(a, []), results.get(b, []))
                 if "error" not in x and "error" not in y]
        if pairs:
            rs = [x / y for x, y in pairs]
            print(f"{label} = {statistics.median(rs):.2f} [{min(rs):.2f}, {max(rs):.2f}]")

    ratio("ours", "trl", "seconds_per_sample", "time ours (re-scoring) / trl")
    ratio("fast", "trl", "seconds_per_sample", "time ours fused (per_sample) / trl (target <= 0.70)")
    ratio("graphs", "trl", "seconds_per_sample", "time ours fused (graphs) / trl")
    ratio("fast", "ours", "seconds_per_sample", "time ours fused (per_sample) / ours re-scoring")
    ratio("fast", "graphs", "seconds_per_sample", "time fused per_sample / fused graphs")
    ratio("fast", "trl", "rss_peak_mb", "peak RSS ours fused (per_sample) / trl (target <= 1.0)")
    ratio("graphs", "trl", "rss_peak_mb", "peak RSS ours fused (graphs) / trl")
    ratio("ours", "trl", "rss_peak_mb", "peak RSS ours re-scoring / trl")
    ratio("pose_fast", "pose_std", "seconds_per_sample", "pose (controlnet_scale 1): time fused per_sample / re-scoring")
    ratio("pose_fast", "pose_std", "rss_peak_mb", "pose (controlnet_scale 1): peak RSS fused per_sample / re-scoring")
    ratio("pose_graphs", "pose_std", "seconds_per_sample", "pose (controlnet_scale 1): time fused graphs / re-scoring")
    ratio("pose_graphs", "pose_std", "rss_peak_mb", "pose (controlnet_scale 1): peak RSS fused graphs / re-scoring")
    ratio("d3po", "ours", "update_seconds_per_item", "D3PO update s/pair / DDPO update s/sample (target <= 2.2)")
    ratio("d3po", "ours", "update_and_reference_seconds_per_item",
          "D3PO update + fresh pairs' reference pass s/pair / DDPO update s/sample", b_key="update_seconds_per_item")
    print("memory: resource.getrusage(RUSAGE_SELF).ru_maxrss of each child process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
