"""Configuration of the reward model's training: data, optimisation and output settings, and the presets."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from poseloop.config.lib import ConfigError, check_finite, field

LABEL_KINDS = ("scores", "prefs", "both")
ARCHES = ("almostperfect", "improved")
KINDS = ("latent", "conditioned", "clip")


# ---- config --------------------------------------------------------------------------------------


# One ensemble member's hyper-parameters: here, so that the config and
# train_reward.py --help import no torch.
@dataclass
class RewardModelConfig:
    """Hyper-parameters of one ensemble member (the latent shape comes from the data, not from here)."""

    kind: str = field("latent", help="latent = a CNN on the sampler's final latents; conditioned = the same CNN that "
                      "also sees each sample's pose (keypoints) and prompt (the base model's text encoder; "
                      "poseloop.rewards.conditioned); clip = a small head on frozen CLIP features of the decoded images "
                      "and the prompt (needs --model.clip; poseloop.rewards.clip_head)",
                      choices=KINDS)
    clip: str = field("", help="clip: the frozen CLIP, a transformers CLIPModel folder (config.json + weights, e.g. "
                      "PickScore_v1) or an open_clip checkpoint file (plain or {'state_dict': ...}, e.g. "
                      "HPS_v2.1_compressed.pt) of --model.clip_arch; not copied, the saved model names it")
    clip_arch: str = field("ViT-H-14", help="clip with a checkpoint file: its open_clip architecture (HPSv2 and "
                           "PickScore are ViT-H-14; open_clip.list_models() lists the names)")
    clip_processor: str = field("", help="clip with a CLIPModel folder: the CLIP processor folder (tokenizer + "
                                "preprocessor_config.json); empty = the model folder")
    arch: str = field("improved", help="almostperfect = AlmostPerfect's CNN (conv 4-8-16-32 + max-pool, adaptive "
                      "pool 8x8, MLP 2048-1024-1); improved = per-channel input normalisation, GroupNorm, "
                      "global mean+max pooling, dropout", choices=ARCHES)
    width: int = field(32, help="improved: channels of the first conv stage (the second has twice as many)")
    hidden: int = field(64, help="improved and clip: width of the MLP head")
    dropout: float = field(0.2, help="improved and clip: dropout before each head layer (0 disables)")
    normalize_input: bool = field(True, help="improved: standardise each latent channel with the training "
                                  "data's mean/std (stored in the weights)")

    def validate(self) -> None:
        """Raise ConfigError naming the field."""
        if self.kind not in KINDS:
            raise ConfigError(f"model.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "clip":
            check_clip_path(self)  # a missing or non-CLIP path fails here, before any label or model loads
        elif self.clip:
            raise ConfigError(f"model.clip: is set ({self.clip}) but model.kind is {self.kind!r}, which does not use "
                              "it; add --model.kind clip")
        if self.kind == "conditioned" and self.arch != "improved":
            raise ConfigError(f"model.arch: the conditioned kind builds on the improved network, not {self.arch!r}; "
                              "use --model.arch improved or --model.kind latent")
        if self.arch not in ARCHES:
            raise ConfigError(f"model.arch: {self.arch!r} is not one of {', '.join(ARCHES)}")
        if self.width < 1 or self.hidden < 1:
            raise ConfigError(f"model.width / model.hidden: must be >= 1 (got {self.width}, {self.hidden})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout: must be in [0, 1) (got {self.dropout})")


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


def check_clip_path(cfg: RewardModelConfig) -> None:
    """ConfigError unless model.clip names a CLIPModel folder (with a processor) or a checkpoint of a known arch."""
    if not cfg.clip:
        raise ConfigError("model.clip: --model.kind clip needs --model.clip PATH, a transformers CLIPModel folder "
                          "(e.g. PickScore_v1) or an open_clip checkpoint file (with --model.clip_arch)")
    path = Path(cfg.clip).expanduser()
    if not path.exists():
        raise ConfigError(f"model.clip: {path} does not exist (a transformers CLIPModel folder or an open_clip "
                          "checkpoint file is expected)")
    if path.is_dir():
        conf = path / "config.json"
        if not conf.is_file():
            raise ConfigError(f"model.clip: {path} is a folder without config.json, so not a transformers CLIPModel "
                              "folder; for an open_clip checkpoint name the file itself")
        try:
            model_type = json.loads(conf.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ConfigError(f"model.clip: {conf} is not a JSON object ({e})") from None
        if model_type != "clip":
            raise ConfigError(f"model.clip: {conf} describes a {model_type!r} model, not a CLIP (model_type 'clip')")
        proc = Path(cfg.clip_processor).expanduser() if cfg.clip_processor else path
        if not any((proc / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
            raise ConfigError(f"model.clip_processor: {proc} has no preprocessor_config.json / processor_config.json; "
                              "name the CLIP processor folder (tokenizer + image processor) with --model.clip_processor")
        return
    if cfg.clip_processor:
        raise ConfigError("model.clip_processor: only a CLIPModel folder takes a processor folder; an open_clip "
                          "checkpoint brings its own tokenizer and preprocessing")
    import open_clip

    if cfg.clip_arch not in open_clip.list_models():
        raise ConfigError(f"model.clip_arch: {cfg.clip_arch!r} is not an open_clip architecture (see "
                          "open_clip.list_models(); HPSv2 and PickScore are ViT-H-14)")
