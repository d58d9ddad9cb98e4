"""The policy trainer's core: everything DDPO, D3PO and the next algorithm share.

The trainer samples trajectories with the shared sampler (every DDIM step a Gaussian policy step),
scores them, re-scores recorded steps under the current weights, steps the optimizer, and runs the
epoch loop with checkpoints, metrics, grids, guards and exports. What an epoch does is the
algorithm's (poseloop.policy.algos, dispatched on cfg.algo): DDPO = sample, score, normalise per group, PPO
passes; D3PO = one pass over preferred / dispreferred trajectory pairs. An algorithm uses only the
operations and attributes of the poseloop.policy.algos.Trainer protocol, which PolicyTrainer provides.

Checkpoint, resume and export are in poseloop.policy.checkpoint (RunCheckpoints, mixed in here).
"""

from __future__ import annotations

import math
import random
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from poseloop.policy import lineage
from poseloop.policy.algos import Algorithm, algorithm_class
from poseloop.config.generation import DataConfig, ModelConfig, SampleConfig
from poseloop.config.lib import ConfigError, to_dict
from poseloop.models.policy_files import CONTROLNET_DIR
from poseloop.models.loading import resolve_device
from poseloop.policy.checkpoint import RunCheckpoints
from poseloop.config.policy import PolicyConfig
from poseloop.policy.rewards import check_reward_fits, resolve_reward, score
from poseloop.policy.rollouts import TrajectoryBatch, cat_conditioning, chosen_steps, derive_seed
from poseloop.policy.run_files import flat_config, save_grid, write_csv


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
    metric: str = "reward"  # what reward_start / reward_end are: the reward, or offline D3PO's pair accuracy

    def summary(self) -> str:
        """The one-line summary printed at the end."""
        rew = "n/a" if self.reward_start is None else f"{self.reward_start:.4f} -> {self.reward_end:.4f}"
        stop = f", stopped early: {self.stopped}" if self.stopped else ""
        return (f"{self.algo}: {self.epochs_done} epochs ({self.epochs_this_run} this run), {self.metric} {rew}, "
                f"{self.seconds:.1f} s{stop}; exported to {self.export_dir or 'nothing'} (run {self.run_dir})")


