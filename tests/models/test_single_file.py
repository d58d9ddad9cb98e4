"""Single-file checkpoints: the embedded models written in the original (LDM / ComfyUI) layout load like the folders.

The files are written by poseloop.models.original_layout (the inverse of diffusers' conversion, which
scripts/to_single_file.py offers users). Loading a converted file must give back the very same weights;
outputs are compared with tolerances justified where they are asserted.
"""

from __future__ import annotations

import json
import pathlib
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from poseloop.sampling import sampler as sampling
from poseloop.config.generation import SampleConfig, tiny, tiny_sdxl, validate_model
from poseloop.config.lib import ConfigError
from poseloop.models.loading import Components, ModelLoadError, load_components
from poseloop.data.openpose import render_pose
from poseloop.models.original_layout import (checkpoint_dict, clip_to_ldm, controlnet_to_ldm, open_clip_to_ldm, unet_to_ldm,
                                      vae_to_ldm)
from poseloop.data.poses import get_builtin_pose
from poseloop.models.single_file import CONFIGS, Fingerprint, detect_base_arch, match_config
from tiny_helpers import eps_of, model_cfg

Tensors = dict[str, torch.Tensor]


def _cfg_json(folder: Path, component: str) -> dict[str, Any]:
    return json.loads((folder / component / "config.json").read_text())


def _weights(folder: Path, component: str) -> Tensors:
    name = "model.safetensors" if component.startswith("text_encoder") else "diffusion_pytorch_model.safetensors"
    return load_file(str(folder / component / name))


def sd15_checkpoint(folder: Path) -> Tensors:
    """The tiny SD1.5 pipeline folder as one original-layout state dict (UNet, VAE, CLIP text encoder)."""
    sd, arch = checkpoint_dict(folder)
    assert arch == "sd15"
    return sd


def sdxl_checkpoint(folder: Path) -> Tensors:
    """The tiny SDXL pipeline folder as one original-layout state dict (both text encoders)."""
    sd, arch = checkpoint_dict(folder)
    assert arch == "sdxl"
    return sd


def half(sd: Tensors) -> Tensors:
    """fp16 copies, as ComfyUI checkpoints usually ship."""
    return {k: v.half() for k, v in sd.items()}


# ---- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (the model hub) fails the test: single files load offline."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def files(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The embedded models written as single files: SD1.5 checkpoint, ControlNet and VAE (fp16), SDXL (fp32)."""
    out = tmp_path_factory.mktemp("single_files")
    sd15, sdxl = models_dir / "tiny-sd15", models_dir / "tiny-sdxl"
    paths = {name: out / f"{name}.safetensors" for name in ("sd15", "controlnet", "vae", "sdxl", "sdxl_controlnet")}
    save_file(half(sd15_checkpoint(sd15)), str(paths["sd15"]))
    save_file(half(controlnet_to_ldm(_weights(sd15, "controlnet"), _cfg_json(sd15, "controlnet"))),
              str(paths["controlnet"]))
    save_file(half(vae_to_ldm(_weights(sd15, "vae"), _cfg_json(sd15, "vae"), prefix="")), str(paths["vae"]))
    # tiny-sdxl has random float32 weights: fp32 files keep them exact.
    save_file(sdxl_checkpoint(sdxl), str(paths["sdxl"]))
    # SDXL OpenPose ControlNets (thibaud's OpenPoseXL2, xinsir's) ship as one file with diffusers keys.
    save_file(_weights(sdxl, "controlnet"), str(paths["sdxl_controlnet"]))
    return paths


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Loading a converted file is a renaming (and a reshape of 1x1 convs): every tensor must come back exactly."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _controlnet_out(comp: Components) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    side = 64 // comp.vae_scale_factor
    x = torch.randn(1, 4, side, side, generator=g)
    pose = torch.from_numpy(np.array(render_pose(get_builtin_pose("walking"), 64, 64))).permute(2, 0, 1)[None] / 255.0
    ctx = torch.randn(1, 77, comp.controlnet.config.cross_attention_dim, generator=g)
    extra = {}
    if comp.arch == "sdxl":
        pooled = comp.pipe.text_encoder_2.config.projection_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, pooled, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        down, mid = comp.controlnet(x, torch.tensor(501), ctx, pose, return_dict=False, **extra)
    return [*down, mid]


