"""Diffusers folders written as single files in the original (LDM) layout that ComfyUI and A1111 load.

The inverse of diffusers' single-file conversion (after diffusers' scripts/convert_diffusers_to_original_*.py),
generalised from SD's fixed 4 x 2 block layout to any number of levels and layers, so the embedded tiny
models convert too. poseloop.models.single_file reads these files back: a round trip gives the same weights.
A checkpoint holds the UNet (model.diffusion_model.*), the VAE (first_stage_model.*) and the text
encoder(s) (cond_stage_model.* for SD1.5, conditioner.embedders.* for SDXL). An SD1.5 ControlNet is
written as control_v11p_sd15_openpose is (control_model.*); an SDXL ControlNet keeps diffusers' keys, as
the SDXL OpenPose ControlNets ship (thibaud's OpenPoseXL2, xinsir's) and as ComfyUI and A1111 read them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from poseloop.config.lib import ConfigError, field
from poseloop.data.store import atomic_write

Tensors = dict[str, torch.Tensor]

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
# Where each arch keeps its text encoders in a checkpoint (as poseloop.models.single_file reads them).
SD15_CLIP = "cond_stage_model.transformer."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."


class ConversionError(ValueError):
    """A folder cannot be converted; the message names the folder and what is missing."""


def _resnet(rest: str) -> str:
    for ours, theirs in _RESNET:
        if rest.startswith(ours + "."):
            return theirs + rest[len(ours):]
    return rest


def _unet_key(key: str, config: dict[str, Any]) -> str:
    """One UNet / ControlNet key in LDM's numbering: input_blocks (1 + level * (L + 1) + layer), ..."""
    per = config["layers_per_block"] + 1  # LDM counts a level's downsampler (or upsampler) as a layer
    head, _, rest = key.partition(".")
    if (m := re.match(r"(time_embedding|add_embedding)\.(linear_\d)\.(.*)", key)):
        return f"{_UNET_TOP[m[1] + '.' + m[2]]}.{m[3]}"
    if head in ("conv_in", "conv_norm_out", "conv_out"):
        return f"{_UNET_TOP[head]}.{rest}"
    if (m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
        index = 1 + int(m[1]) * per + int(m[3])
        return f"input_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"input_blocks.{index}.1.{m[4]}"
    if (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key)):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if (m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key)):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if (m := re.match(r"mid_block\.attentions\.0\.(.*)", key)):
        return f"middle_block.1.{m[1]}"
    if (m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)):
        index = int(m[1]) * per + int(m[3])
        return f"output_blocks.{index}.0.{_resnet(m[4])}" if m[2] == "resnets" else f"output_blocks.{index}.1.{m[4]}"
    if (m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key)):
        block = int(m[1])
        slot = 2 if config["up_block_types"][block].startswith("CrossAttn") else 1  # after the attention, if any
        return f"output_blocks.{block * per + per - 1}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def unet_to_ldm(sd: Tensors, config: dict[str, Any]) -> Tensors:
    """A diffusers UNet state dict in the original layout (model.diffusion_model.*)."""
    return {"model.diffusion_model." + _unet_key(k, config): v for k, v in sd.items()}