class PolicyTrainer(RunCheckpoints):
    """Training of a Policy with accelerate by the algorithm cfg.algo names (DDPO, D3PO); call run()."""

    def __init__(self, cfg: PolicyConfig, reward: Any = None, heldout_reward: Any = None,
                 progress: bool = True) -> None:
        """Validate inputs and load everything; bad input fails here, before any training."""
        from accelerate import Accelerator

        from poseloop.policy.advantages import PerPromptStatTracker

        cfg.validate()
        self.cfg = cfg
        self.progress = progress
        # Inputs before the model: a missing file fails in a second, not after a minute of loading.
        self.specs: list[Any] = []
        self.group_images: dict[int, Image.Image] = {}
        self.reward_components: dict[str, float] = {}  # member means of the last scored batch (weighted mixes)
        self.algorithm: Algorithm = algorithm_class(cfg.algo)(self)  # checks its offline data (D3PO: pairs)
        # The run is named by what it resolves to (reward model, pairs, parent), never by a literal such as "latest".
        self.inputs, self.reward_spec = lineage.run_inputs(cfg, reward, self.algorithm.pairs)
        self.inputs_digest = lineage.digest(self.inputs)
        self.parent, self.parent_reason = lineage.find_parent(cfg.parent, cfg.model.policy, cfg.export_root,
                                                             to_dict(cfg.model), cfg.target.kind, self.inputs_digest)
        if self.parent is not None:
            lineage.check_compatible(self.parent, to_dict(cfg.model), to_dict(cfg.target))
        self.identity = lineage.run_identity(self.inputs_digest, self.parent)
        self.run_name = cfg.output.run_name or f"{cfg.algo}-{self.identity}"
        self.run_dir = cfg.runs_root / self.run_name
        if cfg.online or cfg.output.grid_every:
            from poseloop.data.inputs import build_groups

            data = cfg.data
            if not cfg.online and not (data.prompts or data.dataset or data.prompts_file):
                data = DataConfig()
            self.specs = build_groups(data)
        self.reward = reward
        if self.reward is None and cfg.online:
            self.reward = resolve_reward(self.reward_spec, device=str(resolve_device(cfg.model.device)),
                                         models_dir=cfg.model.models_dir)
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
        from poseloop.policy.targets import Policy

        t = cfg.target
        self.policy = Policy(self.comp, t.kind, rank=t.lora_rank, alpha=t.lora_alpha, target_modules=t.lora_modules,
                             gradient_checkpointing=t.gradient_checkpointing, init_seed=cfg.train.seed)
        if self.parent is not None and t.kind == "unet_lora":
            try:
                self.policy.continue_from(lineage.kohya_file(self.parent.folder))
            except ValueError as e:
                raise ConfigError(f"parent: {e}; pass --parent base to start from the base model") from None
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
        # Weights (CPU copies) of the epoch with the best held-out reward, for guard.restore_best.
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_epoch = 0
        self.heldout_fired = False
        self.export_dir: Path | None = None
        self.first_ratio: float | None = None  # max |r - 1| of the very first re-scored step (test hook)

    # -- setup --

    def _load_model(self) -> Any:
        from poseloop.models.loading import load_components

        # The parent is loaded here (its ControlNet) or after the adapter is made (its LoRA: Policy.continue_from).
        model = ModelConfig(**{**to_dict(self.cfg.model), "policy": ""})
        if self.parent is not None and self.parent.kind != "unet_lora":
            model.controlnet = str(self.parent.folder / CONTROLNET_DIR)
        self.model_cfg = model
        model = ModelConfig(**to_dict(model))
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

    # -- what algorithms call (poseloop.policy.algos.Trainer): sampling --

    def group_image(self, g: int) -> Image.Image:
        """The pose image of group g, rendered once per run (every epoch and grid reuses it)."""
        from poseloop.sampling.round import condition_image

        if g not in self.group_images:
            spec = self.specs[g]
            self.group_images[g] = condition_image(spec, self.width, self.height, self.cfg.data.draw_hands,
                                                   self.cfg.data.draw_face)
        return self.group_images[g]

    def group_metadata(self, g: int) -> dict[str, Any]:
        """What a reward is told about group g's images: keypoints, size, group id and pose name."""
        spec = self.specs[g]
        return {"keypoints": None if spec.poses is None else [p.to_dict() for p in spec.poses],
                "width": self.width, "height": self.height, "group_id": g, "pose_name": spec.pose_name}

    def sample_groups(self, groups: Sequence[int], seeds: Sequence[int], reward: Any | None,
                      start_seeds: Sequence[int] | None = None
                      ) -> tuple[TrajectoryBatch, torch.Tensor | None, list[Image.Image]]:
        """Sample one image per (group, seed) with the current policy (no grad); score with `reward` unless None.

        start_seeds: each item's x_T seed (start_seeds()); None = its own seed. Returns the trajectories
        (latents [N, T+1, C, h, w], log-probs [N, T]), the rewards [N] (None without a reward) and the images;
        a weighted reward's member means go to reward_components.
        """
        from poseloop.sampling.sampler import sample

        cfg = self.cfg
        lat, lps, conds, rewards, images = [], [], [], [], []
        components: dict[str, list[torch.Tensor]] = {}
        timesteps = torch.empty(0)
        bs = cfg.sample.batch_size
        for i in range(0, len(groups), bs):
            gs, ss = list(groups[i:i + bs]), list(seeds[i:i + bs])
            prompts = [self.specs[g].prompt for g in gs]
            poses = [self.group_image(g) for g in gs]
            # Sampled in the training pass's numeric context (see rescore): mixed precision stays consistent.
            out = sample(self.comp, prompts, poses, ss, cfg.sample, self.width, self.height,
                         autocast=self.accelerator.autocast,
                         start_seeds=None if start_seeds is None else list(start_seeds[i:i + bs]))
            conds.append(out.cond)
            lat.append(out.latents)
            lps.append(out.log_probs)
            timesteps = out.timesteps
            images += out.images
            if reward is not None:
                rewards.append(score(reward, out.images, out.latents[:, -1], prompts, [self.group_metadata(g) for g in gs]))
                # A weighted mix keeps each member's values: logged beside the total (reward_<member>).
                for label, value in getattr(reward, "last_components", {}).items():
                    components.setdefault(label, []).append(value.detach().float().cpu())
        self.reward_components = {label: float(torch.cat(v).mean()) for label, v in components.items()}
        batch = TrajectoryBatch(torch.cat(lat), torch.cat(lps), timesteps, cat_conditioning(conds), cfg.sample)
        return batch, (torch.cat(rewards) if reward is not None else None), images

    def epoch_items(self, epoch: int) -> tuple[list[int], list[int], list[str]]:
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

    def start_seeds(self, epoch: int, groups: Sequence[int]) -> list[int] | None:
        """Each item's x_T seed with train.shared_start (one per group and epoch: every process agrees), else None."""
        if not self.cfg.train.shared_start:
            return None
        return [derive_seed(self.cfg.train.seed, "start", epoch, g) for g in groups]

    def _key(self, g: int) -> str:
        spec = self.specs[g]
        return f"{spec.prompt}\x1f{spec.pose_name}"

    # -- what algorithms call (poseloop.policy.algos.Trainer): processes, re-scoring, the optimizer step --

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate t over processes (CPU); t itself with one process."""
        return self.accelerator.gather(t.to(self.accelerator.device)).cpu() if self.accelerator.num_processes > 1 else t

    def gather_keys(self, keys: list[str]) -> list[str]:
        """Concatenate group keys over processes."""
        if self.accelerator.num_processes == 1:
            return keys
        from accelerate.utils import gather_object

        return list(gather_object(keys))

    def local_part(self, mb: torch.Tensor, n_local: int) -> tuple[torch.Tensor, float]:
        """This process's part of a global minibatch, and the factor its mean loss is scaled by.

        `mb` indexes the epoch's global items, process p holding [p * n_local, (p + 1) * n_local); every
        process draws the same global minibatches (shared generator), so N processes train on exactly
        the minibatches one process draws. The part is returned as local indices; the factor
        len(part) * N / len(mb) makes the mean over processes of the scaled local means (the all-reduce
        in optimizer_step) the mean loss of the whole global minibatch, however unevenly it is split
        (a part may be empty). With one process the part is mb and the factor exactly 1.
        """
        acc = self.accelerator
        lo = acc.process_index * n_local
        part = mb[(mb >= lo) & (mb < lo + n_local)] - lo
        return part, len(part) * acc.num_processes / max(1, len(mb))

    def optimizer_step(self) -> None:
        """Average gradients over processes, clip, step, zero; count the step."""
        acc = self.accelerator
        params = self.policy.parameters()
        if acc.num_processes > 1:
            # The model is not wrapped in DDP (the shared sampler needs the plain modules): average here.
            # A process whose part of the minibatch was empty has no gradient: it adds zeros, and every
            # process takes part in every all-reduce.
            for p in params:
                if p.requires_grad:
                    p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
        if self.cfg.optim.max_grad_norm > 0:
            acc.clip_grad_norm_(params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def rescore(self, cond: Any, latents: torch.Tensor, timesteps: torch.Tensor, step: int,
                sample_cfg: SampleConfig) -> torch.Tensor:
        """log-probs [B] of recorded step `step` under the current weights, in the training pass's context.

        The noise prediction runs under accelerate's autocast here AND when sampling (sample_groups),
        so the PPO ratio compares like with like. Sampling in fp32 but re-scoring under bf16 (CPU, tiny
        model) gave mean |r - 1| 2.7e-3 before any update, 27x the clip range 1e-4: clip fraction 1.0,
        nothing learned; with both under autocast r = 1 exactly. The alternative, re-computing the old
        log-probs in this context under no_grad before the first update, costs one more forward pass per
        trained step (+28% of an epoch, tiny model, 10 steps) and scores the samples under a policy
        slightly different from the one that drew them; sampling under autocast cost +4% of sampling
        time on CPU (GPUs sample faster under it) and is what ddpo-pytorch does.
        """
        from poseloop.sampling.sampler import rescore

        return rescore(self.comp, cond, latents, timesteps, step, sample_cfg,
                       autocast=self.accelerator.autocast).float()

    def choose_steps(self, batch: TrajectoryBatch, gen: torch.Generator) -> list[int]:
        """The steps to train a minibatch on: train.timestep_fraction of the steps that have a log-probability
        (sigma_t > 0), in order; with train.first_steps N, of the first N of them.

        A deterministic step (set_alpha_to_one's last one: variance 0, no density) is never trained
        on. When every step is stochastic this draws exactly what chosen_steps(T, ...) draws.
        """
        from poseloop.sampling.sampler import stochastic_steps

        mask = stochastic_steps(self.comp.scheduler, batch.timesteps, batch.sample_cfg.eta,
                                batch.sample_cfg.sampler)  # [T] bool; LCM: all but the last
        trainable = mask.nonzero().flatten().tolist()
        if self.cfg.train.first_steps:
            trainable = trainable[:self.cfg.train.first_steps]
        if not trainable:
            raise ConfigError(f"sample.steps: none of the {mask.numel()} step(s) is stochastic (the scheduler's "
                              "set_alpha_to_one makes the last one deterministic); use more steps")
        return [trainable[k] for k in chosen_steps(len(trainable), self.cfg.train.timestep_fraction, gen)]

    def reference_log_probs(self, batch: TrajectoryBatch, steps: Sequence[int] | None = None) -> torch.Tensor:
        """log-probs [N, T] of the trajectories under the model before fine-tuning (no grad; NaN off `steps`)."""
        with self.policy.reference():
            return self.log_probs(batch, steps, progress=f"{self.cfg.algo} reference log-probs")

    def log_probs(self, batch: TrajectoryBatch, steps: Sequence[int] | None = None, progress: str = ""
                  ) -> torch.Tensor:
        """log-probs [N, T] under the current weights (no grad; NaN off `steps`); a bar named `progress`."""
        from tqdm.auto import tqdm

        n, num_steps = batch.log_probs.shape
        out = torch.full((n, num_steps), float("nan"))
        bs = self.cfg.sample.batch_size
        # One forward pass per trajectory and step: minutes on a large pair set, so it shows progress.
        bar = tqdm(total=n, desc=progress, unit="traj", leave=False, mininterval=0,
                   disable=not (progress and self.progress and self.accelerator.is_main_process))  # show each update
        with torch.no_grad():
            for i in range(0, n, bs):
                sl = slice(i, i + bs)
                cond = batch.cond.select(sl)
                for j in (range(num_steps) if steps is None else steps):
                    out[sl, j] = self.rescore(cond, batch.latents[sl], batch.timesteps, j, batch.sample_cfg).cpu()
                bar.update(min(bs, n - i))
        bar.close()
        return out

    def note_first_ratio(self, log_probs: torch.Tensor, old: torch.Tensor) -> None:
        """Keep max |exp(log_probs - old) - 1| [B] of the run's first trained step as first_ratio (later calls: no-op).

        Before any update the policy is the one that sampled (or the reference), so this is 0 up to kernel
        noise: a test's check that re-scoring reproduces what sampling recorded.
        """
        if self.first_ratio is None:
            self.first_ratio = float((torch.exp(log_probs.detach() - old) - 1).abs().max())

    # -- evaluation, logging, guards --

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Fixed seeds on the first groups: an image grid (PNG) and the reward(s) of those images."""
        n = min(self.cfg.output.grid_images, max(1, len(self.specs))) if self.specs else 0
        if n == 0 or not self.accelerator.is_main_process:
            return {}
        groups = [i % len(self.specs) for i in range(n)]
        seeds = [derive_seed(self.cfg.train.seed, "eval", i) for i in range(n)]
        batch, rewards, images = self.sample_groups(groups, seeds, self.reward)
        out: dict[str, float] = {}
        if rewards is not None:
            out["eval_reward"] = float(rewards.mean())
        if self.heldout is not None:
            prompts = [self.specs[g].prompt for g in groups]
            out["heldout_reward"] = float(score(self.heldout, images, batch.latents[:, -1], prompts,
                                                [self.group_metadata(g) for g in groups]).mean())
        save_grid([self.group_image(g) for g in groups], images, self.run_dir / "grids" / f"grid_e{epoch:04d}.png",
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
        if g.min_kl > 0 and "approx_kl" in row and self.algorithm.kl_is_measured():
            self.low_kl_streak = self.low_kl_streak + 1 if abs(row["approx_kl"]) < g.min_kl else 0
            if self.low_kl_streak == g.min_kl_epochs:  # once per stall, not every epoch after
                warnings.warn(f"epoch {int(row['epoch'])}: approx KL below guard.min_kl {g.min_kl:g} for "
                              f"{g.min_kl_epochs} epochs: the policy is not moving. Raise optim.lr (now "
                              f"{self.cfg.optim.lr:g}; try x10) or train.clip_range (now {self.cfg.train.clip_range:g}), "
                              "or check that the reward differs between images of a group", stacklevel=2)
        self.heldout_fired = False  # whether this epoch's held-out reward fired (a stop then restores the best)
        if "heldout_reward" in row:
            h = row["heldout_reward"]
            if self.best_heldout is not None and h < self.best_heldout - g.heldout_drop * abs(self.best_heldout):
                fired.append(f"held-out reward {h:.4f} fell more than {g.heldout_drop:.0%} below its best "
                             f"{self.best_heldout:.4f} (reward hacking?)")
                self.heldout_fired = True
            elif self.best_heldout is None or h > self.best_heldout:
                self.remember_best(h, int(row["epoch"]))
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


    def remember_best(self, heldout: float, epoch: int) -> None:
        """Record a new best held-out reward and, for guard.restore_best, copies of the weights that reached it."""
        self.best_heldout = heldout
        if self.cfg.guard.stop and self.cfg.guard.restore_best:
            self.best_state, self.best_epoch = self.policy.state_dict(), epoch

    def log(self, row: dict[str, float]) -> None:
        """Append an epoch's metrics to metrics.csv and the accelerate trackers."""
        self.history.append(row)
        if not self.accelerator.is_main_process:
            return
        write_csv(self.run_dir / "metrics.csv", self.history)
        self.accelerator.log({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    # -- the loop --

    def run(self) -> TrainResult:
        """Train (or resume) to cfg.train.epochs, with checkpoints, exports, logs and guards."""
        from tqdm.auto import tqdm

        cfg, acc = self.cfg, self.accelerator
        start = time.perf_counter()
        if self.progress and acc.is_main_process:
            print(f"run {self.run_name}: parent {self.parent.version if self.parent else lineage.BASE} "
                  f"({self.parent_reason})", flush=True)
        resumed = cfg.train.resume and self.load_checkpoint()
        if not resumed:
            random.seed(cfg.train.seed)
            np.random.seed(cfg.train.seed)
            torch.manual_seed(cfg.train.seed)
            if (self.run_dir / "checkpoint").exists() and acc.is_main_process:
                shutil.rmtree(self.run_dir / "checkpoint")
            if acc.is_main_process and self.run_dir.exists():
                (self.run_dir / "metrics.csv").unlink(missing_ok=True)
        acc.init_trackers("policy", config={k: str(v) for k, v in flat_config(to_dict(cfg)).items()})
        first_epoch = self.epoch
        stopped = ""
        if cfg.output.grid_every and not resumed:
            before = self.evaluate(0)
            if before:
                self.log({"epoch": 0.0, **before})
            # The model before training is the held-out guard's first reference: a direct-gradient run
            # (ReFL, DRaFT) can over-optimise within its first epoch, which a best taken from epoch 1 misses.
            if "heldout_reward" in before:
                self.remember_best(before["heldout_reward"], 0)
        epoch_fn = self.algorithm.epoch
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
                if acc.num_processes > 1:
                    # The held-out reward is scored on the main process only: its decision stops every process.
                    from accelerate.utils import broadcast_object_list

                    stopped = broadcast_object_list([stopped])[0]
                self.log(row)
                bar.set_postfix({k: f"{row[k]:.4g}" for k in ("reward_mean", "pair_accuracy", "loss", "approx_kl")
                                 if k in row})
                if stopped and self.heldout_fired and cfg.guard.restore_best and self.best_state is not None:
                    # The guard sees the drop one epoch late: export the best held-out weights, not the hacked ones.
                    self.policy.load_state_dict(self.best_state)
                    stopped += f"; restored the weights of epoch {self.best_epoch} (best held-out reward)"
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
        # Every process tears the process group down together: a rank that destroyed it while the main one was still
        # writing its checkpoint and export aborted once in the suite (SIGABRT in teardown; 32 reruns did not repeat it).
        acc.wait_for_everyone()
        acc.end_training()
        key = "reward_mean" if cfg.online else "pair_accuracy"
        values = [r[key] for r in self.history if key in r and not math.isnan(r[key])]
        return TrainResult(algo=cfg.algo, run_dir=self.run_dir, epochs_done=self.epoch,
                           epochs_this_run=self.epoch - first_epoch,
                           reward_start=values[0] if values else None, reward_end=values[-1] if values else None,
                           seconds=time.perf_counter() - start, export_dir=self.export_dir, history=self.history,
                           stopped=stopped, metric="reward" if cfg.online else "pair accuracy")


def train(cfg: PolicyConfig, reward: Any = None, heldout_reward: Any = None, progress: bool = True) -> TrainResult:
    """Run DDPO or D3PO as configured; `reward` overrides cfg.reward with any callable reward object."""
    from poseloop.data.locks import run_locked

    trainer = PolicyTrainer(cfg, reward=reward, heldout_reward=heldout_reward, progress=progress)
    # Two runs into one folder would overwrite each other's checkpoint and metrics: the second stops here.
    return run_locked(trainer.accelerator, trainer.run_dir / ".lock", f"run folder {trainer.run_dir}",
                      "wait for that run to finish (the same command then resumes from its checkpoint), or pick "
                      "another --output.run_name", trainer.run)

