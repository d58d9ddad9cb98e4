"""DDPO speed and memory: poseloop's trainer vs trl 0.23.1's DDPOTrainer on the same tiny SD model.

    python bench/bench_policy.py                  # every side, interleaved, 2 repeats each
    python bench/bench_policy.py --epochs 3 --steps 10 --samples 8 --sides ours trl

Sides: `ours` (poseloop's DDPO: sample, then re-score each trained step in the PPO update), `trl`,
`pose_std` (ours at controlnet_scale 1: the pose-conditioned case trl cannot run), `d3po` (D3PO with
reward-picked pairs, d3po.source reward: one pair per group, samples / 2 groups an epoch so its update
minibatch holds as many trajectories as DDPO's; its update time per pair against `ours`' update time per
sample, and with the fresh pairs' reference pass added).

Each side runs in its own child process (so its peak memory is its own): it builds the trainer,
runs one warm-up epoch, then times `--epochs` epochs of sampling + reward + PPO update and reports
seconds per trained sample and the process's peak RSS (resource.getrusage ru_maxrss, which counts
model loading too; the delta over the loaded state is reported beside it).

The same work on both sides (`ours` against `trl`): ours_config() sets every field that
changes the work explicitly, whatever the tiny preset says, and work_ours() / work_trl() describe each side's
work in the same terms (steps sampled and trained per trajectory, one x_T per trajectory, LoRA modules,
rank and alpha, trajectories, sample and train batches, optimizer steps, CFG in sampling and training,
eta, resolution, dtype, optimizer and PPO settings, per-prompt statistics). The run prints them side by side
with `trained steps per trajectory: ours N / trl N`, and refuses to time sides whose work differs; each child
also reports what it actually trained (steps per trajectory, x_T per trajectory; trl's live LoRA config and
num_train_timesteps), checked against the declared work. tests/test_bench_policy.py checks the mapping
without trl or a training loop. The settings: the embedded tiny SD1.5-architecture UNet/VAE/text encoder at
the UNet's native size (unet sample_size x the VAE's scale factor: 64 px for the embedded world; trl's
pipeline always samples at that size), DDIM with eta 1, CFG 5 in sampling and training, LoRA r=4 alpha 4 on
to_q/to_k/to_v/to_out.0, all 10 steps trained, one x_T per trajectory, one inner epoch, one optimizer step
per epoch, per-prompt stat tracking (buffer 16, min count 8), trl's optimizer and PPO defaults, brightness
reward, one CPU thread.
trl handles a plain StableDiffusionPipeline only, so trl gets a plain pipeline built from the same
components, while poseloop runs its ControlNet pipeline with controlnet_scale 0, at which
poseloop.sampling.sampler.predict_noise skips the ControlNet's forward pass (its residuals would be zero).

trl is a peer, not a dependency: install it beside the project without touching the venv:
    pip download trl==0.23.1 --no-deps -d /tmp/trl_wheels
    pip install --no-deps --target bench/.peers trl==0.23.1 pandas
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


# What trl 0.23.1 fixes in code rather than in DDPOConfig: DefaultDDPOStableDiffusionPipeline(use_lora=True)
# adds LoraConfig(r=4, lora_alpha=4, target_modules=[...]) (trl/models/modeling_sd_base.py); DDPOTrainer trains
# int(sample_num_steps * train_timestep_fraction) steps of every trajectory, each from its own x_T, with CFG in
# the training pass when train_cfg (trl/trainer/ddpo_trainer.py). run_trl checks these against the live trainer.
TRL_LORA_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
TRL_LORA_RANK, TRL_LORA_ALPHA = 4, 4.0
# Sides that must do trl's work; pose_std (ControlNet at scale 1) and d3po do other work on purpose.
LIKE_TRL = ("ours",)


def trl_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """trl's DDPOConfig arguments (its defaults written out where they set the work), without importing trl."""
    return dict(num_epochs=args.epochs + 1, sample_num_steps=args.steps, sample_eta=1.0, sample_guidance_scale=5.0,
                sample_batch_size=args.samples, sample_num_batches_per_epoch=1, train_batch_size=args.samples,
                train_gradient_accumulation_steps=1, train_timestep_fraction=1.0, train_num_inner_epochs=1,
                train_cfg=True, train_learning_rate=3e-4, train_adam_beta1=0.9, train_adam_beta2=0.999,
                train_adam_weight_decay=1e-4, train_adam_epsilon=1e-8, train_max_grad_norm=1.0,
                train_adv_clip_max=5.0, train_clip_range=1e-4, mixed_precision="no", log_with=None,
                per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=16,
                per_prompt_stat_tracking_min_count=8, negative_prompts=None, save_freq=10**6,
                accelerator_kwargs={"cpu": True})


