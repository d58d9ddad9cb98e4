"""The reward model's evaluation (held-out metrics, baselines, calibration, overfitting verdict) and its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from poseloop.config.reward import TrainRewardConfig
from poseloop.rewards.fit_data import FitInputs, MemberHistory, channel_stats
from poseloop.rewards.labels import GroupSplit, LabelSet


# Below this many decided held-out pairs, held-out accuracy is reported with a warning.
MIN_RELIABLE_HELDOUT_PAIRS = 20


# ---- evaluation ----------------------------------------------------------------------------------


def eval_pairs(labels: LabelSet, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairs to evaluate on one side: preferences (ties included) and score-implied pairs -> (a, b, target)."""
    qa, qb, qt = labels.score_pairs()
    a = torch.cat([labels.pref_a, qa])
    b = torch.cat([labels.pref_b, qb])
    t = torch.cat([labels.pref_target, qt])
    keep = mask[a] & mask[b] if len(a) else torch.zeros(0, dtype=torch.bool)
    return a[keep], b[keep], t[keep]


def pairwise_accuracy(scores: torch.Tensor, a: torch.Tensor, b: torch.Tensor, target: torch.Tensor) -> float | None:
    """Fraction of non-tie pairs ordered as labelled; equal predictions count half. None without such pairs."""
    decided = target != 0.5
    if not bool(decided.any()):
        return None
    d = (scores[a] - scores[b])[decided]
    want = target[decided] > 0.5
    correct = torch.where(d == 0, torch.full_like(d, 0.5), ((d > 0) == want).float())
    return float(correct.mean())


def spearman(scores: torch.Tensor, labels: LabelSet, mask: torch.Tensor) -> float | None:
    """Spearman correlation of predicted score and mean per-rater z-score over scored samples on one side."""
    from scipy.stats import spearmanr

    keep = mask[labels.score_idx]
    if int(keep.sum()) == 0:
        return None
    idx, z = labels.score_idx[keep], labels.score_z[keep]
    n = len(labels.sample_ids)
    total = torch.zeros(n).index_add_(0, idx, z)
    count = torch.zeros(n).index_add_(0, idx, torch.ones_like(z))
    has = count > 0
    if int(has.sum()) < 3:
        return None
    truth, pred = (total[has] / count[has]).numpy(), scores[has].detach().float().numpy()
    if np.ptp(truth) == 0 or np.ptp(pred) == 0:
        return 0.0
    return float(spearmanr(pred, truth).statistic)


def linear_baseline(labels: LabelSet, split: GroupSplit, ridge: float = 1e-2,
                    stats: torch.Tensor | None = None) -> torch.Tensor:
    """A trivial learned baseline: ridge regression of the labels on per-channel latent mean/std -> scores [N].

    Score rows regress z-scores on features; pair rows regress (2 target - 1) on feature differences.
    `stats` replaces the latent statistics (the clip kind passes the RGB images' [N, 6]).
    """
    f = (channel_stats(labels.latents) if stats is None else stats).double().numpy()
    train_mask = split.sample_mask(labels, False)
    mu, sd = f[train_mask.numpy()].mean(0), f[train_mask.numpy()].std(0) + 1e-8
    f = (f - mu) / sd
    rows, ys = [], []
    s_keep = train_mask[labels.score_idx]
    if bool(s_keep.any()):
        rows.append(np.concatenate([f[labels.score_idx[s_keep].numpy()], np.ones((int(s_keep.sum()), 1))], 1))
        ys.append(labels.score_z[s_keep].double().numpy())
    a, b, t = eval_pairs(labels, train_mask)
    if len(a):
        rows.append(np.concatenate([f[a.numpy()] - f[b.numpy()], np.zeros((len(a), 1))], 1))
        ys.append(2 * t.double().numpy() - 1)
    x, y = np.concatenate(rows), np.concatenate(ys)
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    return torch.from_numpy(f @ w[:-1]).float()


def calibration_bins(p: torch.Tensor, target: torch.Tensor, n_bins: int = 10) -> list[dict[str, float]]:
    """Predicted P(a beats b) binned vs observed frequency; each pair counted in both orientations."""
    p = torch.cat([p, 1 - p])  # symmetric: (a, b) and (b, a)
    target = torch.cat([target, 1 - target])
    bins = []
    edges = torch.linspace(0, 1, n_bins + 1)
    for i in range(n_bins):
        sel = (p >= edges[i]) & ((p < edges[i + 1]) if i < n_bins - 1 else (p <= 1))
        if bool(sel.any()):
            bins.append({"lo": float(edges[i]), "hi": float(edges[i + 1]), "predicted": float(p[sel].mean()),
                         "observed": float(target[sel].mean()), "count": int(sel.sum())})
    return bins


