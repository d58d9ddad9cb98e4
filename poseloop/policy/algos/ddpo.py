"""DDPO: PPO-clipped policy gradient against a reward, advantages normalised per (prompt, pose) group.

One epoch = sample train.groups_per_epoch groups x sample.images_per_group trajectories with the
current policy, score them, normalise the rewards per group (poseloop.policy.advantages.PerPromptStatTracker),
then train.inner_epochs shuffled passes of poseloop.policy.losses.ppo_clip_loss over a train.timestep_fraction
of each minibatch's steps, gradients summed over steps and train.grad_accum minibatches.

Fused update (train.fused_update, opt-in, used only where exact): when the whole epoch is one optimizer step
(inner_epochs 1, no more minibatches than grad_accum), every re-scored step would run under the
weights that sampled it, so r = 1 exactly, the clip is inactive and the re-scoring forward recomputes
what sampling computed: the gradient is sum over (sample i, trained step j) of c_i grad log p_ij, where
c_i is what the PPO loss gives (-clip(A_i) x the minibatch's weight / (b x len(steps) x grad_accum)).
The update's generator is replayed before sampling (fused_plan: which steps each sample's minibatch
will draw), and the sampling forward of those steps runs with gradients. Two routes (train.fused_route):

* per_sample (the default): each trained step's log-probs are backpropagated during sampling at once
  (that step's graph freed) and only each sample's gradient of the LoRA weights is kept, summed over
  the steps its minibatch trains ([N, *weight] per weight; poseloop.policy.per_sample_grads); the update
  computes the loss and statistics from the recorded log-probs, takes c_i as autograd's d loss / d log p
  (the same coefficients, checked equal over a sample's steps), and backpropagates sum_i c_i g_i through
  the trainer's usual backward and optimizer step. Memory: one step's graph, as re-scoring.
* graphs: the sampler keeps the log-prob graphs of the steps and the update backpropagates them once:
  every trained step's activations are held until the update (memory grows with steps x batch).

Per-sample gradients need every trainable weight to be a LoRA Linear / Conv2d weight: the `controlnet`
target (a full fine-tune: N copies of the ControlNet's gradient would not fit) falls back to graphs
with a warning. Elsewhere the standard re-scoring path runs unchanged.
"""

from __future__ import annotations

