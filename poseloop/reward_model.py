"""The learned reward model: a small CNN ensemble on the sampler's final latents (no training code here).

A version on disk (models/reward/<version>/) holds:
    weights.safetensors   every ensemble member's parameters ("members.<i>.<name>")
    config.json           model hyper-parameters, latent shape, ensemble size, the training config
    metrics.json          held-out numbers (written by poseloop.reward_training)
    training_curve.png, calibration.png
and models/reward/latest is a small JSON file {"version": "<name>"} naming the newest version (the same
format as models/policies/latest; an older one-line file is read too).

Latent convention: what the sampler stores as x_0, i.e. the VAE latent times vae.config.scaling_factor
(minus shift_factor where a VAE has one); images are brought there by `encode_images`.

Public API used by other modules (keep stable): `load_reward_model(...)` and `LatentRewardModel.score(latents)`.
A version of kind "clip" (config.json model.kind; a head on frozen CLIP image features) shares this folder format
and is loaded by poseloop.clip_reward.load_clip_reward_model; `reward_model_kind` tells the two apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from poseloop.configlib import ConfigError
from poseloop.reward_config import ARCHES, KINDS, RewardModelConfig  # noqa: F401 (re-exported)
from poseloop.store import read_latest_file, write_latest_file

REWARD_FORMAT = "poseloop.reward/1"
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LATEST_FILE = "latest"


def ensemble_mean_std(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [B], std [B]) over the members of values [E, B]; std is 0 for a single member."""
    std = values.std(0, unbiased=False) if values.shape[0] > 1 else torch.zeros_like(values[0])
    return values.mean(0), std


class LatentShapeError(ValueError):
    """Latents do not match what a reward model was trained on (channel count or rank)."""


class AlmostPerfectNet(nn.Module):
    """AlmostPerfect's reward CNN: conv C-8-16-32 (3x3, ReLU, max-pool 2), adaptive pool 8x8, MLP 2048-1024-1."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        chans = (in_channels, 8, 16, 32)
        for cin, cout in zip(chans[:-1], chans[1:]):
            # ceil_mode keeps tiny latents (e.g. 4x4) from pooling to nothing; identical on even sizes.
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 1024), nn.ReLU(), nn.Linear(1024, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B]."""
        return self.head(self.pool(self.features(x))).squeeze(-1)


class ImprovedNet(nn.Module):
    """Input standardisation, two GroupNorm conv stages, global mean+max pooling, dropout MLP head.

    Global pooling makes the head's size independent of the latent size (SD 64x64, SDXL 128x128, tiny 8x8)
    and far smaller than AlmostPerfect's 2M-parameter Linear(2048, 1024), which overfits a few hundred labels.
    """

    def __init__(self, in_channels: int, cfg: RewardModelConfig) -> None:
        super().__init__()
        w = cfg.width
        self.normalize_input = cfg.normalize_input
        # Set from the training latents by the trainer (set_input_stats); identity until then.
        self.register_buffer("in_mean", torch.zeros(in_channels))
        self.register_buffer("in_std", torch.ones(in_channels))

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU()]

        self.stage1 = nn.Sequential(*block(in_channels, w), *block(w, w))
        self.stage2 = nn.Sequential(*block(w, 2 * w), *block(2 * w, 2 * w))
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(4 * w, cfg.hidden), nn.SiLU(),
                                  nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, 1))

    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-channel statistics of the training latents ([C] each)."""
        self.in_mean.copy_(mean)
        self.in_std.copy_(std.clamp(min=1e-4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> [B]."""
        if self.normalize_input:
            x = (x - self.in_mean[:, None, None]) / self.in_std[:, None, None]
        h = self.stage1(x)
        # Downsample only while the map is large: tiny latents (8x8) keep their resolution.
        if min(h.shape[-2:]) > 8:
            h = F.avg_pool2d(h, 2)
        h = self.stage2(h)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # [B, 4w]
        return self.head(pooled).squeeze(-1)


def build_member(cfg: RewardModelConfig, in_channels: int) -> nn.Module:
    """One ensemble member of the configured architecture."""
    if cfg.arch == "almostperfect":
        return AlmostPerfectNet(in_channels)
    if cfg.arch == "improved":
        return ImprovedNet(in_channels, cfg)
    raise ConfigError(f"model.arch: {cfg.arch!r} is not one of {', '.join(ARCHES)}")