def _decode(comp: Components) -> torch.Tensor:
    side = 64 // comp.vae_scale_factor
    z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return comp.vae.decode(z).sample


# Same weights (asserted bit for bit), same inputs, float32 on the CPU: what is left is the order in
# which a kernel sums, which can follow how its buffers happen to be allocated; measured 0 for the UNet
# and VAE and up to 2.9e-6 on ControlNet residuals of magnitude ~7 (4e-7 relative, a few float32 ulps).
# 1e-5 absolute + 1e-5 relative leaves a 25x margin and still catches one swapped attention matrix,
# which moved the prediction by 7.5e-2.
TOL = {"atol": 1e-5, "rtol": 1e-5}


# ---- tests ---------------------------------------------------------------------------------------


def test_fp16_file_is_lossless_for_the_embedded_world(models_dir: Path) -> None:
    # Why the SD1.5 files can be fp16 (as ComfyUI's are) and still be compared exactly: the embedded
    # world ships fp16 weights (poseloop/models/world_weights), so every float32 value is an fp16 value.
    sd = sd15_checkpoint(models_dir / "tiny-sd15")
    assert all(torch.equal(v, v.half().float()) for v in sd.values())


def test_sd15_checkpoint_file_loads_like_the_folder(files: dict[str, Path], models_dir: Path,
                                                    sd15_components: Components, one_thread: None) -> None:
    comp = load_components(model_cfg(models_dir, base=str(files["sd15"])))
    assert type(comp.pipe).__name__ == "StableDiffusionControlNetPipeline"
    for name in ("unet", "vae", "text_encoder"):
        _same_weights(getattr(comp.pipe, name), getattr(sd15_components.pipe, name))
    assert comp.vae.config.scaling_factor == sd15_components.vae.config.scaling_factor  # trained value, from config
    assert dict(comp.scheduler.config) == dict(sd15_components.scheduler.config)
    text = "a person in a red shirt and blue trousers, on a beach"
    assert comp.pipe.tokenizer(text).input_ids == sd15_components.pipe.tokenizer(text).input_ids
    torch.testing.assert_close(eps_of(comp), eps_of(sd15_components), **TOL)
    torch.testing.assert_close(_decode(comp), _decode(sd15_components), **TOL)


def test_controlnet_and_vae_files_load_like_the_folders(files: dict[str, Path], models_dir: Path,
                                                        sd15_components: Components, one_thread: None) -> None:
    comp = load_components(model_cfg(models_dir, controlnet=str(files["controlnet"]), vae=str(files["vae"])))
    _same_weights(comp.controlnet, sd15_components.controlnet)
    _same_weights(comp.vae, sd15_components.vae)
    assert comp.vae.config.scaling_factor == sd15_components.vae.config.scaling_factor
    for ours, theirs in zip(_controlnet_out(comp), _controlnet_out(sd15_components), strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_decode(comp), _decode(sd15_components), **TOL)


def test_vae_file_with_diffusers_keys_takes_its_scaling_from_the_arch(models_dir: Path, tmp_path: Path,
                                                                       sdxl_components: Components) -> None:
    # VAE files also circulate with diffusers' keys (a repo's diffusion_pytorch_model.safetensors, renamed).
    path = tmp_path / "sdxl_vae.safetensors"
    save_file(_weights(models_dir / "tiny-sdxl", "vae"), str(path))
    cfg = tiny_sdxl().model
    cfg.base, cfg.controlnet = str(models_dir / "tiny-sdxl"), str(models_dir / "tiny-sdxl" / "controlnet")
    cfg.vae = str(path)
    comp = load_components(cfg)
    _same_weights(comp.vae, sdxl_components.vae)
    assert comp.vae.config.scaling_factor == sdxl_components.vae.config.scaling_factor == 0.13025  # SDXL's


def test_all_three_as_files_and_a_weights_only_ckpt(files: dict[str, Path], models_dir: Path, tmp_path: Path,
                                                     sd15_components: Components, one_thread: None) -> None:
    # A .ckpt of tensors nested under "state_dict" beside training state, as LDM's checkpoints are,
    # passes torch.load(weights_only=True) and loads.
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(files["sd15"])), "global_step": 1000, "epoch": 3}, ckpt)
    comp = load_components(model_cfg(models_dir, base=str(ckpt), controlnet=str(files["controlnet"]),
                                     vae=str(files["vae"])))
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        _same_weights(getattr(comp.pipe, name), getattr(sd15_components.pipe, name))
    torch.testing.assert_close(eps_of(comp), eps_of(sd15_components), **TOL)


