"""The part processes of bench/gpu_check.py: each builds, samples or trains in its own process (its peak
memory is its own; a crash stops only that part) and emits one JSON line per result."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("a dancer in a red dress, studio photo", "an astronaut in a white suit on the moon")
POSES = ("standing", "arms_raised")
PUBLISHED_CLIP = 1e-4  # DDPO's published PPO clip range
GOAL_MEM_GB = 10.0  # SD1.5 LoRA DDPO peak GPU memory (torch.cuda.max_memory_allocated, 1e9 bytes)
GOAL_GPU_S_PER_SAMPLE = 4.5
SAMPLER_TARGET = 1.05  # bench_sampler.py's target (issue 14): ours/diffusers time
POLICY_TARGET = 0.70  # bench_policy.py's target (issue 14): ours/trl time


# ---- shared helpers (both the parent and the part processes) --------------------------------------


def emit(row: dict[str, Any], results: Path | None) -> None:
    """Print one result as a JSON line and append it to the results file (survives a killed part)."""
    line = json.dumps(row, default=str)
    print(line, flush=True)
    if results is not None:
        with results.open("a") as f:
            f.write(line + "\n")


def fmt(value: Any) -> str:
    """Compact text for the summary table."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)



class Brightness:
    """Mean pixel value: a cheap image reward, as bench_policy.py uses (random weights: any reward will do)."""

    name, needs_images = "brightness", True

    def __call__(self, images: Any, latents: Any, prompts: list[str], metadata: list[dict[str, Any]]) -> Any:
        """Score [B] from images [B, 3, H, W] in 0..1."""
        return images.mean(dim=(1, 2, 3))


class Part:
    """Context of one part process: arguments, deadline, device helpers, result output."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Set thread counts and check the device before any model work."""
        import torch

        self.args = args
        self.cuda = args.device == "cuda"
        # Explicit thread count: torch's default of every core made shared CPUs several times slower.
        torch.set_num_threads(args.threads)
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
        self.results = Path(args.results) if args.results else None
        self.models = Path(args.models)

    def left(self) -> float:
        """Seconds until this part's deadline."""
        return self.args.deadline - time.time()

    def sync(self) -> None:
        """Wait for queued GPU work, so that wall-clock times measure it."""
        import torch

        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        """(seconds, result) of fn() with the GPU synchronised on both ends."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out

    def reset_peak(self) -> None:
        """Start a fresh peak-memory window."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict[str, float]:
        """Peak memory since the last reset: GPU allocated/reserved (GB = 1e9 bytes), or process RSS on CPU."""
        import torch

        if self.cuda:
            return {"peak_alloc_gb": torch.cuda.max_memory_allocated() / 1e9,
                    "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9}
        return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}

    def emit(self, row: dict[str, Any]) -> None:
        """One result line, tagged with the part, architecture and device."""
        emit({"part": self.args.part, "arch": self.args.arch, "device": self.args.device,
              "tiny": self.args.tiny, **row}, self.results)

    def model_config(self) -> Any:
        """poseloop ModelConfig for the models folder: fp16 on CUDA (dtype auto), offline."""
        from poseloop.config.generation import ModelConfig

        return ModelConfig(arch=self.args.arch, base=str(self.models), controlnet=str(self.models / "controlnet"),
                           device=self.args.device, threads=self.args.threads, local_files_only=True)

    def policy_config(self, algo: str) -> Any:
        """The sd15 (or sdxl) policy preset on the models folder, sized by the command line."""
        from poseloop.config import policy as policy_presets

        a = self.args
        cfg = policy_presets.sdxl() if a.arch == "sdxl" else policy_presets.sd15()
        cfg.algo = algo
        cfg.model = self.model_config()  # also drops the sdxl preset's hub VAE: the random VAE is in the folder
        cfg.sample.steps = a.steps
        cfg.sample.width = cfg.sample.height = a.size
        cfg.data.prompts, cfg.data.poses = list(PROMPTS), list(POSES)
        # fp16 autocast needs a GPU; on the CPU the same code runs without mixed precision.
        cfg.optim.mixed_precision = "fp16" if self.cuda else "no"
        # Set, not inherited: a changed preset default must not silently change what this measures.
        cfg.train.clip_range = PUBLISHED_CLIP
        tmp = tempfile.mkdtemp(prefix="gpu-check-runs-")
        cfg.output.root, cfg.output.runs_dir = f"{tmp}/policies", f"{tmp}/runs"
        cfg.output.grid_every = cfg.output.export_every = 0
        cfg.guard.heldout_reward = ""
        return cfg


