"""DDPO: PPO-clipped policy gradient against a reward, advantages normalised per (prompt, pose) group.

One epoch = sample train.groups_per_epoch groups x sample.images_per_group trajectories with the
current policy, score them, normalise the rewards per group (poseloop.advantages.PerPromptStatTracker),
then train.inner_epochs shuffled passes of poseloop.losses.ppo_clip_loss over a train.timestep_fraction
of each minibatch's steps, gradients summed over steps and train.grad_accum minibatches.

Fused update (train.fused_update, opt-in, used only where exact): when the whole epoch is one optimizer step
(inner_epochs 1, no more minibatches than grad_accum), every re-scored step would run under the
weights that sampled it, so r = 1 exactly, the clip is inactive and the re-scoring forward recomputes
what sampling computed. Then the sampler keeps the log-prob graphs of the steps the update will draw
(the shuffle generator is replayed before sampling) and the update backpropagates those: the same
loss, statistics and gradient, one UNet forward per trained step less, the activations of every
trained step held until the update (memory). Elsewhere the standard re-scoring path runs unchanged.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from poseloop import losses
from poseloop.algos import Algorithm
from poseloop.rollouts import TrajectoryBatch, derive_seed


class DDPO(Algorithm):
    """DDPO (Black et al. 2023) with the shared sampler's log-probs and the trainer's stat tracker."""

    def epoch(self, epoch: int) -> dict[str, float]:
        """Sample, score, normalise per group, update."""
        t = self.trainer
        t0 = time.perf_counter()
        groups, seeds, keys = t._epoch_items(epoch)
        grad_steps = self.fused_steps(epoch, len(keys))
        batch, rewards, _ = t._sample_groups(groups, seeds, t.reward, grad_steps=grad_steps or ())
        if grad_steps:
            batch.extra["graph_steps"] = grad_steps
        assert rewards is not None
        t_sample = time.perf_counter() - t0
        all_rewards = t._gather(rewards)
        all_keys = t._gather_keys(keys)
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
        graphs = batch.extra.pop("log_prob_graphs", None)  # [N, S] (fused update) or None
        cols = {j: c for c, j in enumerate(batch.extra.pop("graph_steps", []))}
        pending: torch.Tensor | None = None  # the fused update's summed loss, backpropagated once
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
                steps = t._chosen_trainable_steps(batch, gen)
                idx, weight = t._local_part(mb, n)
                if len(idx) == 0:
                    steps = []  # nothing of this minibatch here: the optimizer step below still all-reduces
                cond = batch.cond.select(idx)
                lat = batch.latents[idx]
                for j in steps:
                    if graphs is not None:
                        lp = graphs[idx.to(graphs.device), cols[j]]  # what re-scoring step j would compute
                    else:
                        lp = t._rescore(cond, lat, batch.timesteps, j, batch.sample_cfg)  # [b]
                    old = batch.log_probs[idx, j].to(lp.device)  # [b]
                    loss, info = losses.ppo_clip_loss(lp, old, adv[idx].to(lp.device), cfg.clip_range,
                                                      cfg.adv_clip_max)
                    if t.first_ratio is None:
                        t.first_ratio = float((torch.exp(lp.detach() - old) - 1).abs().max())
                    scaled = loss * weight / (len(steps) * cfg.grad_accum)
                    if graphs is None:
                        t.accelerator.backward(scaled)
                    else:
                        # Minibatches share the sampling chunks' graphs: one backward of the sum frees them once.
                        pending = scaled if pending is None else pending + scaled
                    stats["loss"].append(float(loss.detach()))
                    for key in ("approx_kl", "clipfrac", "ratio"):
                        stats[key].append(float(info[key]))
                micro += 1
                if micro % cfg.grad_accum == 0 or (inner == cfg.inner_epochs - 1 and mb_i == len(minibatches) - 1):
                    if pending is not None:
                        t.accelerator.backward(pending)
                        pending = None
                    t._optimizer_step()
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def fused_steps(self, epoch: int, n: int) -> list[int] | None:
        """The steps the update of `epoch` will train on (n local samples) when the fused update is exact, else None."""
        t = self.trainer
        cfg = t.cfg.train
        procs = t.accelerator.num_processes
        bs = cfg.batch_size * procs
        if not cfg.fused_update or cfg.inner_epochs != 1 or math.ceil(n * procs / bs) > cfg.grad_accum:
            return None  # more than one optimizer step: later minibatches need re-scoring under new weights
        from types import SimpleNamespace

        from poseloop.sampling import _step_scheduler

        # Replay update()'s generator (shuffle, then each minibatch's steps) on the timesteps sample() will use.
        timesteps = _step_scheduler(t.comp, t.cfg.sample).timesteps.detach().to("cpu", torch.long)
        like = SimpleNamespace(timesteps=timesteps, sample_cfg=t.cfg.sample)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, "shuffle", 0, 0))
        torch.randperm(n * procs, generator=gen)
        steps: set[int] = set()
        for _ in range(0, n * procs, bs):
            steps.update(t._chosen_trainable_steps(like, gen))  # type: ignore[arg-type]
        return sorted(steps)

    def kl_is_measured(self) -> bool:
        """DDPO's approx KL is to the sampling policy: zero by construction when an epoch makes one update."""
        tr = self.trainer.cfg.train
        samples = tr.groups_per_epoch * self.trainer.cfg.sample.images_per_group
        procs = self.trainer.accelerator.num_processes
        return math.ceil(samples / (tr.batch_size * procs)) * tr.inner_epochs > tr.grad_accum
