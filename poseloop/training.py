"""Policy training: DDPO against any reward and D3PO from human preferences (or a reward model).

Both algorithms treat every DDIM step of the shared sampler as a Gaussian policy step and train a
UNet LoRA or the ControlNet (poseloop.policy). One epoch of DDPO = sample a batch of trajectories
with the current policy, score them, normalise rewards per (prompt, pose) group, then several PPO
passes over a fraction of each trajectory's steps. One epoch of D3PO = one pass over the preferred
/ dispreferred trajectory pairs (from the database, or chosen by a reward among K online samples).

Everything a resumed run needs is in <runs_dir>/<run>/checkpoint (weights, optimizer, stat
tracker, RNG states, counters, history); sampling seeds and shuffles are pure functions of
(run seed, epoch, index), so N epochs straight and N/2 + resume + N/2 give identical weights.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from poseloop.config import (
    EMBEDDED_SD15,
    EMBEDDED_SDXL,
    DataConfig,
    ModelConfig,
    SampleConfig,
    validate_data,
    validate_model,
    validate_sample,
)
from poseloop import config as generate_presets
from poseloop.configlib import ConfigError, field, to_dict
from poseloop.inputs import InputError
from poseloop.models import resolve_device
from poseloop.policy import ALL_LORA_MODULES, DEFAULT_LORA_MODULES, TARGETS
from poseloop.sampling import pil_to_tensor

# ---- configuration -------------------------------------------------------------------------------


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
    clip_range: float = field(1e-4, help="PPO ratio clip c: r is clipped to [1-c, 1+c] (DDPO: 1e-4)")
    adv_clip_max: float = field(5.0, help="advantages are clipped to +-this (DDPO: 5)")
    stat_buffer: int = field(32, help="rewards kept per (prompt, pose) for advantage normalisation")
    stat_min_count: int = field(16, help="buffered rewards needed before per-prompt statistics replace batch ones")
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
class OutputConfig:
    """Where checkpoints, logs and exports go."""

    root: str = field("", help="exports: <root>/<version>/ plus <root>/latest naming the newest; "
                      "empty = <model.models_dir>/policies, where generate.py --model.policy looks")
    runs_dir: str = field("", help="checkpoints, metrics.csv, plots, grids and TensorBoard logs; "
                          "empty = <model.models_dir>/policy_runs")
    run_name: str = field("", help="run folder name; empty = <algo>-<hash of the config>, so re-running the same "
                          "command resumes")
    export_every: int = field(10, help="export every N epochs (and always at the end); 0 = at the end only")
    checkpoint_every: int = field(1, help="save a resumable checkpoint every N epochs (and at the end)")
    grid_every: int = field(10, help="image grid of fixed seeds/poses every N epochs (and before/after); 0 = off")
    grid_images: int = field(4, help="images in each grid (the first groups, fixed seeds)")


@dataclass
class GuardConfig:
    """Warnings (and optional early stop) against reward hacking and runaway updates."""

    max_kl: float = field(0.05, help="warn when approx KL to the sampling policy exceeds this; 0 = off")
    max_clipfrac: float = field(0.9, help="warn when the PPO clip fraction exceeds this; 0 = off")
    min_kl: float = field(1e-6, help="warn when approx KL stays below this for min_kl_epochs epochs in a row: the "
                          "policy is not moving (learning rate too low for the run's length); 0 = off")
    min_kl_epochs: int = field(3, help="epochs in a row below min_kl before the not-moving warning")
    heldout_reward: str = field("", help="second reward scored on the grid images (e.g. text_alignment); "
                                "a drop warns; empty = off")
    heldout_drop: float = field(0.2, help="warn when the held-out reward falls this much (relative) below its best")
    stop: bool = field(False, help="stop training (and export) when a guard fires `patience` epochs in a row")
    patience: int = field(2, help="consecutive epochs a guard must fire before stop applies")


@dataclass
class PolicyConfig:
    """Everything train_policy.py needs."""

    algo: str = field("ddpo", help="ddpo = policy gradient against a reward; d3po = direct preference optimisation",
                      choices=("ddpo", "d3po"))
    reward: str = field("latest", help="reward spec for DDPO (and d3po.source=reward): latest (= latent:latest, the "
                        "learned reward model), brightness, jpeg_compressibility, pose_accuracy, text_alignment, or a "
                        "weighted mix such as 'pose_accuracy*0.5 + text_alignment*0.5'")
    model: ModelConfig = field(default_factory=ModelConfig, help="model weights")
    sample: SampleConfig = field(default_factory=SampleConfig, help="sampler (also the training pass: CFG, eta)")
    data: DataConfig = field(default_factory=DataConfig, help="prompts and poses of online sampling")
    target: TargetConfig = field(default_factory=TargetConfig, help="trainable weights")
    optim: OptimConfig = field(default_factory=OptimConfig, help="optimizer")
    train: TrainConfig = field(default_factory=TrainConfig, help="training loop")
    d3po: D3POConfig = field(default_factory=D3POConfig, help="D3PO")
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
        """Whether this run samples online (DDPO, or D3PO with a reward choosing winners)."""
        return self.algo == "ddpo" or self.d3po.source == "reward"

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
        for name in ("epochs", "groups_per_epoch", "batch_size", "grad_accum", "inner_epochs", "stat_buffer",
                     "stat_min_count"):
            if getattr(tr, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1 (got {getattr(tr, name)})")
        if not 0 < tr.timestep_fraction <= 1:
            raise ConfigError(f"train.timestep_fraction: must be in (0, 1] (got {tr.timestep_fraction})")
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
        if self.guard.min_kl < 0 or self.guard.min_kl_epochs < 1:
            raise ConfigError("guard.min_kl must be >= 0 and guard.min_kl_epochs >= 1")
        for name in ("export_every", "checkpoint_every", "grid_every", "grid_images"):
            if getattr(self.output, name) < 0:
                raise ConfigError(f"output.{name}: must be >= 0")
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
    cfg.train.epochs = 8
    # 32 trajectories an epoch, half of each trajectory's steps trained on: a less noisy gradient for
    # the same CPU time than 16 trajectories on every step.
    cfg.train.groups_per_epoch = 8
    cfg.train.timestep_fraction = 0.5
    cfg.train.batch_size = 4  # 8 optimizer steps per epoch
    # Measured on the embedded world (docs/WORLD.md): 1e-3 leaves the samples where they were, 5e-3 and
    # above let a learned reward model be exploited (the images collapse within 8 epochs).
    cfg.optim.lr = 2e-3
    cfg.train.clip_range = 0.2
    # A group's own images set its baseline from the first epoch: a run this short rarely revisits a
    # group, and the batch fallback would reward whole groups for being brighter than others.
    cfg.train.stat_buffer, cfg.train.stat_min_count = 16, cfg.sample.images_per_group
    cfg.d3po.pairs_per_epoch = 16
    cfg.output.export_every = cfg.output.grid_every = 4
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
    cfg.optim.lr, cfg.train.clip_range, cfg.train.timestep_fraction = 3e-4, 1e-4, 1.0
    cfg.target.lora_modules = list(DEFAULT_LORA_MODULES)
    cfg.d3po.beta, cfg.d3po.clamp_eps = 0.1, 0.1
    return cfg


def sd15() -> PolicyConfig:
    """SD1.5 + OpenPose ControlNet at 512 px with DDPO's published settings (one 16-24 GB GPU)."""
    cfg = PolicyConfig()
    base = generate_presets.sd15()
    cfg.model, cfg.sample = base.model, base.sample  # the same weights and size as generate.py --preset sd15
    cfg.sample.steps, cfg.sample.eta, cfg.sample.guidance_scale = 50, 1.0, 5.0
    cfg.sample.batch_size = 8
    cfg.train.groups_per_epoch = 8  # 8 groups x 4 images = 32 trajectories per epoch and GPU
    cfg.train.batch_size, cfg.train.grad_accum = 2, 8
    cfg.optim.mixed_precision = "fp16"
    cfg.optim.lr = 3e-4
    cfg.d3po.beta = 10.0
    return cfg


