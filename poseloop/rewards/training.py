"""Training the learned reward model on human labels: the ensemble fit and the whole run (train_reward).

The config and presets are in poseloop.config.reward, label loading and the group split in poseloop.rewards.labels,
metrics and plots in poseloop.rewards.report.

One objective for both kinds of label (poseloop.policy.losses):
    loss = score_weight * L_scores + pref_weight * L_prefs
    L_scores = MSE on per-rater z-scored scores (a harsh and a generous rater with the same ranking give
               the same targets), or with train.score_loss=ranking Bradley-Terry on the pairs a rater's
               scores imply within a group (equal scores -> target 0.5)
    L_prefs  = Bradley-Terry on pairwise preferences: 'a' -> 1, 'b' -> 0, 'tie' -> 0.5; 'skip' is ignored.
Held-out data are whole (prompt, pose) groups, so near-duplicates (same prompt, same pose) never straddle
the split. Each ensemble member gets its own seed and a bootstrap resample of the training labels; the
spread of the members' predictions is the uncertainty used by reward_model.suggest_pairs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from poseloop.config.lib import ConfigError, to_dict
from poseloop.rewards.losses import bradley_terry_loss
from poseloop.config.reward import RewardTrainConfig, TrainRewardConfig
from poseloop.rewards.labels import GroupSplit, LabelDataError, LabelSet, load_labels, split_groups
from poseloop.rewards.model import LatentRewardModel
from poseloop.rewards.versions import METRICS_FILE, reward_root, save_reward_model, write_latest
from poseloop.rewards.report import eval_pairs, evaluate, pairwise_accuracy, plot_calibration, plot_training_curves
from poseloop.rewards.fit_data import FitInputs, MemberHistory, channel_stats
from poseloop.data.locks import LockBusyError, owner_pid, release, try_lock
from poseloop.data.store import apply_umask, storage_errors


# ---- training ------------------------------------------------------------------------------------


@dataclass
class Items:
    """Training items of one side of the split: scores (sample, target) and pairs (a, b, target)."""

    s_idx: torch.Tensor  # [S] long
    s_target: torch.Tensor  # [S] float32 (z-scores)
    s_weight: torch.Tensor  # [S] float32: score_weight
    p_a: torch.Tensor  # [P] long
    p_b: torch.Tensor  # [P] long
    p_target: torch.Tensor  # [P] float32
    p_weight: torch.Tensor  # [P] float32: pref_weight for preferences, score_weight for score-implied pairs

    def resample(self, gen: torch.Generator) -> Items:
        """A bootstrap resample (with replacement) of scores and of pairs."""
        s = torch.randint(len(self.s_idx), (len(self.s_idx),), generator=gen) if len(self.s_idx) else self.s_idx
        p = torch.randint(len(self.p_a), (len(self.p_a),), generator=gen) if len(self.p_a) else self.p_a
        return Items(self.s_idx[s], self.s_target[s], self.s_weight[s], self.p_a[p], self.p_b[p], self.p_target[p],
                     self.p_weight[p])


def make_items(labels: LabelSet, mask: torch.Tensor, tcfg: RewardTrainConfig) -> Items:
    """The items whose samples are all on the masked side (a pair across the split is dropped)."""
    s_keep = mask[labels.score_idx]
    p_keep = mask[labels.pref_a] & mask[labels.pref_b]
    p_a, p_b, p_t = labels.pref_a[p_keep], labels.pref_b[p_keep], labels.pref_target[p_keep]
    p_w = torch.full((len(p_a),), tcfg.pref_weight)
    s_idx, s_t = labels.score_idx[s_keep], labels.score_z[s_keep]
    if tcfg.score_loss == "ranking":
        qa, qb, qt = labels.score_pairs()
        q_keep = mask[qa] & mask[qb] if len(qa) else torch.zeros(0, dtype=torch.bool)
        p_a, p_b = torch.cat([p_a, qa[q_keep]]), torch.cat([p_b, qb[q_keep]])
        p_t = torch.cat([p_t, qt[q_keep]])
        p_w = torch.cat([p_w, torch.full((int(q_keep.sum()),), tcfg.score_weight)])
        s_idx, s_t = s_idx[:0], s_t[:0]
    return Items(s_idx, s_t, torch.full((len(s_idx),), tcfg.score_weight), p_a, p_b, p_t, p_w)


def _objective(r: torch.Tensor, items: Items, s_rows: torch.Tensor, p_rows: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the score and pair losses of a batch; r holds rewards of [scores, a-sides, b-sides]."""
    ns, np_ = len(s_rows), len(p_rows)
    total = r.new_zeros(())
    if ns:
        # ns * mean(w_i * (r_i - z_i)^2): score_weight scales the MSE term as pref_weight scales the pairs.
        err2 = (r[:ns] - items.s_target[s_rows].to(r.dtype)) ** 2
        total = total + ns * (items.s_weight[s_rows].to(r.dtype) * err2).mean()
    if np_:
        ra, rb = r[ns:ns + np_], r[ns + np_:]
        # np_ * mean(w_i * l_i) = sum(w_i * l_i): every pair weighs as much as one score, times its weight.
        total = total + np_ * bradley_terry_loss(ra, rb, items.p_target[p_rows], weight=items.p_weight[p_rows])
    return total / max(1, ns + np_)