def overfit_advice(cfg: TrainRewardConfig) -> str:
    """What helps against overfitting, with flags that change this run's actual settings."""
    m, t = cfg.model, cfg.train
    tips = ["Label more images of more (prompt, pose) groups (the surest fix)"]
    if m.kind == "clip":
        smaller = f"--model.hidden {max(1, m.hidden // 2)}"
        if m.dropout < 0.5:
            smaller += f" --model.dropout {min(0.5, round(m.dropout + 0.2, 2)):g}"
        tips.append(f"use a smaller head ({smaller})")
    elif m.arch == "almostperfect":
        # AlmostPerfect's 2M-parameter Linear(2048, 1024) head is what overfits; width/dropout do not apply to it.
        tips.append("use the much smaller improved network (--model.arch improved)")
    else:
        smaller = f"--model.width {max(1, m.width // 2)} --model.hidden {max(1, m.hidden // 2)}"
        if m.dropout < 0.5:
            smaller += f" --model.dropout {min(0.5, round(m.dropout + 0.2, 2)):g}"
        tips.append(f"use a smaller network ({smaller})")
    tips.append(f"use stronger weight decay (--train.weight_decay {t.weight_decay * 10 if t.weight_decay > 0 else 1e-3:g})")
    tips.append(f"stop earlier (--train.patience {max(1, t.patience // 2)}"
                + (f" or --train.epochs {max(1, t.epochs // 2)})" if t.epochs > 1 else ")"))
    return "; ".join(tips[:1]) + ", or " + ", ".join(tips[1:]) + "."


def evaluate(model: Any, labels: LabelSet, split: GroupSplit, histories: list[MemberHistory],
             cfg: TrainRewardConfig, inputs: FitInputs | None = None) -> dict[str, Any]:
    """Held-out and train metrics of the ensemble, baselines, calibration, and the overfitting verdict."""
    clip_kind = cfg.model.kind == "clip"
    if inputs is None and clip_kind:
        raise ValueError("evaluate: a clip reward model needs the FitInputs its features came from")
    x = inputs.x if inputs is not None else labels.latents
    shuffled = None
    if cfg.model.kind == "conditioned":
        if inputs is None:
            raise ValueError("evaluate: a conditioned reward model needs the FitInputs its conditions came from")
        from poseloop.rewards.conditioned_training import input_scores

        scores = input_scores(model, inputs)
        # The same model with each group's condition (prompt and pose) swapped for another group's: what the
        # condition is worth on these labels.
        gen = torch.Generator().manual_seed(cfg.train.seed)
        n_groups = len(labels.group_keys)
        perm = torch.randperm(n_groups, generator=gen)
        first = {int(g): i for i, g in reversed(list(enumerate(labels.group_of.tolist())))}
        shuffled = input_scores(model, inputs, torch.tensor([first[int(perm[g])] for g in labels.group_of.tolist()]))
    else:
        score = model.score_features if clip_kind else model.score
        with torch.no_grad():
            scores = torch.cat([score(x[i:i + 256]) for i in range(0, len(x), 256)]).float().cpu()
    train_mask, held_mask = split.sample_mask(labels, False), split.sample_mask(labels, True)
    he_a, he_b, he_t = eval_pairs(labels, held_mask)
    tr_a, tr_b, tr_t = eval_pairs(labels, train_mask)
    lin = linear_baseline(labels, split, stats=inputs.stats if inputs is not None else None)
    stats_of = inputs.stats_of if inputs is not None else "per-channel latent mean and std (2C features)"
    p = torch.sigmoid(scores[he_a] - scores[he_b])
    bins = calibration_bins(p, he_t)
    n_cal = sum(b["count"] for b in bins)
    ece = sum(b["count"] * abs(b["predicted"] - b["observed"]) for b in bins) / n_cal if n_cal else None
    held_acc = pairwise_accuracy(scores, he_a, he_b, he_t)
    train_acc = pairwise_accuracy(scores, tr_a, tr_b, tr_t)
    metrics: dict[str, Any] = {
        "heldout_pairwise_accuracy": held_acc,
        "heldout_spearman": spearman(scores, labels, held_mask),
        "train_pairwise_accuracy": train_acc,
        "train_spearman": spearman(scores, labels, train_mask),
        "baselines": {
            "constant": {"description": "the training-mean score for every sample: every pair is a tie (counted "
                                        "half), no rank correlation",
                         "heldout_pairwise_accuracy": 0.5 if held_acc is not None else None,
                         "heldout_spearman": 0.0},
            "linear_channel_stats": {"description": f"ridge regression on {stats_of} fitted to the same training "
                                                    "labels",
                                     "heldout_pairwise_accuracy": pairwise_accuracy(lin, he_a, he_b, he_t),
                                     "heldout_spearman": spearman(lin, labels, held_mask)},
        },
        "heldout_pairs": int((he_t != 0.5).sum()), "heldout_tie_pairs": int((he_t == 0.5).sum()),
        "n_labels": labels.n_labels, "n_scores": int(labels.score_idx.numel()),
        "n_preferences": int(labels.pref_a.numel()), "n_skipped_preferences": labels.skipped_prefs,
        "n_unreadable_samples_left_out": labels.left_out_samples,
        "n_samples": len(labels.sample_ids), "n_groups": len(labels.group_keys),
        "n_train_groups": len(split.train_groups), "n_heldout_groups": len(split.heldout_groups),
        "heldout_groups": [list(labels.group_keys[g]) for g in split.heldout_groups],
        "rounds": labels.rounds, "raters": labels.raters,
        # Lineage: a reward model is fitted from scratch (no parent) on exactly these labels.
        "parent": None, "labels": labels.summary,
        "kind": cfg.model.kind,
        "latent_shape": None if clip_kind else list(labels.latent_shape),
        "arch": f"clip head on {Path(cfg.model.clip).name}" if clip_kind else cfg.model.arch,
        "ensemble_size": cfg.train.ensemble_size,
        "best_epochs": [h.best_epoch for h in histories],
        "epochs_run": [len(h.train_loss) for h in histories],
        "train_seconds": sum(h.seconds for h in histories),
        "calibration": {"bins": bins, "ece": ece},
        "early_stopping_note": "members stop on held-out pairwise accuracy, so held-out numbers are slightly "
                               "optimistic; compare against the baselines on the same groups",
    }
    if shuffled is not None:
        metrics["condition_shuffled"] = {
            "description": "the same model, each group's prompt and pose replaced by another group's",
            "heldout_pairwise_accuracy": pairwise_accuracy(shuffled, he_a, he_b, he_t),
            "heldout_spearman": spearman(shuffled, labels, held_mask)}
    found = []
    if train_acc is not None and held_acc is not None and train_acc - held_acc > cfg.train.overfit_gap:
        found.append(f"overfitting: train pairwise accuracy {train_acc:.3f} vs held-out {held_acc:.3f} (gap > "
                     f"{cfg.train.overfit_gap}). {overfit_advice(cfg)}")
    # Independent of overfitting: a gap measured on a handful of pairs is itself unreliable, so both are said.
    if held_acc is None:
        found.append("no decided held-out pairs: held-out accuracy is undefined. Label more images of more groups or "
                     "raise --train.holdout_fraction.")
    elif metrics["heldout_pairs"] < MIN_RELIABLE_HELDOUT_PAIRS:
        # With a handful of pairs an accuracy of 1.0 (or 0.0) says nothing; say so instead of letting it pass.
        found.append(f"the held-out numbers rest on {metrics['heldout_pairs']} pairs (fewer than "
                     f"{MIN_RELIABLE_HELDOUT_PAIRS}) and are not reliable. Label more images of more groups before "
                     "trusting this model.")
    metrics["warning"] = " Also: ".join(found) if found else None
    return metrics


