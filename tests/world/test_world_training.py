"""The embedded world's training script: the VAE round-trip ceiling it reports, and a re-run that skips
every finished stage and writes the same weights."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from conftest import TEST_THREADS
from poseloop.world import training as wt
from poseloop.world.train_config import WorldConfig, smoke
from poseloop.config.lib import ConfigError, to_dict


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(TEST_THREADS)


def _micro(tmp_path: Path) -> WorldConfig:
    return replace(smoke(), examples=48, vae_steps=2, detector_steps=2,
                   detector_batch=4, unet_steps=2, unet_batch=2, lcm_steps=2, snapshot_every=2, eval_examples=4,
                   preview_steps=2, preview_renders=8, preview_generated=2,
                   run_dir=str(tmp_path / "run"), out=str(tmp_path / "weights"))


class _Identity(torch.nn.Module):
    """A lossless 'VAE' (diffusers' encode/decode shapes): its round trips are the renders themselves."""

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=z)


def test_roundtrip_attributes_of_a_lossless_vae_read_the_renders() -> None:
    got = wt.roundtrip_attributes(_Identity(), 64, n=24, seed=5)
    # measure_attributes reads renders' clothes and backgrounds right (100% of 288, docs/WORLD.md).
    assert got["shirt_acc"] == 1.0 and got["trousers_acc"] == 1.0
    assert got["background_acc"] >= 0.95
    assert got["psnr_db"] > 60  # only the uint8 rounding of the round trip differs


