"""Training the learned reward model on human labels: label loading, group split, ensemble fit, metrics, plots.

One objective for both kinds of label (poseloop.losses):
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
import re
import shutil
import sys
import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from tqdm.auto import tqdm

from poseloop import db
from poseloop.inputs import InputError
from poseloop.configlib import ConfigError, check_finite, field, to_dict
from poseloop.losses import bradley_terry_loss, normalize_per_rater
from poseloop.reward_model import (
    CONFIG_FILE,
    METRICS_FILE,
    LatentRewardModel,
    RewardModelConfig,
    encode_images,
    reward_root,
    save_reward_model,
    write_latest,
)
from poseloop.store import SampleStore, TrajectoryError, apply_umask, load_trajectory, storage_errors

LABEL_KINDS = ("scores", "prefs", "both")
CHOICE_TARGET = {"a": 1.0, "b": 0.0, "tie": 0.5}


# Below this many decided held-out pairs, held-out accuracy is reported with a warning.
MIN_RELIABLE_HELDOUT_PAIRS = 20


class LabelDataError(InputError):
    """The labels cannot be trained on (none yet, too few groups, mixed latent shapes); says how to fix it."""


class MissingTrajectoryError(LabelDataError, FileNotFoundError):
    """Labelled samples whose trajectory files are missing."""


# ---- config --------------------------------------------------------------------------------------


@dataclass
class RewardDataConfig:
    """Which labels to train on."""

    samples_dir: str = field("samples", help="samples folder (images, trajectories; paths in the DB are relative to it)")
    db_url: str = field("", help="SQLAlchemy URL; empty = sqlite file <samples_dir>/feedback.sqlite")
    rounds: list[str] = field(default_factory=list, help="round names to train on; empty = every round with labels")
    raters: list[str] = field(default_factory=list, help="rater names whose labels count; empty = all raters")
    labels: str = field("both", help="label kinds: scores, pairwise preferences, or both", choices=LABEL_KINDS)
    skip_unreadable: bool = field(False, help="leave out labelled samples whose trajectory file is missing or "
                                  "unreadable (with a warning counting them) instead of stopping")


@dataclass
class RewardTrainConfig:
    """Optimisation, split and ensemble."""

    ensemble_size: int = field(3, help="ensemble members (different seeds + bootstrap); their spread is the uncertainty")
    bootstrap: bool = field(True, help="give each member a bootstrap resample of the training labels (ensemble > 1)")
    epochs: int = field(80, help="maximum epochs per member")
    lr: float = field(1e-3, help="AdamW learning rate")
    batch_size: int = field(32, help="labels per optimisation step (a preference counts once)")
    weight_decay: float = field(1e-4, help="AdamW weight decay")
    holdout_fraction: float = field(0.1, help="fraction of (prompt, pose) groups held out for evaluation (at least 1 group)")
    seed: int = field(0, help="seed of the split, the initialisation and the batches")
    patience: int = field(15, help="stop a member after this many epochs without held-out improvement")
    score_loss: str = field("mse", help="scores: MSE on per-rater z-scores, or Bradley-Terry on the pairs they "
                            "imply within a group", choices=("mse", "ranking"))
    score_weight: float = field(1.0, help="weight of the score loss")
    pref_weight: float = field(1.0, help="weight of the preference (Bradley-Terry) loss")
    flip_augment: bool = field(True, help="random horizontal flips of latents while training (clip kind: the "
                               "features of each image and of its mirror image are cached, one of the two is drawn)")
    overfit_gap: float = field(0.15, help="warn when train pairwise accuracy exceeds held-out accuracy by more than this")
    device: str = field("cpu", help="torch device; auto = cuda if available")


@dataclass
class RewardOutputConfig:
    """Where the version is written."""

    models_dir: str = field("models", help="models folder; versions go to <models_dir>/reward/<version>/")
    version: str = field("", help="version name; empty = timestamp (YYYYmmdd-HHMMSS)")


@dataclass
class TrainRewardConfig:
    """Everything train_reward.py needs."""

    data: RewardDataConfig = field(default_factory=RewardDataConfig, help="labels")
    model: RewardModelConfig = field(default_factory=RewardModelConfig, help="network")
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig, help="optimisation")
    output: RewardOutputConfig = field(default_factory=RewardOutputConfig, help="output")

    def validate(self) -> None:
        """Check every field before any data loads; raise ConfigError naming the field."""
        check_finite(self)
        self.model.validate()
        t = self.train
        if not 1 <= t.ensemble_size <= 32:
            raise ConfigError(f"train.ensemble_size: must be 1..32 (got {t.ensemble_size})")
        for name in ("epochs", "batch_size", "patience"):
            if getattr(t, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1 (got {getattr(t, name)})")
        if not t.lr > 0:
            raise ConfigError(f"train.lr: must be > 0 (got {t.lr})")
        if t.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be >= 0 (got {t.weight_decay})")
        if not 0 < t.holdout_fraction < 1:
            raise ConfigError(f"train.holdout_fraction: must be in (0, 1) (got {t.holdout_fraction}); "
                              "at least one group is always held out")
        if t.score_weight < 0 or t.pref_weight < 0 or t.score_weight + t.pref_weight == 0:
            raise ConfigError("train.score_weight / train.pref_weight: must be >= 0 and not both 0")
        if self.data.labels == "scores" and t.score_weight == 0:
            raise ConfigError("train.score_weight: is 0 but data.labels is 'scores'; nothing would be learned")
        if self.data.labels == "prefs" and t.pref_weight == 0:
            raise ConfigError("train.pref_weight: is 0 but data.labels is 'prefs'; nothing would be learned")
        if not 0 < t.overfit_gap < 1:
            raise ConfigError(f"train.overfit_gap: must be in (0, 1) (got {t.overfit_gap})")
        if t.seed < 0:
            raise ConfigError(f"train.seed: must be >= 0 (got {t.seed})")
        if not self.data.samples_dir:
            raise ConfigError("data.samples_dir: must not be empty")
        v = self.output.version
        if v and (v == "latest" or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", v)):
            raise ConfigError(f"output.version: {v!r} is not a valid version name (letters, digits, '.', '_', '-'; "
                              "not 'latest')")


def default() -> TrainRewardConfig:
    """The improved CNN, 3-member ensemble, scores and preferences."""
    return TrainRewardConfig()


def almostperfect() -> TrainRewardConfig:
    """AlmostPerfect's recipe: its CNN fitted by MSE on scores, one model, no augmentation (group split kept)."""
    cfg = TrainRewardConfig()
    cfg.model.arch = "almostperfect"
    cfg.data.labels = "scores"
    cfg.train.ensemble_size = 1
    cfg.train.bootstrap = False
    cfg.train.flip_augment = False
    cfg.train.weight_decay = 0.0
    return cfg