def fit_inputs(labels: LabelSet, cfg: TrainRewardConfig, clip: Any = None, progress: bool = False) -> FitInputs:
    """Latents as they are, or (clip kind) the frozen CLIP features of every labelled PNG and its mirror image."""
    if cfg.model.kind == "clip":
        from poseloop.rewards.clip_head import image_file_features, load_frozen_clip

        if clip is None:
            clip = load_frozen_clip(cfg.model, device=_device(cfg.train))
        x, xf, stats = image_file_features(clip, labels.image_paths, labels.prompts, flip=cfg.train.flip_augment,
                                           progress=progress)
        return FitInputs(x, xf, stats, "per-channel mean and std of the RGB images (6 features)", clip)
    if cfg.model.kind == "conditioned":
        from poseloop.rewards.conditioned_training import conditioned_inputs

        return conditioned_inputs(labels, cfg, encoder=clip)
    x = labels.latents
    return FitInputs(x, x.flip(-1) if cfg.train.flip_augment else None, channel_stats(x),
                     f"per-channel latent mean and std ({2 * x.shape[1]} features)")


def _device(t: RewardTrainConfig) -> torch.device:
    """The configured torch device (auto = cuda when available)."""
    return torch.device("cuda" if t.device == "auto" and torch.cuda.is_available() else
                        ("cpu" if t.device == "auto" else t.device))


def _batch_rewards(net: torch.nn.Module, x: torch.Tensor, items: Items, s_rows: torch.Tensor, p_rows: torch.Tensor,
                   x_flipped: torch.Tensor | None, gen: torch.Generator | None,
                   inputs: FitInputs | None = None) -> torch.Tensor:
    """Rewards of a batch's samples in the order [scores, a-sides, b-sides]; each mirrored with probability 1/2."""
    idx = torch.cat([items.s_idx[s_rows], items.p_a[p_rows], items.p_b[p_rows]])
    xb = x[idx]  # [ns + 2 np, ...]
    if x_flipped is not None:
        mask = torch.rand(len(idx), generator=gen) < 0.5
        xb = torch.where(mask.to(xb.device).view(-1, *([1] * (xb.ndim - 1))), x_flipped[idx], xb)
    extra = [t.to(xb.device) for t in inputs.text_of(idx)] if inputs is not None else []
    return net(xb, *extra)


@torch.no_grad()
def _predict(net: torch.nn.Module, x: torch.Tensor, chunk: int = 256, inputs: FitInputs | None = None) -> torch.Tensor:
    """Rewards of all latents [N, C, h, w] -> [N] on the CPU."""
    net.eval()
    out = []
    for i in range(0, len(x), chunk):
        extra = [t.to(x.device) for t in inputs.text_of(torch.arange(i, min(len(x), i + chunk)))] if inputs is not None else []
        out.append(net(x[i:i + chunk], *extra))
    return torch.cat(out).float().cpu()


