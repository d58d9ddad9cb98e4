"""Configuration of the reward model's training: data, optimisation and output settings, and the presets."""

from __future__ import annotations

import re
from dataclasses import dataclass

from poseloop.configlib import ConfigError, check_finite, field
from poseloop.reward_model import RewardModelConfig

LABEL_KINDS = ("scores", "prefs", "both")


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


__all__ = ["PRESETS", "RewardDataConfig", "RewardOutputConfig", "RewardTrainConfig", "TrainRewardConfig"]