def quick() -> TrainRewardConfig:
    """A smoke run: 2 members, 20 epochs."""
    cfg = TrainRewardConfig()
    cfg.train.ensemble_size = 2
    cfg.train.epochs = 20
    cfg.train.patience = 10
    return cfg


PRESETS = {"default": default, "almostperfect": almostperfect, "quick": quick}


# ---- labels --------------------------------------------------------------------------------------


@dataclass
class LabelSet:
    """Every labelled sample's final latent and the labels on them (indices are into `sample_ids`)."""

    sample_ids: list[int]  # [N] database ids
    latents: torch.Tensor  # [N, C, h, w] float32
    group_of: torch.Tensor  # [N] long: index into group_keys
    group_keys: list[tuple[str, str]]  # (prompt, pose_name) of each group index
    score_idx: torch.Tensor  # [S] long
    score_rater: torch.Tensor  # [S] long (rater id)
    score_raw: torch.Tensor  # [S] float32, the app's scale
    score_z: torch.Tensor  # [S] float32, z-scored per rater
    pref_a: torch.Tensor  # [P] long
    pref_b: torch.Tensor  # [P] long
    pref_target: torch.Tensor  # [P] float32: 1 a preferred, 0 b, 0.5 tie
    pref_rater: torch.Tensor  # [P] long
    rounds: list[str]
    raters: list[str]
    skipped_prefs: int = 0
    left_out_samples: int = 0  # labelled samples left out because their trajectory was unreadable (skip_unreadable)
    image_paths: list[Path] = dc_field(default_factory=list)  # [N] absolute PNG paths (the clip kind reads them)
    prompts: list[str] = dc_field(default_factory=list)  # [N] each sample's prompt

    @property
    def n_labels(self) -> int:
        return int(self.score_idx.numel() + self.pref_a.numel())

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[1:])  # type: ignore[return-value]

    def score_pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pairs implied by scores: same rater, same group -> (a [Q], b [Q], target [Q]); equal scores -> 0.5."""
        a, b, t = [], [], []
        by_key: dict[tuple[int, int], list[int]] = {}
        for row in range(self.score_idx.numel()):
            key = (int(self.score_rater[row]), int(self.group_of[self.score_idx[row]]))
            by_key.setdefault(key, []).append(row)
        for rows in by_key.values():
            for i in range(len(rows)):
                for j in range(i + 1, len(rows)):
                    ri, rj = rows[i], rows[j]
                    a.append(int(self.score_idx[ri]))
                    b.append(int(self.score_idx[rj]))
                    d = float(self.score_raw[ri] - self.score_raw[rj])
                    t.append(1.0 if d > 0 else 0.0 if d < 0 else 0.5)
        return (torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long),
                torch.tensor(t, dtype=torch.float32))


def resolve_db_url(cfg: RewardDataConfig) -> str:
    """The configured URL or the samples folder's default SQLite file."""
    return cfg.db_url or db.default_db_url(cfg.samples_dir)


