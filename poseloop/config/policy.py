"""Policy-training configuration: the config dataclasses, their validation, presets and the run's config hash.

Every field has a flag and help text (train_policy.py --help); PolicyConfig.validate() checks them all before
any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from poseloop.config import generation as generate_presets
from poseloop.config.generation import (
    EMBEDDED_SD15,
    EMBEDDED_SDXL,
    DataConfig,
    ModelConfig,
    SampleConfig,
    validate_data,
    validate_model,
    validate_sample,
)
from poseloop.config.lib import ConfigError, field, to_dict

# The algorithms poseloop.policy.algos registers (a test checks the two agree): here, so that the config and
# train_policy.py --help import no torch.
ALGORITHM_NAMES = ("ddpo", "d3po", "refl", "draft", "rlcm")
# The trainable targets and LoRA module names: here, so that the config and
# train_policy.py --help import no torch.
TARGETS = ("unet_lora", "controlnet", "controlnet_lora")
DEFAULT_LORA_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
# Every linear and conv layer of the UNet blocks (LoCon-style; kohya and ComfyUI load conv LoRAs). The
# embedded UNet has two attention levels of 32-64 channels: a LoRA on them alone barely moves the
# samples, while one on the resnets and feed-forwards too does (docs/WORLD.md has the measurement).
ALL_LORA_MODULES = (*DEFAULT_LORA_MODULES, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                    "conv1", "conv2", "conv_in", "conv_out")


# ---- configuration -------------------------------------------------------------------------------


# Sane upper bounds (see validate): DDPO's published runs sample 256-512 trajectories an epoch.
MAX_EPOCH_TRAJECTORIES = 16384
MAX_GRID_IMAGES = 64


@dataclass
class TargetConfig:
    """What is trained."""

    kind: str = field("unet_lora", help="trainable weights: a UNet LoRA (exports a LoRA file), the full ControlNet, "
                      "or a ControlNet LoRA (merged into full ControlNet weights on export)", choices=TARGETS)
    lora_rank: int = field(4, help="LoRA rank r")
    lora_alpha: float = field(4.0, help="LoRA alpha; strength = alpha / r (kept exactly in every export)")
    lora_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_MODULES),
                                    help="module names that get a LoRA (attention projections by default)")
    gradient_checkpointing: bool = field(False, help="recompute activations in the backward pass (less GPU memory)")


@dataclass
class OptimConfig:
    """Optimizer and numerics."""

    lr: float = field(3e-4, help="AdamW learning rate (DDPO's published 3e-4)")
    beta1: float = field(0.9, help="Adam beta1")
    beta2: float = field(0.999, help="Adam beta2")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    adam_eps: float = field(1e-8, help="Adam epsilon")
    max_grad_norm: float = field(1.0, help="gradient clipping norm; 0 = off")
    use_8bit_adam: bool = field(False, help="bitsandbytes 8-bit AdamW (CUDA only; needs `pip install bitsandbytes`)")
    mixed_precision: str = field("no", help="accelerate mixed precision for the training pass",
                                 choices=("no", "fp16", "bf16"))


@dataclass
class TrainConfig:
    """Epochs, batches and the DDPO objective."""

    epochs: int = field(100, help="training epochs (one sampling + update round each)")
    groups_per_epoch: int = field(4, help="(prompt, pose) groups sampled per epoch; each gets sample.images_per_group "
                                  "images (DDPO; D3PO with d3po.source=reward)")
    batch_size: int = field(4, help="trajectories (D3PO: pairs) per training minibatch")
    grad_accum: int = field(1, help="minibatches whose gradients are summed before an optimizer step")
    inner_epochs: int = field(1, help="passes over each epoch's samples (PPO epochs)")
    timestep_fraction: float = field(1.0, help="fraction of each trajectory's steps trained on (0..1]")
    first_steps: int = field(0, help="train on the first N stochastic steps only (the noisiest, where layout and "
                             "colour are decided; later steps add noise to the gradient, not signal: docs/WORLD.md); "
                             "0 = all; timestep_fraction then picks among them")
    clip_range: float = field(1e-4, help="PPO ratio clip c: r is clipped to [1-c, 1+c] (DDPO: 1e-4)")
    adv_clip_max: float = field(5.0, help="advantages are clipped to +-this (DDPO: 5)")
    stat_buffer: int = field(32, help="rewards kept per (prompt, pose) for advantage normalisation; 0 = the group's "
                             "rewards of this epoch alone (with train.shared_start: earlier visits had other starts)")
    stat_min_count: int = field(16, help="buffered rewards needed before per-prompt statistics replace batch ones")
    shared_start: bool = field(False, help="the images a group samples in an epoch start from one x_T and differ by "
                               "their step noise only (D3PO's pairs do): the group's mean reward then also removes "
                               "the start's share of the reward from each advantage (DDPO, RLCM, D3PO source reward)")
    seed: int = field(0, help="run seed: sampling seeds and shuffles are derived from (seed, epoch, index)")
    resume: bool = field(True, help="continue from the run's last checkpoint when there is one")


@dataclass
class D3POConfig:
    """D3PO: preference pairs and the loss."""

    source: str = field("db", help="db = human preferences stored by the rating app; reward = a reward picks the "
                        "winner (best) and loser (worst) among images_per_group online samples", choices=("db", "reward"))
    beta: float = field(10.0, help="D3PO beta (published: 0.1, which cannot move the loss; see docs/POLICY.md)")
    clamp_eps: float | None = field(None, help="clamp ratios to [1-eps, 1+eps] as published (0.1); none = no clamp")
    samples_dir: str = field("samples", help="samples folder with the database and the stored trajectories")
    db_url: str = field("", help="SQLAlchemy URL; empty = sqlite file <samples_dir>/feedback.sqlite")
    rounds: list[str] = field(default_factory=list, help="use preferences of these rounds only; empty = all rounds")
    pairs_per_epoch: int = field(0, help="stored pairs trained on per epoch, a fresh random subset each epoch, so "
                                 "an epoch costs the same however many pairs were rated; 0 = every pair")
    skip_unreadable: bool = field(False, help="leave out preference pairs whose trajectory file is unreadable "
                                  "(corrupt), with a warning counting them, instead of stopping")


@dataclass
class RefLConfig:
    """ReFL (ImageReward): one gradient-carrying step at a random late step, scored on its predicted x0."""

    window_start: float = field(0.75, help="earliest stop step as a fraction of sample.steps (ImageReward: 30 of "
                                "40 = 0.75); the sampler runs without gradient down to the stop step")
    window_end: float = field(1.0, help="end of the stop-step window as a fraction of sample.steps, exclusive "
                              "(ImageReward: up to step 39 of 40 = 1.0)")
    margin: float = field(2.0, help="loss = relu(margin - reward) * scale (ImageReward: 2)")
    scale: float = field(1.0, help="loss scale (ImageReward: grad_scale 1e-3; with AdamW the scale matters little)")


@dataclass
class DraftConfig:
    """DRaFT-K / AlignProp: backpropagation through the last K sampling steps into the final sample's reward."""

    k: int = field(1, help="sampling steps that carry gradient, the last K of sample.steps (DRaFT-K; K = 1 is the "
                   "cheapest); the steps before run without gradient")
    k_random: bool = field(False, help="draw K uniformly in 1..draft.k per minibatch (AlignProp's random truncation) "
                           "instead of always draft.k")
    scale: float = field(1.0, help="loss = -reward x scale (mean over the minibatch)")
    checkpointing: bool = field(True, help="gradient checkpointing of every gradient-carrying step (UNet+ControlNet "
                                "with CFG, and the VAE decode of an image reward): memory does not grow with K, "
                                "each step's forward runs twice")
    lv: int = field(0, help="DRaFT-LV: 0 = off; n > 0 = the whole chain without gradient, then n copies of the final "
                    "sample noised to the last timestep, each denoised by one step with gradient (draft.k is ignored)")


