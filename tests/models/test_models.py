"""Loading: embedded models through from_pretrained, LoRA files (kohya and diffusers), clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from poseloop.policy.export import save_kohya_lora
from poseloop.models.loading import Components, ModelLoadError, load_components
from tiny_helpers import eps_of, model_cfg


def add_random_lora(comp: Components, r: int, alpha: int) -> None:
    from peft import LoraConfig

    torch.manual_seed(3)
    # init_lora_weights=False gives a non-zero B, so the adapter changes the output from the start.
    comp.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def test_embedded_model_is_built_once_and_loaded_with_from_pretrained(models_dir: Path) -> None:
    assert (models_dir / "tiny-sd15" / "model_index.json").is_file()
    assert (models_dir / "tiny-sdxl" / "text_encoder_2" / "config.json").is_file()
    stamp = (models_dir / "tiny-sd15" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    comp = load_components(model_cfg(models_dir))
    assert type(comp.pipe).__name__ == "StableDiffusionControlNetPipeline"
    assert type(comp.scheduler).__name__ == "DDIMScheduler"
    assert (models_dir / "tiny-sd15" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_tokenizer_matches_open_clip(sd15_components: Components) -> None:
    import open_clip

    text = "a photo of a dancer, arms raised!"
    ours = sd15_components.pipe.tokenizer(text).input_ids
    theirs = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    assert ours == theirs[: len(ours)]
    assert len(ours) > 5


@pytest.mark.parametrize(("r", "alpha"), [(4, 4), (4, 16)])
def test_kohya_lora_reloads_and_reproduces_the_adapted_model(models_dir: Path, tmp_path: Path,
                                                             r: int, alpha: int) -> None:
    comp = load_components(model_cfg(models_dir))
    base = eps_of(comp)
    add_random_lora(comp, r, alpha)
    adapted = eps_of(comp)
    assert (adapted - base).abs().max() > 1e-3  # the adapter matters, so the check below can fail
    path = save_kohya_lora(comp.unet, tmp_path / "lora.safetensors")
    from safetensors.torch import load_file

    sd = load_file(str(path))
    alpha_keys = [k for k in sd if k.endswith(".alpha")]
    assert alpha_keys and all(k.startswith("lora_unet_") for k in sd)
    assert sd[alpha_keys[0]].item() == pytest.approx(alpha)  # alpha / rank = peft's scaling
    reloaded = load_components(model_cfg(models_dir, lora=str(path)))
    torch.testing.assert_close(eps_of(reloaded), adapted, atol=1e-5, rtol=1e-4)
    half = load_components(model_cfg(models_dir, lora=str(path), lora_scale=0.5))
    assert (eps_of(half) - adapted).abs().max() > 1e-4


def test_diffusers_format_lora_reloads(models_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    comp = load_components(model_cfg(models_dir))
    add_random_lora(comp, 4, 8)
    adapted = eps_of(comp)
    StableDiffusionControlNetPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(comp.unet)),
        unet_lora_adapter_metadata=comp.unet.peft_config["default"].to_dict(),
    )
    reloaded = load_components(model_cfg(models_dir, lora=str(tmp_path / "pytorch_lora_weights.safetensors")))
    torch.testing.assert_close(eps_of(reloaded), adapted, atol=1e-5, rtol=1e-4)


def test_controlnet_weights_from_an_earlier_round_load_from_a_folder(models_dir: Path, tmp_path: Path) -> None:
    comp = load_components(model_cfg(models_dir))
    base = eps_of(comp)
    with torch.no_grad():
        comp.controlnet.controlnet_mid_block.weight.add_(0.5)
    comp.controlnet.save_pretrained(tmp_path / "trained_controlnet")
    changed = load_components(model_cfg(models_dir, controlnet=str(tmp_path / "trained_controlnet")))
    assert (eps_of(changed) - base).abs().max() > 1e-3


def test_an_unreachable_hub_id_says_how_to_get_the_model(models_dir: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_components(model_cfg(models_dir, base="some-org/not-a-model-here"))
    msg = str(info.value)
    assert "model.base" in msg and "hf download some-org/not-a-model-here" in msg and "--model.base" in msg


def test_a_broken_local_folder_is_named(models_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model.controlnet: could not load the folder"):
        load_components(model_cfg(models_dir, controlnet=str(tmp_path / "empty")))


def test_architecture_mismatch_is_explained(models_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="pass --model.arch sdxl"):
        load_components(model_cfg(models_dir, base=str(models_dir / "tiny-sdxl"),
                                  controlnet=str(models_dir / "tiny-sdxl" / "controlnet")))


def test_a_lora_for_another_model_is_refused(models_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(4, 7),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(7, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ModelLoadError, match="model.lora"):
        load_components(model_cfg(models_dir, lora=str(tmp_path / "x.safetensors")))


def test_a_unet_only_lora_loads_without_text_encoder_warnings(models_dir: Path, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    import logging

    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    comp = load_components(model_cfg(models_dir))
    add_random_lora(comp, 4, 8)
    save_kohya_lora(comp.unet, tmp_path / "kohya.safetensors")
    StableDiffusionControlNetPipeline.save_lora_weights(  # what a policy export holds
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(comp.unet)),
        unet_lora_adapter_metadata=comp.unet.peft_config["default"].to_dict())

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to the root
    try:
        capfd.readouterr()
        for name in ("kohya.safetensors", "pytorch_lora_weights.safetensors"):
            reloaded = load_components(model_cfg(models_dir, lora=str(tmp_path / name)))
            assert reloaded.unet.peft_config["loaded"].r == 4  # the UNet adapter is there
            assert not hasattr(reloaded.pipe.text_encoder, "peft_config")  # and nothing else
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert not any("No LoRA keys" in m for m in messages), messages
    assert "No LoRA keys" not in capfd.readouterr().err
