"""D3PO: direct preference optimisation on (winner, loser) trajectory pairs against the frozen reference.

Pairs come from the rating database (d3po.source=db: human preferences, poseloop.policy.algos.preferences),
or from online samples where a reward picks each group's best and worst of sample.images_per_group
(d3po.source=reward). One epoch = one pass of poseloop.policy.losses.d3po_loss over the epoch's pairs,
winner and loser in one forward pass, a train.timestep_fraction of the steps per batch of pairs.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from poseloop.policy import losses
from poseloop.policy.algos import Algorithm, Trainer
from poseloop.policy.algos.preferences import PreferencePair, TrainingInputError, load_preference_pairs
from poseloop.config.generation import SampleConfig
from poseloop.config.lib import ConfigError
from poseloop.policy.rollouts import TrajectoryBatch, cat_conditioning, derive_seed


class D3PO(Algorithm):
    """D3PO (Yang et al. 2024); reference log-probs from the stored trajectories when they are the reference's."""

    def __init__(self, trainer: Trainer) -> None:
        """Load and check the stored preference pairs (d3po.source=db) before any model loads."""
        super().__init__(trainer)
        d3po = trainer.cfg.d3po
        self.pairs: list[PreferencePair] = load_preference_pairs(d3po) if d3po.source == "db" else []
        self.pair_data: list[TrajectoryBatch] | None = None  # the pairs' trajectories, loaded on first use

    def epoch(self, epoch: int) -> dict[str, float]:
        """One D3PO epoch: stored human pairs, or fresh samples with a reward picking winner and loser."""
        t = self.trainer
        t0 = time.perf_counter()
        out: dict[str, float] = {}
        if t.cfg.d3po.source == "db":
            if self.pair_data is None:
                self.pair_data = self._load_pair_data()
            batches = self.pair_data
        else:
            groups, seeds, _ = t.epoch_items(epoch)
            if len(groups) % t.cfg.sample.images_per_group:
                raise ConfigError(f"train.groups_per_epoch ({t.cfg.train.groups_per_epoch}) must be divisible by the "
                                  f"number of processes ({t.accelerator.num_processes}) for d3po.source=reward: a "
                                  "group's images pick its pair on one process")
            batch, rewards, _ = t.sample_groups(groups, seeds, t.reward, start_seeds=t.start_seeds(epoch, groups))
            assert rewards is not None
            k = t.cfg.sample.images_per_group
            r = rewards.view(-1, k)  # [G, K]: a group's K images are consecutive
            base = torch.arange(r.shape[0]) * k
            win, lose = base + r.argmax(1), base + r.argmin(1)
            both = torch.cat([win, lose])
            pair = TrajectoryBatch(batch.latents[both], batch.log_probs[both], batch.timesteps,
                                   batch.cond.select(both), batch.sample_cfg)
            pair.extra["ref"] = t.reference_log_probs(pair)
            batches = [pair]
            all_rewards = t.gather(rewards)
            out.update(reward_mean=float(all_rewards.mean()), reward_std=float(all_rewards.std(unbiased=False)))
        out.update(self.update(batches, epoch))
        out["seconds"] = time.perf_counter() - t0
        return out

    def update(self, batches: list[TrajectoryBatch], epoch: int) -> dict[str, float]:
        """One pass of the D3PO loss over (winner, loser) pairs: batches hold winners then losers."""
        from tqdm.auto import tqdm

        t = self.trainer
        cfg, d = t.cfg.train, t.cfg.d3po
        t0 = time.perf_counter()
        stats: dict[str, list[float]] = {"loss": [], "pair_accuracy": [], "margin": [], "approx_kl": []}
        procs, rank = t.accelerator.num_processes, t.accelerator.process_index
        # The same generator on every process (0: the seed one process always used): the same global
        # batches of batch_size x processes pairs, order and chosen steps as one process with that batch.
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, "pairs", 0))
        work = []  # (batch, this process's pairs as indices into it, loss factor): the same length everywhere
        bs = cfg.batch_size * procs
        for b_i, batch in enumerate(batches):
            n = batch.latents.shape[0] // 2
            if t.cfg.d3po.source == "db":
                # Every process holds every stored pair: process p takes every N-th pair of each global batch.
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n, bs):
                    mb = perm[i:i + bs]
                    work.append((b_i, mb[rank::procs], len(mb[rank::procs]) * procs / len(mb)))
            else:
                # Online pairs: process p holds global pairs [p * n, (p + 1) * n) of its own groups.
                perm = torch.randperm(n * procs, generator=gen)
                work += [(b_i, *t.local_part(perm[i:i + bs], n)) for i in range(0, n * procs, bs)]
        order = torch.randperm(len(work), generator=gen).tolist()
        if d.pairs_per_epoch and t.cfg.d3po.source == "db":
            order = order[:max(1, math.ceil(d.pairs_per_epoch / bs))]
        # An epoch is one pass over the epoch's pairs: the epoch bar alone sits at 0/1 for minutes, so this
        # one moves with each batch of pairs and the epoch ends with a one-line summary.
        show = t.progress and t.accelerator.is_main_process
        n_pairs = sum(len(work[w][1]) for w in order)
        bar = tqdm(total=n_pairs, desc=f"d3po epoch {epoch + 1}", unit="pair", leave=False, disable=not show)
        for pos, w_i in enumerate(order):
            b_i, idx, weight = work[w_i]
            batch = batches[b_i]
            n = batch.latents.shape[0] // 2
            both = torch.cat([idx, idx + n])  # [2b]: winners then losers in one forward pass
            cond = batch.cond.select(both)
            lat = batch.latents[both]
            ref = batch.extra["ref"][both]
            steps = t.choose_steps(batch, gen)
            for j in (steps if len(idx) else []):  # an empty part still takes part in the optimizer step
                lp = t.rescore(cond, lat, batch.timesteps, j, batch.sample_cfg)
                lp_w, lp_l = lp.chunk(2)
                ref_j = ref[:, j].to(lp.device)
                ref_w, ref_l = ref_j.chunk(2)
                t.note_first_ratio(lp, ref_j)
                loss = losses.d3po_loss(lp_w, lp_l, ref_w, ref_l, d.beta, d.clamp_eps)
                t.accelerator.backward(loss * weight / (len(steps) * cfg.grad_accum))
                with torch.no_grad():
                    margin = (lp_w - ref_w) - (lp_l - ref_l)
                    stats["loss"].append(float(loss.detach()))
                    stats["pair_accuracy"].append(float((margin > 0).float().mean()))
                    stats["margin"].append(float(margin.mean()))
                    stats["approx_kl"].append(float(0.5 * ((lp - ref_j) ** 2).mean()))
            if (pos + 1) % cfg.grad_accum == 0 or pos == len(order) - 1:
                t.optimizer_step()
            bar.update(len(idx))
            bar.set_postfix(loss=f"{np.mean(stats['loss']):.4f}", acc=f"{np.mean(stats['pair_accuracy']):.2f}")
        bar.close()
        out = {k: float(np.mean(v)) if v else float("nan") for k, v in stats.items()}
        if show:
            tqdm.write(f"d3po epoch {epoch + 1}/{t.cfg.train.epochs}: {n_pairs} pairs in {len(order)} batches, "
                       f"loss {out['loss']:.4f}, pair accuracy {out['pair_accuracy']:.3f}, "
                       f"margin {out['margin']:.4g}, {time.perf_counter() - t0:.1f} s")
        return out

    def _load_pair_data(self) -> list[TrajectoryBatch]:
        """Stored trajectories of every preference pair, grouped by sampler settings; reference log-probs."""
        from poseloop.sampling.sampler import make_conditioning
        from poseloop.data.store import load_trajectory

        t = self.trainer
        by_settings: dict[tuple[Any, ...], list[tuple[Any, Any, PreferencePair]]] = {}
        for p in self.pairs:
            tw, tl = load_trajectory(p.winner_path), load_trajectory(p.loser_path)
            m = tw.metadata
            key = tuple(m.get(k, "") for k in ("steps", "width", "height", "guidance_scale", "controlnet_scale",
                                               "eta", "negative_prompt", "sampler"))
            if tuple(tl.latents.shape) != tuple(tw.latents.shape) or not torch.equal(tl.timesteps, tw.timesteps):
                raise TrainingInputError(f"{p.winner_path} and {p.loser_path} were sampled with different settings; "
                                         "a preference pair must come from one group of one round")
            if tw.latents.shape[1] != t.comp.latent_channels:
                raise TrainingInputError(f"{p.winner_path}: latents have {tw.latents.shape[1]} channels but the model "
                                         f"has {t.comp.latent_channels}; train with the model that made the round")
            by_settings.setdefault(key, []).append((tw, tl, p))
        batches = []
        for items in by_settings.values():
            m = items[0][0].metadata
            scfg = SampleConfig(steps=int(m["steps"]), eta=float(m["eta"]), guidance_scale=float(m["guidance_scale"]),
                                controlnet_scale=float(m["controlnet_scale"]), negative_prompt=m.get("negative_prompt", ""),
                                sampler=m.get("sampler", "ddim"))  # trajectories from before LCM are DDIM
            w, h = int(m["width"]), int(m["height"])
            conds = []
            for i in range(0, len(items), t.cfg.sample.batch_size):
                chunk = items[i:i + t.cfg.sample.batch_size]
                poses = []
                for _, _, p in chunk:
                    with Image.open(p.condition_path) as im:
                        poses.append(im.convert("RGB").resize((w, h)))
                conds.append(make_conditioning(t.comp, [p.prompt for _, _, p in chunk], poses, scfg, w, h))
            cond = cat_conditioning(conds)
            # Winners then losers: [2N, ...]; pair i is (i, N + i).
            latents = torch.cat([torch.stack([tw.latents for tw, _, _ in items]),
                                 torch.stack([tl.latents for _, tl, _ in items])])
            log_probs = torch.cat([torch.stack([tw.log_probs for tw, _, _ in items]),
                                   torch.stack([tl.log_probs for _, tl, _ in items])])
            batch = TrajectoryBatch(latents, log_probs, items[0][0].timesteps, cat_conditioning([cond, cond]), scfg)
            if all(self._sampled_by_reference(x.metadata) for tw, tl, _ in items for x in (tw, tl)):
                # The round was sampled by the reference model in this numeric context, and re-scoring a
                # stored step reproduces its stored log-prob: the stored values are the reference.
                batch.extra["ref"] = log_probs.clone()
            else:
                batch.extra["ref"] = t.reference_log_probs(batch)
            batches.append(batch)
        return batches

    def _sampled_by_reference(self, meta: dict[str, str]) -> bool:
        """Whether a stored trajectory came from the model D3PO compares against, in the same dtype."""
        t = self.trainer

        def same(a: str, b: str) -> bool:
            pa, pb = Path(a), Path(b)
            return pa.resolve() == pb.resolve() if a and b and pa.exists() and pb.exists() else a == b

        # The reference is the model the run starts from: the base as loaded, plus the parent policy it continues
        # (a round made with that policy records its version; its LoRA path follows from the version).
        m, model = meta, t.model_cfg
        parent = t.parent.version if t.parent is not None else ""
        lora = m.get("lora", "") == model.lora and (not model.lora or float(m.get("lora_scale", "nan")) == model.lora_scale)
        return (t.cfg.optim.mixed_precision == "no" and m.get("dtype") == str(t.comp.dtype)
                and same(m.get("base_model", ""), model.base) and same(m.get("controlnet", ""), model.controlnet)
                and m.get("policy", "") == parent and (bool(parent) or lora)
                and m.get("lcm_lora", "") == model.lcm_lora)

    def pair_margins(self) -> torch.Tensor:
        """Per stored pair, mean over steps of log r_w - log r_l (r = pi_theta / pi_ref): > 0 = winner favoured."""
        if self.pair_data is None:
            self.pair_data = self._load_pair_data()
        out = []
        for batch in self.pair_data:
            lp = self.trainer.log_probs(batch)  # [2N, T], no grad
            ref = batch.extra["ref"]
            n = lp.shape[0] // 2
            log_r = lp - ref  # [2N, T]
            out.append((log_r[:n] - log_r[n:]).mean(dim=1))
        return torch.cat(out)
