"""ReFL (ImageReward, Xu et al. 2023): direct reward fine-tuning through one late denoising step.

Per minibatch of (prompt, pose, seed): the shared DDIM sampler's steps run WITHOUT gradient from
noise down to a stop step drawn uniformly in [refl.window_start, refl.window_end) x sample.steps;
one UNet(+ControlNet) prediction with gradient (CFG as when sampling) at that step gives the
predicted x0; a differentiable reward scores it (a latent reward model on the x0 latents directly,
an image reward on the VAE decoding, with gradient); loss = relu(margin - reward) * scale
(poseloop.policy.losses.refl_loss), backpropagated into the trainable target, then the trainer's
optimizer step. A reward whose output carries no gradient is refused at the first batch.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from poseloop.policy import losses
from poseloop.policy.algos import Algorithm, Trainer
from poseloop.config.lib import ConfigError
from poseloop.policy.rollouts import derive_seed


def reward_name(reward: Any) -> str:
    """The reward's name for messages."""
    return str(getattr(reward, "name", type(reward).__name__))


def refuse_non_differentiable(reward: Any, algo: str = "refl") -> None:
    """ConfigError when a reward declares itself not differentiable (attribute `differentiable`)."""
    if getattr(reward, "differentiable", True) is False:
        raise ConfigError(not_differentiable_message(reward, algo))


def not_differentiable_message(reward: Any, algo: str = "refl") -> str:
    """The one-line refusal of a reward without gradient for the direct algorithm `algo`."""
    return (f"--algo {algo}: reward {reward_name(reward)!r} is not differentiable (its score has no gradient with "
            f"respect to the image/latents); use --algo ddpo for it")