def ours_config(args: argparse.Namespace, side: str, out_dir: str):  # -> PolicyConfig
    """Our side's config: the tiny preset's model and output folders, every field that sets the work explicit."""
    from poseloop.config.policy import tiny_on

    kw = trl_config_kwargs(args)
    cfg = tiny_on(args.model, out_dir)
    cfg.algo = "ddpo"
    cfg.model.dtype, cfg.model.lora, cfg.model.lcm_lora, cfg.model.policy = "float32", "", "", ""
    s = cfg.sample
    s.width = s.height = native_size(args.model)
    s.sampler, s.steps, s.eta, s.guidance_scale = "ddim", kw["sample_num_steps"], kw["sample_eta"], kw["sample_guidance_scale"]
    s.controlnet_scale = 1.0 if side.startswith("pose") else 0.0
    s.negative_prompt = "" if kw["negative_prompts"] is None else kw["negative_prompts"]
    s.images_per_group, s.batch_size = args.samples // len(PROMPTS), kw["sample_batch_size"]
    cfg.data.prompts, cfg.data.poses = PROMPTS, ["standing"]
    t = cfg.target
    t.kind, t.lora_modules, t.lora_rank, t.lora_alpha = "unet_lora", list(TRL_LORA_MODULES), TRL_LORA_RANK, TRL_LORA_ALPHA
    t.gradient_checkpointing = False
    o = cfg.optim
    o.lr, o.beta1, o.beta2 = kw["train_learning_rate"], kw["train_adam_beta1"], kw["train_adam_beta2"]
    o.weight_decay, o.adam_eps, o.max_grad_norm = kw["train_adam_weight_decay"], kw["train_adam_epsilon"], kw["train_max_grad_norm"]
    o.use_8bit_adam, o.mixed_precision = False, kw["mixed_precision"]
    tr = cfg.train
    tr.groups_per_epoch, tr.batch_size = len(PROMPTS), kw["train_batch_size"]
    tr.grad_accum, tr.inner_epochs = kw["train_gradient_accumulation_steps"], kw["train_num_inner_epochs"]
    # Every step of every trajectory, each trajectory from its own x_T (the tiny preset: the first 4, one per group).
    tr.timestep_fraction, tr.first_steps, tr.shared_start = kw["train_timestep_fraction"], 0, False
    tr.clip_range, tr.adv_clip_max = kw["train_clip_range"], kw["train_adv_clip_max"]
    tr.stat_buffer, tr.stat_min_count = kw["per_prompt_stat_tracking_buffer_size"], kw["per_prompt_stat_tracking_min_count"]
    if side == "d3po":
        # One pair per group (its best and worst image): samples / 2 groups give samples / 2 pairs, so D3PO's
        # update minibatch holds as many trajectories (winners + losers) as DDPO's, at the same per-row cost.
        cfg.algo, cfg.d3po.source = "d3po", "reward"
        tr.groups_per_epoch = args.samples // 2
    cfg.validate()
    return cfg