def test_sdxl_checkpoint_and_controlnet_files(files: dict[str, Path], models_dir: Path,
                                              sdxl_components: Components, one_thread: None) -> None:
    cfg = tiny_sdxl().model
    cfg.base, cfg.controlnet = str(files["sdxl"]), str(files["sdxl_controlnet"])
    comp = load_components(cfg)
    assert type(comp.pipe).__name__ == "StableDiffusionXLControlNetPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        _same_weights(getattr(comp.pipe, name), getattr(sdxl_components.pipe, name))
    assert comp.pipe.config.force_zeros_for_empty_prompt == sdxl_components.pipe.config.force_zeros_for_empty_prompt
    for ours, theirs in zip(_controlnet_out(comp), _controlnet_out(sdxl_components), strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    # The pooled text embedding and both encoders' states feed SDXL's UNet: the whole prediction agrees.
    pose = render_pose(get_builtin_pose("walking"), 64, 64)
    outs = []
    for c in (comp, sdxl_components):
        cond = sampling.make_conditioning(c, ["a dancer"], [pose], SampleConfig(guidance_scale=3.0), 64, 64)
        side = 64 // c.vae_scale_factor
        x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            outs.append(sampling.predict_noise(c, x, torch.tensor(501), cond, 3.0, 1.0))
    torch.testing.assert_close(outs[0], outs[1], **TOL)


def test_sdxl_file_under_sd15_arch_names_the_fix(files: dict[str, Path], models_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^model\.arch: .*sdxl\.safetensors is an SDXL checkpoint .*"
                                             r"--model\.arch sdxl$"):
        load_components(model_cfg(models_dir, base=str(files["sdxl"])))


class _Payload:
    """Unpickling this would run code (touch a file): what weights_only loading must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_runs_code_is_refused_in_one_line(models_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "hook": _Payload(marker)}, bad)
    with pytest.raises(ModelLoadError) as e:
        load_components(model_cfg(models_dir, base=str(bad)))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("model.base: ") and str(bad) in msg and "weights_only" in msg
    assert not marker.exists()


@pytest.mark.parametrize(("field", "content", "expected"), [
    ("base", b"not a safetensors file at all", r"is not a readable \.safetensors file"),
    ("controlnet", b"\x00" * 64, r"is not a readable \.safetensors file"),
    ("vae", b"junk", r"is not a readable \.safetensors file"),
    ("controlnet", b"junk", r"is not a readable \.pth checkpoint \(\w+: "),
])
def test_unreadable_file_is_named_in_one_line(models_dir: Path, tmp_path: Path, field: str, content: bytes,
                                              expected: str) -> None:
    bad = tmp_path / f"broken_{field}.{'pth' if 'pth' in expected else 'safetensors'}"
    bad.write_bytes(content)
    with pytest.raises(ModelLoadError, match=rf"^model\.{field}: {re.escape(str(bad))} {expected}") as e:
        load_components(model_cfg(models_dir, **{field: str(bad)}))
    assert "\n" not in str(e.value)


def test_an_unreadable_lora_file_is_named_in_one_line(models_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "half_downloaded_lora.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match=rf"^model\.lora: {re.escape(str(bad))} is not a readable \.safetensors "
                                             r"file \(.*\); check that the download is complete$") as e:
        load_components(model_cfg(models_dir, lora=str(bad)))
    assert "\n" not in str(e.value)
    notes = tmp_path / "lora_notes.txt"
    notes.write_text("trigger word: dancer")
    cfg = model_cfg(models_dir, lora=str(notes))
    with pytest.raises(ConfigError, match=r"^model\.lora: '.*lora_notes\.txt' is not a weights file"):
        validate_model(cfg)


def test_wrong_kind_of_file_says_where_it_belongs(files: dict[str, Path], models_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"^model\.base: .* holds no UNet .*pass it to --model\.controlnet"):
        load_components(model_cfg(models_dir, base=str(files["controlnet"])))
    with pytest.raises(ModelLoadError, match=r"^model\.base: .* holds no UNet .*pass it to --model\.vae"):
        load_components(model_cfg(models_dir, base=str(files["vae"])))
    with pytest.raises(ModelLoadError, match=r"^model\.controlnet: .* is not a ControlNet"):
        load_components(model_cfg(models_dir, controlnet=str(files["vae"])))
    with pytest.raises(ModelLoadError, match=r"^model\.vae: .* holds no VAE"):
        load_components(model_cfg(models_dir, vae=str(files["controlnet"])))
    # A TAESD file as ComfyUI keeps them (models/vae_approx/taesd_decoder.safetensors): its Sequential's keys.
    from safetensors.torch import save_file

    from poseloop.models.embedded import preview_module

    taesd = tmp_path / "taesd_decoder.safetensors"
    save_file({k.removeprefix("decoder.layers."): v.contiguous()
               for k, v in preview_module().state_dict().items() if k.startswith("decoder.")}, str(taesd))
    with pytest.raises(ModelLoadError, match=r"^model\.vae: .* looks like a TAESD .*madebyollin/taesd for SD1\.5"):
        load_components(model_cfg(models_dir, vae=str(taesd)))
    txt = tmp_path / "weights.txt"
    txt.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"^model\.base: .* has an unknown suffix '\.txt'"):
        load_components(model_cfg(models_dir, base=str(txt)))


def test_truncated_checkpoint_names_the_missing_weights(files: dict[str, Path], models_dir: Path,
                                                        tmp_path: Path) -> None:
    sd = load_file(str(files["sd15"]))
    cut = tmp_path / "cut.safetensors"
    save_file({k: v for k, v in sd.items() if "output_blocks.5" not in k}, str(cut))
    with pytest.raises(ModelLoadError, match=r"^model\.base: .*cut\.safetensors lacks \d+ weights of the "
                                             r"tiny-sd15 unet \(e\.g\. up_blocks\.2"):
        load_components(model_cfg(models_dir, base=str(cut)))


def test_missing_file_is_a_config_error() -> None:
    for name in ("base", "controlnet", "vae"):
        cfg = tiny().model
        setattr(cfg, name, "nowhere/model.safetensors")
        with pytest.raises(ConfigError, match=rf"^model\.{name}: file 'nowhere/model\.safetensors' does not exist"):
            validate_model(cfg)
    cfg = tiny().model
    cfg.vae = "madebyollin/sdxl-vae-fp16-fix"  # a hub id stays a hub id
    validate_model(cfg)


def test_tiny_configs_match_the_embedded_models(models_dir: Path) -> None:
    # The shipped tiny configs are copies; a retrained world with another architecture must update them.
    def settings(path: Path) -> dict[str, Any]:
        return {k: v for k, v in json.loads(path.read_text()).items()
                if k not in ("_diffusers_version", "transformers_version")}

    for name in ("tiny-sd15", "tiny-sdxl"):
        for shipped in sorted((CONFIGS / name).rglob("*.json")):
            assert settings(shipped) == settings(models_dir / name / shipped.relative_to(CONFIGS / name)), shipped


def test_real_configs_have_the_published_sizes_and_key_layout() -> None:
    """SD1.5 / SDXL configs, built on the meta device: parameter counts and original key names as published."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    # Published sizes: SD1.5 UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text 123.06 M, SDXL UNet 2.567 B,
    # OpenCLIP bigG text 694.66 M, ControlNet SD1.5 361.28 M and SDXL 1.251 B (2.5 GB in fp16).
    expected = {"sd15": {"unet": 859_520_964, "vae": 83_653_863, "controlnet": 361_279_120,
                         "text_encoder": 123_060_480},
                "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "controlnet": 1_251_014_160,
                         "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}}
    for arch, sizes in expected.items():
        folder = CONFIGS / arch
        with init_empty_weights():
            unet = UNet2DConditionModel.from_config(_cfg_json(folder, "unet"))
            models = {"unet": unet, "vae": AutoencoderKL.from_config(_cfg_json(folder, "vae")),
                      "controlnet": ControlNetModel.from_config(_cfg_json(folder, "controlnet")),
                      "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder"))}
            if arch == "sdxl":
                models["text_encoder_2"] = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2"))
        assert {k: count(m) for k, m in models.items()} == sizes
        # The original layout these configs produce carries the keys diffusers itself uses to recognise
        # real SD1.5 / SDXL files (single_file_utils.CHECKPOINT_KEY_NAMES), and is matched to this config.
        ldm = {**unet_to_ldm(unet.state_dict(), _cfg_json(folder, "unet")),
               **clip_to_ldm(models["text_encoder"].state_dict(),
                             "cond_stage_model.transformer." if arch == "sd15" else
                             "conditioner.embedders.0.transformer.")}
        if arch == "sdxl":
            ldm.update(open_clip_to_ldm(models["text_encoder_2"].state_dict()))
            assert "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" in ldm
        else:
            assert "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in ldm
            assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in ldm
        assert detect_base_arch(ldm, "model.base", Path("x")) == arch
        fingerprint = Fingerprint(320, 768 if arch == "sd15" else 2048, arch == "sdxl")
        assert match_config(fingerprint, "unet", "model.base", Path("x")) == folder
        assert match_config(fingerprint, "controlnet", "model.controlnet", Path("x")) == folder


