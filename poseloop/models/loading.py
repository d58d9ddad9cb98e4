"""Loading pipelines (SD1.5 / SDXL + OpenPose ControlNet) from hub ids, local folders or single files."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from poseloop.config.generation import ModelConfig, apply_threads
from poseloop.config.lib import ConfigError
from poseloop.models.policy_files import CONTROLNET_DIR, DIFFUSERS_LORA_NAME, LEGACY_KOHYA_NAME, kohya_lora_name, resolve_latest
from poseloop.models.embedded import ensure_embedded
from poseloop.config.generation import is_embedded


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the config field and how to fix it."""


@dataclass
class Components:
    """A loaded pipeline and the facts the sampler needs about it."""

    pipe: Any  # StableDiffusionControlNetPipeline | StableDiffusionXLControlNetPipeline
    arch: str
    device: torch.device
    dtype: torch.dtype
    lcm_lora: str = ""  # the LCM-LoRA fused into the UNet at load (model.lcm_lora), if any

    @property
    def unet(self) -> Any:
        return self.pipe.unet

    @property
    def controlnet(self) -> Any:
        return self.pipe.controlnet

    @property
    def vae(self) -> Any:
        return self.pipe.vae

    @property
    def scheduler(self) -> Any:
        return self.pipe.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution_multiple(self) -> int:
        """Image sizes must be multiples of this: VAE factor times the UNet's downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The resolution the model was trained at."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)


def policy_lora_files(version: str) -> tuple[str, ...]:
    """A policy's LoRA file names, preferred first (diffusers' carries its adapter metadata; then kohya's)."""
    # The kohya file is named after the version; exports made before that hold lora_kohya.safetensors.
    return (DIFFUSERS_LORA_NAME, kohya_lora_name(version), LEGACY_KOHYA_NAME)


def policy_versions(models_dir: str | Path) -> list[str]:
    """Versions of trained policies under <models_dir>/policies, oldest first."""
    root = Path(models_dir) / "policies"
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def resolve_policy(cfg: ModelConfig) -> ModelConfig:
    """Turn model.policy ('latest' or a version) into concrete LoRA / ControlNet paths.

    The result names the concrete version, so a round records (and its plan hash pins) the exact
    weights even after 'latest' moves on. Idempotent; a config without a policy is returned as is.
    """
    if not cfg.policy:
        return cfg
    root = Path(cfg.models_dir) / "policies"
    version = cfg.policy
    if version == "latest":
        try:
            version = resolve_latest(root).name
        except FileNotFoundError as e:
            raise ConfigError(f"model.policy: {e}; train one with train_policy.py, or name a version "
                              f"({', '.join(policy_versions(cfg.models_dir)) or 'none found'})") from None
    folder = root / version
    if not folder.is_dir():
        raise ConfigError(f"model.policy: {folder} does not exist; available: "
                          f"{', '.join(policy_versions(cfg.models_dir)) or 'none'}")
    lora_files = policy_lora_files(version)
    lora = next((folder / f for f in lora_files if (folder / f).is_file()), None)
    controlnet = folder / CONTROLNET_DIR
    if lora is None and not controlnet.is_dir():
        raise ConfigError(f"model.policy: {folder} holds neither a LoRA ({' or '.join(lora_files)}) "
                          "nor a controlnet/ folder; was the export interrupted? Pick another version")
    return dataclasses.replace(cfg, policy=version, lora=str(lora) if lora else "",
                               controlnet=str(controlnet) if controlnet.is_dir() else cfg.controlnet)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> float16 on CUDA (as the reference systems run), float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _load(cls: Any, source: str, field_name: str, cfg: ModelConfig, **kwargs: Any) -> Any:
    """cls.from_pretrained (or a single-file load) with an error that says how to get the weights."""
    if is_embedded(source):
        ensure_embedded(source)
    local = Path(source).expanduser()
    if local.is_file():
        # A single-file checkpoint (ComfyUI / A1111 layout), converted offline with configs shipped in the package.
        from poseloop.models.single_file import SingleFileError, load_single_file

        try:
            return load_single_file(cls, local, field_name, cfg.arch, **kwargs)
        except SingleFileError as e:
            raise ModelLoadError(str(e)) from None
    try:
        if cfg.variant and not local.exists():
            kwargs["variant"] = cfg.variant
        return cls.from_pretrained(str(local) if local.exists() else source,
                                   local_files_only=cfg.local_files_only, **kwargs)
    except (OSError, ValueError) as e:
        if local.exists():
            raise ModelLoadError(f"{field_name}: could not load the folder {source!r} as {cls.__name__}: {e}. "
                                 "Check that it is a diffusers-format folder (save_pretrained output).") from e
        name = source.rstrip("/").split("/")[-1]
        raise ModelLoadError(
            f"{field_name}: could not load {source!r} from the model hub or its cache ({type(e).__name__}). "
            f"On a machine with internet run `hf download {source} --local-dir models/{name}` and pass "
            f"--{field_name} models/{name}, or point --{field_name} at a local diffusers folder."
        ) from e


