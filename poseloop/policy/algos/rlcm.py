"""RLCM (Oertell et al. 2024): DDPO's PPO over latent consistency model trajectories.

Every multistep LCM step is a Gaussian policy (poseloop.sampling.lcm): x_prev ~ N(sqrt(alpha_bar_prev) * denoised,
(1 - alpha_bar_prev) I). RLCM trains it exactly as DDPO trains DDIM steps: per-prompt advantages from the
stat tracker, clipped to train.adv_clip_max, the PPO-clipped ratio of re-scored to sampled log-probs.
So the algorithm is DDPO's, run on the LCM sampler (config validation requires sample.sampler = lcm);
the trainer's sampler, re-scoring, LoRA target, checkpoints, resume and exports are shared. The last
LCM step returns its denoised latent (diffusers' LCMScheduler) and has no log-probability: it is never
trained on (RLCM injects noise there too, which never reaches the image: a zero-mean gradient term).
"""

from __future__ import annotations

from poseloop.policy.algos.ddpo import DDPO


class RLCM(DDPO):
    """DDPO on LCM trajectories (cfg.sample.sampler == 'lcm', checked by PolicyConfig.validate).

    Nothing to override: the shared sampler dispatches on the sampler (and warns when the model is not an
    LCM), and the trainer never trains the deterministic last step (sampling.stochastic_steps).
    """
