"""The files of an exported policy version: their names and the `latest` marker (what loaders look for).

The policy layer writes them (poseloop.policy.export); model loading, lineage and the ComfyUI workflow read them.
"""

from __future__ import annotations

from pathlib import Path

from poseloop.data.store import read_latest_file, write_latest_file

LATEST_FILE = "latest"
# Exports before the kohya file was named after its version; still read (poseloop.models.loading.resolve_policy).
LEGACY_KOHYA_NAME = "lora_kohya.safetensors"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
CONTROLNET_DIR = "controlnet"


def kohya_lora_name(version: str) -> str:
    """The kohya LoRA's file name: named after the policy, so policies sit side by side in ComfyUI's loras/."""
    return f"poseloop-{version}.safetensors"


def controlnet_file_name(version: str) -> str:
    """A ControlNet policy's single file (fp16), under the name its ComfyUI workflow loads it by."""
    return f"poseloop-{version}-controlnet.safetensors"


def write_latest(root: str | Path, version: str) -> None:
    """Atomically write <root>/latest naming the newest version (JSON {"version": ...}, as for reward models)."""
    write_latest_file(Path(root) / LATEST_FILE, version)


def resolve_latest(root: str | Path) -> Path:
    """The folder <root>/latest names; FileNotFoundError with a hint when there is none."""
    root = Path(root)
    marker = root / LATEST_FILE
    if not marker.is_file():
        raise FileNotFoundError(f"{marker} does not exist: no policy has been exported to {root} yet "
                                "(run train_policy.py first)")
    folder = root / read_latest_file(marker)
    if not folder.is_dir():
        raise FileNotFoundError(f"{marker} names {folder.name!r} but {folder} is missing")
    return folder