@dataclass
class OutputConfig:
    """Where checkpoints, logs and exports go."""

    root: str = field("", help="exports: <root>/<version>/ plus <root>/latest naming the newest; "
                      "empty = <model.models_dir>/policies, where generate.py --model.policy looks")
    runs_dir: str = field("", help="checkpoints, metrics.csv, plots, grids and TensorBoard logs; "
                          "empty = <model.models_dir>/policy_runs")
    run_name: str = field("", help="run folder name; empty = <algo>-<identity>: a hash of the config with the reward "
                          "models, D3PO's pairs and the parent resolved, so re-running with nothing new resumes")
    export_every: int = field(10, help="export every N epochs (and always at the end); 0 = at the end only")
    checkpoint_every: int = field(1, help="save a resumable checkpoint every N epochs (and at the end)")
    grid_every: int = field(10, help="image grid of fixed seeds/poses every N epochs (and before/after); 0 = off")
    grid_images: int = field(4, help="images in each grid (the first groups, fixed seeds)")


@dataclass
class GuardConfig:
    """Warnings (and optional early stop) against reward hacking and runaway updates."""

    max_kl: float = field(0.05, help="warn when approx KL to the sampling policy exceeds this; 0 = off")
    max_clipfrac: float = field(0.9, help="warn when the PPO clip fraction exceeds this; 0 = off")
    min_kl: float = field(1e-8, help="warn when approx KL stays below this for min_kl_epochs epochs in a row: the "
                          "policy is not moving (learning rate too low for the run's length); 0 = off. The tiny "
                          "preset's approx KL per epoch (mean over the latent's elements) is 1e-7-2e-6 at its lr "
                          "1e-3, where it learns, 2e-9 at 1e-4 and 1e-11 at 1e-5: it scales with lr^2")
    min_kl_epochs: int = field(3, help="epochs in a row below min_kl before the not-moving warning")
    heldout_reward: str = field("", help="second reward scored on the grid images (e.g. text_alignment); "
                                "a drop warns; empty = off")
    heldout_drop: float = field(0.2, help="warn when the held-out reward falls this much (relative) below its best")
    stop: bool = field(False, help="stop training (and export) when a guard fires `patience` epochs in a row")
    restore_best: bool = field(True, help="when the held-out reward stops a run, restore the weights of the epoch "
                               "with the best held-out reward (kept in memory since this process started) before "
                               "the final checkpoint and export")
    patience: int = field(2, help="consecutive epochs a guard must fire before stop applies")