def _script(name: str) -> Any:
    """A script under scripts/ as a module (its main(argv))."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_to_single_file_round_trip(models_dir: Path, tmp_path: Path, sd15_components: Components,
                                   sdxl_components: Components, one_thread: None,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/to_single_file.py writes checkpoints and ControlNets that load back as the folders they came from."""
    main = _script("to_single_file").main
    out = {name: tmp_path / f"{name}.safetensors" for name in ("sd15", "sd15-cn", "sdxl", "sdxl-cn")}
    sd15, sdxl = models_dir / "tiny-sd15", models_dir / "tiny-sdxl"
    # fp16 (the default) is lossless for the embedded SD1.5 world (see above); tiny-sdxl's random weights need fp32.
    assert main(["--source", str(sd15), "--out", str(out["sd15"])]) == 0
    assert main(["--source", str(sd15 / "controlnet"), "--out", str(out["sd15-cn"])]) == 0
    assert main(["--source", str(sdxl), "--out", str(out["sdxl"]), "--dtype", "float32"]) == 0
    assert main(["--source", str(sdxl / "controlnet"), "--out", str(out["sdxl-cn"]), "--dtype", "float32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[0].startswith(f"wrote {out['sd15']}: sd15 checkpoint, ") and "float16" in lines[0]
    assert "sd15 ControlNet" in lines[1] and "sdxl checkpoint" in lines[2] and "sdxl ControlNet" in lines[3]
    assert {v.dtype for v in load_file(str(out["sd15"])).values()} == {torch.float16}
    # The SD1.5 ControlNet in control_v11p_sd15_openpose's layout, the SDXL one with diffusers' keys (as they ship).
    assert all(k.startswith("control_model.") for k in load_file(str(out["sd15-cn"])))
    assert "controlnet_cond_embedding.conv_in.weight" in load_file(str(out["sdxl-cn"]))

    comp = load_components(model_cfg(models_dir, base=str(out["sd15"]), controlnet=str(out["sd15-cn"])))
    for name in ("unet", "vae", "text_encoder", "controlnet"):
        _same_weights(getattr(comp.pipe, name), getattr(sd15_components.pipe, name))
    torch.testing.assert_close(eps_of(comp), eps_of(sd15_components), **TOL)
    for ours, theirs in zip(_controlnet_out(comp), _controlnet_out(sd15_components), strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)
    cfg = tiny_sdxl().model
    cfg.base, cfg.controlnet = str(out["sdxl"]), str(out["sdxl-cn"])
    comp = load_components(cfg)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "controlnet"):
        _same_weights(getattr(comp.pipe, name), getattr(sdxl_components.pipe, name))
    for ours, theirs in zip(_controlnet_out(comp), _controlnet_out(sdxl_components), strict=True):
        torch.testing.assert_close(ours, theirs, **TOL)


def test_to_single_file_names_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main = _script("to_single_file").main
    with pytest.raises(SystemExit) as e:  # argparse's error: usage, then the line
        main(["--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.safetensors")])
    assert e.value.code == 2 and "--source: " in capsys.readouterr().err
    (tmp_path / "half" / "unet").mkdir(parents=True)
    (tmp_path / "half" / "unet" / "config.json").write_text("{}")
    assert main(["--source", str(tmp_path / "half"), "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "holds no model.safetensors or diffusion_pytorch" in err
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SystemExit):
        main(["--source", str(tmp_path / "half"), "--out", str(tmp_path / "x.ckpt")])
    assert "must be a .safetensors file" in capsys.readouterr().err