def _items_loss(scores: torch.Tensor, items: Items) -> float:
    """The objective on all items of a side, from precomputed rewards."""
    r = torch.cat([scores[items.s_idx], scores[items.p_a], scores[items.p_b]])
    return float(_objective(r, items, torch.arange(len(items.s_idx)), torch.arange(len(items.p_a))))


def fit_member(labels: LabelSet, split: GroupSplit, cfg: TrainRewardConfig, member: int,
               bar: Any = None, inputs: FitInputs | None = None) -> tuple[torch.nn.Module, MemberHistory]:
    """Train one ensemble member with early stopping on held-out pairwise accuracy (then held-out loss)."""
    from poseloop.rewards.model import build_member

    t = cfg.train
    start = time.perf_counter()
    inputs = inputs if inputs is not None else fit_inputs(labels, cfg)
    seed = t.seed * 1000 + member
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = _device(t)
    train_mask, held_mask = split.sample_mask(labels, False), split.sample_mask(labels, True)
    train_items, held_items = make_items(labels, train_mask, t), make_items(labels, held_mask, t)
    if t.bootstrap and t.ensemble_size > 1:
        fit_items = train_items.resample(gen)
    else:
        fit_items = train_items
    tr_a, tr_b, tr_t = eval_pairs(labels, train_mask)
    he_a, he_b, he_t = eval_pairs(labels, held_mask)

    if cfg.model.kind == "clip":
        from poseloop.rewards.clip_head import ClipHead

        net: torch.nn.Module = ClipHead(inputs.x.shape[1], cfg.model)
        xt = inputs.x[train_mask]  # statistics of the training side only
        net.set_input_stats(xt.mean(0), xt.std(0))
    elif cfg.model.kind == "conditioned":
        from poseloop.rewards.conditioned import POSE_CHANNELS, ConditionedNet

        assert inputs.text is not None
        net = ConditionedNet(inputs.x.shape[1] - POSE_CHANNELS, inputs.text[0].shape[-1], cfg.model)
        xt = inputs.x[train_mask]  # statistics of the training side only
        net.set_input_stats(xt.mean(dim=(0, 2, 3)), xt.std(dim=(0, 2, 3)))
    else:
        net = build_member(cfg.model, inputs.x.shape[1])
        if hasattr(net, "set_input_stats"):
            xt = inputs.x[train_mask]  # statistics of the training side only
            net.set_input_stats(xt.mean(dim=(0, 2, 3)), xt.std(dim=(0, 2, 3)))
    net.to(device)
    x = inputs.x.to(device)
    x_flipped = inputs.x_flipped.to(device) if inputs.x_flipped is not None else None
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    n_s, n_p = len(fit_items.s_idx), len(fit_items.p_a)
    if n_s + n_p == 0:
        raise LabelDataError("no training labels left after the group split; label more groups")

    hist = MemberHistory([], [], [], [], 0, 0.0)
    best_key: tuple[float, float] | None = None
    best_state = copy.deepcopy(net.state_dict())
    since_best = 0
    for epoch in range(t.epochs):
        net.train()
        perm = torch.randperm(n_s + n_p, generator=gen)
        losses = []
        for i in range(0, n_s + n_p, t.batch_size):
            rows = perm[i:i + t.batch_size]
            s_rows, p_rows = rows[rows < n_s], rows[rows >= n_s] - n_s
            r = _batch_rewards(net, x, fit_items, s_rows, p_rows, x_flipped, gen, inputs)
            loss = _objective(r, fit_items, s_rows, p_rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        scores = _predict(net, x, inputs=inputs)
        hist.train_loss.append(float(np.mean(losses)))
        hist.heldout_loss.append(_items_loss(scores, held_items) if len(held_items.s_idx) + len(held_items.p_a) else math.nan)
        hist.train_acc.append(pairwise_accuracy(scores, tr_a, tr_b, tr_t))
        hist.heldout_acc.append(pairwise_accuracy(scores, he_a, he_b, he_t))
        acc = hist.heldout_acc[-1]
        key = (acc if acc is not None else 0.0, -hist.heldout_loss[-1] if not math.isnan(hist.heldout_loss[-1]) else 0.0)
        if best_key is None or key > best_key:
            best_key, best_state, hist.best_epoch, since_best = key, copy.deepcopy(net.state_dict()), epoch, 0
        else:
            since_best += 1
        if bar is not None:
            bar.set_postfix(member=member, heldout_acc=f"{acc:.3f}" if acc is not None else "-")
            bar.update(1)
        if since_best >= t.patience:
            if bar is not None:
                bar.update(t.epochs - epoch - 1)  # the bar counts planned epochs; skip the ones not run
            break
    net.load_state_dict(best_state)
    net.eval()
    hist.seconds = time.perf_counter() - start
    return net.cpu(), hist


def fit_ensemble(labels: LabelSet, split: GroupSplit, cfg: TrainRewardConfig, version: str = "",
                 progress: bool = True, inputs: FitInputs | None = None) -> tuple[Any, list[MemberHistory]]:
    """Train cfg.train.ensemble_size members into a LatentRewardModel (or a ClipRewardModel for the clip kind)."""
    inputs = inputs if inputs is not None else fit_inputs(labels, cfg, progress=progress)
    model: Any
    if cfg.model.kind == "clip":
        from poseloop.rewards.clip_head import ClipRewardModel

        model = ClipRewardModel(cfg.model, inputs.x.shape[1], cfg.train.ensemble_size, version=version,
                                extra_config=to_dict(cfg), clip=inputs.clip)
    elif cfg.model.kind == "conditioned":
        from poseloop.rewards.conditioned import ConditionedRewardModel

        assert inputs.text is not None
        model = ConditionedRewardModel(cfg.model, labels.latent_shape, inputs.text[0].shape[-1],
                                       cfg.train.ensemble_size, version=version, extra_config=to_dict(cfg),
                                       encoder=inputs.encoder, vae_scale=labels.sizes[0][0] // labels.latent_shape[2])
    else:
        model = LatentRewardModel(cfg.model, labels.latent_shape, cfg.train.ensemble_size, version=version,
                                  extra_config=to_dict(cfg))
    histories = []
    with tqdm(total=cfg.train.ensemble_size * cfg.train.epochs, desc="train reward", unit="epoch",
              disable=not progress) as bar:
        for m in range(cfg.train.ensemble_size):
            net, hist = fit_member(labels, split, cfg, m, bar, inputs)
            model.members[m].load_state_dict(net.state_dict())
            histories.append(hist)
    model.eval()
    return model, histories


# ---- the whole run -------------------------------------------------------------------------------


@dataclass
class TrainRewardResult:
    """What a train_reward run produced."""

    version: str
    folder: Path
    metrics: dict[str, Any]

    def summary(self) -> str:
        """The one-line summary printed at the end."""
        m = self.metrics
        lin = m["baselines"]["linear_channel_stats"]

        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.3f}"

        return (f"reward {self.version} ({m['arch']}, {m['ensemble_size']} member(s)): held-out pairwise accuracy "
                f"{f(m['heldout_pairwise_accuracy'])} vs baseline 0.500 (constant) / {f(lin['heldout_pairwise_accuracy'])} "
                f"(linear on channel stats), Spearman {f(m['heldout_spearman'])} vs {f(lin['heldout_spearman'])}; "
                f"{m['n_labels']} labels, {m['n_groups']} groups ({m['n_heldout_groups']} held out)"
                + (f"; condition shuffled: accuracy {f(m['condition_shuffled']['heldout_pairwise_accuracy'])}, "
                   f"Spearman {f(m['condition_shuffled']['heldout_spearman'])}" if "condition_shuffled" in m else "")
                + f" -> {self.folder}")


def default_version(models_dir: str | Path) -> str:
    """A timestamp name that does not exist yet (reserve_version also skips names another run has reserved)."""
    base = datetime.now().strftime("%Y%m%d-%H%M%S")
    name, k = base, 1
    while (reward_root(models_dir) / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


def _version_lock(models_dir: str | Path, version: str) -> Path:
    return reward_root(models_dir) / f".{version}.lock"


def reserve_version(models_dir: str | Path, explicit: str = "") -> tuple[str, Path, int]:
    """(version, lock file, descriptor): a version name no finished version has and no running train_reward.py
    holds, locked until release(). Two runs in the same second get -2, -3, ... names; two runs given the
    same --output.version: the second stops at once naming the first's pid, before any training."""
    with storage_errors(reward_root(models_dir)):
        if explicit:
            path = _version_lock(models_dir, explicit)
            fd = try_lock(path)
            if fd is None:
                pid = owner_pid(path)
                raise LockBusyError(f"output.version: {explicit!r} is being trained by another train_reward.py "
                                    f"(pid {pid}; lock file {path}); pick another --output.version, or wait for "
                                    "that run to finish", pid)
            if (reward_root(models_dir) / explicit).exists():
                release(path, fd)
                raise ConfigError(f"output.version: {reward_root(models_dir) / explicit} already exists; pick "
                                  "another --output.version")
            return explicit, path, fd
        base = default_version(models_dir)
        name, k = base, 1
        while True:
            if not (reward_root(models_dir) / name).exists():
                path = _version_lock(models_dir, name)
                fd = try_lock(path)
                if fd is not None:
                    if not (reward_root(models_dir) / name).exists():  # finished while we took the lock
                        return name, path, fd
                    release(path, fd)
            k += 1
            name = f"{base}-{k}"


def write_version(model: Any, metrics: dict[str, Any], histories: list[MemberHistory],
                  models_dir: str | Path, version: str) -> Path:
    """Write weights, config, metrics and plots to a temp folder, rename it into place, update latest."""
    root = reward_root(models_dir)
    final = root / version
    if final.exists():
        raise ConfigError(f"output.version: {final} already exists; pick another --output.version")
    tmp = root / f".tmp-{version}-{os.getpid()}"
    try:
        with storage_errors(root):
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            save_reward_model(model, tmp)
            (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
            plot_training_curves(histories, tmp / "training_curve.png")
            plot_calibration(metrics["calibration"]["bins"], tmp / "calibration.png")
            apply_umask(tmp)  # safetensors writes 0600: other users (a web server) could not read the weights
            # One rename: an interrupted run leaves at most a .tmp-* folder, never a half version.
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_latest(models_dir, version)
    return final


def train_reward(cfg: TrainRewardConfig, progress: bool = True, vae: Any = None) -> TrainRewardResult:
    """Load labels, split by group, fit the ensemble, evaluate, write the version and point latest at it."""
    cfg.validate()
    root = reward_root(cfg.output.models_dir)
    existed = root.is_dir()
    version, lock_path, lock_fd = reserve_version(cfg.output.models_dir, cfg.output.version)
    try:
        return _train_version(cfg, version, progress, vae)
    finally:
        release(lock_path, lock_fd)
        if not existed:  # a run that stored nothing leaves no empty folder behind
            try:
                root.rmdir()
            except OSError:
                pass


def _train_version(cfg: TrainRewardConfig, version: str, progress: bool, vae: Any) -> TrainRewardResult:
    """train_reward() once `version` is reserved."""
    clip = None
    if cfg.model.kind == "clip":
        from poseloop.rewards.clip_head import load_frozen_clip

        clip = load_frozen_clip(cfg.model, device=_device(cfg.train))  # a bad CLIP file fails before the labels load
    labels = load_labels(cfg.data, vae=vae, with_latents=cfg.model.kind != "clip")
    split = split_groups(labels, cfg.train.holdout_fraction, cfg.train.seed)
    inputs = fit_inputs(labels, cfg, clip=clip, progress=progress)
    model, histories = fit_ensemble(labels, split, cfg, version=version, progress=progress, inputs=inputs)
    metrics = evaluate(model, labels, split, histories, cfg, inputs)
    metrics["version"] = version
    if metrics["warning"]:
        print(f"warning: {metrics['warning']}", file=sys.stderr)
    folder = write_version(model, metrics, histories, cfg.output.models_dir, version)
    return TrainRewardResult(version=version, folder=folder, metrics=metrics)


__all__ = ["TrainRewardResult", "fit_ensemble", "fit_inputs", "train_reward"]