def clip_tokenizer(wheel_dir: Path | None, pad_token: str) -> Any:
    """CLIP's tokenizer offline: the carried vocab/merges files, else derived from open_clip's BPE table."""
    from transformers import CLIPTokenizer

    folder = wheel_dir / "clip_tokenizer" if wheel_dir else None
    if folder is None or not (folder / "vocab.json").is_file():
        from poseloop.models.embedded import write_clip_tokenizer_files  # needs open_clip_torch

        folder = Path(tempfile.mkdtemp(prefix="clip-tokenizer-"))
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def part_build(p: Part) -> None:
    """Random-weight models from the shipped configs, saved with save_pretrained into the models folder."""
    import diffusers
    import torch
    import transformers
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    a = p.args
    cfg_dir = ROOT / "poseloop" / "configs" / a.configs
    dtype = torch.float16 if p.cuda else torch.float32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    # Initialised straight on the device: an 860M-parameter UNet takes seconds there, minutes on 2 CPU cores.
    with torch.device(a.device):
        modules: dict[str, Any] = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(cfg_dir / "unet")),
            "controlnet": ControlNetModel.from_config(ControlNetModel.load_config(cfg_dir / "controlnet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(cfg_dir / "vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(cfg_dir / "text_encoder")),
        }
        if a.arch == "sdxl":
            modules["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(cfg_dir / "text_encoder_2"))
    for m in modules.values():
        m.to(dtype)
    p.sync()
    t_init = time.perf_counter() - t0
    sched_cfg = json.loads((cfg_dir / "scheduler" / "scheduler_config.json").read_text())
    # The scheduler class the real checkpoint names (PNDM / Euler); load_components switches to DDIM.
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    wheels = Path(a.wheels) if a.wheels else None
    if a.arch == "sdxl":
        pipe: Any = diffusers.StableDiffusionXLControlNetPipeline(
            tokenizer=clip_tokenizer(wheels, "<|endoftext|>"), tokenizer_2=clip_tokenizer(wheels, "!"),
            scheduler=scheduler, force_zeros_for_empty_prompt=True, **modules)
    else:
        pipe = diffusers.StableDiffusionControlNetPipeline(
            tokenizer=clip_tokenizer(wheels, "<|endoftext|>"), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False, **modules)
    t1 = time.perf_counter()
    pipe.save_pretrained(p.models)
    t_save = time.perf_counter() - t1
    size = sum(f.stat().st_size for f in p.models.rglob("*") if f.is_file())
    p.emit({"metric": "models", "configs": a.configs, "dtype": str(dtype).replace("torch.", ""),
            "params_m": {k: round(sum(x.numel() for x in m.parameters()) / 1e6, 1) for k, m in modules.items()},
            "init_s": t_init, "save_s": t_save, "disk_gb": size / 1e9,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(0) if p.cuda else "", "python": sys.version.split()[0]})


def pose_images(size: int, n: int) -> list[Any]:
    """n OpenPose condition images of the built-in poses, size x size."""
    from poseloop.data.openpose import render_pose
    from poseloop.data.poses import get_builtin_pose

    rendered = [render_pose(get_builtin_pose(name), size, size) for name in POSES]
    return [rendered[i % len(rendered)] for i in range(n)]


def part_sampler(p: Part) -> None:
    """Our sampler vs diffusers' pipeline on the same loaded model; interleaved, alternating order."""
    import numpy as np
    import torch

    from poseloop.config.generation import SampleConfig
    from poseloop.models.loading import load_components
    from poseloop.sampling.sampler import sample

    a = p.args
    t_load, comp = p.timed(lambda: load_components(p.model_config()))
    comp.pipe.set_progress_bar_config(disable=True)
    s = SampleConfig(steps=a.steps, eta=1.0, guidance_scale=5.0, controlnet_scale=1.0, batch_size=a.batch)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(a.batch)]
    controls = pose_images(a.size, a.batch)
    seeds = list(range(a.batch))

    def ours() -> list[Any]:
        return sample(comp, prompts, controls, seeds, s, a.size, a.size).images

    def theirs() -> list[Any]:
        gens = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]  # the same noise streams as ours
        with torch.no_grad():
            out = comp.pipe(prompt=prompts, negative_prompt=[s.negative_prompt] * a.batch, image=controls,
                            num_inference_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta,
                            controlnet_conditioning_scale=s.controlnet_scale, height=a.size, width=a.size,
                            generator=gens, output_type="pil")
        return list(out.images)

    p.reset_peak()
    w_ours, img_ours = p.timed(ours)  # warm-up: kernel selection, allocator growth
    w_theirs, img_theirs = p.timed(theirs)
    diff = float(np.mean([np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).mean()
                          for x, y in zip(img_ours, img_theirs)]))
    times: dict[str, list[float]] = {"ours": [], "diffusers": []}
    ratios: list[float] = []
    note = ""
    for r in range(a.repeats):
        if p.left() < 1.5 * (w_ours + w_theirs):
            note = f"stopped after {r} of {a.repeats} repeats: part time budget"
            break
        # Alternate which goes first so that a slow phase of the machine favours neither.
        order = [("ours", ours), ("diffusers", theirs)] if r % 2 == 0 else [("diffusers", theirs), ("ours", ours)]
        got = {name: p.timed(fn)[0] for name, fn in order}
        for name in times:
            times[name].append(got[name])
        ratios.append(got["ours"] / got["diffusers"])
    if not ratios:  # no time for a repeat: report the warm-up (labelled as such)
        times, ratios = {"ours": [w_ours], "diffusers": [w_theirs]}, [w_ours / w_theirs]
        note = note or "warm-up only"
    med_o, med_d = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    p.emit({"metric": "sampler", "steps": a.steps, "batch": a.batch, "size": a.size,
            "ours_s_per_batch": med_o, "diffusers_s_per_batch": med_d,
            "ours_images_per_s": a.batch / med_o, "diffusers_images_per_s": a.batch / med_d,
            "ratio_ours_over_diffusers": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "repeats": len(ratios), "warmup_s": {"ours": w_ours, "diffusers": w_theirs},
            "mean_abs_pixel_diff": diff, "load_s": t_load, "dtype": str(comp.dtype), **p.memory(),
            "target": f"<= {SAMPLER_TARGET}", "note": note})