# ---- plots ---------------------------------------------------------------------------------------


def plot_training_curves(histories: list[MemberHistory], path: Path) -> None:
    """Loss and pairwise accuracy per epoch (train and held-out) of every member -> PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Figure + Agg canvas: no global pyplot state, safe in threads and without a display.
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_l, ax_a = fig.subplots(1, 2)
    for m, h in enumerate(histories):
        ep = np.arange(1, len(h.train_loss) + 1)
        c = f"C{m % 10}"
        ax_l.plot(ep, h.train_loss, color=c, label=f"member {m} train")
        ax_l.plot(ep, h.heldout_loss, color=c, ls="--", label=f"member {m} held-out")
        ax_a.plot(ep, [np.nan if v is None else v for v in h.train_acc], color=c)
        ax_a.plot(ep, [np.nan if v is None else v for v in h.heldout_acc], color=c, ls="--")
        ax_a.axvline(h.best_epoch + 1, color=c, lw=0.5, alpha=0.5)
    ax_a.axhline(0.5, color="gray", lw=0.8, ls=":", label="constant baseline")
    ax_l.set(xlabel="epoch", ylabel="loss", title="loss (solid train, dashed held-out)")
    ax_a.set(xlabel="epoch", ylabel="pairwise accuracy", title="pairwise accuracy (vertical: best epoch)", ylim=(0, 1.02))
    ax_l.legend(fontsize=7)
    ax_a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_calibration(bins: list[dict[str, float]], path: Path) -> None:
    """Predicted P(a beats b) per bin vs observed frequency on held-out pairs -> PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="gray", ls=":", label="perfectly calibrated")
    if bins:
        pred = [b["predicted"] for b in bins]
        obs = [b["observed"] for b in bins]
        counts = np.array([b["count"] for b in bins], dtype=float)
        ax.plot(pred, obs, color="C0", marker="o", lw=1, label="held-out pairs (both orders)")
        ax.scatter(pred, obs, s=20 + 200 * counts / counts.max(), color="C0", alpha=0.4)
    else:
        ax.text(0.5, 0.5, "no held-out pairs", ha="center")
    ax.set(xlabel="predicted P(a beats b) = sigmoid(r_a - r_b)", ylabel="observed frequency (ties = 0.5)",
           xlim=(0, 1), ylim=(0, 1), title="calibration (marker size = pairs)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


__all__ = ["evaluate"]
