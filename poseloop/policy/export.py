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

from poseloop.data.store import apply_umask, atomic_write, storage_error, storage_errors
from poseloop.models.policy_files import (CONTROLNET_DIR, DIFFUSERS_LORA_NAME, controlnet_file_name, kohya_lora_name,
                                         write_latest)


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


# ---- versioned policy exports ------------------------------------------------------------------

def save_controlnet_file(controlnet: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None
                         ) -> Path:
    """Write a ControlNet as one fp16 file in the layout ComfyUI and A1111 load (poseloop.models.original_layout)."""
    from poseloop.models.original_layout import controlnet_file_dict, save_weights_file

    sd = controlnet_file_dict(controlnet.state_dict(), dict(controlnet.config))  # type: ignore[attr-defined]
    return save_weights_file(sd, Path(path), torch.float16, metadata)


def save_diffusers_lora(pipe: Any, unet: torch.nn.Module, folder: str | Path, adapter: str = "default") -> Path:
    """Write the UNet adapter with the pipeline class's save_lora_weights, keeping lora_alpha.

    Without unet_lora_adapter_metadata diffusers reloads the file with alpha = rank, i.e. at the
    wrong strength whenever lora_alpha != r.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter))
    layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers,
                                 unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict())
    return folder / DIFFUSERS_LORA_NAME


def readme_text(version: str, files: list[str], arch: str, base: str, controlnet: str) -> str:
    """How to load an exported policy in ComfyUI, A1111 and diffusers."""
    lines = [f"# Policy {version}", "", f"Base model: `{base}` ({arch}); ControlNet: `{controlnet}`.", "",
             "Files: " + ", ".join(f"`{f}`" for f in files), ""]
    pipe = "StableDiffusionXLControlNetPipeline" if arch == "sdxl" else "StableDiffusionControlNetPipeline"
    kohya, cn_file = kohya_lora_name(version), controlnet_file_name(version)
    if kohya in files:
        lines += [
            "## LoRA", "",
            f"- ComfyUI: copy `{kohya}` into `ComfyUI/models/loras/` and use a *Load LoRA* node at "
            "strength 1.0 (the file's alpha gives the trained strength).",
            f"- A1111 / Forge: copy `{kohya}` into `stable-diffusion-webui/models/Lora/` and add "
            f"`<lora:{Path(kohya).stem}:1>` to the prompt.",
            f"- poseloop: `python generate.py --model.lora models/policies/{version}/{kohya}`.",
            "- diffusers:", "", "```python",
            f"pipe = {pipe}.from_pretrained(base, controlnet=controlnet)",
            f'pipe.load_lora_weights("models/policies/{version}", weight_name="{DIFFUSERS_LORA_NAME}")',
            "```", "",
        ]
    if CONTROLNET_DIR in files:
        lines += [
            "## ControlNet", "",
            f"- ComfyUI: copy `{cn_file}` (fp16) into `ComfyUI/models/controlnet/` and load it with "
            "*Load ControlNet Model*.",
            f"- A1111 (sd-webui-controlnet): copy `{cn_file}` into `extensions/sd-webui-controlnet/models/`.",
            f"- poseloop: `python generate.py --model.controlnet models/policies/{version}/{CONTROLNET_DIR}`.",
            f'- diffusers: `ControlNetModel.from_pretrained("models/policies/{version}/{CONTROLNET_DIR}")`.', "",
        ]
    return "\n".join(lines)


def export_policy(policy: Any, root: str | Path, version: str, config: dict[str, Any],
                  extra_metadata: dict[str, str] | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Export a trained policy to <root>/<version>/ atomically and point <root>/latest at it.

    extra_files: {file name: text} written into the folder too (the trainer's lineage.json).

    The folder is written under a temporary name and renamed, so a reader (ComfyUI, the next
    generate.py) never sees half an export; re-exporting a version replaces it whole.
    """
    import json
    import shutil
    import tempfile

    root = Path(root)
    comp = policy.comp
    with storage_errors(root):
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=".tmp", dir=root))
    try:
        files: list[str] = []
        meta = {"poseloop_version": version, "ss_base_model_version": comp.arch,
                **{k: str(v) for k, v in (extra_metadata or {}).items()}}
        if policy.target == "unet_lora":
            save_kohya_lora(comp.unet, tmp / kohya_lora_name(version), metadata=meta)
            save_diffusers_lora(comp.pipe, comp.unet, tmp)
            files += [kohya_lora_name(version), DIFFUSERS_LORA_NAME]
        else:
            # ComfyUI loads whole ControlNets, not ControlNet LoRAs: export full weights, as a diffusers
            # folder (poseloop, diffusers) and as the single fp16 file the ComfyUI workflow names.
            merged = policy.merged_controlnet()
            merged.save_pretrained(tmp / CONTROLNET_DIR, safe_serialization=True)
            save_controlnet_file(merged, tmp / controlnet_file_name(version), metadata=meta)
            files += [CONTROLNET_DIR, controlnet_file_name(version)]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        from poseloop.policy.comfy_workflow import write_comfy_workflow  # imports this module: not at the top

        comfy_files, comfy_readme = write_comfy_workflow(tmp, version, config, policy.target, comp.native_size,
                                                         dict(comp.unet.config))
        files += comfy_files
        model = config.get("model", {})
        (tmp / "README.md").write_text(readme_text(version, files, comp.arch, str(model.get("base", "")),
                                                   str(model.get("controlnet", ""))) + comfy_readme)
        # mkdtemp's 0700 and safetensors' 0600 would lock out a ComfyUI running as another user.
        apply_umask(tmp)
        final = root / version
        if final.exists():
            old = root / f".{version}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = storage_error(e, root)
        if err is not None and err is not e:
            raise err from e
        raise
    write_latest(root, version)
    return final