def sd15_faithful() -> PolicyConfig:
    """SD1.5 with every published default, D3PO included (beta 0.1, clamp 0.1): reproduces the papers."""
    cfg = sd15()
    cfg.d3po.beta, cfg.d3po.clamp_eps = 0.1, 0.1
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


PRESETS: dict[str, Callable[[], PolicyConfig]] = {
    "tiny": tiny, "tiny-sdxl": tiny_sdxl, "tiny-faithful": tiny_faithful,
    "sd15": sd15, "sd15-faithful": sd15_faithful, "sdxl": sdxl,
}


# ---- rewards -------------------------------------------------------------------------------------


def resolve_reward(spec: str, device: str = "cpu", models_dir: str = "models") -> Any:
    """build_reward(spec) with 'latest' meaning the newest learned reward model; ConfigError when unknown."""
    spec = spec.strip()
    if spec == "latest":
        spec = "latent:latest"
    try:
        from poseloop.rewards import build_reward
    except ImportError as e:
        raise ConfigError(f"reward: poseloop.rewards cannot be imported ({e}); pass a reward object in code") from e
    try:
        return build_reward(spec, device=device, models_dir=models_dir)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"reward: {e}") from e
    except FileNotFoundError as e:
        raise ConfigError(f"reward: {e} (train a reward model first, or pick a built-in reward)") from e


def reward_latent_shape(reward: Any) -> tuple[int, ...] | None:
    """The latent shape a latent-space reward expects, when it says (members of a weighted mix included)."""
    for obj in (reward, getattr(reward, "model", None)):
        shape = getattr(obj, "latent_shape", None)
        if shape is not None:
            return tuple(int(s) for s in shape)
    for member in getattr(reward, "members", ()):
        shape = reward_latent_shape(member[1] if isinstance(member, tuple) else member)
        if shape is not None:
            return shape
    return None


def check_reward_fits(reward: Any, latent_channels: int, name: str = "reward",
                      latent_size: tuple[int, int] | None = None, vae_scale_factor: int = 8) -> None:
    """A latent reward made for other latents is refused (channels) or warned about (spatial size)."""
    shape = reward_latent_shape(reward)
    if shape is None:
        return
    if shape[0] != latent_channels:
        raise ConfigError(f"{name}: the reward model {getattr(reward, 'name', '')!r} scores latents of shape "
                          f"{list(shape)} ({shape[0]} channels) but this model's latents have {latent_channels} "
                          "channels; train a reward model on this model's samples")
    if latent_size is not None and tuple(shape[1:]) != tuple(latent_size):
        # The CNN pools adaptively, so it runs, but it scores images of a size it never saw.
        h, w = (s * vae_scale_factor for s in shape[1:])
        warnings.warn(f"{name}: the reward model was trained on latents {list(shape)} ({w}x{h} px images) but this "
                      f"run samples latents {[latent_channels, *latent_size]}; its scores may mean little. Set "
                      f"--sample.width {w} --sample.height {h}, or train the reward model on rounds of this size",
                      stacklevel=2)


def score(reward: Any, images: Sequence[Image.Image], latents: torch.Tensor, prompts: list[str],
          metadata: list[dict[str, Any]]) -> torch.Tensor:
    """Call a reward on a batch; returns float32 [B] on CPU."""
    needs_images = getattr(reward, "needs_images", True)
    with torch.no_grad():
        out = reward(pil_to_tensor(images) if needs_images else None, latents.float(), prompts, metadata)
    out = torch.as_tensor(out).detach().float().reshape(-1).cpu()
    if out.shape[0] != len(prompts):
        raise ValueError(f"reward {getattr(reward, 'name', reward)!r} returned {out.shape[0]} scores for "
                         f"{len(prompts)} images")
    return out


# ---- small helpers -------------------------------------------------------------------------------


class TrainingInputError(InputError):
    """Training data (preferences, trajectories) is missing or unusable; the message says what to do."""


def derive_seed(*parts: object) -> int:
    """A 31-bit seed that is a pure function of its parts (run seed, epoch, index, ...)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def config_hash(cfg: PolicyConfig) -> str:
    """Hash of what determines a run's trajectory (not its length or where outputs go)."""
    d = to_dict(cfg)
    d["train"].pop("epochs")
    d["train"].pop("resume")
    d.pop("output")
    d.pop("guard")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def cat_conditioning(conds: Sequence[Any]) -> Any:
    """Concatenate Conditioning objects along the batch dimension."""
    from poseloop.sampling import Conditioning

    def cat(xs: list[Any]) -> Any:
        if xs[0] is None:
            return None
        if isinstance(xs[0], dict):
            return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
        return torch.cat(xs)

    return Conditioning(prompt_embeds=cat([c.prompt_embeds for c in conds]),
                        negative_embeds=cat([c.negative_embeds for c in conds]),
                        control=cat([c.control for c in conds]), added=cat([c.added for c in conds]),
                        negative_added=cat([c.negative_added for c in conds]))


def chosen_steps(num_steps: int, fraction: float, gen: torch.Generator) -> list[int]:
    """A random subset (round(fraction * T), at least 1) of the step indices, in sampling order."""
    k = max(1, int(round(fraction * num_steps)))
    return sorted(torch.randperm(num_steps, generator=gen)[:k].tolist())


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state() output."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- D3PO offline data ---------------------------------------------------------------------------


@dataclass
class PreferencePair:
    """A human judgement turned into a (winner, loser) pair of stored trajectories of one group."""

    winner_path: Path
    loser_path: Path
    prompt: str
    condition_path: Path
    group_key: str