def test_roundtrip_attributes_see_a_colour_shift() -> None:
    class Swap(_Identity):
        def decode(self, z: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(sample=z.flip(1))  # RGB -> BGR: red clothes come out blue

    got = wt.roundtrip_attributes(Swap(), 64, n=24, seed=5)
    assert got["shirt_acc"] < 0.7 and got["trousers_acc"] < 0.7


def test_a_rerun_skips_finished_stages_and_writes_the_same_weights(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _micro(tmp_path)
    first = wt.train_world(cfg)
    run = Path(cfg.run_dir)
    for name in ("vae", "latents", "detector", "diffusion"):
        assert (run / f"{name}.safetensors").is_file(), name
    shipped = {f.name: f.read_bytes() for f in Path(cfg.out).glob("*.safetensors")}
    assert {"vae.safetensors", "unet.safetensors", "controlnet.safetensors", "text_encoder.safetensors",
            "lcm_lora.safetensors", "preview_vae.safetensors"} <= set(shipped)
    assert (run / "lcm" / "lcm_lora.safetensors").is_file() and first["lcm_loss_last_50"] > 0
    record = json.loads((Path(cfg.out) / "world.json").read_text())["preview_vae"]
    assert record["architecture"]["decoder_blocks"] and record["preview_psnr_db"] == first["preview_psnr_db"]

    def finished(*_: object, **__: object) -> None:
        raise AssertionError("a finished stage ran again")

    for stage in ("train_vae", "encode_all", "train_detector", "train_diffusion"):
        monkeypatch.setattr(wt, stage, finished)
    monkeypatch.setattr("poseloop.world.lcm_distill.distill", finished)
    monkeypatch.setattr("poseloop.world.preview_distill.distill_preview", finished)
    second = wt.train_world(cfg)
    assert {f.name: f.read_bytes() for f in Path(cfg.out).glob("*.safetensors")} == shipped
    # Same weights and seeds, measured again: a second call may pick another fp32 kernel order (~1e-6 in a latent),
    # which can flip a uint8 pixel after 20 steps and nudge a soft-argmax keypoint, or flip one of the 16 round
    # trips' nearest-colour reads; anything from other weights moves OKS by far more.
    assert second["generator_oks"] == pytest.approx(first["generator_oks"], abs=1e-3)
    assert second["generator_step"] == first["generator_step"] == cfg.unet_steps
    assert 0 <= second["roundtrip_shirt_acc"] <= 1
    assert second["roundtrip_shirt_acc"] == pytest.approx(first["roundtrip_shirt_acc"], abs=1 / 16 + 1e-9)
    # The build time is the first run's, which trained the stages, not the resume's.
    assert second["minutes"] == first["minutes"] > 0
    assert json.loads((Path(cfg.out) / "world.json").read_text())["metrics"]["minutes"] == first["minutes"]


def test_eval_examples_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="eval_examples"):
        replace(smoke(), eval_examples=0).validate()


def test_the_architecture_is_validated() -> None:
    with pytest.raises(ConfigError, match="vae_channels: .*multiple of the smallest"):
        replace(smoke(), vae_channels=[16, 24, 64]).validate()
    with pytest.raises(ConfigError, match="unet_heads: 3 must divide 32"):
        replace(smoke(), unet_heads=3).validate()


def test_the_shipped_files_record_the_architecture_they_fit(tmp_path: Path) -> None:
    from poseloop.models.embedded import LEGACY_WORLD_ARCH, load_world_modules, world_modules

    torch.manual_seed(0)
    mods = world_modules(0.5, unet_heads=4, vae_channels=[16, 32, 32])
    wt.write_weights(mods, None, tmp_path / "w", {})
    meta = json.loads((tmp_path / "w" / "world.json").read_text())
    assert meta["architecture"] == {"unet_heads": 4, "vae_channels": [16, 32, 32]}
    loaded = load_world_modules(tmp_path / "w")
    assert loaded["unet"].config.attention_head_dim == 4
    assert list(loaded["vae"].config.block_out_channels) == [16, 32, 32]
    want = mods["unet"].state_dict()
    # fp16 files: each weight comes back within fp16's rounding (relative 2^-11).
    assert all(torch.allclose(v, want[k], rtol=2**-10, atol=1e-7) for k, v in loaded["unet"].state_dict().items())
    # A world.json written before the architecture was recorded loads as the architecture of that time.
    legacy = world_modules(0.5, **LEGACY_WORLD_ARCH)
    wt.write_weights(legacy, None, tmp_path / "old", {})
    meta = json.loads((tmp_path / "old" / "world.json").read_text())
    del meta["architecture"]
    (tmp_path / "old" / "world.json").write_text(json.dumps(meta))
    assert load_world_modules(tmp_path / "old")["unet"].config.attention_head_dim == 8


def test_a_run_folder_of_other_settings_is_refused(tmp_path: Path) -> None:
    cfg = _micro(tmp_path)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    wt.check_run_dir(cfg, run)  # no config.json yet: a fresh run
    (run / "config.json").write_text(json.dumps({**to_dict(cfg), "threads": 1, "out": "elsewhere"}))
    wt.check_run_dir(cfg, run)  # thread count and output folder do not change what a stage computes
    other = 8 if cfg.unet_heads == 2 else 2
    (run / "config.json").write_text(json.dumps({**to_dict(cfg), "unet_heads": other}))
    with pytest.raises(ConfigError, match=rf"run_dir: .*\(unet_heads {other} -> {cfg.unet_heads}\); pass another"):
        wt.check_run_dir(cfg, run)
    (run / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        wt.check_run_dir(cfg, run)


def test_a_run_folder_from_before_vae_posterior_existed_trained_on_samples(tmp_path: Path) -> None:
    cfg = _micro(tmp_path)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True)
    old = {k: v for k, v in to_dict(cfg).items() if k != "vae_posterior"}
    (run / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="vae_posterior 'sample' -> 'mean'"):
        wt.check_run_dir(replace(cfg, vae_posterior="mean"), run)
    wt.check_run_dir(replace(cfg, vae_posterior="sample"), run)
    with pytest.raises(ConfigError, match="vae_posterior: 'median' must be 'mean' or 'sample'"):
        replace(cfg, vae_posterior="median").validate()


def _trained_vae(tmp_path: Path, **overrides: Any) -> torch.nn.Module:
    """A small VAE after train_vae under the micro config with these overrides."""
    from poseloop.models.embedded import world_modules
    from poseloop.world.render import make_examples

    torch.manual_seed(0)
    vae = world_modules(1.0, unet_heads=2, vae_channels=[16, 32, 32])["vae"]
    cfg = replace(_micro(tmp_path), vae_batch=2, **overrides)
    Path(cfg.run_dir).mkdir(parents=True)
    wt.train_vae(cfg, make_examples(8, 64, seed=3), vae, Path(cfg.run_dir))
    return vae


def test_a_vae_trained_on_means_samples_its_means(tmp_path: Path) -> None:
    vae = _trained_vae(tmp_path, vae_steps=3, vae_posterior="mean")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    # std exp(-10) = 4.5e-5 against latents of std ~0.1-1: sample() is the mean to fp16 precision (2^-11 relative).
    assert post.std.max() == pytest.approx(float(torch.exp(torch.tensor(wt.DETERMINISTIC_LOG_VARIANCE / 2))))
    assert torch.allclose(post.sample(torch.Generator().manual_seed(0)), post.mean, atol=5e-4)


def test_the_vae_log_variance_bias_option_sets_the_initial_bias(tmp_path: Path) -> None:
    vae = _trained_vae(tmp_path / "a", vae_steps=0, vae_logvar_bias=-6.0)
    half = vae.quant_conv.out_channels // 2
    assert torch.equal(vae.quant_conv.bias[half:], torch.full((half,), -6.0))
    assert not torch.equal(vae.quant_conv.bias[:half], torch.full((half,), -6.0))  # the means' bias is untouched
    # none keeps diffusers' initialisation (a conv bias drawn within +-1/sqrt(fan_in)), as the first worlds had
    first = _trained_vae(tmp_path / "b", vae_steps=0, vae_logvar_bias=None)
    assert float(first.quant_conv.bias[half:].detach().abs().max()) < 1.0


def test_offset_noise_adds_a_constant_per_image_and_channel() -> None:
    shape = torch.Size([512, 4, 16, 16])
    plain = wt.training_noise(shape, 0.0, torch.Generator().manual_seed(5))
    # offset 0 draws nothing extra: a build without it keeps the random stream it always had
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(5)))
    offset = wt.training_noise(shape, 0.3, torch.Generator().manual_seed(5))
    # the per-image, per-channel means: std 1/16 for plain noise, sqrt(0.3^2 + 1/256) = 0.306 with the offset;
    # over 2048 means their sample std is within 5% (3.2 standard errors) of either
    assert abs(float(plain.mean((2, 3)).std()) - 1 / 16) < 0.05 / 16
    assert abs(float(offset.mean((2, 3)).std()) - (0.09 + 1 / 256) ** 0.5) < 0.05 * 0.306
    # within an image the offset is constant: the deviations from each image's mean are the plain draw's
    assert torch.allclose(offset - offset.mean((2, 3), keepdim=True), plain - plain.mean((2, 3), keepdim=True),
                          atol=1e-6)
    with pytest.raises(ConfigError, match="noise_offset: must be >= 0"):
        replace(smoke(), noise_offset=-0.1).validate()
