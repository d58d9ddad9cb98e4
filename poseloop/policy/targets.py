"""Trainable targets of policy training and the reference model they are compared with.

Targets:
    unet_lora        peft LoRA on the UNet's attention projections (the default; exports as a LoRA file)
    controlnet       every ControlNet weight (exports a diffusers-format ControlNet folder)
    controlnet_lora  peft LoRA on the ControlNet (merged into full ControlNet weights for export)
The reference model (D3PO, KL monitoring) is the model before fine-tuning: for a LoRA the same
modules with the adapters disabled (no second copy in memory), for full ControlNet training a
frozen copy taken before the first update.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from poseloop.models.loading import Components
from poseloop.config.policy import DEFAULT_LORA_MODULES, TARGETS

ADAPTER = "default"


def _tuner_layers(module: torch.nn.Module) -> list[Any]:
    """Every peft tuner layer (LoRA layer) inside `module`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def set_adapters_enabled(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of `module` on or off (off = the base model)."""
    for layer in _tuner_layers(module):
        layer.enable_adapters(enabled)


def fuse_loaded_lora(comp: Components) -> None:
    """Bake a LoRA loaded with --model.lora into the base weights, so training starts from it.

    Without this the new adapter would sit beside the loaded one and 'adapters disabled' would drop
    both, making the reference something other than the model before fine-tuning.
    """
    pipe = comp.pipe
    if not getattr(pipe.unet, "peft_config", None):
        return
    pipe.fuse_lora(components=["unet"], adapter_names=list(pipe.unet.peft_config))
    pipe.unload_lora_weights()


class Policy:
    """The trainable part of a loaded pipeline, with its reference model."""

    def __init__(self, comp: Components, target: str = "unet_lora", rank: int = 4, alpha: float = 4.0,
                 target_modules: Sequence[str] = DEFAULT_LORA_MODULES, gradient_checkpointing: bool = False,
                 init_seed: int = 0) -> None:
        """Attach the trainable weights to `comp` (modifies its UNet or ControlNet in place)."""
        from peft import LoraConfig, inject_adapter_in_model

        if target not in TARGETS:
            raise ValueError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        self.comp = comp
        self.target = target
        self.frozen_controlnet: torch.nn.Module | None = None
        # A LoRA continued from a parent policy (continue_from): the parent's weights, the reference model.
        self.reference_state: dict[str, torch.Tensor] | None = None
        fuse_loaded_lora(comp)
        # Fixed seed for any random adapter init (lora_A), so runs and resumes are reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            if target == "unet_lora":
                cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
                comp.unet.add_adapter(cfg, adapter_name=ADAPTER)
                self.module: torch.nn.Module = comp.unet
            elif target == "controlnet_lora":
                cfg = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True, target_modules=list(target_modules))
                inject_adapter_in_model(cfg, comp.controlnet, adapter_name=ADAPTER)
                comp.controlnet.peft_config = {ADAPTER: cfg}
                self.module = comp.controlnet
            else:
                self.frozen_controlnet = copy.deepcopy(comp.controlnet).requires_grad_(False).eval()
                self.module = comp.controlnet
                self.module.requires_grad_(True)
        self.lora_config = None if target == "controlnet" else cfg
        if self.is_lora:
            for name, p in self.module.named_parameters():
                p.requires_grad_("lora_" in name)
        # Trainable weights in float32 even when the model runs in fp16: Adam updates of fp16
        # weights underflow. Forward passes then run under accelerate's autocast.
        for p in self.parameters():
            p.data = p.data.float()
        if gradient_checkpointing:
            self.module.enable_gradient_checkpointing()

    @property
    def is_lora(self) -> bool:
        """Whether the trained weights are a LoRA adapter."""
        return self.target != "controlnet"

    def parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimizer updates."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        """{name: parameter} of the trainable weights (stable names, for checkpoints)."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    @contextmanager
    def reference(self) -> Iterator[None]:
        """Within this block the pipeline computes with the model before fine-tuning (a continued LoRA: the parent)."""
        if self.reference_state is not None:
            trained = self.state_dict()
            self.load_state_dict(self.reference_state)
            try:
                yield
            finally:
                self.load_state_dict(trained)
        elif self.is_lora:
            set_adapters_enabled(self.module, False)
            try:
                yield
            finally:
                set_adapters_enabled(self.module, True)
        else:
            trained = self.comp.pipe.controlnet
            self.comp.pipe.controlnet = self.frozen_controlnet
            try:
                yield
            finally:
                self.comp.pipe.controlnet = trained

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable weights on CPU (float32)."""
        return {n: p.detach().to("cpu", torch.float32).clone() for n, p in self.named_trainable().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore state_dict() output; names must match exactly."""
        params = self.named_trainable()
        missing, extra = set(params) - set(state), set(state) - set(params)
        if missing or extra:
            raise ValueError(f"checkpoint weights do not match the policy target {self.target!r}: "
                             f"{len(missing)} missing, {len(extra)} unexpected (e.g. {sorted(missing | extra)[:2]})")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))

    def continue_from(self, kohya_file: Path) -> None:
        """Start from a parent policy's LoRA (a kohya file of this target's layers, rank and strength): the same
        LoRA is trained further, so the export holds the whole model; the parent becomes the reference."""
        from safetensors.torch import load_file

        from poseloop.policy.export import lora_layers

        if self.target != "unet_lora":
            raise ValueError(f"continue_from: a {self.target} policy continues by loading its ControlNet, not a LoRA")
        sd = load_file(str(kohya_file))
        state, wanted = {}, set()
        for name, layer in lora_layers(self.module, ADAPTER).items():
            key = f"lora_unet_{name.replace('.', '_')}"
            wanted.add(key)
            down, up, alpha = (sd.get(f"{key}.{k}") for k in ("lora_down.weight", "lora_up.weight", "alpha"))
            a_name, b_name = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
            rank = layer.lora_A[ADAPTER].weight.shape[0]
            if down is None or up is None or alpha is None:
                raise ValueError(f"{kohya_file}: no LoRA for layer {name}; the parent was trained on other modules")
            if (down.shape, up.shape) != (layer.lora_A[ADAPTER].weight.shape, layer.lora_B[ADAPTER].weight.shape) or \
                    abs(float(alpha) - float(layer.scaling[ADAPTER]) * rank) > 1e-6 * max(1.0, abs(float(alpha))):
                raise ValueError(f"{kohya_file}: layer {name} has another rank or strength than this run's LoRA")
            state[a_name], state[b_name] = down, up
        extra = {k.rsplit(".", 2)[0] for k in sd if k.startswith("lora_unet_")} - wanted
        if extra:
            raise ValueError(f"{kohya_file}: {len(extra)} LoRA layer(s) this run does not train, e.g. {sorted(extra)[0]}")
        self.load_state_dict(state)
        self.reference_state = self.state_dict()

    def merged_controlnet(self) -> torch.nn.Module:
        """The trained ControlNet as a plain diffusers ControlNetModel (a LoRA merged into its weights)."""
        from diffusers import ControlNetModel

        if self.target == "controlnet":
            return self.module
        if self.target != "controlnet_lora":
            raise ValueError("merged_controlnet: the ControlNet was not trained (target is unet_lora)")
        from peft.tuners.lora import LoraLayer

        merged = copy.deepcopy(self.module)
        for layer in merged.modules():
            if isinstance(layer, LoraLayer):
                layer.merge(adapter_names=[ADAPTER])
        # Drop the LoRA tensors and peft's 'base_layer' level: the names of a plain ControlNet remain.
        sd = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items() if "lora_" not in k}
        plain = ControlNetModel.from_config(self.module.config)
        plain.load_state_dict(sd, strict=True)
        # torch's own cast: diffusers' override warns about fp32-kept modules on every export although the
        # ControlNet has none (its list is empty, not None)
        return torch.nn.Module.to(plain, next(self.module.parameters()).dtype)
