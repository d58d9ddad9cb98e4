"""Exporting trained LoRA weights in formats that ComfyUI, A1111 and diffusers load.

ComfyUI and A1111 load SD1.5/SDXL UNet LoRAs in kohya format:
    lora_unet_<module path with '_'>.lora_down.weight / .lora_up.weight / .alpha
with strength alpha / rank. The alpha written here is taken from each adapted layer's actual
scaling, so any rank / alpha (and rsLoRA) combination loads at the strength it was trained at.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from poseloop.store import atomic_write


def lora_layers(model: torch.nn.Module, adapter: str = "default") -> dict[str, Any]:
    """{module path: peft LoraLayer} for every layer of `model` that carries `adapter`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and adapter in getattr(m, "lora_A", {})}


def kohya_state_dict(model: torch.nn.Module, prefix: str = "lora_unet", adapter: str = "default"
                     ) -> dict[str, torch.Tensor]:
    """The adapter of a peft-wrapped UNet (or ControlNet) as a kohya-format state dict."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model, adapter).items():
        down = layer.lora_A[adapter].weight.detach()
        up = layer.lora_B[adapter].weight.detach()
        rank = down.shape[0]
        key = f"{prefix}_{name.replace('.', '_')}"
        out[f"{key}.lora_down.weight"] = down.to("cpu", torch.float32).contiguous()
        out[f"{key}.lora_up.weight"] = up.to("cpu", torch.float32).contiguous()
        # kohya strength is alpha / rank; peft's scaling already folds in lora_alpha, r and rsLoRA.
        out[f"{key}.alpha"] = torch.tensor(float(layer.scaling[adapter]) * rank, dtype=torch.float32)
    if not out:
        raise ValueError(f"no LoRA adapter named {adapter!r} in the model; nothing to export")
    return out


def save_kohya_lora(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None,
                    prefix: str = "lora_unet", adapter: str = "default") -> Path:
    """Write a kohya-format LoRA .safetensors atomically (for ComfyUI / A1111 / diffusers)."""
    path = Path(path)
    sd = kohya_state_dict(model, prefix=prefix, adapter=adapter)
    meta = {"format": "pt", "ss_network_module": "networks.lora", **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=meta))
    return path
