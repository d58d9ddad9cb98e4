"""Policy exports: kohya + diffusers LoRA (alpha != rank) and ControlNet folders reload and reproduce the model."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from poseloop.config.generation import ModelConfig
from poseloop.policy.export import export_policy
from poseloop.models.policy_files import LATEST_FILE, controlnet_file_name, kohya_lora_name, resolve_latest
from poseloop.models.loading import load_components
from poseloop.policy.targets import Policy
from poseloop.config.policy import ALL_LORA_MODULES, DEFAULT_LORA_MODULES
from tiny_helpers import eps_of, model_cfg


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb_lora(policy: Policy) -> None:
    """Stand-in for training: lora_B starts at zero, so give it values that change the output."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_trainable().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# Attention only (the published LoRA), and every layer (the tiny preset's LoCon): a kohya file of the latter
# once reloaded with its attention layers silently dropped (diffusers read the old names only partly).
@pytest.mark.parametrize("modules", [DEFAULT_LORA_MODULES, ALL_LORA_MODULES], ids=["attention", "every-layer"])
def test_unet_lora_exports_reload_and_reproduce_the_trained_model(models_dir: Path, tmp_path: Path,
                                                                  umask_022: None, modules: tuple[str, ...]) -> None:
    comp = load_components(model_cfg(models_dir))
    base = eps_of(comp)
    policy = Policy(comp, "unet_lora", rank=4, alpha=8.0, target_modules=modules)  # alpha != rank: strength 2
    # B = 0 adds exact zeros, but the two passes are separate GEMM calls (bit-equal only for identical
    # memory alignment under MKL): fp32 noise is allowed, a nonzero B (0.05 scale) moves eps by ~1e-2.
    torch.testing.assert_close(eps_of(comp), base, atol=1e-6, rtol=0,
                               msg="a fresh LoRA (B = 0) must not change the model")
    perturb_lora(policy)
    trained = eps_of(comp)
    assert (trained - base).abs().max() > 1e-3

    folder = export_policy(policy, tmp_path / "policies", "run-e0003", {"model": {"base": "b", "controlnet": "c"}})
    assert folder == tmp_path / "policies" / "run-e0003"
    # One format for both 'latest' pointers: JSON, as models/reward/latest.
    assert json.loads((tmp_path / "policies" / LATEST_FILE).read_text()) == {"version": "run-e0003"}
    assert resolve_latest(tmp_path / "policies") == folder
    assert json.loads((folder / "config.json").read_text())["model"]["base"] == "b"
    readme = (folder / "README.md").read_text()
    assert "ComfyUI" in readme and "A1111" in readme and "load_lora_weights" in readme
    assert not [p for p in (tmp_path / "policies").iterdir() if p.name.endswith(".tmp")]
    # Readable by other users (a ComfyUI service): the umask decides, not mkstemp's 0600 / mkdtemp's 0700.
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    for f in [*folder.iterdir(), tmp_path / "policies" / LATEST_FILE]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f.name

    kohya = kohya_lora_name("run-e0003")
    with safe_open(str(folder / kohya), framework="pt") as f:
        keys = list(f.keys())
        alphas = {f.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert alphas == {8.0}

    for name in (kohya, "pytorch_lora_weights.safetensors"):
        reloaded = load_components(model_cfg(models_dir, lora=str(folder / name)))
        torch.testing.assert_close(eps_of(reloaded), trained, atol=1e-5, rtol=1e-4, msg=name)

    # Re-exporting a version replaces it whole; 'latest' follows the newest export.
    export_policy(policy, tmp_path / "policies", "run-e0006", {"model": {}})
    assert resolve_latest(tmp_path / "policies").name == "run-e0006"


@pytest.mark.parametrize("target", ["controlnet_lora", "controlnet"])
def test_controlnet_export_reloads_with_from_pretrained(models_dir: Path, tmp_path: Path, target: str) -> None:
    from diffusers import ControlNetModel

    comp = load_components(model_cfg(models_dir))
    # The tiny ControlNet comes from ControlNetModel.from_unet with zero convolutions, which hide any
    # change inside it; give them values, as a trained ControlNet has.
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in comp.controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    base = eps_of(comp)
    policy = Policy(comp, target, rank=4, alpha=2.0)
    if target == "controlnet_lora":
        perturb_lora(policy)
    else:
        with torch.no_grad():
            comp.controlnet.controlnet_mid_block.bias.add_(0.5)  # a zero-conv bias: visible in the output
    trained = eps_of(comp)
    assert (trained - base).abs().max() > 1e-3
    # The reference (model before fine-tuning) is still reachable.
    with policy.reference():
        torch.testing.assert_close(eps_of(comp), base, atol=1e-6, rtol=0)

    folder = export_policy(policy, tmp_path / "policies", "cn-e0001", {"model": {}})
    assert not (folder / kohya_lora_name("cn-e0001")).exists()
    cn = ControlNetModel.from_pretrained(str(folder / "controlnet"))
    assert not any("lora" in k for k in cn.state_dict())
    with safe_open(str(folder / "controlnet" / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        assert "controlnet_cond_embedding.conv_in.weight" in f.keys()  # what ComfyUI detects
    reloaded = load_components(model_cfg(models_dir, controlnet=str(folder / "controlnet")))
    torch.testing.assert_close(eps_of(reloaded), trained, atol=1e-5, rtol=1e-4)

    # The single fp16 file ComfyUI loads (under the name its workflow gives) holds the trained ControlNet
    # rounded to fp16: loaded back, it equals that rounding bit for bit, and so predicts as it does.
    single = load_components(model_cfg(models_dir, controlnet=str(folder / controlnet_file_name("cn-e0001"))))
    trained_sd = policy.merged_controlnet().state_dict()
    for k, v in single.controlnet.state_dict().items():
        assert torch.equal(v, trained_sd[k].half().float()), k
    if target == "controlnet":  # (a ControlNet LoRA's merged weights are rounded, not its factors: not comparable)
        with torch.no_grad():
            for p in comp.controlnet.parameters():
                p.copy_(p.half().float())
        torch.testing.assert_close(eps_of(single), eps_of(comp), atol=1e-5, rtol=1e-4)


def test_resolve_latest_without_exports_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train_policy.py"):
        resolve_latest(tmp_path)


def test_policy_and_reward_latest_share_one_format_and_read_the_old_one(tmp_path: Path) -> None:
    from poseloop.models.policy_files import write_latest
    from poseloop.rewards.versions import read_latest
    from poseloop.rewards.versions import write_latest as write_reward_latest

    (tmp_path / "policies" / "run-0002").mkdir(parents=True)
    write_latest(tmp_path / "policies", "run-0002")
    write_reward_latest(tmp_path, "rm-1")
    assert (tmp_path / "policies" / LATEST_FILE).read_text() == (tmp_path / "reward" / "latest").read_text().replace(
        "rm-1", "run-0002")
    assert resolve_latest(tmp_path / "policies").name == "run-0002"
    (tmp_path / "policies" / "run-0001").mkdir()
    (tmp_path / "policies" / LATEST_FILE).write_text("run-0001\n")  # an export made by an older poseloop
    assert resolve_latest(tmp_path / "policies").name == "run-0001"
    (tmp_path / "reward" / "latest").write_text("rm-0\n")
    assert read_latest(tmp_path) == "rm-0"


def test_sdxl_unet_lora_export_reloads_and_reproduces_the_trained_model(models_dir: Path, tmp_path: Path) -> None:
    from poseloop.config.generation import tiny_sdxl

    def sdxl_cfg(**overrides: object) -> ModelConfig:
        cfg = tiny_sdxl().model
        cfg.base, cfg.controlnet = str(models_dir / "tiny-sdxl"), str(models_dir / "tiny-sdxl" / "controlnet")
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg

    comp = load_components(sdxl_cfg())
    base = eps_of(comp)
    policy = Policy(comp, "unet_lora", rank=4, alpha=2.0, target_modules=ALL_LORA_MODULES)
    perturb_lora(policy)
    trained = eps_of(comp)
    assert (trained - base).abs().max() > 1e-3
    folder = export_policy(policy, tmp_path / "policies", "xl-e0001", {"model": {}})
    for name in (kohya_lora_name("xl-e0001"), "pytorch_lora_weights.safetensors"):
        reloaded = load_components(sdxl_cfg(lora=str(folder / name)))
        torch.testing.assert_close(eps_of(reloaded), trained, atol=1e-5, rtol=1e-4, msg=name)


def test_policy_named_by_version_reads_old_exports_too(models_dir: Path, tmp_path: Path) -> None:
    """generate.py --model.policy finds the kohya file under its versioned name, and lora_kohya.safetensors of
    exports made before files were named after their policy."""
    import dataclasses

    from poseloop.policy.export import save_kohya_lora
    from poseloop.models.loading import resolve_policy

    comp = load_components(model_cfg(models_dir))
    Policy(comp, "unet_lora", rank=2, alpha=2.0)
    cfg = dataclasses.replace(model_cfg(models_dir), models_dir=str(tmp_path))
    for version, name in (("new-e0001", kohya_lora_name("new-e0001")), ("old-e0001", "lora_kohya.safetensors")):
        save_kohya_lora(comp.unet, tmp_path / "policies" / version / name)
        resolved = resolve_policy(dataclasses.replace(cfg, policy=version))
        assert resolved.lora == str(tmp_path / "policies" / version / name)
    assert kohya_lora_name("new-e0001") == "poseloop-new-e0001.safetensors"