def load_preference_pairs(d3po: D3POConfig) -> list[PreferencePair]:
    """Every decisive preference (ties and skips ignored) with its files checked; errors name what is missing."""
    from sqlalchemy import select

    from poseloop import db
    from poseloop.store import SampleStore, TrajectoryError, check_trajectory

    store = SampleStore(d3po.samples_dir)
    url = d3po.db_url or db.default_db_url(store.root)
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise TrainingInputError(f"d3po.db_url: no database at {url.removeprefix('sqlite:///')}; run generate.py and "
                                 "rate pairs in the rating app first (or pass --d3po.samples_dir)")
    factory = db.open_db(url)
    with db.session_scope(factory) as session:
        query = select(db.Preference).where(db.Preference.choice.in_(("a", "b")))
        prefs = list(session.scalars(query))
        total = session.query(db.Preference).count()
        pairs: list[PreferencePair] = []
        missing: list[str] = []
        unreadable: list[TrajectoryError] = []  # header checked here, before the model loads
        left_out = 0
        for p in prefs:
            win = session.get(db.Sample, p.winner_id)
            lose = session.get(db.Sample, p.loser_id)
            assert win is not None and lose is not None
            rnd = session.get(db.Round, win.round_id)
            if d3po.rounds and (rnd is None or rnd.name not in d3po.rounds):
                continue
            if win.group_id != lose.group_id:
                continue  # D3PO compares images of one prompt and pose; cross-group pairs carry no signal here
            group = session.get(db.Group, win.group_id)
            assert group is not None
            paths = []
            n_unreadable = len(unreadable)
            for s in (win, lose):
                if s.trajectory_path is None:
                    missing.append(f"sample {s.id} ({s.image_path}) has no stored trajectory")
                    paths.append(Path())
                    continue
                path = store.abs(s.trajectory_path)
                if not path.is_file():
                    missing.append(str(path))
                elif (bad := check_trajectory(path, f"sample {s.id}")) is not None:
                    unreadable.append(bad)
                paths.append(path)
            if len(unreadable) > n_unreadable and d3po.skip_unreadable:
                left_out += 1
                continue
            pairs.append(PreferencePair(paths[0], paths[1], group.prompt, store.abs(group.condition_path),
                                        f"{group.id}"))
    if unreadable and not d3po.skip_unreadable:
        n_files = len({e.path for e in unreadable})
        more = f" ({n_files - 1} more unreadable file(s) of preferred pairs)" if n_files > 1 else ""
        raise TrajectoryError(f"{unreadable[0]}{more}; or pass --d3po.skip_unreadable true to train on the other pairs",
                              unreadable[0].path, unreadable[0].short)
    if unreadable:
        print(f"warning: d3po.skip_unreadable: left out {left_out} preference pair(s) with "
              f"{len({e.path for e in unreadable})} unreadable trajectory file(s), e.g. {unreadable[0].short}",
              file=sys.stderr)
        if not pairs:
            raise TrainingInputError("every preference pair has an unreadable trajectory file; restore the samples "
                                     "folder or regenerate the rounds (generate.py --store.round <round name>)")
    if not pairs:
        if total:
            raise TrainingInputError(f"no usable preferences: {total} stored, none decisive (a/b) within one group"
                                     + (f" of rounds {d3po.rounds}" if d3po.rounds else "")
                                     + "; ties and skips carry no direction. Rate more pairs in the rating app.")
        raise TrainingInputError(f"no preferences yet in {url}: rate pairs in the rating app (webapp) first, "
                                 "or use --algo ddpo with a reward")
    if missing:
        raise TrainingInputError(f"{len(missing)} trajectory file(s) of preferred pairs are missing, e.g. "
                                 f"{missing[0]}; restore the samples folder, or run generate.py again with that round's settings "
                                 "and --store.round <round name>: it regenerates missing files from their seeds")
    for p in pairs:
        if not p.condition_path.is_file():
            raise TrainingInputError(f"pose image {p.condition_path} of a preferred pair is missing")
    return pairs


# ---- the trainer ---------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a training run did."""

    algo: str
    run_dir: Path
    epochs_done: int
    epochs_this_run: int
    reward_start: float | None
    reward_end: float | None
    seconds: float
    export_dir: Path | None
    history: list[dict[str, float]]
    stopped: str = ""

    def summary(self) -> str:
        """The one-line summary printed at the end."""
        rew = "n/a" if self.reward_start is None else f"{self.reward_start:.4f} -> {self.reward_end:.4f}"
        label = "reward" if self.algo == "ddpo" else "pair accuracy" if self.reward_start is not None else "reward"
        stop = f", stopped early: {self.stopped}" if self.stopped else ""
        return (f"{self.algo}: {self.epochs_done} epochs ({self.epochs_this_run} this run), {label} {rew}, "
                f"{self.seconds:.1f} s{stop}; exported to {self.export_dir or 'nothing'} (run {self.run_dir})")


@dataclass
class _Batch:
    """Trajectories of one epoch (or a D3PO pair set), kept on the CPU between passes."""

    latents: torch.Tensor  # [N, T+1, C, h, w] float16
    log_probs: torch.Tensor  # [N, T] float32 (sampling policy)
    timesteps: torch.Tensor  # [T]
    cond: Any  # Conditioning of N
    sample_cfg: SampleConfig
    extra: dict[str, Any] = dc_field(default_factory=dict)