@dataclass
class PolicyConfig:
    """Everything train_policy.py needs."""

    algo: str = field("ddpo", help="ddpo = policy gradient against a reward; d3po = direct preference optimisation; refl = "
                      "ImageReward's ReFL (gradient of a differentiable reward through one late step); draft = DRaFT-K / "
                      "AlignProp (gradient of the final sample's reward through the last draft.k steps); rlcm = DDPO's PPO over "
                      "LCM trajectories (needs --sample.sampler lcm; see the rlcm-faithful preset)",
                      choices=ALGORITHM_NAMES)
    reward: str = field("latest", help="reward spec for DDPO (and d3po.source=reward): latest (= latent:latest, the "
                        "learned reward model), brightness, jpeg_compressibility, pose_accuracy, text_alignment, or a "
                        "weighted mix such as 'pose_accuracy*0.5 + text_alignment*0.5'")
    parent: str = field("auto", help="the policy this run continues (its LoRA trained further; the export then holds "
                        "the whole model): auto = the newest policy under output.root made for the same base model "
                        "and target kind (none: the base model), base = start from the base model, latest, or a "
                        "version; --model.policy VERSION names it too")
    model: ModelConfig = field(default_factory=ModelConfig, help="model weights")
    sample: SampleConfig = field(default_factory=SampleConfig, help="sampler (also the training pass: CFG, eta)")
    data: DataConfig = field(default_factory=DataConfig, help="prompts and poses of online sampling")
    target: TargetConfig = field(default_factory=TargetConfig, help="trainable weights")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer")
    train: TrainConfig = field(default_factory=TrainConfig, help="training loop")
    d3po: D3POConfig = field(default_factory=D3POConfig, help="D3PO")
    refl: RefLConfig = field(default_factory=RefLConfig, help="ReFL (direct reward fine-tuning)")
    draft: DraftConfig = field(default_factory=DraftConfig, help="DRaFT-K / AlignProp (direct reward fine-tuning)")
    output: OutputConfig = field(default_factory=OutputConfig, help="outputs")
    guard: GuardConfig = field(default_factory=GuardConfig, help="guards")

    @property
    def export_root(self) -> Path:
        """Where policy versions are exported."""
        return Path(self.output.root or Path(self.model.models_dir) / "policies")

    @property
    def runs_root(self) -> Path:
        """Where run folders (checkpoints, logs, plots) live."""
        return Path(self.output.runs_dir or Path(self.model.models_dir) / "policy_runs")

    @property
    def online(self) -> bool:
        """Whether this run samples online (every algorithm but D3PO on stored human preferences)."""
        return not (self.algo == "d3po" and self.d3po.source == "db")

    def validate(self) -> None:
        """Check every field before any model loads; raise ConfigError naming the field."""
        validate_model(self.model)
        validate_sample(self.sample)
        if self.online:
            validate_data(self.data)
            if not self.reward.strip():
                raise ConfigError("reward: give a reward spec, e.g. --reward latest or --reward jpeg_compressibility")
        t, o, tr = self.target, self.optim, self.train
        if t.lora_rank < 1:
            raise ConfigError(f"target.lora_rank: must be >= 1 (got {t.lora_rank})")
        if not t.lora_alpha > 0:
            raise ConfigError(f"target.lora_alpha: must be > 0 (got {t.lora_alpha})")
        if t.kind != "controlnet" and not t.lora_modules:
            raise ConfigError("target.lora_modules: name at least one module, e.g. to_q to_k to_v to_out.0")
        if not o.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0 (got {o.lr})")
        if o.max_grad_norm < 0:
            raise ConfigError(f"optim.max_grad_norm: must be >= 0 (got {o.max_grad_norm})")
        for name in ("epochs", "groups_per_epoch", "batch_size", "grad_accum", "inner_epochs", "stat_min_count"):
            if getattr(tr, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1 (got {getattr(tr, name)})")
        # An epoch's trajectories are held in memory together: bound them before a typo ends in a MemoryError.
        if tr.groups_per_epoch * self.sample.images_per_group > MAX_EPOCH_TRAJECTORIES:
            raise ConfigError(f"train.groups_per_epoch: {tr.groups_per_epoch} groups x {self.sample.images_per_group} "
                              f"images is above {MAX_EPOCH_TRAJECTORIES} trajectories an epoch, which are held in "
                              "memory together; use fewer groups and more epochs")
        if self.output.grid_images > MAX_GRID_IMAGES:
            raise ConfigError(f"output.grid_images: must be <= {MAX_GRID_IMAGES} (got {self.output.grid_images})")
        if tr.stat_buffer < 0:
            raise ConfigError(f"train.stat_buffer: must be >= 0, 0 = this epoch's rewards of the group (got "
                              f"{tr.stat_buffer})")
        if not 0 < tr.timestep_fraction <= 1:
            raise ConfigError(f"train.timestep_fraction: must be in (0, 1] (got {tr.timestep_fraction})")
        if tr.first_steps < 0:
            raise ConfigError(f"train.first_steps: must be >= 0, 0 = every step (got {tr.first_steps})")
        if not tr.clip_range > 0 or not tr.adv_clip_max > 0:
            raise ConfigError("train.clip_range and train.adv_clip_max: must be > 0")
        if self.algo == "d3po":
            if not self.d3po.beta > 0:
                raise ConfigError(f"d3po.beta: must be > 0 (got {self.d3po.beta})")
            if self.d3po.pairs_per_epoch < 0:
                raise ConfigError(f"d3po.pairs_per_epoch: must be >= 0 (got {self.d3po.pairs_per_epoch}); 0 = every pair")
            if self.d3po.clamp_eps is not None and not 0 < self.d3po.clamp_eps < 1:
                raise ConfigError(f"d3po.clamp_eps: must be in (0, 1) or none (got {self.d3po.clamp_eps})")
            if self.d3po.source == "reward" and self.sample.images_per_group < 2:
                raise ConfigError("sample.images_per_group: d3po.source=reward needs >= 2 images per group to pick a "
                                  "winner and a loser")
        if self.algo == "rlcm" and self.sample.sampler != "lcm":
            raise ConfigError(f"sample.sampler: --algo rlcm trains latent consistency model trajectories (got "
                              f"{self.sample.sampler!r}); pass --sample.sampler lcm, or --preset rlcm-faithful")
        if self.sample.sampler == "lcm":
            if self.algo in ("refl", "draft"):
                raise ConfigError(f"sample.sampler: --algo {self.algo} steps with DDIM; use --sample.sampler ddim, or "
                                  "--algo rlcm / ddpo / d3po for LCM trajectories")
            if self.sample.steps < 2:
                raise ConfigError(f"sample.steps: the LCM sampler's last step returns its denoised latent "
                                  f"(deterministic, nothing to train), so training needs >= 2 steps (got "
                                  f"{self.sample.steps}); RLCM used 8")
        if self.algo == "refl":
            r = self.refl
            if not 0 <= r.window_start < r.window_end <= 1:
                raise ConfigError(f"refl.window_start/window_end: need 0 <= start < end <= 1 (got {r.window_start}, "
                                  f"{r.window_end})")
            if not r.scale > 0:
                raise ConfigError(f"refl.scale: must be > 0 (got {r.scale})")
        if self.algo == "draft":
            if not 1 <= self.draft.k <= self.sample.steps:
                raise ConfigError(f"draft.k: must be in 1..sample.steps ({self.sample.steps}) (got {self.draft.k}); "
                                  "K = 1 is the cheapest")
            if not self.draft.scale > 0:
                raise ConfigError(f"draft.scale: must be > 0 (got {self.draft.scale})")
            if self.draft.lv < 0:
                raise ConfigError(f"draft.lv: must be >= 0 (got {self.draft.lv}); 0 = plain DRaFT-K, n = DRaFT-LV with n "
                                  "copies")
        if self.guard.min_kl < 0 or self.guard.min_kl_epochs < 1:
            raise ConfigError("guard.min_kl must be >= 0 and guard.min_kl_epochs >= 1")
        for name in ("export_every", "checkpoint_every", "grid_every", "grid_images"):
            if getattr(self.output, name) < 0:
                raise ConfigError(f"output.{name}: must be >= 0")
        if not self.parent.strip() or os.sep in self.parent or self.parent.startswith("."):
            raise ConfigError(f"parent: {self.parent!r} must be auto, base, latest or a policy version (a folder name "
                              "under output.root)")
        if self.output.run_name and (os.sep in self.output.run_name or self.output.run_name.startswith(".")):
            raise ConfigError(f"output.run_name: {self.output.run_name!r} must be a plain folder name")


# ---- presets -------------------------------------------------------------------------------------


def tiny() -> PolicyConfig:
    """The embedded pose world on a CPU: generate.py's size and steps, settings that move the policy in minutes.

    The published DDPO settings (lr 3e-4, clip 1e-4) do not visibly move a LoRA in a CPU-sized run
    (tiny-faithful keeps them); these take larger steps, and D3PO trains on a fresh subset of the
    rated pairs each epoch so an epoch costs about what a DDPO epoch does.
    """
    cfg = PolicyConfig()
    cfg.reward = "jpeg_compressibility"
    base = generate_presets.tiny()
    # The same weights, size and steps as generate.py: a reward model fitted on its rounds' latents
    # scores exactly the latents DDPO samples, and D3PO re-scores trajectories of that shape.
    cfg.model, cfg.sample = base.model, base.sample
    cfg.sample.batch_size = 16
    cfg.target.lora_modules = list(ALL_LORA_MODULES)
    # One x_T per group (its baseline then removes the start's share of the reward) and only the first 4 steps
    # (later ones add noise, not signal) turn a 32-trajectory gradient from noise into signal (docs/WORLD.md).
    cfg.train.epochs = 8
    cfg.train.groups_per_epoch = 8  # 32 trajectories an epoch
    cfg.train.shared_start = True
    cfg.train.first_steps, cfg.train.timestep_fraction = 4, 1.0
    cfg.train.batch_size = 4  # 8 optimizer steps per epoch
    # With this gradient 2e-3 over-optimised a learned reward model (its score rose, the rater's statistic did not).
    cfg.optim.lr = 1e-3
    cfg.train.clip_range = 0.2
    # The baseline is this epoch's images of the group alone: they share a start, which earlier visits do not.
    cfg.train.stat_buffer = 0
    # 8 epochs x 16 pairs: 128 of a 144-pair round.
    cfg.d3po.pairs_per_epoch = 16
    # These steps are ~10x the published ones, and so is the KL per epoch: runs that learned stayed under about 3,
    # a collapsing run passed 14; 5 stays quiet on a good run and fires on a runaway.
    cfg.guard.max_kl = 5.0
    cfg.output.export_every = cfg.output.grid_every = 4
    return cfg


def tiny_on(model_dir: str, out_dir: str, threads: int = 0) -> PolicyConfig:
    """The tiny preset on a model folder (with its controlnet/), runs kept under out_dir, no grids or exports, each
    run from the base model: what benchmarks and experiments start from."""
    cfg = tiny()
    cfg.model.base, cfg.model.controlnet, cfg.model.threads = str(model_dir), f"{model_dir}/controlnet", threads
    cfg.output.root, cfg.output.runs_dir = f"{out_dir}/policies", f"{out_dir}/runs"
    cfg.output.grid_every = cfg.output.export_every = 0
    cfg.parent = "base"  # an experiment measures one run against the base model, not a chain of earlier ones
    return cfg


def tiny_rlcm() -> PolicyConfig:
    """RLCM on the embedded world's LCM (its distilled LCM-LoRA fused in): 4 LCM steps, no CFG pass, the tiny
    preset's training settings, every stochastic step trained (a 4-step trajectory has 3)."""
    cfg = tiny()
    cfg.algo = "rlcm"
    cfg.model.lcm_lora = generate_presets.EMBEDDED_LCM_LORA
    cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale = "lcm", 4, 1.0
    # The tiny preset's recipe (one start per group, this epoch's baseline; all 3 stochastic steps are among the
    # first 4) at the lr RLCM learned with in 8 epochs.
    cfg.optim.lr = 2e-3
    return cfg


# Where the embedded world leaves a pose reward room to gain: its OKS is 0.76 at this ControlNet scale with the
# LCM (0.94 at 1.0, against its detector's 0.98 on true renders).
POSE_SCALE = 0.4


def pose_and_prompt_reward(detector: str) -> str:
    """The reward spec of tiny-rlcm-pose: the world's pose accuracy with its prompt's colours kept, half each."""
    return f"0.5*pose_accuracy:weights={detector} + 0.5*prompt_attributes"


def tiny_rlcm_pose() -> PolicyConfig:
    """RLCM on the embedded world's pose accuracy, training the ControlNet (a LoRA on it) at ControlNet scale 0.4."""
    cfg = tiny_rlcm()
    # As the pose-ControlNet RL reference pairs its pose reward with text alignment: pose accuracy alone cost some
    # of the prompt's colours, half weight on them kept the colours at the same OKS gain (docs/RESULTS.md).
    cfg.reward = pose_and_prompt_reward(f"{EMBEDDED_SD15}/pose_detector")
    cfg.sample.controlnet_scale = POSE_SCALE
    # The pose-ControlNet RL reference trains the ControlNet, not the UNet: here a UNet LoRA gained unreliably and a
    # ControlNet LoRA at 4e-3 on every seed tried. The preset's LoCon modules match the ControlNet's too.
    cfg.target.kind = "controlnet_lora"
    cfg.optim.lr = 4e-3
    # 64 trajectories (16 groups x 4) per optimizer step, one step an epoch: with 4 a step Adam followed the noise.
    cfg.train.groups_per_epoch, cfg.train.grad_accum = 16, 16
    return cfg


def tiny_sdxl() -> PolicyConfig:
    """The embedded tiny SDXL-architecture model."""
    cfg = tiny()
    cfg.model.arch = "sdxl"
    cfg.model.base, cfg.model.controlnet = EMBEDDED_SDXL, f"{EMBEDDED_SDXL}/controlnet"
    return cfg


def tiny_faithful() -> PolicyConfig:
    """The tiny model with the published settings (DDPO lr 3e-4, clip 1e-4; D3PO beta 0.1, clamp 0.1)."""
    cfg = tiny()
    # Every image its own x_T, every stochastic step, a running per-group baseline: DDPO as published.
    cfg.train.shared_start, cfg.train.first_steps, cfg.train.timestep_fraction = False, 0, 1.0
    cfg.train.stat_buffer, cfg.train.stat_min_count = 16, cfg.sample.images_per_group
    cfg.optim.lr, cfg.train.clip_range = 3e-4, 1e-4
    cfg.target.lora_modules = list(DEFAULT_LORA_MODULES)
    cfg.d3po.beta, cfg.d3po.clamp_eps = 0.1, 0.1
    cfg.refl.margin, cfg.refl.scale = 2.0, 1e-3
    cfg.guard.max_kl = GuardConfig().max_kl  # published steps, published-size KL
    return cfg


def sd15() -> PolicyConfig:
    """SD1.5 + OpenPose ControlNet at 512 px with DDPO's published settings (one 16-24 GB GPU)."""
    cfg = PolicyConfig()
    base = generate_presets.sd15()
    cfg.model, cfg.sample = base.model, base.sample  # the same weights and size as generate.py --preset sd15
    cfg.sample.steps, cfg.sample.eta, cfg.sample.guidance_scale = 50, 1.0, 5.0
    cfg.sample.batch_size = 8
    cfg.train.groups_per_epoch = 8  # 8 groups x 4 images = 32 trajectories per epoch, split over the processes
    cfg.train.batch_size, cfg.train.grad_accum = 2, 8
    cfg.optim.mixed_precision = "fp16"
    cfg.optim.lr = 3e-4
    cfg.d3po.beta = 10.0
    return cfg


def sd15_faithful() -> PolicyConfig:
    """SD1.5 with every published default, D3PO included (beta 0.1, clamp 0.1): reproduces the papers."""
    cfg = sd15()
    cfg.d3po.beta, cfg.d3po.clamp_eps = 0.1, 0.1
    cfg.refl.margin, cfg.refl.scale = 2.0, 1e-3
    cfg.optim.lr = 3e-4
    return cfg


def sdxl() -> PolicyConfig:
    """SDXL + OpenPose ControlNet at 1024 px; gradient checkpointing so it fits one 24 GB GPU."""
    cfg = sd15()
    base = generate_presets.sdxl()
    cfg.model = base.model
    cfg.sample.width, cfg.sample.height = base.sample.width, base.sample.height
    cfg.sample.batch_size = 2
    cfg.train.batch_size, cfg.train.grad_accum = 1, 16
    cfg.target.gradient_checkpointing = True
    return cfg


def rlcm_faithful() -> PolicyConfig:
    """RLCM's published settings (Owen-Oertell/rlcm, aesthetic task) on an LCM with the OpenPose ControlNet.

    LCM_Dreamshaper_v7 (an LCM distilled with a guidance embedding: w = 8 - 1 as timestep_cond, no CFG
    pass), 8 LCM steps, PPO clip 1e-4, advantages clipped to +-10, per-prompt stat tracker, lr 1e-4,
    LoRA on to_q/to_k/to_v/to_out.0. The timestep grid is diffusers' (8 steps end at 139, RLCM's at 159).
    """
    cfg = sd15()
    cfg.algo = "rlcm"
    cfg.model.base = "SimianLuo/LCM_Dreamshaper_v7"
    cfg.sample.sampler, cfg.sample.steps, cfg.sample.guidance_scale = "lcm", 8, 8.0
    cfg.train.clip_range, cfg.train.adv_clip_max = 1e-4, 10.0
    cfg.optim.lr = 1e-4
    cfg.target.lora_modules = list(DEFAULT_LORA_MODULES)
    cfg.target.lora_rank, cfg.target.lora_alpha = 8, 8.0  # RLCM: r 8-16; alpha = r keeps strength 1
    cfg.train.timestep_fraction = 1.0
    return cfg


PRESETS: dict[str, Callable[[], PolicyConfig]] = {
    "tiny": tiny, "tiny-rlcm": tiny_rlcm, "tiny-rlcm-pose": tiny_rlcm_pose, "tiny-sdxl": tiny_sdxl,
    "tiny-faithful": tiny_faithful,
    "sd15": sd15, "sd15-faithful": sd15_faithful, "sdxl": sdxl,
    "rlcm-faithful": rlcm_faithful,
}


def config_hash(cfg: PolicyConfig) -> str:
    """Hash of what determines a run's trajectory (not its length or where outputs go)."""
    d = to_dict(cfg)
    d["train"].pop("epochs")
    d["train"].pop("resume")
    d.pop("output")
    d.pop("guard")
    d.pop("parent")  # a run's identity adds the resolved parent (poseloop.policy.lineage), not this reference
    for algo in ("refl", "draft"):
        if cfg.algo != algo:
            d.pop(algo)  # an algorithm's own section does not change another algorithm's run
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]