import math
import time
import warnings

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
        groups, seeds, keys = t._epoch_items(epoch)
        plan = self.fused_plan(epoch, len(keys))  # [n, T] bool or None
        starts = t._start_seeds(epoch, groups)
        if plan is not None and self.fused_route() == "per_sample":
            batch, rewards, _ = t._sample_groups(groups, seeds, t.reward, step_mask=plan, start_seeds=starts)
        else:
            grad_steps = [] if plan is None else plan.any(0).nonzero().flatten().tolist()
            batch, rewards, _ = t._sample_groups(groups, seeds, t.reward, grad_steps=grad_steps, start_seeds=starts)
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
        graphs = batch.extra.pop("log_prob_graphs", None)  # [N, S] (fused update, graphs route) or None
        cols = {j: c for c, j in enumerate(batch.extra.pop("graph_steps", []))}
        pending: torch.Tensor | None = None  # the graphs route's summed loss, backpropagated once
        per_sample = batch.extra.pop("per_sample_grads", None)  # {name: [N, *shape]} (per_sample route) or None
        planned = batch.extra.pop("step_mask", None)  # [N, T] bool: the steps per_sample sums, per sample
        coef = torch.full((n,), float("nan"))  # per_sample route: each sample's c_i (NaN = not trained yet)
        trained = torch.zeros_like(planned) if planned is not None else None  # [N, T] what this update drew
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
                    if per_sample is not None:
                        # r = 1: re-scoring would compute the recorded value. A leaf: autograd gives d loss / d lp.
                        lp = batch.log_probs[idx, j].clone().requires_grad_()  # [b]
                    elif graphs is not None:
                        lp = graphs[idx.to(graphs.device), cols[j]]  # what re-scoring step j would compute
                    else:
                        lp = t._rescore(cond, lat, batch.timesteps, j, batch.sample_cfg)  # [b]
                    old = batch.log_probs[idx, j].to(lp.device)  # [b]
                    loss, info = losses.ppo_clip_loss(lp, old, adv[idx].to(lp.device), cfg.clip_range,
                                                      cfg.adv_clip_max)
                    if t.first_ratio is None:
                        t.first_ratio = float((torch.exp(lp.detach() - old) - 1).abs().max())
                    scaled = loss * weight / (len(steps) * cfg.grad_accum)
                    if per_sample is not None:
                        assert trained is not None
                        (c,) = torch.autograd.grad(scaled, lp)  # [b]: this step's coefficient of each grad log p
                        _note_coefficients(coef, idx, c, j)
                        trained[idx, j] = True
                    elif graphs is None:
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
                    if per_sample is not None:
                        self._backward_per_sample(per_sample, coef, planned, trained)
                        per_sample = None  # the only optimizer step of the epoch (fused_plan's condition)
                    t._optimizer_step()
        return {k: float(np.mean(v)) for k, v in stats.items()}

    def _backward_per_sample(self, per_sample: dict[str, torch.Tensor], coef: torch.Tensor,
                             planned: torch.Tensor, trained: torch.Tensor) -> None:
        """Backpropagate sum_i coef[i] x per_sample[.][i] through the trainer's backward (per_sample route)."""
        if not torch.equal(trained, planned):
            bad = (trained != planned).any(1).nonzero().flatten().tolist()
            raise RuntimeError(f"DDPO per-sample route: samples {bad[:5]} trained other steps than sampling summed "
                               "(fused_plan out of step with update()); set train.fused_route graphs")
        c = torch.nan_to_num(coef, nan=0.0)  # a sample no minibatch trained here (an empty local part): 0
        t = self.trainer
        # d/dp of sum(p * G) is exactly G: the trainer's backward (accelerate's loss scaling included) then
        # leaves G in p.grad, as if the loss had been backpropagated through every trained step.
        surrogate = sum((p * torch.tensordot(c.to(per_sample[n]), per_sample[n], dims=1)).sum()
                        for n, p in t.policy.named_trainable().items())
        t.accelerator.backward(surrogate)

    def fused_route(self) -> str:
        """'per_sample' or 'graphs' (train.fused_route; graphs where per-sample gradients do not apply, with a warning)."""
        t = self.trainer
        if t.cfg.train.fused_route != "per_sample":
            return t.cfg.train.fused_route
        from poseloop.policy.per_sample_grads import unsupported

        why = unsupported(t.policy.module, t.policy.named_trainable())
        if why:
            if not getattr(self, "_warned_route", False):
                warnings.warn(f"train.fused_update: per-sample gradients do not apply to target {t.cfg.target.kind} "
                              f"({why}): the update holds every trained step's graph instead (memory grows with "
                              "steps x batch); set train.fused_route graphs to say so, or train.fused_update false",
                              stacklevel=2)
                self._warned_route = True
            return "graphs"
        return "per_sample"

    def fused_plan(self, epoch: int, n: int) -> torch.Tensor | None:
        """[n, T] bool: local sample i is trained on step j by the update of `epoch`, when the fused update is exact; else None."""
        t = self.trainer
        cfg = t.cfg.train
        procs = t.accelerator.num_processes
        bs = cfg.batch_size * procs
        if not cfg.fused_update or cfg.inner_epochs != 1 or math.ceil(n * procs / bs) > cfg.grad_accum:
            return None  # more than one optimizer step: later minibatches need re-scoring under new weights
        from types import SimpleNamespace

        from poseloop.sampling.sampler import _step_scheduler

        # Replay update()'s generator (shuffle, then each minibatch's steps) on the timesteps sample() will use.
        timesteps = _step_scheduler(t.comp, t.cfg.sample).timesteps.detach().to("cpu", torch.long)
        like = SimpleNamespace(timesteps=timesteps, sample_cfg=t.cfg.sample)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, "shuffle", 0, 0))
        perm = torch.randperm(n * procs, generator=gen)
        plan = torch.zeros(n, len(timesteps), dtype=torch.bool)
        for i in range(0, n * procs, bs):
            steps = t._chosen_trainable_steps(like, gen)  # type: ignore[arg-type]
            idx, _ = t._local_part(perm[i:i + bs], n)  # this process's samples of the minibatch
            for j in steps:
                plan[idx, j] = True
        return plan

    def fused_steps(self, epoch: int, n: int) -> list[int] | None:
        """The steps the update of `epoch` will train on (n local samples) when the fused update is exact, else None."""
        plan = self.fused_plan(epoch, n)
        return None if plan is None else plan.any(0).nonzero().flatten().tolist()

    def kl_is_measured(self) -> bool:
        """DDPO's approx KL is to the sampling policy: zero by construction when an epoch makes one update."""
        tr = self.trainer.cfg.train
        samples = tr.groups_per_epoch * self.trainer.cfg.sample.images_per_group
        procs = self.trainer.accelerator.num_processes
        return math.ceil(samples / (tr.batch_size * procs)) * tr.inner_epochs > tr.grad_accum


def _note_coefficients(coef: torch.Tensor, idx: torch.Tensor, c: torch.Tensor, step: int) -> None:
    """Record c [b] as coef[idx]; a sample's coefficient must be the same for each of its steps (r = 1 exactly)."""
    c = c.detach().cpu()
    prev = coef[idx]
    seen = ~torch.isnan(prev)
    if not torch.equal(prev[seen], c[seen]):
        # sum_j c_ij g_ij = c_i sum_j g_ij only holds with equal c_ij; the per-step sums cannot be split again.
        raise RuntimeError(f"DDPO per-sample route: step {step} weighs a sample's gradient differently from its other "
                           "steps; set train.fused_route graphs")
    coef[idx] = c