def trained_steps_ours(cfg) -> int:  # type: ignore[no-untyped-def]
    """Steps trained per trajectory, by the trainer's own choice (PolicyTrainer.choose_steps) on the
    model's scheduler, without loading the model."""
    from types import SimpleNamespace

    import torch
    from diffusers import DDIMScheduler

    from poseloop.sampling.sampler import _step_scheduler
    from poseloop.policy.trainer import PolicyTrainer

    comp = SimpleNamespace(scheduler=DDIMScheduler.from_pretrained(cfg.model.base, subfolder="scheduler"), device="cpu")
    like = SimpleNamespace(timesteps=_step_scheduler(comp, cfg.sample).timesteps.cpu(), sample_cfg=cfg.sample)
    me = SimpleNamespace(cfg=cfg, comp=comp)
    return len(PolicyTrainer.choose_steps(me, like, torch.Generator().manual_seed(0)))  # type: ignore[arg-type]


def work_ours(cfg) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """What our side computes per epoch, in the terms work_trl uses."""
    s, t, o, tr = cfg.sample, cfg.target, cfg.optim, cfg.train
    n = tr.groups_per_epoch * s.images_per_group
    return {
        "sampler, steps per trajectory": (s.sampler, s.steps),
        "trained steps per trajectory": trained_steps_ours(cfg),
        "x_T per trajectory": "one per group" if tr.shared_start else "its own",
        "trajectories per epoch": n,
        "sample batch": min(s.batch_size, n),
        "train minibatch, accumulation, inner epochs": (tr.batch_size, tr.grad_accum, tr.inner_epochs),
        "optimizer steps per epoch": tr.inner_epochs * math.ceil(math.ceil(n / tr.batch_size) / tr.grad_accum),
        "CFG scale, CFG in training": (s.guidance_scale, s.guidance_scale > 1),
        "negative prompt": s.negative_prompt,
        "eta": s.eta,
        "resolution px": (s.width, s.height),
        "ControlNet forward passes": "yes" if s.controlnet_scale else "none (scale 0 skips it)",
        "trained weights": t.kind,
        "LoRA modules": sorted(t.lora_modules),
        "LoRA rank, alpha": (t.lora_rank, float(t.lora_alpha)),
        "gradient checkpointing": t.gradient_checkpointing,
        "weights added before training": [x for x in (cfg.model.lora, cfg.model.lcm_lora, cfg.model.policy) if x],
        "dtype, mixed precision": ("float32" if cfg.model.dtype in ("auto", "float32") else cfg.model.dtype,
                                   o.mixed_precision),
        "AdamW lr, betas, weight decay, eps": (o.lr, (o.beta1, o.beta2), o.weight_decay, o.adam_eps),
        "8-bit Adam": o.use_8bit_adam,
        "max grad norm": o.max_grad_norm,
        "PPO clip range, advantage clip": (tr.clip_range, tr.adv_clip_max),
        "per-prompt stats buffer, min count": (tr.stat_buffer, tr.stat_min_count),
    }


