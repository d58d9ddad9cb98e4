"""DDPO: PPO-clipped policy gradient against a reward, advantages normalised per (prompt, pose) group.

One epoch = sample train.groups_per_epoch groups x sample.images_per_group trajectories with the
current policy, score them, normalise the rewards per group (poseloop.policy.advantages.PerPromptStatTracker),
then train.inner_epochs shuffled passes of poseloop.policy.losses.ppo_clip_loss over a train.timestep_fraction
of each minibatch's steps, gradients summed over steps and train.grad_accum minibatches.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from poseloop.policy import losses
from poseloop.policy.algos import Algorithm
from poseloop.policy.rollouts import TrajectoryBatch, derive_seed


class DDPO(Algorithm):
    """DDPO (Black et al. 2023) with the shared sampler's log-probs and the trainer's stat tracker."""

    def epoch(self, epoch: int) -> dict[str, float]:
        """Sample, score, normalise per group, update."""
        t = self.trainer
        t0 = time.perf_counter()
        groups, seeds, keys = t.epoch_items(epoch)
        batch, rewards, _ = t.sample_groups(groups, seeds, t.reward, start_seeds=t.start_seeds(epoch, groups))
        assert rewards is not None
        t_sample = time.perf_counter() - t0
        all_rewards = t.gather(rewards)
        all_keys = t.gather_keys(keys)
        adv_all = torch.from_numpy(t.tracker.update(all_keys, all_rewards.numpy()))
        per = len(keys)
        adv = adv_all[t.accelerator.process_index * per:(t.accelerator.process_index + 1) * per]
        members = {f"reward_{label}": v for label, v in t.reward_components.items()}
        info = self.update(batch, adv, epoch)
        return {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                **members, **info, "samples": float(all_rewards.numel()), "sample_seconds": t_sample,
                "seconds": time.perf_counter() - t0}

    def update(self, batch: TrajectoryBatch, adv: torch.Tensor, epoch: int) -> dict[str, float]:
        """PPO-clipped passes over the epoch's trajectories (CFG inside the training pass); adv is [N]."""
        t = self.trainer
        cfg = t.cfg.train
        n = batch.log_probs.shape[0]
        stats: dict[str, list[float]] = {"loss": [], "approx_kl": [], "clipfrac": [], "ratio": []}
        micro = 0
        procs = t.accelerator.num_processes
        for inner in range(cfg.inner_epochs):
            # The same generator on every process (0: the seed one process always used): the same global
            # shuffle, minibatches of batch_size x processes and chosen steps as one process with that batch.
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, "shuffle", inner, 0))
            perm = torch.randperm(n * procs, generator=gen)
            bs = cfg.batch_size * procs
            minibatches = [perm[i:i + bs] for i in range(0, n * procs, bs)]
            for mb_i, mb in enumerate(minibatches):
                steps = t.choose_steps(batch, gen)
                idx, weight = t.local_part(mb, n)
                if len(idx) == 0:
                    steps = []  # nothing of this minibatch here: the optimizer step below still all-reduces
                cond = batch.cond.select(idx)
                lat = batch.latents[idx]
                for j in steps:
                    lp = t.rescore(cond, lat, batch.timesteps, j, batch.sample_cfg)  # [b]
                    old = batch.log_probs[idx, j].to(lp.device)  # [b]
                    loss, info = losses.ppo_clip_loss(lp, old, adv[idx].to(lp.device), cfg.clip_range,
                                                      cfg.adv_clip_max)
                    t.note_first_ratio(lp, old)
                    t.accelerator.backward(loss * weight / (len(steps) * cfg.grad_accum))
                    stats["loss"].append(float(loss.detach()))
                    for key in ("approx_kl", "clipfrac", "ratio"):
                        stats[key].append(float(info[key]))
                micro += 1
                if micro % cfg.grad_accum == 0 or (inner == cfg.inner_epochs - 1 and mb_i == len(minibatches) - 1):
                    t.optimizer_step()
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def kl_is_measured(self) -> bool:
        """DDPO's approx KL is to the sampling policy: zero by construction when an epoch makes one update."""
        tr = self.trainer.cfg.train
        samples = tr.groups_per_epoch * self.trainer.cfg.sample.images_per_group
        procs = self.trainer.accelerator.num_processes
        return math.ceil(samples / (tr.batch_size * procs)) * tr.inner_epochs > tr.grad_accum
