"""Single-file checkpoints (ComfyUI / A1111 / original LDM layout) for model.base, model.controlnet and model.vae.

diffusers' from_single_file converts the original key layout but fetches the model's config from the
hub unless it is given one. The configs ship here instead (poseloop/models/configs/<name>/, diffusers
format): sd15 and sdxl hold the configs of the hub repos diffusers' own conversion defaults point at
(stable-diffusion-v1-5, stable-diffusion-xl-base-1.0, lllyasviel's SD1.5 ControlNet, the SDXL
ControlNet), tiny-sd15 and tiny-sdxl those of the embedded models. The config that fits a file is
picked from its weight shapes and handed to from_single_file as a local folder with
local_files_only=True, so nothing contacts the hub. Pickled .ckpt / .pth files are read only through
torch.load(weights_only=True), which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Also imported by poseloop.config.generation (validation), so this module imports torch and diffusers lazily.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CONFIGS = Path(__file__).parent / "configs"
# The shipped configs, tried in this order. Their UNet / ControlNet shapes all differ; the SD1.5 and
# SDXL VAEs share theirs, and model.arch decides between those.
CONFIG_NAMES = ("sd15", "sdxl", "tiny-sd15", "tiny-sdxl")

LDM_UNET = "model.diffusion_model."
LDM_CONTROLNET = "control_model."
# Where the text encoders sit in an original checkpoint: SD1.5's CLIP-L, SDXL's CLIP-L and OpenCLIP bigG.
SD15_CLIP = "cond_stage_model.transformer."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."
# diffusers' ControlNet conversion expects the hint embedding's last conv at input_hint_block.14,
# where SD's 8-conv stack puts it (DIFFUSERS_TO_LDM_MAPPING["controlnet"]).
DIFFUSERS_HINT_OUT = 14


class SingleFileError(ValueError):
    """A single-file checkpoint could not be read or matched; the message names the field and the file."""


def read_state_dict(path: Path, field_name: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a pickle that torch.load(weights_only=True) accepts."""
    import torch

    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise SingleFileError(f"{field_name}: {path} is not a readable .safetensors file "
                                  f"({_first_line(e)}); check that the download is complete") from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ... by file
            if "weights only load failed" in str(e).lower():
                raise SingleFileError(
                    f"{field_name}: {path} is a pickle that holds more than tensors and would run code to load; "
                    "refused (torch.load weights_only=True failed). Use a .safetensors download of the model") from None
            raise SingleFileError(f"{field_name}: {path} is not a readable {suffix} checkpoint "
                                  f"({type(e).__name__}: {_first_line(e)}); check that the download is complete"
                                  ) from None
    else:
        raise SingleFileError(f"{field_name}: {path} has an unknown suffix {suffix!r}; pass a .safetensors file "
                              "(or a weights-only .ckpt/.pth), a diffusers folder or a hub id")
    # Lightning / LDM checkpoints nest the weights under "state_dict" beside the training state.
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise SingleFileError(f"{field_name}: {path} holds no named tensors; expected a model checkpoint")
    return tensors


# ---- which shipped config fits a file -------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    """What the weight shapes say about a UNet or ControlNet: enough to tell the shipped configs apart."""

    channels: int  # conv_in output channels (320 for SD1.5 / SDXL)
    context: int  # cross-attention (text) dimension (768 SD1.5, 2048 SDXL)
    xl: bool  # has SDXL's added time / pooled-text embedding

    def describe(self) -> str:
        """A short human-readable description for error messages."""
        return f"{self.channels} channels, {self.context}-dim text context, {'SDXL' if self.xl else 'SD1.5'}-style"


def _config(name: str, component: str) -> dict[str, Any] | None:
    path = CONFIGS / name / component / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _config_fingerprint(config: dict[str, Any]) -> Fingerprint:
    return Fingerprint(int(config["block_out_channels"][0]), int(config["cross_attention_dim"]),
                       config.get("addition_embed_type") == "text_time")


def _fingerprint(sd: dict[str, torch.Tensor], conv_in: str, label_emb: str, field_name: str, path: Path) -> Fingerprint:
    if conv_in not in sd:
        raise SingleFileError(f"{field_name}: {path} has no {conv_in} weight; the file is incomplete or of an "
                              "unsupported layout")
    context = next((v.shape[1] for k, v in sd.items() if k.endswith("attn2.to_k.weight")), 0)
    return Fingerprint(int(sd[conv_in].shape[0]), int(context), label_emb in sd)


