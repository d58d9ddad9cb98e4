"""DRaFT-K (Clark et al. 2023) / AlignProp (Prabhudesai et al. 2023): backpropagation through the last K steps.

Per minibatch of (prompt, pose, seed): the shared DDIM sampler runs WITHOUT gradient from noise down to
step T - K (ReFL's rollout, with the same per-seed noise generators as poseloop.sampling.sample); the
last K steps run WITH gradient (UNet+ControlNet with CFG, the DDIM step with its eta noise drawn from
the same generators), so the final latents are exactly the sample the current weights draw for the
seeds. A differentiable reward scores them (a latent reward model directly, an image reward through a
VAE decode with gradient); loss = -reward x draft.scale, backpropagated into the trainable target,
then the trainer's optimizer step. K is draft.k, or drawn uniformly in 1..draft.k per minibatch
(draft.k_random, AlignProp's random truncation). With draft.checkpointing every gradient-carrying step
(and the decode) is wrapped in torch.utils.checkpoint: only its input is kept, its activations are
recomputed in the backward pass, so memory does not grow with K. A reward without gradient is refused
at the first batch (ReFL's check). DRaFT-LV (draft.lv = n > 0): the whole chain without gradient,
then n copies of the final sample noised to the last timestep, each denoised by one step with gradient.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from poseloop.algos.refl import ReFL, decode_with_grad
from poseloop.rollouts import derive_seed


class DRaFT(ReFL):
    """DRaFT-K / AlignProp on the shared sampler; reuses ReFL's rollout, reward check and scoring."""

    def draw_k(self, gen: torch.Generator) -> int:
        """K for one minibatch: draft.k, or uniform in 1..draft.k with draft.k_random."""
        d = self.trainer.cfg.draft
        if not d.k_random:
            return int(d.k)
        return int(torch.randint(1, d.k + 1, (1,), generator=gen))

    def grad_step(self, cond: Any, x: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One DDIM step x_t -> x_{t-1} with gradient (CFG as when sampling), checkpointed if configured."""
        from poseloop.sampling import ddim_step_with_logprob, predict_noise

        t = self.trainer
        comp, s = t.comp, t.cfg.sample

        def step(x_in: torch.Tensor) -> torch.Tensor:
            with t.accelerator.autocast():
                eps = predict_noise(comp, x_in, timestep, cond, s.guidance_scale, s.controlnet_scale)
            x_prev, _ = ddim_step_with_logprob(comp.scheduler, eps, timestep, x_in, s.eta, noise=noise)
            return x_prev

        if t.cfg.draft.checkpointing:
            # Non-reentrant: works when the input needs no gradient (the first step's x is a detached
            # rollout) and restores the autocast state when it recomputes.
            out: torch.Tensor = checkpoint(step, x, use_reentrant=False)
            return out
        return step(x)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images with gradient; the VAE decode is checkpointed too (AlignProp), its activations are large."""
        comp = self.trainer.comp
        if self.trainer.cfg.draft.checkpointing:
            out: torch.Tensor = checkpoint(decode_with_grad, comp, latents, use_reentrant=False)
            return out
        return decode_with_grad(comp, latents)

    def final_latents(self, cond: Any, seeds: list[int], k: int) -> torch.Tensor:
        """The sample's final latents: T - k steps without gradient, then k steps with gradient."""
        t = self.trainer
        comp, steps = t.comp, t.cfg.sample.steps
        x, timesteps, gens = self.rollout(cond, seeds, steps - k)
        shape = tuple(x.shape[1:])
        for ts in timesteps[steps - k:]:
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(comp.device)
            x = self.grad_step(cond, x, ts, noise)
        return x

    def lv_backward(self, cond: Any, seeds: list[int], prompts: list[str], metadata: list[dict[str, Any]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DRaFT-LV's minibatch: backpropagate draft.lv re-denoised copies of the sample; (mean loss, mean reward [B]).

        The whole chain runs without gradient; each copy is the final sample noised to the last timestep
        and denoised by one step with gradient, then backpropagated at once. The copies are noised with the forward process, x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, eps
        from the seeds' own generators; one backward pass per copy keeps memory at one copy's graph.
        """
        t = self.trainer
        cfg, comp = t.cfg, t.comp
        x0, timesteps, gens = self.rollout(cond, seeds, cfg.sample.steps)
        last = timesteps[-1]
        alpha = comp.scheduler.alphas_cumprod.to(x0.device)[last.long()].float()
        shape = tuple(x0.shape[1:])
        n = cfg.draft.lv
        losses_, rewards = [], []
        for _ in range(n):
            eps = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(comp.device)
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(comp.device)
            x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
            r = self.score(self.grad_step(cond, x_t, last, noise), prompts, metadata)
            loss = -r.mean() * cfg.draft.scale
            t.accelerator.backward(loss / (n * cfg.train.grad_accum))
            losses_.append(loss.detach())
            rewards.append(r.detach())
        return torch.stack(losses_).mean(), torch.stack(rewards).mean(dim=0)

    def epoch(self, epoch: int) -> dict[str, float]:
        """Minibatches of train.batch_size (group, seed) items: roll out, K steps with gradient, score, update."""
        from poseloop.sampling import make_conditioning

        t = self.trainer
        cfg = t.cfg
        t0 = time.perf_counter()
        groups, seeds, _ = t._epoch_items(epoch)
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, epoch, "draft", t.accelerator.process_index))
        losses_, ks = [], []
        rewards: list[torch.Tensor] = []
        bs = cfg.train.batch_size
        micro = 0
        starts = list(range(0, len(groups), bs))
        for j, i in enumerate(starts):
            gs, ss = groups[i:i + bs], seeds[i:i + bs]
            prompts = [t.specs[g].prompt for g in gs]
            cond = make_conditioning(t.comp, prompts, [t._group_image(g) for g in gs], cfg.sample, t.width, t.height)
            meta = [t._metadata(g) for g in gs]
            if cfg.draft.lv:
                k = 1
                loss, r = self.lv_backward(cond, ss, prompts, meta)
            else:
                k = self.draw_k(gen)
                x = self.final_latents(cond, ss, k)
                r = self.score(x, prompts, meta)
                loss = -r.mean() * cfg.draft.scale
                t.accelerator.backward(loss / cfg.train.grad_accum)
            losses_.append(float(loss.detach()))
            ks.append(float(k))
            rewards.append(r.detach().float().cpu())
            micro += 1
            if micro % cfg.train.grad_accum == 0 or j == len(starts) - 1:
                t._optimizer_step()
        all_rewards = t._gather(torch.cat(rewards))
        # The reward of the finished samples drawn by the weights before each minibatch's update (on-policy;
        # DRaFT-LV: of the re-denoised copies).
        return {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                "loss": float(np.mean(losses_)), "k": float(np.mean(ks)),
                "samples": float(all_rewards.numel()), "seconds": time.perf_counter() - t0}