class PolicyTrainer:
    """DDPO / D3PO training of a Policy with accelerate; call run()."""

    def __init__(self, cfg: PolicyConfig, reward: Any = None, heldout_reward: Any = None,
                 progress: bool = True) -> None:
        """Validate inputs and load everything; bad input fails here, before any training."""
        from accelerate import Accelerator

        from poseloop.advantages import PerPromptStatTracker

        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        self.run_name = cfg.output.run_name or f"{cfg.algo}-{config_hash(cfg)}"
        self.run_dir = cfg.runs_root / self.run_name
        # Inputs before the model: a missing file fails in a second, not after a minute of loading.
        self.pairs: list[PreferencePair] = []
        self.specs: list[Any] = []
        self.group_images: dict[int, Image.Image] = {}
        self.reward_components: dict[str, float] = {}  # member means of the last scored batch (weighted mixes)
        if cfg.algo == "d3po" and cfg.d3po.source == "db":
            self.pairs = load_preference_pairs(cfg.d3po)
        if cfg.online or cfg.output.grid_every:
            from poseloop.inputs import build_groups

            data = cfg.data
            if cfg.algo == "d3po" and cfg.d3po.source == "db" and not (data.prompts or data.dataset or data.prompts_file):
                data = DataConfig()
            self.specs = build_groups(data)
        self.reward = reward
        if self.reward is None and cfg.online:
            self.reward = resolve_reward(cfg.reward, device=str(resolve_device(cfg.model.device)), models_dir=cfg.model.models_dir)
        self.heldout = heldout_reward
        if self.heldout is None and cfg.guard.heldout_reward:
            self.heldout = resolve_reward(cfg.guard.heldout_reward, device=str(resolve_device(cfg.model.device)),
                                          models_dir=cfg.model.models_dir)
        if cfg.optim.use_8bit_adam:
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError("optim.use_8bit_adam: bitsandbytes is not installed; `pip install bitsandbytes` "
                                  "(CUDA only) or drop --optim.use_8bit_adam") from None

        self.accelerator = Accelerator(mixed_precision=cfg.optim.mixed_precision, log_with="tensorboard",
                                       project_dir=str(self.run_dir))
        acc = self.accelerator
        self.comp = self._load_model()
        from poseloop.policy import Policy

        t = cfg.target
        self.policy = Policy(self.comp, t.kind, rank=t.lora_rank, alpha=t.lora_alpha, target_modules=t.lora_modules,
                             gradient_checkpointing=t.gradient_checkpointing, init_seed=cfg.train.seed)
        self.optimizer = acc.prepare(self._make_optimizer())
        self.tracker = PerPromptStatTracker(cfg.train.stat_buffer, cfg.train.stat_min_count)
        self.width = cfg.sample.width or self.comp.native_size
        self.height = cfg.sample.height or self.comp.native_size
        f = self.comp.vae_scale_factor
        for name, rew in (("reward", self.reward), ("guard.heldout_reward", self.heldout)):
            if rew is not None:
                check_reward_fits(rew, self.comp.latent_channels, name, (self.height // f, self.width // f), f)
        self.low_kl_streak = 0
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        self.guard_streak = 0
        self.best_heldout: float | None = None
        self.pair_data: list[_Batch] | None = None
        self.export_dir: Path | None = None
        self.first_ratio: float | None = None  # max |r - 1| of the very first re-scored step (test hook)

    # -- setup --

    def _load_model(self) -> Any:
        from poseloop.models import load_components

        model = ModelConfig(**to_dict(self.cfg.model))
        if model.device == "auto":
            # Under `accelerate launch` every process takes its own GPU.
            model.device = str(self.accelerator.device)
        return load_components(model)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = self.policy.parameters()
        if o.use_8bit_adam:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                       eps=o.adam_eps)
        return torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
                                 eps=o.adam_eps)

    # -- sampling --

    def _group_image(self, g: int) -> Image.Image:
        """The pose image of group g, rendered once per run (every epoch and grid reuses it)."""
        from poseloop.generation import condition_image

        if g not in self.group_images:
            spec = self.specs[g]
            self.group_images[g] = condition_image(spec, self.width, self.height, self.cfg.data.draw_hands,
                                                   self.cfg.data.draw_face)
        return self.group_images[g]

    def _metadata(self, g: int) -> dict[str, Any]:
        spec = self.specs[g]
        return {"keypoints": None if spec.poses is None else [p.to_dict() for p in spec.poses],
                "width": self.width, "height": self.height, "group_id": g, "pose_name": spec.pose_name}

    def _sample_groups(self, groups: Sequence[int], seeds: Sequence[int], reward: Any | None
                       ) -> tuple[_Batch, torch.Tensor | None, list[Image.Image]]:
        """Sample one image per (group, seed) with the current policy; score with `reward`."""
        from poseloop.sampling import sample

        cfg = self.cfg
        lat, lps, conds, rewards, images = [], [], [], [], []
        components: dict[str, list[torch.Tensor]] = {}
        timesteps = torch.empty(0)
        bs = cfg.sample.batch_size
        for i in range(0, len(groups), bs):
            gs, ss = list(groups[i:i + bs]), list(seeds[i:i + bs])
            prompts = [self.specs[g].prompt for g in gs]
            poses = [self._group_image(g) for g in gs]
            # Sampled in the training pass's numeric context (see _rescore): mixed precision stays consistent.
            out = sample(self.comp, prompts, poses, ss, cfg.sample, self.width, self.height,
                         autocast=self.accelerator.autocast)
            conds.append(out.cond)
            lat.append(out.latents)
            lps.append(out.log_probs)
            timesteps = out.timesteps
            images += out.images
            if reward is not None:
                rewards.append(score(reward, out.images, out.latents[:, -1], prompts, [self._metadata(g) for g in gs]))
                # A weighted mix keeps each member's values: logged beside the total (reward_<member>).
                for label, value in getattr(reward, "last_components", {}).items():
                    components.setdefault(label, []).append(value.detach().float().cpu())
        self.reward_components = {label: float(torch.cat(v).mean()) for label, v in components.items()}
        batch = _Batch(torch.cat(lat), torch.cat(lps), timesteps, cat_conditioning(conds), cfg.sample)
        return batch, (torch.cat(rewards) if reward is not None else None), images

    def _epoch_items(self, epoch: int) -> tuple[list[int], list[int], list[str]]:
        """This process's (group, seed, key) for an epoch: a deterministic function of (seed, epoch)."""
        cfg, acc = self.cfg, self.accelerator
        n = len(self.specs)
        k = cfg.sample.images_per_group
        # Walk a fixed permutation of the groups so every group is visited equally often.
        order = np.random.default_rng(derive_seed(cfg.train.seed, "groups")).permutation(n)
        start = epoch * cfg.train.groups_per_epoch
        groups = [int(order[(start + j) % n]) for j in range(cfg.train.groups_per_epoch)]
        items = [(g, derive_seed(cfg.train.seed, epoch, j, i)) for j, g in enumerate(groups) for i in range(k)]
        total = len(items)
        if total % acc.num_processes:
            raise ConfigError(f"train.groups_per_epoch x sample.images_per_group = {total} must be divisible by the "
                              f"number of processes ({acc.num_processes})")
        per = total // acc.num_processes
        mine = items[acc.process_index * per:(acc.process_index + 1) * per]
        return [g for g, _ in mine], [s for _, s in mine], [self._key(g) for g, _ in mine]

    def _key(self, g: int) -> str:
        spec = self.specs[g]
        return f"{spec.prompt}\x1f{spec.pose_name}"

    # -- the update --

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(t.to(self.accelerator.device)).cpu() if self.accelerator.num_processes > 1 else t

    def _optimizer_step(self) -> None:
        acc = self.accelerator
        params = self.policy.parameters()
        if acc.num_processes > 1:
            # The model is not wrapped in DDP (the shared sampler needs the plain modules): average here.
            for p in params:
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        if self.cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _rescore(self, cond: Any, latents: torch.Tensor, timesteps: torch.Tensor, step: int,
                 sample_cfg: SampleConfig) -> torch.Tensor:
        """log-probs [B] of recorded step `step` under the current weights, in the training pass's context.

        The noise prediction runs under accelerate's autocast here AND when sampling (_sample_groups),
        so the PPO ratio compares like with like. Sampling in fp32 but re-scoring under bf16 (CPU, tiny
        model) gave mean |r - 1| 2.7e-3 before any update, 27x the clip range 1e-4: clip fraction 1.0,
        nothing learned; with both under autocast r = 1 exactly. The alternative, re-computing the old
        log-probs in this context under no_grad before the first update, costs one more forward pass per
        trained step (+28% of an epoch, tiny model, 10 steps) and scores the samples under a policy
        slightly different from the one that drew them; sampling under autocast cost +4% of sampling
        time on CPU (GPUs sample faster under it) and is what ddpo-pytorch does.
        """
        from poseloop.sampling import rescore

        return rescore(self.comp, cond, latents, timesteps, step, sample_cfg,
                       autocast=self.accelerator.autocast).float()

    def _chosen_trainable_steps(self, batch: _Batch, gen: torch.Generator) -> list[int]:
        """train.timestep_fraction of the steps that have a log-probability (sigma_t > 0), in order.

        A deterministic step (set_alpha_to_one's last one: variance 0, no density) is never trained
        on. When every step is stochastic this draws exactly what chosen_steps(T, ...) draws.
        """
        from poseloop.sampling import stochastic_steps

        mask = stochastic_steps(self.comp.scheduler, batch.timesteps, batch.sample_cfg.eta)  # [T] bool
        trainable = mask.nonzero().flatten().tolist()
        if not trainable:
            raise ConfigError(f"sample.steps: none of the {mask.numel()} step(s) is stochastic (the scheduler's "
                              "set_alpha_to_one makes the last one deterministic); use more steps")
        return [trainable[k] for k in chosen_steps(len(trainable), self.cfg.train.timestep_fraction, gen)]

    def _ppo_update(self, batch: _Batch, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        """DDPO: PPO-clipped passes over the epoch's trajectories (CFG inside the training pass)."""
        from poseloop.losses import ppo_clip_loss

        cfg = self.cfg.train
        n = batch.log_probs.shape[0]
        stats: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio": []}
        micro = 0
        for inner in range(cfg.inner_epochs):
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, epoch, "shuffle", inner,
                                                            self.accelerator.process_index))
            perm = torch.randperm(n, generator=gen)
            minibatches = [perm[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
            for mb_i, idx in enumerate(minibatches):
                steps = self._chosen_trainable_steps(batch, gen)
                cond = batch.cond.select(idx)
                lat = batch.latents[idx]
                for j in steps:
                    lp = self._rescore(cond, lat, batch.timesteps, j, batch.sample_cfg)
                    old = batch.log_probs[idx, j].to(lp.device)
                    loss, info = ppo_clip_loss(lp, old, adv[idx].to(lp.device), cfg.clip_range, cfg.adv_clip_max)
                    if self.first_ratio is None:
                        self.first_ratio = float((torch.exp(lp.detach() - old) - 1).abs().max())
                    self.accelerator.backward(loss / (len(steps) * cfg.grad_accum))
                    stats["loss"].append(float(loss.detach()))
                    for key in ("approx_kl", "clipfrac", "ratio"):
                        stats[key].append(float(info[key]))
                micro += 1
                if micro % cfg.grad_accum == 0 or (inner == cfg.inner_epochs - 1 and mb_i == len(minibatches) - 1):
                    self._optimizer_step()
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def ddpo_epoch(self, epoch: int) -> dict[str, float]:
        """Sample, score, normalise per group, update."""
        t0 = time.perf_counter()
        groups, seeds, keys = self._epoch_items(epoch)
        batch, rewards, _ = self._sample_groups(groups, seeds, self.reward)
        assert rewards is not None
        t_sample = time.perf_counter() - t0
        all_rewards = self._gather(rewards)
        all_keys = self._gather_keys(keys)
        adv_all = torch.from_numpy(self.tracker.update(all_keys, all_rewards.numpy()))
        per = len(keys)
        adv = adv_all[self.accelerator.process_index * per:(self.accelerator.process_index + 1) * per]
        members = {f"reward_{label}": v for label, v in self.reward_components.items()}
        info = self._ppo_update(batch, adv, epoch)
        return {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                **members, **info, "samples": float(all_rewards.numel()), "sample_seconds": t_sample,
                "seconds": time.perf_counter() - t0}

    def _gather_keys(self, keys: list[str]) -> list[str]:
        if self.accelerator.num_processes == 1:
            return keys
        from accelerate.utils import gather_object

        return list(gather_object(keys))

    # -- D3PO --

    def _reference_log_probs(self, batch: _Batch, steps: Sequence[int] | None = None) -> torch.Tensor:
        """log-probs [N, T] of the trajectories under the model before fine-tuning (no grad)."""
        from tqdm.auto import tqdm

        n, num_steps = batch.log_probs.shape
        out = torch.full((n, num_steps), float("nan"))
        bs = self.cfg.sample.batch_size
        # One forward pass per trajectory and step: minutes on a large pair set, so it shows progress.
        bar = tqdm(total=n, desc="d3po reference log-probs", unit="traj", leave=False, mininterval=0,
                   disable=not (self.progress and self.accelerator.is_main_process))  # few updates: show each
        with torch.no_grad(), self.policy.reference():
            for i in range(0, n, bs):
                sl = slice(i, i + bs)
                cond = batch.cond.select(sl)
                for j in (range(num_steps) if steps is None else steps):
                    out[sl, j] = self._rescore(cond, batch.latents[sl], batch.timesteps, j, batch.sample_cfg).cpu()
                bar.update(min(bs, n - i))
        bar.close()
        return out

    def _load_pair_data(self) -> list[_Batch]:
        """Stored trajectories of every preference pair, grouped by sampler settings; reference log-probs."""
        from poseloop.sampling import make_conditioning
        from poseloop.store import load_trajectory

        by_settings: dict[tuple[Any, ...], list[tuple[Any, Any, PreferencePair]]] = {}
        for p in self.pairs:
            tw, tl = load_trajectory(p.winner_path), load_trajectory(p.loser_path)
            m = tw.metadata
            key = tuple(m.get(k, "") for k in ("steps", "width", "height", "guidance_scale", "controlnet_scale",
                                               "eta", "negative_prompt"))
            if tuple(tl.latents.shape) != tuple(tw.latents.shape) or not torch.equal(tl.timesteps, tw.timesteps):
                raise TrainingInputError(f"{p.winner_path} and {p.loser_path} were sampled with different settings; "
                                         "a preference pair must come from one group of one round")
            if tw.latents.shape[1] != self.comp.latent_channels:
                raise TrainingInputError(f"{p.winner_path}: latents have {tw.latents.shape[1]} channels but the model "
                                         f"has {self.comp.latent_channels}; train with the model that made the round")
            by_settings.setdefault(key, []).append((tw, tl, p))
        batches = []
        for items in by_settings.values():
            m = items[0][0].metadata
            scfg = SampleConfig(steps=int(m["steps"]), eta=float(m["eta"]), guidance_scale=float(m["guidance_scale"]),
                                controlnet_scale=float(m["controlnet_scale"]), negative_prompt=m.get("negative_prompt", ""))
            w, h = int(m["width"]), int(m["height"])
            conds = []
            for i in range(0, len(items), self.cfg.sample.batch_size):
                chunk = items[i:i + self.cfg.sample.batch_size]
                poses = []
                for _, _, p in chunk:
                    with Image.open(p.condition_path) as im:
                        poses.append(im.convert("RGB").resize((w, h)))
                conds.append(make_conditioning(self.comp, [p.prompt for _, _, p in chunk], poses, scfg, w, h))
            cond = cat_conditioning(conds)
            # Winners then losers: [2N, ...]; pair i is (i, N + i).
            latents = torch.cat([torch.stack([tw.latents for tw, _, _ in items]),
                                 torch.stack([tl.latents for _, tl, _ in items])])
            log_probs = torch.cat([torch.stack([tw.log_probs for tw, _, _ in items]),
                                   torch.stack([tl.log_probs for _, tl, _ in items])])
            batch = _Batch(latents, log_probs, items[0][0].timesteps, cat_conditioning([cond, cond]), scfg)
            if all(self._sampled_by_reference(t.metadata) for tw, tl, _ in items for t in (tw, tl)):
                # The round was sampled by the reference model in this numeric context, and re-scoring a
                # stored step reproduces its stored log-prob: the stored values are the reference.
                batch.extra["ref"] = log_probs.clone()
            else:
                batch.extra["ref"] = self._reference_log_probs(batch)
            batches.append(batch)
        return batches

    def _sampled_by_reference(self, meta: dict[str, str]) -> bool:
        """Whether a stored trajectory came from the model D3PO compares against, in the same dtype."""
        def same(a: str, b: str) -> bool:
            pa, pb = Path(a), Path(b)
            return pa.resolve() == pb.resolve() if a and b and pa.exists() and pb.exists() else a == b

        m, model = meta, self.cfg.model
        return (self.cfg.optim.mixed_precision == "no" and m.get("dtype") == str(self.comp.dtype)
                and same(m.get("base_model", ""), model.base) and same(m.get("controlnet", ""), model.controlnet)
                and m.get("lora", "") == model.lora and m.get("policy", "") == model.policy
                and (not model.lora or float(m.get("lora_scale", "nan")) == model.lora_scale))

    def _d3po_update(self, batches: list[_Batch], epoch: int) -> dict[str, float]:
        """One pass of the D3PO loss over (winner, loser) pairs: batches hold winners then losers."""
        from tqdm.auto import tqdm

        from poseloop.losses import d3po_loss

        cfg, d = self.cfg.train, self.cfg.d3po
        t0 = time.perf_counter()
        stats: dict[str, list[float]] = {"loss": [], "pair_accuracy": [], "margin": [], "approx_kl": []}
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, "pairs", self.accelerator.process_index))
        work = []
        for b_i, batch in enumerate(batches):
            n = batch.latents.shape[0] // 2
            perm = torch.randperm(n, generator=gen)
            mine = perm[self.accelerator.process_index::self.accelerator.num_processes]
            work += [(b_i, mine[i:i + cfg.batch_size]) for i in range(0, len(mine), cfg.batch_size)]
        order = torch.randperm(len(work), generator=gen).tolist()
        if d.pairs_per_epoch and self.cfg.d3po.source == "db":
            order = order[:max(1, math.ceil(d.pairs_per_epoch / (cfg.batch_size * self.accelerator.num_processes)))]
        # An epoch is one pass over the epoch's pairs: the epoch bar alone sits at 0/1 for minutes, so this
        # one moves with each batch of pairs and the epoch ends with a one-line summary.
        show = self.progress and self.accelerator.is_main_process
        n_pairs = sum(len(work[w][1]) for w in order)
        bar = tqdm(total=n_pairs, desc=f"d3po epoch {epoch + 1}", unit="pair", leave=False, disable=not show)
        for pos, w_i in enumerate(order):
            b_i, idx = work[w_i]
            batch = batches[b_i]
            n = batch.latents.shape[0] // 2
            both = torch.cat([idx, idx + n])  # [2b]: winners then losers in one forward pass
            cond = batch.cond.select(both)
            lat = batch.latents[both]
            ref = batch.extra["ref"][both]
            steps = self._chosen_trainable_steps(batch, gen)
            for j in steps:
                lp = self._rescore(cond, lat, batch.timesteps, j, batch.sample_cfg)
                lp_w, lp_l = lp.chunk(2)
                ref_j = ref[:, j].to(lp.device)
                ref_w, ref_l = ref_j.chunk(2)
                if self.first_ratio is None:
                    self.first_ratio = float((torch.exp(lp.detach() - ref_j) - 1).abs().max())
                loss = d3po_loss(lp_w, lp_l, ref_w, ref_l, d.beta, d.clamp_eps)
                self.accelerator.backward(loss / (len(steps) * cfg.grad_accum))
                with torch.no_grad():
                    margin = (lp_w - ref_w) - (lp_l - ref_l)
                    stats["loss"].append(float(loss.detach()))
                    stats["pair_accuracy"].append(float((margin > 0).float().mean()))
                    stats["margin"].append(float(margin.mean()))
                    stats["approx_kl"].append(float(0.5 * ((lp - ref_j) ** 2).mean()))
            if (pos + 1) % cfg.grad_accum == 0 or pos == len(order) - 1:
                self._optimizer_step()
            bar.update(len(idx))
            bar.set_postfix(loss=f"{np.mean(stats['loss']):.4f}", acc=f"{np.mean(stats['pair_accuracy']):.2f}")
        bar.close()
        out = {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}
        if show:
            tqdm.write(f"d3po epoch {epoch + 1}/{self.cfg.train.epochs}: {n_pairs} pairs in {len(order)} batches, "
                       f"loss {out['loss']:.4f}, pair accuracy {out['pair_accuracy']:.3f}, "
                       f"margin {out['margin']:.4g}, {time.perf_counter() - t0:.1f} s")
        return out

    def pair_margins(self) -> torch.Tensor:
        """Per stored pair, mean over steps of log r_w - log r_l (r = pi_theta / pi_ref): > 0 = winner favoured."""
        if self.pair_data is None:
            self.pair_data = self._load_pair_data()
        out = []
        for batch in self.pair_data:
            with torch.no_grad():
                lp = self._policy_log_probs(batch)
            ref = batch.extra["ref"]
            n = lp.shape[0] // 2
            log_r = lp - ref  # [2N, T]
            out.append((log_r[:n] - log_r[n:]).mean(dim=1))
        return torch.cat(out)

    def _policy_log_probs(self, batch: _Batch) -> torch.Tensor:
        """log-probs [N, T] under the current policy (no grad)."""
        n, num_steps = batch.log_probs.shape
        out = torch.empty(n, num_steps)
        bs = self.cfg.sample.batch_size
        for i in range(0, n, bs):
            sl = slice(i, i + bs)
            cond = batch.cond.select(sl)
            for j in range(num_steps):
                out[sl, j] = self._rescore(cond, batch.latents[sl], batch.timesteps, j, batch.sample_cfg).cpu()
        return out

    def d3po_epoch(self, epoch: int) -> dict[str, float]:
        """One D3PO epoch: stored human pairs, or fresh samples with a reward picking winner and loser."""
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if self.cfg.d3po.source == "db":
            if self.pair_data is None:
                self.pair_data = self._load_pair_data()
            batches = self.pair_data
        else:
            groups, seeds, _ = self._epoch_items(epoch)
            batch, rewards, _ = self._sample_groups(groups, seeds, self.reward)
            assert rewards is not None
            k = self.cfg.sample.images_per_group
            r = rewards.view(-1, k)  # [G, K]: a group's K images are consecutive
            base = torch.arange(r.shape[0]) * k
            win, lose = base + r.argmax(1), base + r.argmin(1)
            both = torch.cat([win, lose])
            pair = _Batch(batch.latents[both], batch.log_probs[both], batch.timesteps, batch.cond.select(both),
                          batch.sample_cfg)
            pair.extra["ref"] = self._reference_log_probs(pair)
            batches = [pair]
            all_rewards = self._gather(rewards)
            out.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)))
        out.update(self._d3po_update(batches, epoch))
        out["seconds"] = time.perf_counter() - t0
        return out

    # -- evaluation, logging, guards --

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Fixed seeds on the first groups: an image grid (PNG) and the reward(s) of those images."""
        n = min(self.cfg.output.grid_images, max(1, len(self.specs))) if self.specs else 0
        if n == 0 or not self.accelerator.is_main_process:
            return {}
        groups = [i % len(self.specs) for i in range(n)]
        seeds = [derive_seed(self.cfg.train.seed, "eval", i) for i in range(n)]
        batch, rewards, images = self._sample_groups(groups, seeds, self.reward)
        out: dict[str, float] = {}
        if rewards is not None:
            out["eval_reward"] = float(rewards.mean())
        if self.heldout is not None:
            prompts = [self.specs[g].prompt for g in groups]
            out["heldout_reward"] = float(score(self.heldout, images, batch.latents[:, -1], prompts,
                                                [self._metadata(g) for g in groups]).mean())
        save_grid([self._group_image(g) for g in groups], images, self.run_dir / "grids" / f"grid_e{epoch:04d}.png",
                  [f"{v:.3f}" for v in rewards.tolist()] if rewards is not None else None)
        return out

    def check_guards(self, row: dict[str, float]) -> str:
        """Warn about exploding KL / clip fraction or a falling held-out reward; return the reason to stop."""
        g = self.cfg.guard
        fired = []
        if g.max_kl > 0 and row.get("approx_kl", 0.0) > g.max_kl:
            fired.append(f"approx KL {row['approx_kl']:.4g} > guard.max_kl {g.max_kl}")
        if g.max_clipfrac > 0 and row.get("clipfrac", 0.0) > g.max_clipfrac:
            fired.append(f"clip fraction {row['clipfrac']:.3f} > guard.max_clipfrac {g.max_clipfrac}")
        if g.min_kl > 0 and "approx_kl" in row and self._kl_is_measured():
            self.low_kl_streak = self.low_kl_streak + 1 if abs(row["approx_kl"]) < g.min_kl else 0
            if self.low_kl_streak == g.min_kl_epochs:  # once per stall, not every epoch after
                warnings.warn(f"epoch {int(row['epoch'])}: approx KL below guard.min_kl {g.min_kl:g} for "
                              f"{g.min_kl_epochs} epochs: the policy is not moving. Raise optim.lr (now "
                              f"{self.cfg.optim.lr:g}; try x10) or train.clip_range (now {self.cfg.train.clip_range:g}), "
                              "or check that the reward differs between images of a group", stacklevel=2)
        if "heldout_reward" in row:
            h = row["heldout_reward"]
            if self.best_heldout is not None and h < self.best_heldout - g.heldout_drop * abs(self.best_heldout):
                fired.append(f"held-out reward {h:.4f} fell more than {g.heldout_drop:.0%} below its best "
                             f"{self.best_heldout:.4f} (reward hacking?)")
            self.best_heldout = h if self.best_heldout is None else max(self.best_heldout, h)
        if fired:
            self.guard_streak += 1
            msg = f"epoch {int(row['epoch'])}: " + "; ".join(fired)
            warnings.warn(msg, stacklevel=2)
            if g.stop and self.guard_streak >= g.patience:
                return msg
        else:
            self.guard_streak = 0
        return ""

    def _kl_is_measured(self) -> bool:
        """DDPO's approx KL is to the sampling policy: zero by construction when an epoch makes one update."""
        if self.cfg.algo != "ddpo":
            return True  # D3PO's is to the frozen reference
        tr = self.cfg.train
        samples = tr.groups_per_epoch * self.cfg.sample.images_per_group
        return math.ceil(samples / tr.batch_size) * tr.inner_epochs > tr.grad_accum

    def log(self, row: dict[str, float]) -> None:
        """Append an epoch's metrics to metrics.csv and the accelerate trackers."""
        self.history.append(row)
        if not self.accelerator.is_main_process:
            return
        write_csv(self.run_dir / "metrics.csv", self.history)
        self.accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    # -- checkpoints and exports --

    def save_checkpoint(self) -> Path:
        """Atomically write everything a resumed run needs to <run_dir>/checkpoint."""
        from safetensors.torch import save_file

        final = self.run_dir / "checkpoint"
        if not self.accelerator.is_main_process:
            return final
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", suffix=".tmp", dir=self.run_dir))
        try:
            save_file(self.policy.state_dict(), str(tmp / "weights.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(rng_state(), tmp / "rng.pt")
            state = {"epoch": self.epoch, "global_step": self.global_step, "config_hash": config_hash(self.cfg),
                     "tracker": self.tracker.state_dict(), "history": self.history,
                     "guard_streak": self.guard_streak, "best_heldout": self.best_heldout,
                     "config": to_dict(self.cfg)}
            (tmp / "state.json").write_text(json.dumps(state))
            old = self.run_dir / ".checkpoint.old"
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint of this run, if any; refuse one made with another config."""
        from safetensors.torch import load_file

        ckpt = self.run_dir / "checkpoint"
        if not (ckpt / "state.json").is_file():
            return False
        state = json.loads((ckpt / "state.json").read_text())
        if state["config_hash"] != config_hash(self.cfg):
            raise ConfigError(f"output.run_name: the checkpoint in {ckpt} was made with a different config; pick "
                              "another --output.run_name, or pass --train.resume false to start over")
        self.policy.load_state_dict(load_file(str(ckpt / "weights.safetensors")))
        self.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        set_rng_state(torch.load(ckpt / "rng.pt", weights_only=False))
        self.tracker.load_state_dict(state["tracker"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = list(state["history"])
        self.guard_streak, self.best_heldout = int(state["guard_streak"]), state["best_heldout"]
        return True

    def export(self) -> Path | None:
        """Export the current weights as models/policies/<run>-e<epoch>/ and point 'latest' at it."""
        from poseloop.export import export_policy

        if not self.accelerator.is_main_process:
            return None
        version = f"{self.run_name}-e{self.epoch:04d}"
        meta = {"poseloop_algo": self.cfg.algo, "poseloop_epoch": str(self.epoch),
                "poseloop_reward": self.cfg.reward if self.cfg.online else "human preferences"}
        self.export_dir = export_policy(self.policy, self.cfg.export_root, version, to_dict(self.cfg), meta)
        plot_history(self.history, self.run_dir / "metrics.png", self.cfg.algo)
        return self.export_dir

    # -- the loop --

    def run(self) -> TrainResult:
        """Train (or resume) to cfg.train.epochs, with checkpoints, exports, logs and guards."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        start = time.perf_counter()
        resumed = cfg.train.resume and self.load_checkpoint()
        if not resumed:
            random.seed(cfg.train.seed)
            np.random.seed(cfg.train.seed)
            torch.manual_seed(cfg.train.seed)
            if (self.run_dir / "checkpoint").exists() and acc.is_main_process:
                shutil.rmtree(self.run_dir / "checkpoint")
            if acc.is_main_process and self.run_dir.exists():
                (self.run_dir / "metrics.csv").unlink(missing_ok=True)
        acc.init_trackers("policy", config={k: str(v) for k, v in _flat(to_dict(cfg)).items()})
        first_epoch = self.epoch
        stopped = ""
        if cfg.output.grid_every and not resumed:
            before = self.evaluate(0)
            if before:
                self.log({"epoch": 0.0, **before})
        epoch_fn = self.ddpo_epoch if cfg.algo == "ddpo" else self.d3po_epoch
        bar = tqdm(range(first_epoch, cfg.train.epochs), initial=first_epoch, total=cfg.train.epochs,
                   desc=f"{cfg.algo} {self.run_name}", unit="epoch", disable=not (self.progress and acc.is_main_process))
        try:
            for epoch in bar:
                row = {"epoch": float(epoch + 1), **epoch_fn(epoch)}
                self.epoch = epoch + 1
                last = self.epoch == cfg.train.epochs
                if cfg.output.grid_every and (self.epoch % cfg.output.grid_every == 0 or last):
                    row.update(self.evaluate(self.epoch))
                stopped = self.check_guards(row)
                self.log(row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("reward_mean", "pair_accuracy", "loss", "approx_kl")
                                 if k in row})
                if stopped or last or (cfg.output.checkpoint_every and self.epoch % cfg.output.checkpoint_every == 0):
                    self.save_checkpoint()
                if stopped or last or (cfg.output.export_every and self.epoch % cfg.output.export_every == 0):
                    self.export()
                if stopped:
                    break
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted in epoch {self.epoch + 1}; re-run the same command to resume from the checkpoint "
                  f"of epoch {self._checkpoint_epoch()} in {self.run_dir / 'checkpoint'}")
            raise
        bar.close()
        if self.export_dir is None and self.epoch > 0:
            self.export()  # a resumed run that had nothing left to do still reports (and refreshes) its export
        acc.end_training()
        key = "reward_mean" if cfg.online else "pair_accuracy"
        values = [r[key] for r in self.history if key in r and not math.isnan(r[key])]
        return TrainResult(algo=cfg.algo, run_dir=self.run_dir, epochs_done=self.epoch,
                           epochs_this_run=self.epoch - first_epoch,
                           reward_start=values[0] if values else None, reward_end=values[-1] if values else None,
                           seconds=time.perf_counter() - start, export_dir=self.export_dir, history=self.history,
                           stopped=stopped)

    def _checkpoint_epoch(self) -> int:
        p = self.run_dir / "checkpoint" / "state.json"
        return int(json.loads(p.read_text())["epoch"]) if p.is_file() else 0


