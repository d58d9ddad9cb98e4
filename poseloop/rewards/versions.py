"""Saved reward model versions on disk: folder layout, the `latest` marker, config checks, weights, kinds.

models/reward/<version>/ holds weights.safetensors, config.json, metrics.json and plots; models/reward/latest
names the newest version. Every kind (latent, conditioned, clip) shares this format; config.json's model.kind
tells them apart, and poseloop.rewards.loading loads each with its own class.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from poseloop.config.reward import ARCHES, KINDS
from poseloop.data.store import read_latest_file, write_latest_file
from poseloop.rewards.model import REWARD_FORMAT

WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
LATEST_FILE = "latest"


def save_reward_model(model: nn.Module, folder: str | Path) -> None:
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


_LOADERS = {"latent": "poseloop.rewards.loading.load_reward_model", "clip": "poseloop.rewards.clip_head.load_clip_reward_model",
            "conditioned": "poseloop.rewards.loading.load_reward_model"}
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
    "CONFIG_FILE", "LATEST_FILE", "METRICS_FILE", "RewardFolderError", "WEIGHTS_FILE", "check_reward_config",
    "load_checked_weights", "load_metrics", "read_latest", "read_reward_config", "read_version", "resolve_reward_path",
    "reward_model_kind", "reward_root", "save_reward_model", "write_latest",
]
