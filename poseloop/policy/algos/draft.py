"""DRaFT-K (Clark et al. 2023) / AlignProp (Prabhudesai et al. 2023): backpropagation through the last K steps.

Per minibatch of (prompt, pose, seed): the shared DDIM sampler runs WITHOUT gradient from noise down to
step T - K (ReFL's rollout, with the same per-seed noise generators as poseloop.sampling.sampler.sample); the
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

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from poseloop.policy.algos.refl import ReFL, decode_with_grad


class DRaFT(ReFL):
    """DRaFT-K / AlignProp on the shared sampler; reuses ReFL's rollout, reward check, scoring and epoch loop."""

    stat, tag = "k", "draft"  # the logged statistic (K per minibatch) and the epoch's random stream

    def draw_k(self, gen: torch.Generator) -> int:
        """K for one minibatch: draft.k, or uniform in 1..draft.k with draft.k_random."""
        d = self.trainer.cfg.draft
        if not d.k_random:
            return int(d.k)
        return int(torch.randint(1, d.k + 1, (1,), generator=gen))

    def grad_step(self, cond: Any, x: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One DDIM step x_t -> x_{t-1} with gradient (CFG as when sampling), checkpointed if configured."""
        from poseloop.sampling.sampler import predict_noise
        from poseloop.sampling.ddim import ddim_step_with_logprob

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

    def minibatch(self, cond: Any, seeds: list[int], prompts: list[str], metadata: list[dict[str, Any]],
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        """K steps with gradient (or DRaFT-LV's copies), score, backpropagate; (loss, reward [B], K)."""
        cfg = self.trainer.cfg
        if cfg.draft.lv:
            loss, r = self.lv_backward(cond, seeds, prompts, metadata)
            return loss, r, 1.0
        k = self.draw_k(gen)
        r = self.score(self.final_latents(cond, seeds, k), prompts, metadata)
        loss = -r.mean() * cfg.draft.scale
        self.trainer.accelerator.backward(loss / cfg.train.grad_accum)
        return loss, r, float(k)