def controlnet_to_ldm(sd: Tensors, config: dict[str, Any]) -> Tensors:
    """A diffusers ControlNet in the original layout (control_model.*, as in control_v11p_sd15_openpose)."""
    blocks = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
    out: Tensors = {}
    for k, v in sd.items():
        if (m := re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", k)):
            key = f"zero_convs.{m[1]}.0.{m[2]}"
        elif k.startswith("controlnet_mid_block."):
            key = "middle_block_out.0." + k.split(".", 1)[1]
        elif (m := re.match(r"controlnet_cond_embedding\.(conv_in|conv_out|blocks\.(\d+))\.(.*)", k)):
            # A Sequential of convs with a SiLU after each: conv_in at 0, block b at 2b + 2, conv_out last.
            index = 0 if m[1] == "conv_in" else 2 * blocks + 2 if m[1] == "conv_out" else 2 * int(m[2]) + 2
            key = f"input_hint_block.{index}.{m[3]}"
        else:
            key = _unet_key(k, config)
        out["control_model." + key] = v
    return out


def vae_to_ldm(sd: Tensors, config: dict[str, Any], prefix: str = "first_stage_model.") -> Tensors:
    """A diffusers VAE in the original layout: decoder levels reversed, attention as 1x1 convs."""
    levels = len(config["block_out_channels"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out: Tensors = {}
    for k, v in sd.items():
        key = k.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", key)
        key = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", key)
        key = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", key)
        if (m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)$", key)):
            key = f"{m[1]}.mid.attn_1.{attn[m[2]]}.{m[3]}"
            v = v[:, :, None, None] if v.ndim == 2 else v
        out[prefix + key] = v
    return out


def clip_to_ldm(sd: Tensors, prefix: str) -> Tensors:
    """A transformers CLIPTextModel in the original layout (<prefix>text_model.*)."""
    return {f"{prefix}text_model.{k.removeprefix('text_model.')}": v for k, v in sd.items()}


def open_clip_to_ldm(sd: Tensors, prefix: str = SDXL_OPEN_CLIP) -> Tensors:
    """A CLIPTextModelWithProjection in OpenCLIP's layout: fused q/k/v, transposed text_projection."""
    out: Tensors = {}
    names = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for k, v in sd.items():
        k = k.removeprefix("text_model.")
        if k == "text_projection.weight":
            out[prefix + "text_projection"] = v.T.contiguous()
        elif k in names:
            out[prefix + names[k]] = v
        elif (m := re.match(r"encoder\.layers\.(\d+)\.(.*)", k)):
            layer, rest = m[1], m[2]
            if re.match(r"self_attn\.[qkv]_proj\.", rest):
                if rest.startswith("self_attn.q_proj."):
                    kind = rest.rsplit(".", 1)[1]
                    parts = [sd.get(f"text_model.encoder.layers.{layer}.self_attn.{x}_proj.{kind}",
                                    sd.get(f"encoder.layers.{layer}.self_attn.{x}_proj.{kind}")) for x in "qkv"]
                    out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(parts)
                continue
            rest = (rest.replace("self_attn.", "attn.").replace("layer_norm1", "ln_1").replace("layer_norm2", "ln_2")
                    .replace("mlp.fc1", "mlp.c_fc").replace("mlp.fc2", "mlp.c_proj"))
            out[f"{prefix}transformer.resblocks.{layer}.{rest}"] = v
        else:
            raise KeyError(k)
    return out


# ---- folders -> state dicts ----------------------------------------------------------------------


def component_config(folder: Path) -> dict[str, Any]:
    """A component folder's config.json."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json; pass a diffusers pipeline folder (with unet/, vae/, "
                              "text_encoder/) or a ControlNet folder (config.json + diffusion_pytorch_model.*)")
    return json.loads(path.read_text())


def component_weights(folder: Path) -> Tensors:
    """A component folder's weights (.safetensors, fp32 or the fp16 variant; one file or shards)."""
    from safetensors.torch import load_file

    stems = ("model", "diffusion_pytorch_model")
    for variant in ("", ".fp16"):
        for stem in stems:
            if (folder / f"{stem}{variant}.safetensors").is_file():
                return load_file(str(folder / f"{stem}{variant}.safetensors"))
            index = folder / f"{stem}{variant}.safetensors.index.json"
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    raise ConversionError(f"{folder} holds no {' or '.join(s + '.safetensors' for s in stems)}; download the "
                          "safetensors weights of that component (pickled .bin weights are not converted)")


def is_sdxl_controlnet(config: dict[str, Any]) -> bool:
    """SDXL ControlNets take SDXL's pooled text and size conditioning (addition_embed_type text_time)."""
    return config.get("addition_embed_type") == "text_time"


def controlnet_file_dict(sd: Tensors, config: dict[str, Any]) -> Tensors:
    """A ControlNet as ComfyUI / A1111 files hold it: SD1.5 in the original layout, SDXL with diffusers' keys."""
    return dict(sd) if is_sdxl_controlnet(config) else controlnet_to_ldm(sd, config)


def checkpoint_dict(folder: Path) -> tuple[Tensors, str]:
    """A diffusers SD1.5 / SDXL pipeline folder as one original-layout state dict, and its arch."""
    arch = "sdxl" if (folder / "text_encoder_2").is_dir() else "sd15"
    sd = {**unet_to_ldm(component_weights(folder / "unet"), component_config(folder / "unet")),
          **vae_to_ldm(component_weights(folder / "vae"), component_config(folder / "vae"))}
    if arch == "sdxl":
        sd.update(clip_to_ldm(component_weights(folder / "text_encoder"), SDXL_CLIP))
        sd.update(open_clip_to_ldm(component_weights(folder / "text_encoder_2")))
    else:
        sd.update(clip_to_ldm(component_weights(folder / "text_encoder"), SD15_CLIP))
    return sd, arch


def save_weights_file(sd: Tensors, path: Path, dtype: torch.dtype, metadata: dict[str, str] | None = None) -> Path:
    """Write tensors as .safetensors in `dtype` under a temporary name, then rename."""
    from safetensors.torch import save_file

    # clone: a renamed view (1x1 attention convs) must not share storage with another saved tensor.
    out = {k: v.detach().to("cpu", dtype).contiguous().clone() for k, v in sd.items()}
    atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata={"format": "pt", **(metadata or {})}))
    return path


def write_single_file(source: str | Path, out: str | Path, dtype: torch.dtype = torch.float16) -> tuple[str, int]:
    """Convert a pipeline folder (-> checkpoint) or ControlNet folder (-> ControlNet file); (what, tensors)."""
    source, out = Path(source).expanduser(), Path(out).expanduser()
    if not source.is_dir():
        raise ConversionError(f"{source} is not a folder; pass a diffusers pipeline or ControlNet folder")
    if out.suffix != ".safetensors":
        raise ConversionError(f"{out}: the output must end in .safetensors")
    if (source / "unet").is_dir():
        sd, arch = checkpoint_dict(source)
        what = f"{arch} checkpoint"
    else:
        config = component_config(source)
        if "ControlNet" not in str(config.get("_class_name", "")):
            raise ConversionError(f"{source} is neither a pipeline folder (no unet/) nor a ControlNet folder "
                                  f"(config.json says {config.get('_class_name')!r})")
        sd = controlnet_file_dict(component_weights(source), config)
        what = f"{'sdxl' if is_sdxl_controlnet(config) else 'sd15'} ControlNet"
    save_weights_file(sd, out, dtype, {"poseloop_source": source.name})
    return what, len(sd)


# ---- scripts/to_single_file.py -------------------------------------------------------------------

DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class SingleFileConfig:
    """Write a diffusers folder as one .safetensors file that ComfyUI and A1111 load."""

    source: str = field("", help="a diffusers SD1.5 / SDXL pipeline folder (unet/, vae/, text_encoder/ ...) or a "
                                 "ControlNet folder (config.json + diffusion_pytorch_model.safetensors)")
    out: str = field("", help="the .safetensors file to write, e.g. ComfyUI/models/checkpoints/NAME.safetensors "
                              "(the name the exported workflow expects, given in the export's README)")
    dtype: str = field("float16", help="weights' precision in the file (float16: the size ComfyUI checkpoints "
                                       "ship at, 2 GB for SD1.5)", choices=tuple(DTYPES))

    def validate(self) -> None:
        """Both paths are given, the source exists, the output is a .safetensors file."""
        if not self.source:
            raise ConfigError("--source: give the diffusers folder to convert, e.g. --source models/my-sd15")
        if not Path(self.source).expanduser().is_dir():
            raise ConfigError(f"--source: {self.source!r} is not a folder; give a diffusers pipeline or ControlNet "
                              "folder")
        if not self.out.endswith(".safetensors"):
            raise ConfigError(f"--out: {self.out!r} must be a .safetensors file, e.g. --out "
                              "ComfyUI/models/checkpoints/my-sd15.safetensors")


PRESETS = {"default": SingleFileConfig}