def match_config(fingerprint: Fingerprint, component: str, field_name: str, path: Path) -> Path:
    """The shipped config folder whose `component` (unet or controlnet) has these shapes."""
    for name in CONFIG_NAMES:
        config = _config(name, component)
        if config is not None and _config_fingerprint(config) == fingerprint:
            return CONFIGS / name
    known = "; ".join(f"{name}: {_config_fingerprint(c).describe()}" for name in CONFIG_NAMES
                      if (c := _config(name, component)) is not None)
    raise SingleFileError(f"{field_name}: {path} has a {component} with {fingerprint.describe()}, which matches "
                          f"no supported model ({known}); SD2.x and other families are not supported")


def detect_base_arch(sd: dict[str, torch.Tensor], field_name: str, path: Path) -> str:
    """'sd15' or 'sdxl' from an original-layout checkpoint's keys; SingleFileError for anything else."""
    if f"{LDM_UNET}input_blocks.0.0.weight" not in sd:
        hint = (" (it looks like a ControlNet: pass it to --model.controlnet)" if _is_controlnet(sd) else
                " (it looks like a VAE: pass it to --model.vae)" if _vae_conv_in(sd) is not None else
                " (it looks like a LoRA: pass it to --model.lora)" if any("lora" in k for k in sd) else "")
        raise SingleFileError(f"{field_name}: {path} holds no UNet in the original layout "
                              f"({LDM_UNET}*){hint}; expected a full SD1.5 or SDXL checkpoint")
    in_channels = sd[f"{LDM_UNET}input_blocks.0.0.weight"].shape[1]
    if in_channels != 4:
        raise SingleFileError(f"{field_name}: {path} is a UNet with {in_channels} input channels (an inpainting or "
                              "other special model); pass a text-to-image SD1.5 or SDXL checkpoint")
    if any(k.startswith(SDXL_OPEN_CLIP) for k in sd):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in sd):
        raise SingleFileError(f"{field_name}: {path} is an SDXL refiner checkpoint; pass an SDXL base checkpoint")
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise SingleFileError(f"{field_name}: {path} is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder); "
                              "SD1.5 and SDXL are supported")
    if any(k.startswith(SD15_CLIP) for k in sd):
        return "sd15"
    raise SingleFileError(f"{field_name}: {path} holds no text encoder ({SD15_CLIP}* or conditioner.embedders.*); "
                          "expected a full SD1.5 or SDXL checkpoint")


# ---- loading ---------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_complete(model: Any, field_name: str, path: Path, what: str) -> None:
    # from_single_file builds the model on the meta device and fills in what the file holds: a missing
    # weight stays meta and would fail only later, deep inside a forward pass.
    missing = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if missing:
        raise SingleFileError(f"{field_name}: {path} lacks {len(missing)} weights of the {what} (e.g. {missing[0]}); "
                              "the file is incomplete or of another architecture")


@contextlib.contextmanager
def _quiet_dtype_cast() -> Iterator[None]:
    # diffusers 0.42 warns on every model.to(dtype) "There are modules in ... that should be kept in
    # float32: []", naming no module: noise for the user.
    logger = logging.getLogger("diffusers.models.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _from_single_file(cls: Any, sd: dict[str, torch.Tensor], config_dir: Path, component: str,
                      dtype: torch.dtype, field_name: str, path: Path) -> Any:
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    what = f"{config_dir.name} {component}"
    try:
        with _quiet_dtype_cast():
            model = cls.from_single_file(sd, config=str(config_dir), subfolder=component, local_files_only=True,
                                         dtype=dtype)
    except NotImplementedError:
        # A weight the file lacks stays on the meta device, and from_single_file's final move to the
        # CPU fails on it ("Cannot copy out of meta tensor"): name what is missing instead.
        try:
            missing = _missing_weights(cls, sd, config_dir, component)
        except (KeyError, ValueError, RuntimeError, AttributeError):  # only for the message: never mask the cause
            missing = []
        raise SingleFileError(f"{field_name}: {path} lacks {len(missing)} weights of the {what} (e.g. "
                              f"{missing[0] if missing else '?'}); the file is incomplete or of another "
                              "architecture") from None
    except (ValueError, KeyError, RuntimeError, SingleFileComponentError) as e:
        raise SingleFileError(f"{field_name}: {path} does not fit the {what} config ({_first_line(e)})") from None
    _check_complete(model, field_name, path, what)
    return model


