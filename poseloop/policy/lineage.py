"""Where a policy came from: its run identity from resolved inputs, the policy it continues, and its lineage file.

A run is named by what it was trained on, resolved: the config, the reward spec with every learned reward
model pinned to its version and weights digest, the stored preference pairs (D3PO), and the parent policy
it continues from. Re-running after new labels (a new reward model, more pairs) is a new run; re-running
with nothing new resumes. Each export writes lineage.json (parent, inputs, identity) beside its weights;
`train_policy.py --lineage VERSION` prints the chain back to the base model.

"Previous policy" (parent auto): the newest export under the export root made for the same base model
(model.arch, base, controlnet, lcm_lora) and the same target kind. A moving reference (auto, latest) that
names a policy made from exactly this run's inputs is a re-run of that policy's run: its parent is taken,
so the run resumes instead of training on top of itself.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from poseloop.config.lib import ConfigError
from poseloop.config.policy import PolicyConfig, config_hash

LINEAGE_FILE = "lineage.json"
BASE = "base"
MOVING = ("auto", "latest")  # references that move as policies are trained


def digest(obj: Any, n: int = 10) -> str:
    """Short sha256 of a JSON-serialisable value (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_digest(path: Path, n: int = 16) -> str:
    """Short sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


# ---- inputs --------------------------------------------------------------------------------------


def reward_inputs(spec: str, models_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """(spec with every learned model's 'latest' pinned, [{version, weights digest, labels}] of those models)."""
    from poseloop.rewards.versions import METRICS_FILE, WEIGHTS_FILE, resolve_reward_path
    from poseloop.rewards.spec import parse_reward_spec, pin_reward_versions

    spec = "latent:latest" if spec.strip() == "latest" else spec
    try:
        pinned, _ = pin_reward_versions(spec, models_dir)
        terms = parse_reward_spec(pinned)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"reward: {e}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"reward: {e} (train a reward model first, or pick a built-in reward)") from None
    models = []
    for t in terms:
        if t.name != "latent":
            continue
        try:
            folder = resolve_reward_path(dict(t.options).get("version", "latest"), models_dir)
        except FileNotFoundError as e:
            raise ConfigError(f"reward: {e}") from None
        weights = folder / WEIGHTS_FILE
        metrics = json.loads((folder / METRICS_FILE).read_text()) if (folder / METRICS_FILE).is_file() else {}
        models.append({"version": folder.name, "weights": file_digest(weights) if weights.is_file() else "",
                       "labels": metrics.get("labels") or {"rounds": metrics.get("rounds", []),
                                                           "n_labels": metrics.get("n_labels")}})
    return pinned, models


def pair_inputs(pairs: Sequence[Any]) -> dict[str, Any]:
    """The stored preference pairs D3PO trains on: per-round counts and a digest of (rater, winner, loser)."""
    rounds: dict[str, int] = {}
    for p in pairs:
        rounds[p.round_name] = rounds.get(p.round_name, 0) + 1
    keys = sorted((p.rater_id, p.winner_id, p.loser_id) for p in pairs)
    return {"pairs": len(keys), "rounds": dict(sorted(rounds.items())), "digest": digest(keys, 16)}


def run_inputs(cfg: PolicyConfig, reward: Any = None, pairs: Sequence[Any] | None = None) -> tuple[dict[str, Any], str]:
    """(what a run trains on, resolved: config hash, reward with learned models pinned, stored pairs; the pinned
    reward spec). `reward`: a reward object given in code instead of cfg.reward."""
    inputs: dict[str, Any] = {}
    spec = cfg.reward
    if cfg.online and reward is None:
        spec, models = reward_inputs(cfg.reward, cfg.model.models_dir)
        inputs["reward"] = spec
        if models:
            inputs["reward_models"] = models
    elif cfg.online:
        inputs["reward_object"] = str(getattr(reward, "name", None) or type(reward).__name__)
    if pairs:
        inputs["labels"] = pair_inputs(pairs)
    # The parent counts resolved, beside the config (run_identity), not as the --model.policy text.
    model = dataclasses.replace(cfg.model, policy="")
    inputs["config"] = config_hash(dataclasses.replace(cfg, reward=spec, model=model))
    return inputs, spec


# ---- exported policies ---------------------------------------------------------------------------


@dataclass
class Parent:
    """An exported policy a run continues from."""

    version: str
    folder: Path
    config: dict[str, Any]  # its config.json
    lineage: dict[str, Any]  # its lineage.json ({} for exports made before lineage existed)

    @property
    def kind(self) -> str:
        """Its target kind (unet_lora, controlnet, controlnet_lora)."""
        return str(self.config.get("target", {}).get("kind", "unet_lora"))


def read_export(folder: Path) -> Parent | None:
    """The export in `folder` with its config and lineage; None when it has no config.json (not a trained policy)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    try:
        lineage = json.loads((folder / LINEAGE_FILE).read_text())
    except (OSError, ValueError):
        lineage = {}
    return Parent(folder.name, folder, config if isinstance(config, dict) else {},
                  lineage if isinstance(lineage, dict) else {})


MODEL_KEYS = ("arch", "base", "controlnet", "lcm_lora", "lora")


def model_key(model: dict[str, Any]) -> tuple[str, ...]:
    """What a policy was trained on top of: architecture, base pipeline, ControlNet, fused LCM-LoRA and any other
    LoRA fused into the base (--model.lora)."""
    return tuple(str(model.get(k, "") or "") for k in MODEL_KEYS)


def _created(p: Parent) -> str:
    """An export's time as a sortable string (lineage's created_at, else the folder's mtime)."""
    if p.lineage.get("created_at"):
        return str(p.lineage["created_at"])
    return datetime.fromtimestamp(p.folder.stat().st_mtime, timezone.utc).isoformat()


def newest_matching(root: Path, model: dict[str, Any], kind: str) -> Parent | None:
    """The newest export under root trained on the same base model with the same target kind."""
    found = []
    if root.is_dir():
        for folder in root.iterdir():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            p = read_export(folder)
            if p is not None and p.kind == kind and model_key(p.config.get("model", {})) == model_key(model):
                found.append(p)
    return max(found, key=lambda p: (_created(p), p.version)) if found else None


def _named(root: Path, version: str, field_name: str) -> Parent:
    p = read_export(root / version)
    if p is None:
        known = sorted(f.name for f in root.iterdir() if (f / "config.json").is_file()) if root.is_dir() else []
        raise ConfigError(f"{field_name}: no policy {version!r} in {root} (a folder with config.json); known: "
                          f"{', '.join(known) or 'none'}; or pass --parent base to start from the base model")
    return p


def kohya_file(folder: Path) -> Path:
    """The kohya-format LoRA file of an exported unet_lora policy (the file ComfyUI loads)."""
    from safetensors import safe_open

    from poseloop.models.policy_files import DIFFUSERS_LORA_NAME, kohya_lora_name

    if (folder / kohya_lora_name(folder.name)).is_file():
        return folder / kohya_lora_name(folder.name)
    for path in sorted(folder.glob("*.safetensors")):
        if path.name != DIFFUSERS_LORA_NAME:
            with safe_open(str(path), "pt") as f:
                if any(k.startswith("lora_unet_") for k in f.keys()):
                    return path
    raise ConfigError(f"parent: {folder} holds no kohya LoRA file (lora_unet_... keys); was its export interrupted? "
                      "Pass --parent base or another version")


def find_parent(requested: str, model_policy: str, root: Path, model: dict[str, Any], kind: str,
                inputs: str) -> tuple[Parent | None, str]:
    """The policy a run continues from (None = the base model) and a sentence saying why.

    requested: 'auto', 'base', 'latest' or a version; model.policy, when set, names the parent too.
    inputs: this run's inputs digest: a moving reference to a policy made from the same inputs resumes its run.
    """
    from poseloop.models.policy_files import resolve_latest

    field_name = "parent"
    if model_policy:
        if requested not in ("auto", model_policy):
            raise ConfigError(f"parent: --parent {requested} and --model.policy {model_policy} disagree; the policy a "
                              "run continues from is --parent (drop --model.policy)")
        if requested == "auto":
            requested, field_name = model_policy, "model.policy"
    if requested == BASE:
        return None, "starting from the base model (--parent base)"
    if requested == "auto":
        found = newest_matching(root, model, kind)
        if found is None:
            return None, f"starting from the base model: no earlier {kind} policy of {model.get('base')} in {root}"
        why = f"the newest {kind} policy of {model.get('base')} in {root}"
    elif requested == "latest":
        try:
            found = _named(root, resolve_latest(root).name, field_name)
        except FileNotFoundError as e:
            raise ConfigError(f"{field_name}: {e}; or pass --parent base") from None
        why = f"{root / 'latest'}"
    else:
        found = _named(root, requested, field_name)
        why = "named"
    if requested in MOVING and found.lineage.get("inputs_digest") == inputs:
        # That policy was made by this very command: resume its run rather than train on top of it.
        previous = found.lineage.get("parent")
        if not previous:
            return None, f"starting from the base model, as {found.version} (made from these same inputs) did"
        return _named(root, previous, field_name), f"the parent of {found.version}, made from these same inputs"
    return found, why


def check_compatible(parent: Parent, model: dict[str, Any], target: dict[str, Any]) -> None:
    """Refuse a parent of another base model or target, or (unet_lora) of another LoRA shape, with the fix."""
    fix = "pass --parent base to start from the base model, or --parent <version> to pick another policy"
    pm = parent.config.get("model", {})
    if model_key(pm) != model_key(model):
        raise ConfigError(f"parent: {parent.version} was trained on {model_key(pm)}, this run on {model_key(model)}; "
                          f"{fix}")
    if parent.kind != target["kind"]:
        raise ConfigError(f"parent: {parent.version} trained target {parent.kind}, this run {target['kind']}; a policy "
                          f"continues only a policy of its own target; {fix}")
    if target["kind"] == "unet_lora":
        pt = parent.config.get("target", {})
        mine = (int(target["lora_rank"]), float(target["lora_alpha"]), sorted(target["lora_modules"]))
        theirs = (int(pt.get("lora_rank", 0)), float(pt.get("lora_alpha", 0)), sorted(pt.get("lora_modules", [])))
        if mine != theirs:
            raise ConfigError(f"parent: {parent.version} is a LoRA of rank {theirs[0]}, alpha {theirs[1]:g} on "
                              f"{len(theirs[2])} module names; this run asks rank {mine[0]}, alpha {mine[1]:g} on "
                              f"{len(mine[2])}: continuing trains the same LoRA, so pass the parent's --target "
                              f"values, or {fix}")


def run_identity(inputs_digest: str, parent: Parent | None) -> str:
    """A run's identity: its inputs and the policy it starts from."""
    return digest({"inputs": inputs_digest, "parent": parent.version if parent else None})


def lineage_record(version: str, run: str, algo: str, epoch: int, identity: str, inputs: dict[str, Any],
                   inputs_digest: str, parent: Parent | None, model: dict[str, Any], kind: str) -> dict[str, Any]:
    """What an export's lineage.json holds."""
    return {"version": version, "run": run, "algo": algo, "epoch": epoch,
            "created_at": datetime.now(timezone.utc).isoformat(), "identity": identity,
            "parent": parent.version if parent else None, "inputs_digest": inputs_digest, "inputs": inputs,
            "base": dict(zip(MODEL_KEYS, model_key(model), strict=True)),
            "target": kind}


# ---- printing ------------------------------------------------------------------------------------


def _labels_text(labels: dict[str, Any]) -> str:
    rounds = labels.get("rounds") or {}
    if isinstance(rounds, dict):
        parts = []
        for name, n in rounds.items():
            if isinstance(n, dict):
                made = f" by {n['policy']}" if n.get("policy") else ""
                parts.append(f"{name}{made}: {n.get('scores', 0)} scores + {n.get('preferences', 0)} pairs")
            else:
                parts.append(f"{name}: {n} pairs")
        text = "; ".join(parts)
    else:
        text = ", ".join(map(str, rounds))
    return text + (f" (labels {labels['digest']})" if labels.get("digest") else "")


def describe(p: Parent) -> str:
    """One line: a policy, what it was trained on, its parent."""
    lin = p.lineage
    if not lin:
        return f"{p.version}: made before lineage was recorded ({p.kind}, algo {p.config.get('algo', '?')})"
    inputs = lin.get("inputs", {})
    what = []
    if inputs.get("reward"):
        what.append(f"reward {inputs['reward']}")
    for m in inputs.get("reward_models", []):
        labels = _labels_text(m.get("labels", {}))
        what.append(f"reward model {m['version']} [{m.get('weights', '')}]" + (f" on {labels}" if labels else ""))
    if inputs.get("labels"):
        what.append(f"{inputs['labels']['pairs']} preference pairs from {_labels_text(inputs['labels'])}")
    if inputs.get("reward_object"):
        what.append(f"reward object {inputs['reward_object']}")
    return (f"{p.version}: {lin.get('algo')} {p.kind}, {lin.get('epoch')} epochs, {lin.get('created_at', '')[:19]}; "
            f"{'; '.join(what) or 'no reward'}; config {inputs.get('config', '?')}; parent {lin.get('parent') or BASE}")


def lineage_lines(root: Path, version: str) -> list[str]:
    """The chain from a policy back to the base model, one line each ('latest' resolves first)."""
    from poseloop.models.policy_files import resolve_latest

    if version == "latest":
        try:
            version = resolve_latest(root).name
        except FileNotFoundError as e:
            raise ConfigError(f"lineage: {e}") from None
    p = _named(root, version, "lineage")
    lines, seen = [], set()
    while p is not None and p.version not in seen:
        seen.add(p.version)
        lines.append(("  <- " if lines else "") + describe(p))
        parent = p.lineage.get("parent")
        if not parent:
            base = p.lineage.get("base") or dict(zip(MODEL_KEYS, model_key(p.config.get("model", {})), strict=True))
            lines.append(f"  <- {BASE}: {base.get('base')} + ControlNet {base.get('controlnet')}"
                         + (f" + LCM-LoRA {base['lcm_lora']}" if base.get("lcm_lora") else "")
                         + (f" + LoRA {base['lora']} (fused)" if base.get("lora") else ""))
            break
        nxt = read_export(root / parent)
        if nxt is None:
            lines.append(f"  <- {parent}: missing from {root}")
            break
        p = nxt
    return lines


def lineage_line(root: Path, version: str) -> str:
    """The chain as one line of versions: 'v3 <- v2 <- v1 <- base'."""
    chain, seen = [version], {version}
    while True:
        p = read_export(root / chain[-1])
        parent = p.lineage.get("parent") if p is not None else None
        if p is None or not p.lineage:
            chain.append("(no lineage recorded)" if p is not None else "(missing)")
            break
        if not parent:
            chain.append(BASE)
            break
        if parent in seen:
            break
        seen.add(parent)
        chain.append(parent)
    return " <- ".join(chain)