def train(cfg: PolicyConfig, reward: Any = None, heldout_reward: Any = None, progress: bool = True) -> TrainResult:
    """Run DDPO or D3PO as configured; `reward` overrides cfg.reward with any callable reward object."""
    return PolicyTrainer(cfg, reward=reward, heldout_reward=heldout_reward, progress=progress).run()


# ---- files: csv, plots, grids --------------------------------------------------------------------


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    """Rewrite the metrics CSV (all rows; columns = union of keys in first-seen order) atomically."""
    from poseloop.store import atomic_write

    cols = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def plot_history(rows: list[dict[str, float]], path: Path, algo: str) -> None:
    """Curves of the logged metrics (PNG, matplotlib Agg)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poseloop.store import atomic_write

    keys = [k for k in ("reward_mean", "eval_reward", "heldout_reward", "pair_accuracy", "margin", "loss",
                        "approx_kl", "clipfrac") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=2)
        if key == "reward_mean":
            std = np.array([r.get("reward_std", 0.0) for r in rows if key in r])
            ax.fill_between(xs, np.array(ys) - std, np.array(ys) + std, alpha=0.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{algo} training", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def save_grid(poses: list[Image.Image], images: list[Image.Image], path: Path, labels: list[str] | None = None) -> None:
    """Two rows: pose conditions above the generated images (PNG), with optional reward labels."""
    from PIL import ImageDraw

    from poseloop.store import save_png

    w, h = images[0].size
    scale = max(1, -(-160 // min(w, h)))  # small renders are enlarged so that a person can see them
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (w * len(images), 2 * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (p, im) in enumerate(zip(poses, images)):
        grid.paste(p.resize((w, h)), (i * w, 0))
        grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (i * w, h))
        if labels:
            draw.rectangle((i * w, h, i * w + 7 * len(labels[i]) + 6, h + 14), fill=(0, 0, 0))
            draw.text((i * w + 3, h + 2), labels[i], fill=(255, 255, 0))
    save_png(grid, path)