def _missing_weights(cls: Any, sd: dict[str, torch.Tensor], config_dir: Path, component: str) -> list[str]:
    """The weights a model of this config needs that the converted file does not provide (for error messages)."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_model import (
        SINGLE_FILE_LOADABLE_CLASSES,
        _get_single_file_loadable_mapping_class,
    )

    config = cls.load_config(str(config_dir), subfolder=component, local_files_only=True)
    with init_empty_weights():
        expected = cls.from_config(config).state_dict()
    convert = SINGLE_FILE_LOADABLE_CLASSES[_get_single_file_loadable_mapping_class(cls)]["checkpoint_mapping_fn"]
    converted = sd if expected.keys() == sd.keys() else convert(config=config, checkpoint=sd)
    return sorted(k for k in expected if converted.get(k) is None)


def _text_encoder(cls: Any, sd: dict[str, torch.Tensor], prefix: str, config_dir: Path, component: str,
                  dtype: torch.dtype, field_name: str, path: Path) -> Any:
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    # Only this encoder's keys: diffusers tells SDXL's two encoders apart by width, which the tiny
    # SDXL model's encoders share (32), so it would load the first encoder's weights into the second.
    own = {k: v for k, v in sd.items() if k.startswith(prefix)}
    what = f"{config_dir.name} {component}"
    try:
        # No dtype here: the cast at the end would fail on a weight the file lacks (left on the meta
        # device) before _check_complete can name it.
        model = create_diffusers_clip_model_from_ldm(cls, own, subfolder=component, config=str(config_dir),
                                                     local_files_only=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise SingleFileError(f"{field_name}: {path} does not fit the {what} config ({_first_line(e)})") from None
    _check_complete(model, field_name, path, what)
    return model.to(dtype)


def _tokenizer(pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    from poseloop.models.embedded import write_clip_tokenizer_files

    # CLIP's tokenizer is rebuilt from the BPE table open_clip ships (as for the embedded models), so
    # no 2 MB vocabulary has to ship; it is the same tokenizer all these models were trained with.
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer_files(Path(tmp))
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token=pad_token,
                             model_max_length=77)


def load_pipeline_file(pipe_cls: Any, path: Path, arch: str, dtype: torch.dtype, field_name: str = "model.base",
                       **components: Any) -> Any:
    """A ControlNet pipeline from a full SD1.5 / SDXL checkpoint file; `components` (controlnet, vae, ...) win."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    sd = read_state_dict(path, field_name)
    found = detect_base_arch(sd, field_name, path)
    if found != arch:
        raise SingleFileError(f"model.arch: {path} is an {'SDXL' if found == 'sdxl' else 'SD1.5'} checkpoint but "
                              f"model.arch is {arch!r}; pass --model.arch {found}")
    unet_fp = _fingerprint(sd, f"{LDM_UNET}input_blocks.0.0.weight", f"{LDM_UNET}label_emb.0.0.weight", field_name,
                           path)
    config_dir = match_config(unet_fp, "unet", field_name, path)
    index = json.loads((config_dir / "model_index.json").read_text())
    scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text())
    parts: dict[str, Any] = {
        # Scalar pipeline settings (requires_safety_checker, force_zeros_for_empty_prompt) as the hub repo has them.
        **{k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)},
        "unet": _from_single_file(diffusers.UNet2DConditionModel, sd, config_dir, "unet", dtype, field_name, path),
        "scheduler": getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config),
        "tokenizer": _tokenizer("<|endoftext|>"),
    }
    if components.get("vae") is None:
        parts["vae"] = _from_single_file(diffusers.AutoencoderKL, sd, config_dir, "vae", dtype, field_name, path)
    if arch == "sdxl":
        parts["text_encoder"] = _text_encoder(CLIPTextModel, sd, SDXL_CLIP, config_dir, "text_encoder", dtype,
                                              field_name, path)
        parts["text_encoder_2"] = _text_encoder(CLIPTextModelWithProjection, sd, SDXL_OPEN_CLIP, config_dir,
                                                "text_encoder_2", dtype, field_name, path)
        parts["tokenizer_2"] = _tokenizer("!")  # SDXL's second tokenizer pads with "!", as OpenCLIP does
    else:
        parts["text_encoder"] = _text_encoder(CLIPTextModel, sd, SD15_CLIP, config_dir, "text_encoder", dtype,
                                              field_name, path)
        parts.update(safety_checker=None, feature_extractor=None)
    parts.update({k: v for k, v in components.items() if v is not None})
    return pipe_cls(**parts)


def _is_controlnet(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith("input_hint_block.0.weight") or k == "controlnet_cond_embedding.conv_in.weight" for k in sd)