def encode_images(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in 0..1 -> latents [B, C, H/f, W/f] as the sampler stores them (mean x scaling)."""
    x = images.to(vae.device, vae.dtype) * 2 - 1
    encoded = vae.encode(x)
    # The posterior mean, not a sample: scoring must be deterministic. An AutoencoderTiny (a TAESD-style
    # preview VAE) gives its latents directly.
    z = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return z * vae.config.scaling_factor


class LatentRewardModel(nn.Module):
    """An ensemble of reward CNNs on final latents; score() is the ensemble mean and is differentiable.

    prompts and metadata (one dict per sample, "keypoints"/"width"/"height") are accepted everywhere and ignored
    here; the conditioned kind (poseloop.reward_condition, `conditioned` True) needs them.
    """

    conditioned = False

    def __init__(self, cfg: RewardModelConfig, latent_shape: Sequence[int], ensemble_size: int = 1,
                 version: str = "", extra_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if len(latent_shape) != 3:
            raise ValueError(f"latent_shape must be (C, h, w), got {tuple(latent_shape)}")
        if ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1 (got {ensemble_size})")
        # The saved kind says what the weights are: a plain ensemble is "latent" whatever config it was given.
        self.config = replace(cfg, kind="latent") if cfg.kind == "conditioned" else cfg
        self.latent_shape: tuple[int, int, int] = tuple(int(s) for s in latent_shape)  # type: ignore[assignment]
        self.version = version
        # The training config and anything else saved next to the weights (config.json "training").
        self.extra_config = dict(extra_config or {})
        self.members = nn.ModuleList(build_member(cfg, self.latent_shape[0]) for _ in range(ensemble_size))

    @property
    def ensemble_size(self) -> int:
        return len(self.members)

    def check_latents(self, latents: torch.Tensor) -> None:
        """Raise LatentShapeError unless latents are [B, C, h, w] with this model's channel count."""
        c = self.latent_shape[0]
        if latents.ndim != 4:
            raise LatentShapeError(f"reward model {self.version or '(unsaved)'}: expected latents [B, {c}, h, w], got "
                                   f"shape {tuple(latents.shape)}")
        if latents.shape[1] != c:
            raise LatentShapeError(
                f"reward model {self.version or '(unsaved)'} was trained on {c}-channel latents "
                f"{list(self.latent_shape)} but got {latents.shape[1]}-channel latents {tuple(latents.shape)}: it "
                "belongs to another VAE / model family. Train a reward model on samples of this model "
                "(python train_reward.py --data.rounds ...) or use another reward.")

    def member_scores(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
                      metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Every member's reward: latents [B, C, h, w] -> [E, B]."""
        self.check_latents(latents)
        p = next(self.parameters())
        x = latents.to(p.device, p.dtype)
        return torch.stack([m(x) for m in self.members])  # [E, B]

    def forward(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
                metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Same as score()."""
        return self.member_scores(latents, prompts, metadata).mean(0)

    def score(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
              metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Reward per latent [B, C, h, w] -> [B]: the ensemble mean; differentiable with respect to latents."""
        return self.member_scores(latents, prompts, metadata).mean(0)

    def score_with_uncertainty(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
                               metadata: Sequence[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean [B], std [B]) over ensemble members; std is 0 for a single-member model."""
        return ensemble_mean_std(self.member_scores(latents, prompts, metadata))

    @torch.no_grad()
    def rank(self, latents: torch.Tensor, prompts: Sequence[str] | None = None,
             metadata: Sequence[dict] | None = None) -> torch.Tensor:
        """Indices of latents [B, C, h, w], best first."""
        return torch.argsort(self.score(latents, prompts, metadata), descending=True)

    def prefer_prob(self, latents_a: torch.Tensor, latents_b: torch.Tensor, prompts: Sequence[str] | None = None,
                    metadata: Sequence[dict] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """P(a beats b) = sigmoid(r_a - r_b) per member -> (ensemble mean [B], ensemble std [B]); a pair shares its
        condition (one group)."""
        return ensemble_mean_std(torch.sigmoid(self.member_scores(latents_a, prompts, metadata)
                                               - self.member_scores(latents_b, prompts, metadata)))

    def score_images(self, images: torch.Tensor, vae: Any) -> torch.Tensor:
        """Reward of images [B, 3, H, W] in 0..1: VAE-encode (posterior mean x scaling) then score -> [B]."""
        return self.score(encode_images(vae, images))

    def config_dict(self) -> dict[str, Any]:
        """What config.json holds (without the training config when none was given)."""
        return {"format": REWARD_FORMAT, "version": self.version, "model": asdict(self.config),
                "latent_shape": list(self.latent_shape), "ensemble_size": self.ensemble_size,
                "latent_convention": "final sampler latent x_0 = VAE posterior mean * scaling_factor",
                "training": self.extra_config}


@dataclass
class PairSuggestion:
    """A candidate pair to ask raters about, with the model's preference and its uncertainty."""

    a: int
    b: int
    p_a: float  # ensemble-mean P(a beats b)
    std: float  # ensemble std of P(a beats b): disagreement between members


@torch.no_grad()
def suggest_pairs(model: LatentRewardModel, latents: torch.Tensor, pairs: Sequence[tuple[int, int]],
                  top_k: int | None = None, prompts: Sequence[str] | None = None,
                  metadata: Sequence[dict] | None = None) -> list[PairSuggestion]:
    """Candidate pairs (indices into latents [N, C, h, w]) sorted by ensemble std of P(a beats b), most uncertain first.

    prompts / metadata: one per latent, for a conditioned model."""
    if not pairs:
        return []
    idx = torch.as_tensor(list(pairs), dtype=torch.long)  # [P, 2]
    member = model.member_scores(latents, prompts, metadata)  # [E, N]: each latent scored once, however many pairs it is in
    p = torch.sigmoid(member[:, idx[:, 0]] - member[:, idx[:, 1]])  # [E, P]
    std = p.std(0, unbiased=False) if p.shape[0] > 1 else torch.zeros_like(p[0])
    mean = p.mean(0)
    # Ties in std (e.g. a single-member model) fall back to closeness of P to 0.5.
    order = sorted(range(len(pairs)), key=lambda i: (-float(std[i]), abs(float(mean[i]) - 0.5)))
    out = [PairSuggestion(int(idx[i, 0]), int(idx[i, 1]), float(mean[i]), float(std[i])) for i in order]
    return out if top_k is None else out[:top_k]


# ---- save / load --------------------------------------------------------------------------------


def save_reward_model(model: LatentRewardModel, folder: str | Path) -> None:
    """Write weights.safetensors and config.json into folder (the caller makes the folder atomic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": REWARD_FORMAT})
    (folder / CONFIG_FILE).write_text(json.dumps(model.config_dict(), indent=2))


def reward_root(models_dir: str | Path) -> Path:
    """Folder holding every reward model version: <models_dir>/reward."""
    return Path(models_dir) / "reward"


def write_latest(models_dir: str | Path, version: str) -> Path:
    """Point <models_dir>/reward/latest at version, atomically (temp file + os.replace)."""
    path = reward_root(models_dir) / LATEST_FILE
    write_latest_file(path, version)
    return path


def read_latest(models_dir: str | Path) -> str:
    """The version named by <models_dir>/reward/latest."""
    path = reward_root(models_dir) / LATEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no reward model yet: {path} does not exist; train one with `python train_reward.py`")
    return read_latest_file(path)


def resolve_reward_path(path_or_version: str | Path, models_dir: str | Path = "models") -> Path:
    """A version folder from a folder path, a version name under <models_dir>/reward, or 'latest'."""
    p = Path(path_or_version)
    if (p / CONFIG_FILE).is_file():
        return p
    if str(path_or_version) == "latest":
        return reward_root(models_dir) / read_latest(models_dir)
    candidate = reward_root(models_dir) / str(path_or_version)
    if (candidate / CONFIG_FILE).is_file():
        return candidate
    root = reward_root(models_dir)
    known = sorted(d.name for d in root.iterdir() if (d / CONFIG_FILE).is_file()) if root.is_dir() else []
    raise FileNotFoundError(f"reward model {str(path_or_version)!r} not found (neither a folder with {CONFIG_FILE} "
                            f"nor a version in {root}); known versions: {', '.join(known) or 'none'}")


def read_reward_config(folder: Path) -> dict[str, Any]:
    """The config.json of a version folder, checked to be a poseloop reward model with loadable values."""
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RewardFolderError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]}); restore the file or "
                                "re-train the version with train_reward.py") from None
    except RecursionError:
        raise RewardFolderError(f"{path}: JSON nested too deeply to be a reward model config; restore the file "
                                "or re-train the version with train_reward.py") from None
    if not isinstance(data, dict) or data.get("format") != REWARD_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path}: not a poseloop reward model (format {found!r})")
    check_reward_config(data, path)
    return data


def reward_model_kind(path_or_version: str | Path = "latest", models_dir: str | Path = "models") -> str:
    """'latent', 'conditioned' or 'clip': what a saved version scores (versions older than the clip kind are 'latent')."""
    folder = resolve_reward_path(path_or_version, models_dir)
    return str(read_reward_config(folder)["model"].get("kind", "latent"))


_LOADERS = {"latent": "poseloop.reward_model.load_reward_model", "clip": "poseloop.clip_reward.load_clip_reward_model",
            "conditioned": "poseloop.reward_model.load_reward_model"}
_INPUTS = {"latent": "latents", "clip": "decoded images", "conditioned": "latents with their prompts and poses"}


def read_version(path_or_version: str | Path, models_dir: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """(folder, config.json) of a complete saved version of `kind`; an incomplete one or another kind is refused."""
    folder = resolve_reward_path(path_or_version, models_dir)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS_FILE} is missing; the version is incomplete, re-train it")
    data = read_reward_config(folder)
    found = data["model"].get("kind", "latent")
    if found != kind:
        raise ValueError(f"{folder}: a {found!r} reward model scores {_INPUTS[found]}, not {_INPUTS[kind]}; load it "
                         f"with {_LOADERS[found]}, or use it as the reward spec latent:{folder} (which reads either kind)")
    return folder, data


def load_reward_model(path_or_version: str | Path = "latest", models_dir: str | Path = "models",
                      device: str | torch.device = "cpu") -> LatentRewardModel:
    """Load a saved version (folder, version name or 'latest') in eval mode with frozen parameters.

    A conditioned version comes back as a ConditionedRewardModel (poseloop.reward_condition) with its text encoder.
    """
    if reward_model_kind(path_or_version, models_dir) == "conditioned":
        from poseloop.reward_condition import load_conditioned_reward_model

        return load_conditioned_reward_model(path_or_version, models_dir, device=device)
    folder, data = read_version(path_or_version, models_dir, "latent")
    cfg = RewardModelConfig(**data["model"])
    model = LatentRewardModel(cfg, data["latent_shape"], data["ensemble_size"], version=data.get("version") or folder.name,
                              extra_config=data.get("training"))
    load_checked_weights(model, folder / WEIGHTS_FILE)
    model.to(device)
    model.eval()
    # Rewards are frozen functions for the policy trainer; gradients still flow to the input latents.
    model.requires_grad_(False)
    return model


def load_metrics(path_or_version: str | Path = "latest", models_dir: str | Path = "models") -> dict[str, Any]:
    """The metrics.json of a saved version."""
    return json.loads((resolve_reward_path(path_or_version, models_dir) / METRICS_FILE).read_text())


# ---- checks of a saved folder: one line naming the file and field, before anything is built or read


class RewardFolderError(ValueError):
    """A saved version's config.json or weights cannot describe the model; the message names file and field."""


# Far above any trained here (32 wide, 3 members, ~65 k parameters each), far below what exhausts memory.
MAX_ENSEMBLE = 64
MAX_PARAMETERS = 200_000_000
MAX_LATENT_CHANNELS, MAX_LATENT_SIDE, MAX_FEATURE_DIM = 64, 1024, 65536
_FIELD_TYPES = {"kind": str, "clip": str, "clip_arch": str, "clip_processor": str, "arch": str, "width": int,
                "hidden": int, "dropout": float, "normalize_input": bool}


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_reward_config(data: dict[str, Any], path: Path) -> None:
    """Types and ranges of a config.json's fields (its model's size included); RewardFolderError naming the field."""
    fix = "restore the file or re-train the version with train_reward.py"

    def bad(name: str, why: str) -> RewardFolderError:
        return RewardFolderError(f"{path}: {name} {why}; {fix}")

    model = data.get("model")
    if not isinstance(model, dict):
        raise bad("model", "is missing or not an object")
    for key, value in model.items():
        want = _FIELD_TYPES.get(key)
        if want is None:
            raise bad(f"model.{key}", f"is not a field of a reward model (fields: {', '.join(_FIELD_TYPES)})")
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool) if want is float
              else isinstance(value, bool) if want is bool else _int_in(value, -2**62, 2**62) if want is int
              else isinstance(value, want))
        if not ok:
            raise bad(f"model.{key}", f"is {value!r:.40}, not a {want.__name__}")
    kind, arch = model.get("kind", "latent"), model.get("arch", "improved")
    if kind not in KINDS:
        raise bad("model.kind", f"is {kind!r:.40}, not one of {', '.join(KINDS)}")
    if arch not in ARCHES:
        raise bad("model.arch", f"is {arch!r:.40}, not one of {', '.join(ARCHES)}")
    width, hidden, dropout = model.get("width", 32), model.get("hidden", 64), model.get("dropout", 0.2)
    if width < 1 or hidden < 1:
        raise bad("model.width / model.hidden", f"must be >= 1 (got {width}, {hidden})")
    if not 0 <= dropout < 1:
        raise bad("model.dropout", f"must be in [0, 1) (got {dropout})")
    members = data.get("ensemble_size")
    if not _int_in(members, 1, MAX_ENSEMBLE):
        raise bad("ensemble_size", f"is {members!r:.40}, not an integer in 1..{MAX_ENSEMBLE}")
    if not isinstance(data.get("version", ""), (str, type(None))):
        raise bad("version", "is not a string")
    if not isinstance(data.get("training", {}), (dict, type(None))):
        raise bad("training", "is not an object")
    if kind == "latent":
        shape = data.get("latent_shape")
        if not (isinstance(shape, list) and len(shape) == 3 and _int_in(shape[0], 1, MAX_LATENT_CHANNELS)
                and all(_int_in(v, 1, MAX_LATENT_SIDE) for v in shape[1:])):
            raise bad("latent_shape", f"is {shape!r:.60}, not [channels 1..{MAX_LATENT_CHANNELS}, height, width "
                      f"1..{MAX_LATENT_SIDE}]")
        c = shape[0]
        per_member = (9 * (c * width + 7 * width * width) + 4 * width * hidden if arch == "improved"
                      else 9 * c * 8 + 2_100_000)
    elif kind == "clip":
        dim = data.get("feature_dim")
        if not _int_in(dim, 1, MAX_FEATURE_DIM):
            raise bad("feature_dim", f"is {dim!r:.40}, not an integer in 1..{MAX_FEATURE_DIM}")
        per_member = dim * (hidden + 2) + hidden
    else:  # a kind whose loader checks its own fields
        return
    if per_member * members > MAX_PARAMETERS:
        raise bad("model.width / model.hidden / ensemble_size", f"describe {per_member * members:,} parameters, "
                  f"more than the {MAX_PARAMETERS:,} a reward model here can have")


def load_checked_weights(model: nn.Module, path: Path) -> None:
    """Load a safetensors file into `model` after checking its tensor names and shapes against the model's."""
    from safetensors import safe_open

    fix = "restore the file or re-train the version with train_reward.py"
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # SafetensorError, OSError: not a safetensors file, truncated, unreadable
        raise RewardFolderError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:120]}); {fix}") from None
    missing, extra = sorted(set(want) - set(found)), sorted(set(found) - set(want))
    if missing or extra:
        what = f"lacks tensor {missing[0]!r}" if missing else f"has tensor {extra[0]!r}"
        raise RewardFolderError(f"{path}: {what}, which the model of config.json does not match "
                                f"({len(missing)} missing, {len(extra)} unexpected); {fix}")
    for k, shape in want.items():
        if found[k] != shape:
            raise RewardFolderError(f"{path}: tensor {k!r} has shape {list(found[k])}, the model of config.json "
                                    f"needs {list(shape)}; {fix}")
    model.load_state_dict(load_file(str(path)))


__all__ = [
    "LatentRewardModel", "LatentShapeError", "PairSuggestion", "RewardFolderError", "RewardModelConfig",
    "check_reward_config", "encode_images", "load_checked_weights",
    "ensemble_mean_std", "load_metrics", "load_reward_model", "read_latest", "read_reward_config", "read_version",
    "resolve_reward_path",
    "reward_model_kind", "save_reward_model",
    "suggest_pairs", "write_latest",
]