def vae_class(source: str, cfg: ModelConfig) -> Any:
    """AutoencoderTiny for a TAESD-style preview decoder (its config's _class_name), else AutoencoderKL."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    if is_embedded(source):
        ensure_embedded(source)  # the embedded world's preview decoder comes with its folder
        if not Path(source).exists():
            raise ModelLoadError(f"model.vae: {source} does not exist: this embedded world ships no preview decoder; "
                                 "make one with python scripts/train_world.py (its last stage, --preview_steps), "
                                 "or pass --model.vae '' to decode with the world's VAE")
    local = Path(source).expanduser()
    if local.is_file():  # single files are full VAEs (single_file.load_vae_file)
        return AutoencoderKL
    try:
        config = AutoencoderKL.load_config(str(local) if local.exists() else source,
                                           local_files_only=cfg.local_files_only)
    except (OSError, ValueError):
        return AutoencoderKL  # _load then says what is missing, for the class most VAEs are
    return AutoencoderTiny if config.get("_class_name") == "AutoencoderTiny" else AutoencoderKL


def load_components(cfg: ModelConfig) -> Components:
    """Load base pipeline, ControlNet, optional VAE and LoRA; switch to DDIM; freeze everything."""
    from diffusers import (
        ControlNetModel,
        DDIMScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionXLControlNetPipeline,
    )

    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    # Per-component loading bars drown the one progress bar that matters.
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    cfg = resolve_policy(cfg)
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    extra: dict[str, Any] = {"controlnet": _load(ControlNetModel, cfg.controlnet, "model.controlnet", cfg,
                                                 dtype=dtype)}
    if cfg.vae:
        extra["vae"] = _load(vae_class(cfg.vae, cfg), cfg.vae, "model.vae", cfg, dtype=dtype)
    if cfg.arch == "sd15":
        pipe_cls: Any = StableDiffusionControlNetPipeline
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        pipe_cls = StableDiffusionXLControlNetPipeline
    quiet = type(extra.get("vae")).__name__ == "AutoencoderTiny"
    verbosity = dlog.get_verbosity()
    if quiet:  # diffusers warns that the pipeline expects an AutoencoderKL; a TAESD-style one decodes as well
        dlog.set_verbosity_error()
    try:
        pipe = _load(pipe_cls, cfg.base, "model.base", cfg, dtype=dtype, **extra)
    finally:
        dlog.set_verbosity(verbosity)
    check_architecture(pipe, cfg)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    if cfg.lcm_lora:
        # Fused first, so that model.lora / model.policy and a trained LoRA sit on top of the LCM, and the
        # policy trainer's reference (adapters off) is the LCM itself.
        fuse_lcm_lora(pipe, cfg.lcm_lora, cfg)
    if cfg.lora:
        load_lora(pipe, cfg.lora, cfg.lora_scale)
    pipe.to(device)
    for module in (pipe.unet, pipe.controlnet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    return Components(pipe=pipe, arch=cfg.arch, device=device, dtype=dtype, lcm_lora=cfg.lcm_lora)


def check_architecture(pipe: Any, cfg: ModelConfig) -> None:
    """Catch an SD1.5 model under --model.arch sdxl (or a mismatched ControlNet) with a clear message."""
    is_xl = getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"
    if is_xl != (cfg.arch == "sdxl"):
        found = "SDXL" if is_xl else "SD1.5-style"
        raise ModelLoadError(f"model.arch: {cfg.base!r} is an {found} model but model.arch is {cfg.arch!r}; "
                             f"pass --model.arch {'sdxl' if is_xl else 'sd15'}")
    unet_ctx = pipe.unet.config.cross_attention_dim
    cn_ctx = pipe.controlnet.config.cross_attention_dim
    if unet_ctx != cn_ctx:
        raise ModelLoadError(f"model.controlnet: {cfg.controlnet!r} expects text context {cn_ctx} but the base model "
                             f"gives {unet_ctx}; use a ControlNet made for this base model")


# diffusers' older attention names (kohya files convert to these) -> the module peft attaches to.
_OLD_ATTENTION_NAMES = tuple((f"{pre}{old}_lora.", f".{new}.lora.") for pre in (".processor.", ".")
                             for old, new in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")))


def peft_lora_key(key: str) -> str:
    """One LoRA key (or network-alpha key) in peft's form: '<module>.lora_A.weight', '<module>.alpha'."""
    for old, new in _OLD_ATTENTION_NAMES:
        if old in key:
            key = key.replace(old, new)
            break
    key = key.replace(".lora.down.weight.alpha", ".alpha").replace(".lora.up.weight.alpha", ".alpha")
    return key.replace(".lora.down.weight", ".lora_A.weight").replace(".lora.up.weight", ".lora_B.weight")