def _normalise_ldm_controlnet(sd: dict[str, torch.Tensor], field_name: str, path: Path) -> dict[str, torch.Tensor]:
    """Strip the control_model. prefix and put the hint embedding's last conv where diffusers expects it."""
    if any(k.startswith(LDM_CONTROLNET) for k in sd):
        # Extracted ControlNets keep the prefix; full ControlLDM checkpoints also hold a UNet, VAE, ...
        sd = {k.removeprefix(LDM_CONTROLNET): v for k, v in sd.items() if k.startswith(LDM_CONTROLNET)}
    hint = sorted({int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.")})
    last = hint[-1] if hint else -1
    if last > DIFFUSERS_HINT_OUT:
        raise SingleFileError(f"{field_name}: {path} has a hint embedding of {len(hint)} convs, more than "
                              "SD's ControlNet; this layout is not supported")
    if last < DIFFUSERS_HINT_OUT:
        # A smaller hint stack (the embedded tiny ControlNet: 6 convs, so its output conv is at 10);
        # diffusers maps index 14 to conv_out and counts every other index as a block.
        for name in ("weight", "bias"):
            sd[f"input_hint_block.{DIFFUSERS_HINT_OUT}.{name}"] = sd.pop(f"input_hint_block.{last}.{name}")
    return sd


def load_controlnet_file(path: Path, dtype: torch.dtype, field_name: str = "model.controlnet") -> Any:
    """A ControlNet from a single file: original layout (control_v11p_sd15_openpose) or diffusers keys (SDXL)."""
    from diffusers import ControlNetModel

    sd = read_state_dict(path, field_name)
    if any(k.endswith("input_hint_block.0.weight") for k in sd):
        sd = _normalise_ldm_controlnet(sd, field_name, path)
        fingerprint = _fingerprint(sd, "input_blocks.0.0.weight", "label_emb.0.0.weight", field_name, path)
    elif "controlnet_cond_embedding.conv_in.weight" in sd:
        fingerprint = _fingerprint(sd, "conv_in.weight", "add_embedding.linear_1.weight", field_name, path)
    else:
        lora = " (control-LoRA files are not supported)" if any("lora" in k for k in sd) else ""
        raise SingleFileError(f"{field_name}: {path} is not a ControlNet (no input_hint_block or "
                              f"controlnet_cond_embedding weights){lora}; pass an OpenPose ControlNet file or folder")
    config_dir = match_config(fingerprint, "controlnet", field_name, path)
    return _from_single_file(ControlNetModel, sd, config_dir, "controlnet", dtype, field_name, path)


def _vae_conv_in(sd: dict[str, torch.Tensor]) -> torch.Tensor | None:
    # Standalone VAE files have bare keys (encoder.conv_in.weight); full checkpoints prefix them.
    for prefix in ("", "first_stage_model.", "vae."):
        if f"{prefix}encoder.conv_in.weight" in sd:
            return sd[f"{prefix}encoder.conv_in.weight"]
    return None


def load_vae_file(path: Path, arch: str, dtype: torch.dtype, field_name: str = "model.vae") -> Any:
    """A VAE from a single file (original or diffusers keys, or a checkpoint's VAE); arch picks the scaling."""
    from diffusers import AutoencoderKL

    sd = read_state_dict(path, field_name)
    conv_in = _vae_conv_in(sd)
    if conv_in is None:
        # TAESD ships as taesd_decoder.safetensors (keys "1.weight", ...) or with diffusers' AutoencoderTiny keys.
        if sd and all(k.split(".")[0].isdigit() or k.startswith(("decoder.layers.", "encoder.layers.")) for k in sd):
            raise SingleFileError(f"{field_name}: {path} looks like a TAESD tiny autoencoder file; pass its diffusers "
                                  "folder or hub id instead (madebyollin/taesd for SD1.5, madebyollin/taesdxl for "
                                  "SDXL), which --model.vae loads as an AutoencoderTiny")
        raise SingleFileError(f"{field_name}: {path} holds no VAE (no encoder.conv_in weight); pass a VAE file "
                              "such as sdxl_vae.safetensors or vae-ft-mse-840000-ema-pruned.safetensors")
    # SD1.5's and SDXL's VAEs have the same shapes and differ in the latent scaling factor, which the
    # file does not carry: model.arch decides between them.
    order = sorted(CONFIG_NAMES, key=lambda name: arch not in name)
    for name in order:
        config = _config(name, "vae")
        if config is not None and int(config["block_out_channels"][0]) == conv_in.shape[0]:
            return _from_single_file(AutoencoderKL, sd, CONFIGS / name, "vae", dtype, field_name, path)
    raise SingleFileError(f"{field_name}: {path} is a VAE with {conv_in.shape[0]} base channels, which matches no "
                          "supported model (SD1.5 / SDXL: 128; tiny-sd15: 32; tiny-sdxl: 16)")


def load_single_file(cls: Any, path: Path, field_name: str, arch: str, dtype: torch.dtype, **kwargs: Any) -> Any:
    """Load `cls` (a ControlNet, VAE or ControlNet pipeline class) from a single weights file."""
    from diffusers import AutoencoderKL, ControlNetModel

    if isinstance(cls, type) and issubclass(cls, ControlNetModel):
        return load_controlnet_file(path, dtype, field_name)
    if isinstance(cls, type) and issubclass(cls, AutoencoderKL):
        return load_vae_file(path, arch, dtype, field_name)
    return load_pipeline_file(cls, path, arch, dtype, field_name, **kwargs)