def run_epochs(p: Part, epoch_fn: Callable[[int], dict[str, float]], max_epochs: int = 2
               ) -> list[tuple[float, dict[str, float]]]:
    """Epoch 0, then more while the part's budget allows; (seconds, stats) of each."""
    done: list[tuple[float, dict[str, float]]] = []
    for epoch in range(max_epochs):
        if done and p.left() < 1.3 * done[-1][0] + 5:
            break
        done.append(p.timed(lambda: epoch_fn(epoch)))
    return done


def part_ddpo(p: Part) -> None:
    """One (or two) DDPO epochs of the sd15 preset: clip fraction, memory, GPU-seconds per sample."""
    from poseloop.policy.trainer import PolicyTrainer

    a = p.args
    cfg = p.policy_config("ddpo")
    per_group = max(1, a.samples // 2)
    cfg.train.groups_per_epoch, cfg.sample.images_per_group = 2, per_group
    cfg.sample.batch_size = min(cfg.sample.batch_size, 2 * per_group)
    # Two optimizer steps per epoch, as the preset makes (32 trajectories, minibatch 2, accumulation 8):
    # the second half of the epoch then runs on updated weights, as in a real run.
    cfg.train.grad_accum = max(1, (2 * per_group) // (2 * cfg.train.batch_size))
    t_load, trainer = p.timed(lambda: PolicyTrainer(cfg, reward=Brightness(), progress=False))
    p.reset_peak()
    epochs = run_epochs(p, trainer.algorithm.epoch)
    n = 2 * per_group
    first_s, first = epochs[0]
    steady_s = epochs[-1][0] if len(epochs) > 1 else first_s
    row = {"metric": "ddpo", "steps": a.steps, "size": a.size, "samples_per_epoch": n,
           "train_batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
           "mixed_precision": cfg.optim.mixed_precision, "clip_range": cfg.train.clip_range,
           "lora_modules": list(cfg.target.lora_modules), "gradient_checkpointing": cfg.target.gradient_checkpointing,
           "first_epoch_clipfrac": first.get("clipfrac"), "first_epoch_approx_kl": first.get("approx_kl"),
           "first_step_max_abs_ratio_minus_1": getattr(trainer, "first_ratio", None),
           "first_epoch_s": first_s, "first_epoch_sample_s": first.get("sample_seconds"),
           "epochs_timed": len(epochs), "s_per_sample": steady_s / n,
           "s_per_sample_source": "second epoch" if len(epochs) > 1 else "first epoch (includes warm-up)",
           "load_s": t_load, **p.memory(),
           "reward_mean": first.get("reward_mean"), "reward_std": first.get("reward_std")}
    if p.cuda and a.arch == "sd15" and not a.tiny:
        row["goal_mem"] = f"<= {GOAL_MEM_GB} GB: {'PASS' if row['peak_alloc_gb'] <= GOAL_MEM_GB else 'FAIL'}"
        row["goal_speed"] = (f"< {GOAL_GPU_S_PER_SAMPLE} GPU-s/sample at {a.steps} steps: "
                             f"{'PASS' if row['s_per_sample'] < GOAL_GPU_S_PER_SAMPLE else 'FAIL'}")
    p.emit(row)


def part_d3po(p: Part) -> None:
    """One D3PO epoch with a reward picking each group's winner and loser: seconds per pair."""
    from poseloop.policy.trainer import PolicyTrainer

    a = p.args
    cfg = p.policy_config("d3po")
    cfg.d3po.source = "reward"  # online pairs: no database needed
    pairs = max(1, a.samples // 2)
    cfg.sample.images_per_group, cfg.train.groups_per_epoch = 2, pairs
    cfg.sample.batch_size = min(cfg.sample.batch_size, 2 * pairs)
    cfg.train.grad_accum = 1
    t_load, trainer = p.timed(lambda: PolicyTrainer(cfg, reward=Brightness(), progress=False))
    p.reset_peak()
    epochs = run_epochs(p, trainer.algorithm.epoch)
    first_s, first = epochs[0]
    steady_s = epochs[-1][0] if len(epochs) > 1 else first_s
    p.emit({"metric": "d3po", "steps": a.steps, "size": a.size, "pairs_per_epoch": pairs,
            "pair_batch": cfg.train.batch_size, "mixed_precision": cfg.optim.mixed_precision, "beta": cfg.d3po.beta,
            "first_epoch_s": first_s, "epochs_timed": len(epochs), "s_per_pair": steady_s / pairs,
            "s_per_pair_source": "second epoch" if len(epochs) > 1 else "first epoch (includes warm-up)",
            "includes": "sampling 2 images per pair, reference log-probs, D3PO update",
            "first_epoch_loss": first.get("loss"), "load_s": t_load, **p.memory()})


def part_policy_ours(p: Part) -> None:
    """bench_policy.py's 'ours' row at this size: our DDPO with exactly the settings trl gets."""
    from poseloop.config.policy import DEFAULT_LORA_MODULES
    from poseloop.policy.trainer import PolicyTrainer

    a = p.args
    cfg = p.policy_config("ddpo")
    per_group = max(1, a.samples // 2)
    cfg.train.groups_per_epoch, cfg.sample.images_per_group = 2, per_group
    n = 2 * per_group
    cfg.sample.batch_size = n  # trl: sample_batch_size
    cfg.sample.controlnet_scale = 0.0  # trl runs a plain pipeline; at scale 0 ours skips the ControlNet
    cfg.target.kind, cfg.target.lora_rank, cfg.target.lora_alpha = "unet_lora", 4, 4.0  # trl's LoRA
    cfg.target.lora_modules = list(DEFAULT_LORA_MODULES)
    cfg.target.gradient_checkpointing = False
    cfg.optim.lr = 3e-4
    cfg.train.timestep_fraction, cfg.train.inner_epochs = 1.0, 1
    cfg.train.batch_size, cfg.train.grad_accum = 2, max(1, n // 2)  # one optimizer step per epoch, as trl below
    cfg.train.stat_buffer, cfg.train.stat_min_count = 16, 8
    t_load, trainer = p.timed(lambda: PolicyTrainer(cfg, reward=Brightness(), progress=False))
    p.reset_peak()
    epochs = run_epochs(p, trainer.algorithm.epoch)
    secs = epochs[-1][0]
    p.emit({"metric": "policy", "side": "ours", "steps": a.steps, "size": a.size, "samples_per_epoch": n,
            "s_per_sample": secs / n, "source": "second epoch" if len(epochs) > 1 else "first epoch (warm-up)",
            "first_epoch_s": epochs[0][0], "load_s": t_load, **p.memory()})


def plain_pipeline_dir(models: Path) -> Path:
    """A StableDiffusionPipeline folder (what trl loads) sharing the models folder's components via symlinks."""
    plain = Path(tempfile.mkdtemp(prefix="gpu-check-plain-"))
    index = json.loads((models / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionPipeline"
    index.pop("controlnet", None)
    (plain / "model_index.json").write_text(json.dumps(index, indent=2))
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (plain / name).symlink_to((models / name).resolve(), target_is_directory=True)
    return plain


def part_policy_trl(p: Part) -> None:
    """trl's DDPOTrainer (0.23.1, bench_policy.py's peer) on the same UNet/VAE/text encoder."""
    import torch

    try:
        from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline
    except Exception as e:  # noqa: BLE001 (any import failure means: peer absent or broken)
        p.emit({"metric": "policy", "side": "trl", "error": f"trl not importable ({type(e).__name__}: {e})"})
        return
    import trl

    a = p.args
    n = 2 * max(1, a.samples // 2)
    if not p.cuda:
        from accelerate import PartialState

        PartialState(cpu=True)  # trl's pipeline logs through accelerate before its trainer creates the state
    t0 = time.perf_counter()
    pipeline = DefaultDDPOStableDiffusionPipeline(str(plain_pipeline_dir(p.models)), use_lora=True)
    cfg = DDPOConfig(num_epochs=2, sample_num_steps=a.steps, sample_eta=1.0, sample_guidance_scale=5.0,
                     sample_batch_size=n, sample_num_batches_per_epoch=1, train_batch_size=2,
                     train_gradient_accumulation_steps=max(1, n // 2), train_timestep_fraction=1.0,
                     train_num_inner_epochs=1, train_learning_rate=3e-4, train_clip_range=PUBLISHED_CLIP,
                     mixed_precision="fp16" if p.cuda else "no", log_with=None, per_prompt_stat_tracking=True,
                     per_prompt_stat_tracking_buffer_size=16, per_prompt_stat_tracking_min_count=8,
                     save_freq=10**6, logdir=tempfile.mkdtemp(), accelerator_kwargs={} if p.cuda else {"cpu": True})
    counter = {"i": 0}

    def prompt_fn() -> tuple[str, dict[str, Any]]:
        counter["i"] += 1
        return PROMPTS[counter["i"] % len(PROMPTS)], {}

    def reward_fn(images: Any, prompts: Any, metadata: Any) -> tuple[Any, dict[str, Any]]:
        return images.float().mean(dim=(1, 2, 3)), {}

    trainer = DDPOTrainer(cfg, reward_fn, prompt_fn, pipeline)
    p.sync()
    t_load = time.perf_counter() - t0
    torch.set_num_threads(a.threads)  # trl's accelerate setup may change it; keep the explicit count
    p.reset_peak()
    state = {"step": 0}

    def epoch(e: int) -> dict[str, float]:
        state["step"] = trainer.step(e, state["step"])
        return {}

    epochs = run_epochs(p, epoch)
    secs = epochs[-1][0]
    p.emit({"metric": "policy", "side": "trl", "trl": trl.__version__, "steps": a.steps, "size": a.size,
            "samples_per_epoch": n, "s_per_sample": secs / n,
            "source": "second epoch" if len(epochs) > 1 else "first epoch (warm-up)", "first_epoch_s": epochs[0][0],
            "allow_tf32": cfg.allow_tf32, "load_s": t_load, **p.memory()})


PART_FUNCS: dict[str, Callable[[Part], None]] = {
    "build": part_build, "sampler": part_sampler, "ddpo": part_ddpo, "d3po": part_d3po,
    "policy_ours": part_policy_ours, "policy_trl": part_policy_trl,
}


def run_part(args: argparse.Namespace) -> int:
    """Entry point of a part process: run it, turn any exception into an error row."""
    try:
        PART_FUNCS[args.part](Part(args))
    except Exception as e:  # noqa: BLE001 (the parent reports it and goes on with the next part)
        import traceback

        traceback.print_exc()
        emit({"part": args.part, "arch": args.arch, "device": args.device, "tiny": args.tiny,
              "error": f"{type(e).__name__}: {str(e)[:600]}"}, Path(args.results) if args.results else None)
        return 1
    return 0