def peft_lora_keys(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The state dict (or network alphas) with diffusers' older LoRA names renamed to peft's, every key at once.

    diffusers (0.42, measured here) converts the older names only when the FIRST key lacks 'lora_A', so a
    file mixing both forms, or any file read in the older form, loads partly: every attention projection
    of an every-layer policy was skipped without a word (56 of 108 layers). Renamed here, all of them apply.
    """
    return {peft_lora_key(k): v for k, v in state_dict.items()}


def check_lora_layers_attached(unet: Any, state_dict: dict[str, Any], adapter: str, what: str) -> None:
    """Raise when fewer UNet layers got the adapter than the file has LoRA layers for (diffusers skips some silently).

    The guard behind peft_lora_keys: a file diffusers reads in some other way must not load half-applied either.
    """
    wanted = {peft_lora_key(k).split(".lora_", 1)[0] for k in state_dict if k.startswith("unet.") and "lora" in k}
    attached = sum(1 for m in unet.modules() if adapter in getattr(m, "lora_A", {}))
    if wanted and attached < len(wanted):
        raise ValueError(f"only {attached} of the {len(wanted)} LoRA layers in the file were applied to this UNet "
                         f"({what}); check that the LoRA was made for this base model")


def load_unet_lora(pipe: Any, source: str, adapter: str, **extra: Any) -> tuple[dict[str, Any], Any, Any]:
    """Read a LoRA (kohya or diffusers keys), attach its UNet part as `adapter`, check every layer applied.

    Returns (state_dict in peft key form, network alphas, metadata) for the text encoders' part.
    """
    if hasattr(pipe, "text_encoder_2"):
        extra["unet_config"] = pipe.unet.config  # SDXL kohya names
    state_dict, alphas, metadata = pipe.lora_state_dict(source, return_lora_metadata=True, **extra)
    state_dict = peft_lora_keys(state_dict)
    alphas = peft_lora_keys(alphas) if alphas else alphas
    if not state_dict or not all("lora" in key for key in state_dict):
        raise ValueError("not a LoRA checkpoint: every key must contain 'lora'")
    pipe.load_lora_into_unet(state_dict, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter,
                             metadata=metadata, _pipeline=pipe)
    check_lora_layers_attached(pipe.unet, state_dict, adapter, source)
    return state_dict, alphas, metadata


def load_lora(pipe: Any, path: str, scale: float) -> None:
    """Load a kohya- or diffusers-format LoRA file into the pipeline at the given strength.

    pipe.load_lora_weights would also try every text encoder and log "No LoRA keys associated to
    CLIPTextModel" for each one the file has no keys for, i.e. on every round made with a policy (they
    train the UNet only). The UNet part is loaded alone; a text encoder only when the file holds keys for it.
    """
    try:
        state_dict, alphas, metadata = load_unet_lora(pipe, path, "loaded")
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None and any(key.startswith(f"{name}.") for key in state_dict):
                pipe.load_lora_into_text_encoder(state_dict, network_alphas=alphas, text_encoder=encoder, prefix=name,
                                                 lora_scale=pipe.lora_scale, adapter_name="loaded", metadata=metadata,
                                                 _pipeline=pipe)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        from poseloop.models.single_file import SingleFileError, read_state_dict

        try:  # a truncated or foreign file gets read_state_dict's one-line reason, not diffusers' text
            read_state_dict(Path(path).expanduser(), "model.lora")
        except SingleFileError as unreadable:
            raise ModelLoadError(str(unreadable)) from None
        raise ModelLoadError(f"model.lora: could not load {path!r}: {str(e).strip().rstrip('. ')}. Expected a kohya "
                             "(lora_unet_...) or diffusers (unet....lora_A) LoRA for this base model.") from e
    pipe.set_adapters(["loaded"], adapter_weights=[scale])


def fuse_lcm_lora(pipe: Any, source: str, cfg: ModelConfig) -> None:
    """Fuse an LCM-LoRA (file, folder or hub id; kohya or diffusers keys) into the UNet's weights for good."""
    if is_embedded(source):
        ensure_embedded(source)  # the embedded world's own LCM-LoRA comes with its folder
        if not Path(source).exists():
            raise ModelLoadError(f"model.lcm_lora: {source} does not exist: this embedded world ships no LCM-LoRA; "
                                 "make one with python scripts/train_world.py (its last stage, --lcm_steps)")
    local = Path(source).expanduser()
    try:
        hub = {} if local.exists() else {"local_files_only": cfg.local_files_only}
        load_unet_lora(pipe, str(local) if local.exists() else source, "lcm", **hub)
        pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["lcm"])
        # Removing the (fused) LoRA layers keeps their merged base weights: the UNet is now a plain LCM.
        pipe.unload_lora_weights()
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        hint = "" if local.exists() else (f" Offline: `hf download {source} --local-dir models/lcm-lora` on a machine "
                                          "with internet and pass --model.lcm_lora models/lcm-lora.")
        raise ModelLoadError(f"model.lcm_lora: could not load {source!r}: {e}. Expected an LCM-LoRA for this base "
                             f"model (kohya or diffusers keys).{hint}") from e