def _load_round_vae(round_config: dict[str, Any]) -> Any:
    """The VAE of the model that made a round (for imported images without latents)."""
    from poseloop.config import ModelConfig
    from poseloop.configlib import from_dict
    from poseloop.models import load_components

    model_cfg = from_dict(ModelConfig, round_config["model"])
    model_cfg.dtype = "float32"  # encoding in float32: a few images, accuracy over speed
    return load_components(model_cfg).vae


@torch.no_grad()
def _encode_image_files(paths: list[Path], vae: Any) -> torch.Tensor:
    """PNG files -> latents [N, C, h, w] float32 (posterior mean x scaling factor)."""
    from PIL import Image

    from poseloop.sampling import pil_to_tensor

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(encode_images(vae, pil_to_tensor([im])).float().cpu())
    return torch.cat(out)


def load_labels(cfg: RewardDataConfig, vae: Any = None, with_latents: bool = True) -> LabelSet:
    """Read ratings and preferences from the DB and the final latents of the labelled samples.

    Samples without a trajectory (imported images) are VAE-encoded with `vae`, or with the VAE of the
    model that made their round when `vae` is None. with_latents=False (the clip kind, which reads the
    PNGs) reads no trajectory and leaves `latents` empty ([N, 0]).
    """
    url = resolve_db_url(cfg)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        path = Path(url.removeprefix("sqlite:///"))
        if not path.is_file():
            raise LabelDataError(f"no database at {path}: generate a round with `python generate.py`, then rate "
                                 "some images with `python -m webapp` first")
    factory = db.open_db(url, "data.db_url")
    store = SampleStore(cfg.samples_dir)
    with db.session_scope(factory) as s:
        rounds = {r.id: r for r in s.scalars(select(db.Round))}
        if cfg.rounds:
            unknown = sorted(set(cfg.rounds) - {r.name for r in rounds.values()})
            if unknown:
                raise ConfigError(f"data.rounds: no round named {', '.join(map(repr, unknown))} in "
                                  f"{db.shown_db_url(url)}; known: "
                                  f"{', '.join(sorted(r.name for r in rounds.values())) or 'none'}")
            rounds = {i: r for i, r in rounds.items() if r.name in cfg.rounds}
        raters = {r.id: r.name for r in s.scalars(select(db.Rater))}
        if cfg.raters:
            unknown = sorted(set(cfg.raters) - set(raters.values()))
            if unknown:
                raise ConfigError(f"data.raters: no rater named {', '.join(map(repr, unknown))}; known: "
                                  f"{', '.join(sorted(raters.values())) or 'none'}")
            raters = {i: n for i, n in raters.items() if n in cfg.raters}
        round_ids, rater_ids = list(rounds), list(raters)

        ratings: list[tuple[int, int, float]] = []
        if cfg.labels in ("scores", "both"):
            ratings = [tuple(r) for r in s.execute(  # type: ignore[misc]
                select(db.Rating.sample_id, db.Rating.rater_id, db.Rating.score).join(db.Sample)
                .where(db.Sample.round_id.in_(round_ids), db.Rating.rater_id.in_(rater_ids))
                .order_by(db.Rating.id))]
        prefs: list[tuple[int, int, int, str]] = []
        skipped = 0
        if cfg.labels in ("prefs", "both"):
            for a, b, rid, choice in s.execute(
                select(db.Preference.sample_a_id, db.Preference.sample_b_id, db.Preference.rater_id,
                       db.Preference.choice).join(db.Sample, db.Sample.id == db.Preference.sample_a_id)
                .where(db.Sample.round_id.in_(round_ids), db.Preference.rater_id.in_(rater_ids))
                .order_by(db.Preference.id)):
                if choice == "skip":  # seen but not judged: no information
                    skipped += 1
                else:
                    prefs.append((a, b, rid, choice))
        if not ratings and not prefs:
            which = f"rounds {', '.join(sorted(r.name for r in rounds.values()))}" if cfg.rounds else "any round"
            who = f" by {', '.join(cfg.raters)}" if cfg.raters else ""
            raise LabelDataError(f"no {cfg.labels if cfg.labels != 'both' else 'scores or preferences'} yet in "
                                 f"{which}{who} ({db.shown_db_url(url)}): rate some images with `python -m webapp` "
                                 "first")

        ids = sorted({r[0] for r in ratings} | {p[0] for p in prefs} | {p[1] for p in prefs})
        samples = {x.id: x for x in s.scalars(select(db.Sample).where(db.Sample.id.in_(ids)))}
        groups = {g.id: g for g in s.scalars(select(db.Group).where(db.Group.id.in_({x.group_id for x in samples.values()})))}
        all_rounds = {r.id: r for r in s.scalars(select(db.Round))}
        # Rows are read inside the session; only plain values leave it.
        info = {i: (samples[i].trajectory_path, samples[i].image_path, samples[i].round_id,
                    groups[samples[i].group_id].prompt, groups[samples[i].group_id].pose_name) for i in ids}
        round_names = {i: r.name for i, r in all_rounds.items()}
        round_cfgs = {i: r.config for i, r in all_rounds.items()}

    missing = [(sid, store.abs(tp)) for sid in ids
               if with_latents and (tp := info[sid][0]) is not None and not store.abs(tp).is_file()]
    if missing and not cfg.skip_unreadable:
        by_round = sorted({round_names[info[sid][2]] for sid, _ in missing})
        names = ", ".join(str(p) for _, p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise MissingTrajectoryError(
            f"{len(missing)} labelled sample(s) have no trajectory file ({names}). Fix: copy the round's "
            f"trajectories/ folder back into {store.root} (round {', '.join(by_round)}), or re-run generate.py with "
            f"the round's settings and --store.round {by_round[0]} (missing files of existing rows are regenerated "
            f"from their seeds), or train without that round (--data.rounds <other rounds>), or leave those samples "
            f"out with --data.skip_unreadable true")

    # Final latents of the samples with a trajectory; unreadable ones are an error, or left out on request.
    left_out = {sid: f"{path} is missing" for sid, path in missing}
    final: dict[int, torch.Tensor] = {}
    for sid in ids:
        tp = info[sid][0]
        if tp is None or sid in left_out or not with_latents:
            continue
        try:
            final[sid] = load_trajectory(store.abs(tp), sample=f"sample {sid}").latents[-1].float()  # x_0, [C, h, w]
        except TrajectoryError as e:
            if not cfg.skip_unreadable:
                raise TrajectoryError(f"{e}; or leave unreadable samples out with --data.skip_unreadable true",
                                      e.path, e.short) from None
            left_out[sid] = e.short
    if left_out:
        n_r, n_p = len(ratings), len(prefs)
        ratings = [r for r in ratings if r[0] not in left_out]
        prefs = [p for p in prefs if p[0] not in left_out and p[1] not in left_out]
        print(f"warning: data.skip_unreadable: left out {len(left_out)} labelled sample(s) whose trajectory is "
              f"missing or unreadable ({n_r - len(ratings)} scores and {n_p - len(prefs)} preferences on them), "
              f"e.g. {next(iter(left_out.values()))}", file=sys.stderr)
        if not ratings and not prefs:
            raise LabelDataError("every labelled sample's trajectory is missing or unreadable; restore the samples "
                                 "folder or regenerate the round (generate.py --store.round <round name>)")
        ids = sorted({r[0] for r in ratings} | {p[0] for p in prefs} | {p[1] for p in prefs})

    latents: list[torch.Tensor | None] = [None] * len(ids)
    to_encode: dict[int, list[int]] = {}  # round id -> positions in ids
    for pos, sid in enumerate(ids):
        if not with_latents:
            latents[pos] = torch.zeros(0)
        elif info[sid][0] is None:
            to_encode.setdefault(info[sid][2], []).append(pos)
        else:
            latents[pos] = final[sid]
    for rid, positions in to_encode.items():
        round_vae = vae if vae is not None else _load_round_vae(round_cfgs[rid])
        enc = _encode_image_files([store.abs(info[ids[p]][1]) for p in positions], round_vae)
        for k, p in enumerate(positions):
            latents[p] = enc[k]
    shapes = {tuple(x.shape) for x in latents if x is not None}
    if len(shapes) != 1:
        per_round = {round_names[info[sid][2]]: tuple(latents[i].shape) for i, sid in enumerate(ids)}  # type: ignore[union-attr]
        raise LabelDataError(f"labelled latents have different shapes {sorted(shapes)} (per round: {per_round}); "
                             "one reward model takes one latent shape: pick rounds of one model/size with --data.rounds")

    pos_of = {sid: i for i, sid in enumerate(ids)}
    keys = sorted({(info[sid][3], info[sid][4]) for sid in ids})
    key_index = {k: i for i, k in enumerate(keys)}
    score_rater = torch.tensor([r[1] for r in ratings], dtype=torch.long)
    score_raw = torch.tensor([r[2] for r in ratings], dtype=torch.float32)
    return LabelSet(
        sample_ids=ids,
        latents=torch.stack(latents),  # type: ignore[arg-type]  # [N, C, h, w]
        group_of=torch.tensor([key_index[(info[sid][3], info[sid][4])] for sid in ids], dtype=torch.long),
        group_keys=keys,
        score_idx=torch.tensor([pos_of[r[0]] for r in ratings], dtype=torch.long),
        score_rater=score_rater,
        score_raw=score_raw,
        score_z=normalize_per_rater(score_raw, score_rater) if ratings else torch.zeros(0),
        pref_a=torch.tensor([pos_of[p[0]] for p in prefs], dtype=torch.long),
        pref_b=torch.tensor([pos_of[p[1]] for p in prefs], dtype=torch.long),
        pref_target=torch.tensor([CHOICE_TARGET[p[3]] for p in prefs], dtype=torch.float32),
        pref_rater=torch.tensor([p[2] for p in prefs], dtype=torch.long),
        rounds=sorted({round_names[info[sid][2]] for sid in ids}),
        raters=sorted({raters[i] for i in set(score_rater.tolist()) | {p[2] for p in prefs}}),
        skipped_prefs=skipped,
        left_out_samples=len(left_out),
        image_paths=[store.abs(info[sid][1]) for sid in ids],
        prompts=[info[sid][3] for sid in ids],
    )


# ---- split ---------------------------------------------------------------------------------------


@dataclass
class GroupSplit:
    """Which (prompt, pose) groups train and which are held out."""

    train_groups: list[int]
    heldout_groups: list[int]

    def sample_mask(self, labels: LabelSet, heldout: bool) -> torch.Tensor:
        """[N] bool: samples on the requested side."""
        side = torch.tensor(self.heldout_groups if heldout else self.train_groups, dtype=torch.long)
        return torch.isin(labels.group_of, side)


def split_groups(labels: LabelSet, holdout_fraction: float, seed: int) -> GroupSplit:
    """Hold out round(fraction x groups) whole groups (at least 1, leaving at least 1 for training)."""
    n = len(labels.group_keys)
    if n < 2:
        raise LabelDataError(f"too few groups for a held-out split: the labels cover {n} (prompt, pose) group; at least "
                             "2 are needed (one to train, one to evaluate). Rate images of more groups.")
    n_hold = min(n - 1, max(1, round(holdout_fraction * n)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return GroupSplit(train_groups=sorted(perm[n_hold:]), heldout_groups=sorted(perm[:n_hold]))


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


@dataclass
class FitInputs:
    """What the networks read for every labelled sample, computed once before training (never per epoch)."""

    x: torch.Tensor  # [N, ...] final latents (latent kind) or frozen CLIP features [N, F] (clip kind)
    x_flipped: torch.Tensor | None  # [N, ...] the same of the mirrored samples; None without flip augmentation
    stats: torch.Tensor  # [N, 2C] per-channel mean/std of the latents (or RGB images): the linear baseline's features
    stats_of: str  # what `stats` describes, for the report
    clip: Any = None  # clip kind: the FrozenClip the features came from (kept for the saved model)


def _channel_stats_t(x: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std of [N, C, h, w] -> [N, 2C]."""
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


def fit_inputs(labels: LabelSet, cfg: TrainRewardConfig, clip: Any = None, progress: bool = False) -> FitInputs:
    """Latents as they are, or (clip kind) the frozen CLIP features of every labelled PNG and its mirror image."""
    if cfg.model.kind == "clip":
        from poseloop.clip_reward import image_file_features, load_frozen_clip

        if clip is None:
            clip = load_frozen_clip(cfg.model, device=_device(cfg.train))
        x, xf, stats = image_file_features(clip, labels.image_paths, labels.prompts, flip=cfg.train.flip_augment,
                                           progress=progress)
        return FitInputs(x, xf, stats, "per-channel mean and std of the RGB images (6 features)", clip)
    x = labels.latents
    return FitInputs(x, x.flip(-1) if cfg.train.flip_augment else None, _channel_stats_t(x),
                     f"per-channel latent mean and std ({2 * x.shape[1]} features)")


def _device(t: RewardTrainConfig) -> torch.device:
    """The configured torch device (auto = cuda when available)."""
    return torch.device("cuda" if t.device == "auto" and torch.cuda.is_available() else
                        ("cpu" if t.device == "auto" else t.device))


def _batch_rewards(net: torch.nn.Module, x: torch.Tensor, items: Items, s_rows: torch.Tensor, p_rows: torch.Tensor,
                   x_flipped: torch.Tensor | None, gen: torch.Generator | None) -> torch.Tensor:
    """Rewards of a batch's samples in the order [scores, a-sides, b-sides]; each mirrored with probability 1/2."""
    idx = torch.cat([items.s_idx[s_rows], items.p_a[p_rows], items.p_b[p_rows]])
    xb = x[idx]  # [ns + 2 np, ...]
    if x_flipped is not None:
        mask = torch.rand(len(idx), generator=gen) < 0.5
        xb = torch.where(mask.to(xb.device).view(-1, *([1] * (xb.ndim - 1))), x_flipped[idx], xb)
    return net(xb)


@torch.no_grad()
def _predict(net: torch.nn.Module, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Rewards of all latents [N, C, h, w] -> [N] on the CPU."""
    net.eval()
    out = torch.cat([net(x[i:i + chunk]) for i in range(0, len(x), chunk)]).float().cpu()
    return out


def _items_loss(scores: torch.Tensor, items: Items) -> float:
    """The objective on all items of a side, from precomputed rewards."""
    r = torch.cat([scores[items.s_idx], scores[items.p_a], scores[items.p_b]])
    return float(_objective(r, items, torch.arange(len(items.s_idx)), torch.arange(len(items.p_a))))


@dataclass
class MemberHistory:
    """Per-epoch curves of one ensemble member."""

    train_loss: list[float]
    heldout_loss: list[float]
    train_acc: list[float | None]
    heldout_acc: list[float | None]
    best_epoch: int
    seconds: float


def fit_member(labels: LabelSet, split: GroupSplit, cfg: TrainRewardConfig, member: int,
               bar: Any = None, inputs: FitInputs | None = None) -> tuple[torch.nn.Module, MemberHistory]:
    """Train one ensemble member with early stopping on held-out pairwise accuracy (then held-out loss)."""
    from poseloop.reward_model import build_member

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
        from poseloop.clip_reward import ClipHead

        net: torch.nn.Module = ClipHead(inputs.x.shape[1], cfg.model)
        xt = inputs.x[train_mask]  # statistics of the training side only
        net.set_input_stats(xt.mean(0), xt.std(0))
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
            r = _batch_rewards(net, x, fit_items, s_rows, p_rows, x_flipped, gen)
            loss = _objective(r, fit_items, s_rows, p_rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        scores = _predict(net, x)
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
        from poseloop.clip_reward import ClipRewardModel

        model = ClipRewardModel(cfg.model, inputs.x.shape[1], cfg.train.ensemble_size, version=version,
                                extra_config=to_dict(cfg), clip=inputs.clip)
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


# ---- evaluation ----------------------------------------------------------------------------------


def _channel_stats(latents: torch.Tensor) -> np.ndarray:
    """Per-channel mean and std of latents [N, C, h, w] -> features [N, 2C]."""
    return torch.cat([latents.mean(dim=(2, 3)), latents.std(dim=(2, 3))], dim=1).double().numpy()


def linear_baseline(labels: LabelSet, split: GroupSplit, ridge: float = 1e-2,
                    stats: torch.Tensor | None = None) -> torch.Tensor:
    """A trivial learned baseline: ridge regression of the labels on per-channel latent mean/std -> scores [N].

    Score rows regress z-scores on features; pair rows regress (2 target - 1) on feature differences.
    `stats` replaces the latent statistics (the clip kind passes the RGB images' [N, 6]).
    """
    f = _channel_stats(labels.latents) if stats is None else stats.double().numpy()
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
                f"{m['n_labels']} labels, {m['n_groups']} groups ({m['n_heldout_groups']} held out) -> {self.folder}")


def default_version(models_dir: str | Path) -> str:
    """A timestamp name that does not exist yet."""
    base = datetime.now().strftime("%Y%m%d-%H%M%S")
    name, k = base, 1
    while (reward_root(models_dir) / name).exists():
        k += 1
        name = f"{base}-{k}"
    return name


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
    version = cfg.output.version or default_version(cfg.output.models_dir)
    if (reward_root(cfg.output.models_dir) / version).exists():
        raise ConfigError(f"output.version: {reward_root(cfg.output.models_dir) / version} already exists; "
                          "pick another --output.version")
    clip = None
    if cfg.model.kind == "clip":
        from poseloop.clip_reward import load_frozen_clip

        clip = load_frozen_clip(cfg.model, device=_device(cfg.train))  # a bad CLIP file fails before the labels load
    labels = load_labels(cfg.data, vae=vae, with_latents=cfg.model.kind == "latent")
    split = split_groups(labels, cfg.train.holdout_fraction, cfg.train.seed)
    inputs = fit_inputs(labels, cfg, clip=clip, progress=progress)
    model, histories = fit_ensemble(labels, split, cfg, version=version, progress=progress, inputs=inputs)
    metrics = evaluate(model, labels, split, histories, cfg, inputs)
    metrics["version"] = version
    if metrics["warning"]:
        print(f"warning: {metrics['warning']}", file=sys.stderr)
    folder = write_version(model, metrics, histories, cfg.output.models_dir, version)
    return TrainRewardResult(version=version, folder=folder, metrics=metrics)


__all__ = [
    "CONFIG_FILE", "GroupSplit", "LabelDataError", "LabelSet", "MissingTrajectoryError", "PRESETS",
    "FitInputs", "RewardDataConfig", "RewardOutputConfig", "RewardTrainConfig", "TrainRewardConfig",
    "TrainRewardResult", "evaluate", "fit_ensemble", "fit_inputs", "load_labels", "split_groups", "train_reward",
]