def work_trl(kw: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """What trl's side computes per epoch (DDPOConfig arguments + what trl 0.23.1 fixes in code)."""
    n = kw["sample_batch_size"] * kw["sample_num_batches_per_epoch"]
    size = native_size(model_dir)
    return {
        "sampler, steps per trajectory": ("ddim", kw["sample_num_steps"]),
        "trained steps per trajectory": int(kw["sample_num_steps"] * kw["train_timestep_fraction"]),
        "x_T per trajectory": "its own",
        "trajectories per epoch": n,
        "sample batch": kw["sample_batch_size"],
        "train minibatch, accumulation, inner epochs": (kw["train_batch_size"], kw["train_gradient_accumulation_steps"],
                                                        kw["train_num_inner_epochs"]),
        "optimizer steps per epoch": kw["train_num_inner_epochs"] * math.ceil(
            math.ceil(n / kw["train_batch_size"]) / kw["train_gradient_accumulation_steps"]),
        "CFG scale, CFG in training": (kw["sample_guidance_scale"], bool(kw["train_cfg"])),
        "negative prompt": "" if kw["negative_prompts"] is None else kw["negative_prompts"],
        "eta": kw["sample_eta"],
        "resolution px": (size, size),
        "ControlNet forward passes": "none (scale 0 skips it)",  # a plain pipeline: no ControlNet at all
        "trained weights": "unet_lora",
        "LoRA modules": sorted(TRL_LORA_MODULES),
        "LoRA rank, alpha": (TRL_LORA_RANK, TRL_LORA_ALPHA),
        "gradient checkpointing": False,
        "weights added before training": [],
        "dtype, mixed precision": ("float32", kw["mixed_precision"]),
        "AdamW lr, betas, weight decay, eps": (kw["train_learning_rate"], (kw["train_adam_beta1"], kw["train_adam_beta2"]),
                                               kw["train_adam_weight_decay"], kw["train_adam_epsilon"]),
        "8-bit Adam": False,
        "max grad norm": kw["train_max_grad_norm"],
        "PPO clip range, advantage clip": (kw["train_clip_range"], kw["train_adv_clip_max"]),
        "per-prompt stats buffer, min count": (kw["per_prompt_stat_tracking_buffer_size"],
                                               kw["per_prompt_stat_tracking_min_count"]),
    }


def work_differences(ours: dict[str, Any], trl: dict[str, Any]) -> list[str]:
    """One line per work field where the sides differ (empty: the same work)."""
    return [f"{k}: ours {ours.get(k)!r} / trl {trl.get(k)!r}" for k in dict.fromkeys([*ours, *trl])
            if ours.get(k) != trl.get(k)]


def run_ours(args: argparse.Namespace, out: dict) -> None:
    """poseloop's DDPO (or D3PO, side d3po): time epochs after a warm-up, and the update part of them."""
    import torch

    from poseloop.policy.trainer import PolicyTrainer

    class Brightness:
        name, needs_images = "brightness", True

        def __call__(self, images, latents, prompts, metadata):  # type: ignore[no-untyped-def]
            return images.mean(dim=(1, 2, 3))

    cfg = ours_config(args, args.side, tempfile.mkdtemp())
    out["size"] = cfg.sample.width
    trainer = PolicyTrainer(cfg, reward=Brightness(), progress=False)
    loaded = maxrss_mb()
    algo = trainer.algorithm
    spent = {"update": 0.0, "reference": 0.0}
    real_update, real_ref = algo.update, trainer.reference_log_probs

    def timed(key, fn):  # type: ignore[no-untyped-def]
        def wrapper(*a, **k):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
        return wrapper

    algo.update, trainer.reference_log_probs = timed("update", real_update), timed("reference", real_ref)
    # What the trainer actually does, for the parent's check against the declared work.
    seen: dict[str, set] = {"trained": set(), "starts": set()}
    real_choose, real_starts = trainer.choose_steps, trainer.start_seeds

    def choose(*a, **k):  # type: ignore[no-untyped-def]
        steps = real_choose(*a, **k)
        seen["trained"].add(len(steps))
        return steps

    def starts(*a, **k):  # type: ignore[no-untyped-def]
        got = real_starts(*a, **k)
        seen["starts"].add("its own" if got is None else "one per group")
        return got

    trainer.choose_steps, trainer.start_seeds = choose, starts
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
    out["live_trained_steps"], out["live_starts"] = sorted(seen["trained"]), sorted(seen["starts"])
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

    from poseloop.config.generation import ModelConfig
    from poseloop.models.loading import load_components

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
    cfg = DDPOConfig(**trl_config_kwargs(args), logdir=tempfile.mkdtemp())
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
    peft = sd.unet.peft_config["default"]
    out["live_trained_steps"], out["live_lora"] = [trainer.num_train_timesteps], [
        int(peft.r), float(peft.lora_alpha), sorted(peft.target_modules)]
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


SIDES = ("ours", "trl", "pose_std", "d3po")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's arguments (a child gets --side)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="sides to run")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per side (after one warm-up epoch)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps")
    ap.add_argument("--samples", type=int, default=8, help="trajectories per epoch (= sample and train batch)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs per side; medians are reported")
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-sd15"), help="tiny model folder")
    ap.add_argument("--log", default="", help="append each child's JSON report to this file")
    return ap.parse_args(argv)


def print_work(args: argparse.Namespace) -> list[str]:
    """Print both sides' work side by side; return the differences (ours' sides in LIKE_TRL against trl)."""
    ours, trl = work_ours(ours_config(args, "ours", tempfile.mkdtemp())), work_trl(trl_config_kwargs(args), args.model)
    print(f"trained steps per trajectory: ours {ours['trained steps per trajectory']} / "
          f"trl {trl['trained steps per trajectory']}")
    print(f"{'work (ours | trl)':<46}{'ours':<42}trl")
    for key in dict.fromkeys([*ours, *trl]):
        a, b = ours.get(key), trl.get(key)
        print(f"{key:<46}{a!r:<42}{'same' if a == b else repr(b) + '   <- DIFFERS'}")
    diffs = []
    for side in LIKE_TRL:
        diffs += [f"{side}: {d}" for d in work_differences(work_ours(ours_config(args, side, tempfile.mkdtemp())), trl)]
    return diffs


def live_differences(args: argparse.Namespace, results: dict[str, list[dict]]) -> list[str]:
    """What the children report they trained, against the declared work."""
    trl_work = work_trl(trl_config_kwargs(args), args.model)
    want_steps = [trl_work["trained steps per trajectory"]]
    out = []
    for side, runs in results.items():
        for r in runs:
            if "error" in r or side not in (*LIKE_TRL, "trl"):
                continue
            if r.get("live_trained_steps") != want_steps:
                out.append(f"{side}: trained {r.get('live_trained_steps')} steps per trajectory, declared {want_steps}")
            if side != "trl" and r.get("live_starts") != ["its own"]:
                out.append(f"{side}: x_T per trajectory {r.get('live_starts')}, declared ['its own']")
            lora = [TRL_LORA_RANK, TRL_LORA_ALPHA, sorted(TRL_LORA_MODULES)]
            if side == "trl" and r.get("live_lora") != lora:
                out.append(f"trl: live LoRA (r, alpha, modules) {r.get('live_lora')}, declared {lora}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Interleave the sides, print a table and ratios measured in this run (median, min and max over repeats)."""
    args = parse_args(argv)
    if args.side:
        import torch

        torch.set_num_threads(1)
        out: dict = {"side": args.side}
        (run_trl if args.side == "trl" else run_ours)(args, out)
        print(json.dumps(out))
        return 0
    from poseloop.models.embedded import ensure_embedded

    ensure_embedded(args.model)
    diffs = print_work(args)
    if diffs:
        print("not the same work as trl's side, nothing timed:\n  " + "\n  ".join(diffs))
        return 1
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

    ratio("ours", "trl", "seconds_per_sample", "time ours / trl (target <= 0.70)")
    ratio("ours", "trl", "rss_peak_mb", "peak RSS ours / trl (target <= 1.0)")
    ratio("pose_std", "ours", "seconds_per_sample", "pose (controlnet_scale 1) / controlnet_scale 0: time")
    ratio("d3po", "ours", "update_seconds_per_item", "D3PO update s/pair / DDPO update s/sample (target <= 2.2)")
    ratio("d3po", "ours", "update_and_reference_seconds_per_item",
          "D3PO update + fresh pairs' reference pass s/pair / DDPO update s/sample", b_key="update_seconds_per_item")
    print("memory: resource.getrusage(RUSAGE_SELF).ru_maxrss of each child process")
    live = live_differences(args, results)
    print("work done, as the children report it: " + ("as declared" if not live else "DIFFERS\n  " + "\n  ".join(live)))
    return 1 if live else 0


if __name__ == "__main__":
    sys.exit(main())