def decode_with_grad(comp: Any, latents: torch.Tensor) -> torch.Tensor:
    """Latents [B, C, h, w] -> images [B, 3, H, W] in 0..1 with gradient (sampling.decode_latents is no_grad)."""
    vae = comp.vae
    z = latents.to(comp.device, vae.dtype) / vae.config.scaling_factor
    image = vae.decode(z, return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


class ReFL(Algorithm):
    """ReFL with the shared sampler's DDIM step, the trainer's conditioning and optimizer step."""

    stat: str = "stop_step"  # minibatch()'s statistic, logged as its mean over the epoch
    tag: str = "refl"  # names the epoch's random stream (derive_seed)

    def __init__(self, trainer: Trainer) -> None:
        super().__init__(trainer)
        self.checked = False

    def stop_step(self, gen: torch.Generator) -> int:
        """A stop step index in the late window [start, end) of the schedule (at least one step)."""
        r, n = self.trainer.cfg.refl, self.trainer.cfg.sample.steps
        lo = min(n - 1, int(np.floor(r.window_start * n)))
        hi = max(lo + 1, min(n, int(np.ceil(r.window_end * n))))
        return int(torch.randint(lo, hi, (1,), generator=gen))

    def rollout_to(self, cond: Any, seeds: list[int], stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x at step `stop` (no gradient), and the schedule's timesteps."""
        x, timesteps, _ = self.rollout(cond, seeds, stop)
        return x, timesteps

    def rollout(self, cond: Any, seeds: list[int], stop: int
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Generator]]:
        """x at step `stop` (no gradient), the timesteps, and the per-seed generators positioned for step `stop`.

        The generators draw each step's noise as poseloop.sampling.sampler.sample does, so continuing the
        chain with them (DRaFT) ends on exactly the sample the current weights draw for these seeds.
        """
        from poseloop.sampling.sampler import initial_noise, predict_noise
        from poseloop.sampling.ddim import ddim_step_with_logprob

        t = self.trainer
        comp, s = t.comp, t.cfg.sample
        scheduler = comp.scheduler
        scheduler.set_timesteps(s.steps, device=comp.device)
        shape = (comp.latent_channels, t.height // comp.vae_scale_factor, t.width // comp.vae_scale_factor)
        x, gens = initial_noise(seeds, shape)
        x = x.to(comp.device) * scheduler.init_noise_sigma
        with torch.no_grad():
            for ts in scheduler.timesteps[:stop]:
                with t.accelerator.autocast():
                    eps = predict_noise(comp, x, ts, cond, s.guidance_scale, s.controlnet_scale)
                noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(comp.device)
                x, _ = ddim_step_with_logprob(scheduler, eps, ts, x, s.eta, noise=noise)
        return x.detach(), scheduler.timesteps, gens

    def predicted_x0(self, cond: Any, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """x0 predicted by one gradient-carrying noise prediction at `timestep` (CFG as when sampling)."""
        from poseloop.sampling.sampler import predict_noise
        from poseloop.sampling.ddim import predicted_x0_and_eps

        t = self.trainer
        comp, s = t.comp, t.cfg.sample
        with t.accelerator.autocast():
            out = predict_noise(comp, x, timestep, cond, s.guidance_scale, s.controlnet_scale)
        alpha = comp.scheduler.alphas_cumprod.to(x.device)[timestep.long()].float().reshape(1, 1, 1, 1)
        x0, _ = predicted_x0_and_eps(comp.scheduler.config.prediction_type, out.float(), x.float(), alpha)
        return x0

    def score(self, x0: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> torch.Tensor:
        """The reward [B] of predicted x0 with gradient; refuses (ConfigError) a reward without one."""
        t = self.trainer
        reward = t.reward
        algo = t.cfg.algo
        refuse_non_differentiable(reward, algo)
        needs_images = getattr(reward, "needs_images", True)
        images = self.decode(x0) if needs_images else None
        out = reward(images, x0, prompts, metadata)
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            raise ConfigError(not_differentiable_message(reward, algo))
        self.checked = True
        return out.float().reshape(-1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images of latents with gradient for an image reward (a subclass may checkpoint it)."""
        return decode_with_grad(self.trainer.comp, latents)

    def minibatch(self, cond: Any, seeds: list[int], prompts: list[str], metadata: list[dict[str, Any]],
                  gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Roll out to a late stop step, predict x0 with gradient, score, backpropagate; (loss, reward [B], stop step)."""
        cfg = self.trainer.cfg
        stop = self.stop_step(gen)
        x, timesteps = self.rollout_to(cond, seeds, stop)
        r = self.score(self.predicted_x0(cond, x, timesteps[stop]), prompts, metadata)
        loss = losses.refl_loss(r, cfg.refl.margin, cfg.refl.scale)
        self.trainer.accelerator.backward(loss / cfg.train.grad_accum)
        return loss, r, float(stop)

    def epoch(self, epoch: int) -> dict[str, float]:
        """Minibatches of train.batch_size (group, seed) items: minibatch() backpropagates, then the optimizer steps."""
        from poseloop.sampling.sampler import make_conditioning

        t = self.trainer
        cfg = t.cfg
        t0 = time.perf_counter()
        groups, seeds, _ = t.epoch_items(epoch)
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, epoch, self.tag, t.accelerator.process_index))
        losses_: list[float] = []
        stats: list[float] = []
        rewards: list[torch.Tensor] = []
        bs = cfg.train.batch_size
        starts = list(range(0, len(groups), bs))
        for k, i in enumerate(starts):
            gs, ss = groups[i:i + bs], seeds[i:i + bs]
            prompts = [t.specs[g].prompt for g in gs]
            cond = make_conditioning(t.comp, prompts, [t.group_image(g) for g in gs], cfg.sample, t.width, t.height)
            loss, r, stat = self.minibatch(cond, ss, prompts, [t.group_metadata(g) for g in gs], gen)
            losses_.append(float(loss.detach()))
            stats.append(stat)
            rewards.append(r.detach().float().cpu())
            if (k + 1) % cfg.train.grad_accum == 0 or k == len(starts) - 1:
                t.optimizer_step()
        all_rewards = t.gather(torch.cat(rewards))
        # ReFL: the reward of predicted x0 at the stop step (a training signal, not an evaluation); DRaFT: of the
        # finished samples drawn by the weights before each minibatch's update (DRaFT-LV: of the re-denoised copies).
        return {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                "loss": float(np.mean(losses_)), self.stat: float(np.mean(stats)),
                "samples": float(all_rewards.numel()), "seconds": time.perf_counter() - t0}

    def kl_is_measured(self) -> bool:
        """ReFL logs no KL: the not-moving guard has nothing to read."""
        return False
