"""The embedded default models: tiny SD1.5- and SDXL-architecture ControlNet pipelines built offline.

tiny-sd15 is the embedded pose world's model: diffusers' real classes (AutoencoderKL, UNet,
OpenPose ControlNet, a CLIP text encoder with CLIP's own tokenizer, SD's DDIM scheduler) trained by
scripts/train_world.py on poseloop.world.render's rendered people. Its weights ship with the package
(poseloop/models/world_weights, fp16) and are written out here with save_pretrained, so they load through
exactly the same from_pretrained path as a real checkpoint. Its folder also holds the world's pose
detector (pose_detector/). tiny-sdxl keeps random (seeded) weights: its images are noise-like and it
exists to exercise the SDXL code paths. build_random_sd15 gives the SD1.5 architecture with random
weights: what tiny-sd15 becomes (with a warning) where no trained world ships.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any
from pathlib import Path

import torch

from poseloop.config.generation import EMBEDDED_NAMES, LCM_LORA_FILE

_SEED = 1234


def write_clip_tokenizer_files(folder: Path) -> None:
    """Derive CLIP's vocab.json and merges.txt from the BPE table that open_clip_torch ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    # Same slice as CLIP's SimpleTokenizer: 49152 - 256 - 2 merges after the version line.
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def _tokenizer(tmp: Path, pad_token: str):  # -> CLIPTokenizer
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(tmp)
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def _text_config(**extra: int):  # -> CLIPTextConfig
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **extra)


def _vae(scaling_factor: float):  # -> AutoencoderKL
    from diffusers import AutoencoderKL

    # Four blocks so that the latent is 1/8 of the image, as in SD.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=16, sample_size=128, scaling_factor=scaling_factor)


def _scheduler():  # -> DDIMScheduler
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


WORLD_WEIGHTS = Path(__file__).parent / "world_weights"
PREVIEW_FILE = "preview_vae.safetensors"  # the world's preview decoder (an AutoencoderTiny), train_world's last stage
PREVIEW_DIR = "preview_vae"  # ... saved as a diffusers folder in a built tiny-sd15
WORLD_STAMP_FILE = "poseloop_world.json"  # in a built tiny-sd15: the sha256 of the world.json it was built from
WORLD_SIZE = 64  # the embedded world's native resolution (16 x 16 latents)


def world_text_config():  # -> CLIPTextConfig
    """The embedded world's CLIP text encoder: 2 layers, hidden 64, CLIP's 49,408-token vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=49408, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=77, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407)


# What a world.json without an "architecture" record was built with (every world before it was recorded).
LEGACY_WORLD_ARCH = {"unet_heads": 8, "vae_channels": [32, 64, 64]}
# The shipped world's architecture: what train_world.py builds by default and build_random_sd15 gives. Two
# attention heads: a noise prediction takes half the CPU time of the first world's 8 (docs/WORLD.md).
WORLD_ARCH = {"unet_heads": 2, "vae_channels": [32, 64, 64]}


def world_modules(scaling_factor: float = 1.0, unet_heads: int = WORLD_ARCH["unet_heads"],
                  vae_channels: list[int] = WORLD_ARCH["vae_channels"]) -> dict[str, torch.nn.Module]:
    """Fresh (random) vae, unet, controlnet and text_encoder of the embedded world's architecture."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from transformers import CLIPTextModel

    # Three VAE blocks: latents are 1/4 of the image (64 px -> 16 x 16), cheap enough for 2 cores.
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=min(vae_channels), sample_size=WORLD_SIZE,
                        scaling_factor=scaling_factor)
    # diffusers reads attention_head_dim as the number of heads (its config misnomer): the shipped world
    # has 2 of 16-32 dims; the first world's 8 of 4-8 dims took twice the CPU time per noise prediction.
    unet = UNet2DConditionModel(
        sample_size=WORLD_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=unet_heads, norm_num_groups=32,
    )
    # The conditioning embedding downsamples by 4 to meet the latents, as SD's does by 8.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 64))
    return {"vae": vae, "unet": unet, "controlnet": controlnet, "text_encoder": CLIPTextModel(world_text_config())}


def _save_sd15(out_dir: Path, modules: dict[str, torch.nn.Module]) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    with tempfile.TemporaryDirectory() as tok_tmp:
        pipe = StableDiffusionControlNetPipeline(
            vae=modules["vae"], text_encoder=modules["text_encoder"],
            tokenizer=_tokenizer(Path(tok_tmp), pad_token="<|endoftext|>"), unet=modules["unet"],
            controlnet=modules["controlnet"], scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out_dir)


def load_world_modules(weights_dir: Path = WORLD_WEIGHTS) -> dict[str, torch.nn.Module]:
    """The trained embedded world (fp16 files -> float32 modules); FileNotFoundError names a missing file."""
    from safetensors.torch import load_file

    meta_path = weights_dir / "world.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing; the trained embedded world ships with poseloop "
                                "(rebuild it with: python scripts/train_world.py)")
    meta = json.loads(meta_path.read_text())
    arch = meta.get("architecture", LEGACY_WORLD_ARCH)  # weights only fit the architecture they were trained in
    modules = world_modules(float(meta["scaling_factor"]), arch["unet_heads"], arch["vae_channels"])
    for name, module in modules.items():
        path = weights_dir / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; rebuild the embedded world with: python scripts/train_world.py")
        module.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return modules


# Every block of an AutoencoderTiny has one width. No block at full resolution: after the last upsample
# only two 3x3 convolutions run at 64 px, which is where a decoder spends its time.
PREVIEW_ARCH: dict[str, Any] = {"channels": 32, "encoder_blocks": [1, 2, 2], "decoder_blocks": [3, 3, 0]}


def preview_module(arch: dict[str, Any] = PREVIEW_ARCH, latent_channels: int = 4):  # -> AutoencoderTiny
    """A fresh AutoencoderTiny of the preview architecture (three levels: latents are 1/4 of the image)."""
    from diffusers import AutoencoderTiny

    width = int(arch["channels"])
    levels = len(arch["decoder_blocks"])
    return AutoencoderTiny(encoder_block_out_channels=(width,) * levels, decoder_block_out_channels=(width,) * levels,
                           num_encoder_blocks=tuple(arch["encoder_blocks"]),
                           num_decoder_blocks=tuple(arch["decoder_blocks"]), latent_channels=latent_channels,
                           scaling_factor=1.0)


def load_world_preview(weights_dir: Path = WORLD_WEIGHTS):  # -> AutoencoderTiny
    """The world's preview decoder (train_world's last stage), float32, in the architecture world.json records."""
    from safetensors.torch import load_file

    meta = json.loads((weights_dir / "world.json").read_text()).get("preview_vae", {})
    module = preview_module(meta.get("architecture", PREVIEW_ARCH))
    module.load_state_dict({k: v.float() for k, v in load_file(str(weights_dir / PREVIEW_FILE)).items()})
    return module.eval()


def build_tiny_sd15(out_dir: Path, weights_dir: Path = WORLD_WEIGHTS) -> None:
    """Write the trained embedded world pipeline (+ ControlNet, + pose detector) into out_dir, stamped with
    the world it came from."""
    # Built from the shipped world: rebuilt when another one ships; from other weights (train_world's
    # teacher for the LCM-LoRA): kept as it is.
    shipped = weights_dir.resolve() == WORLD_WEIGHTS.resolve()
    stamp = {"world_sha256": _world_stamp(weights_dir), "shipped": shipped}
    if not (weights_dir / "world.json").is_file():
        import warnings

        warnings.warn(f"{weights_dir} holds no trained embedded world: tiny-sd15 gets random weights "
                      "(noise images); rebuild the world with: python scripts/train_world.py", stacklevel=2)
        build_random_sd15(out_dir)
    else:
        _save_sd15(out_dir, load_world_modules(weights_dir))
        shutil.copytree(weights_dir / "pose_detector", out_dir / "pose_detector")
        if (weights_dir / LCM_LORA_FILE).is_file():
            shutil.copyfile(weights_dir / LCM_LORA_FILE, out_dir / LCM_LORA_FILE)
        if (weights_dir / PREVIEW_FILE).is_file():
            preview = out_dir / PREVIEW_DIR
            load_world_preview(weights_dir).save_pretrained(preview)
            # AutoencoderTiny registers block_out_channels for pipelines' scale factor but warns when loading
            # a config that names it; it is registered again at load.
            config = json.loads((preview / "config.json").read_text())
            config.pop("block_out_channels", None)
            (preview / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / WORLD_STAMP_FILE).write_text(json.dumps(stamp) + "\n")


def build_random_sd15(out_dir: Path, seed: int = _SEED) -> None:
    """The embedded SD1.5 architecture with random weights (for tests that need no picture)."""
    torch.manual_seed(seed)
    _save_sd15(out_dir, world_modules(0.18215))


def build_tiny_sdxl(out_dir: Path) -> None:
    """Build and save the tiny SDXL-architecture pipeline (+ ControlNet) into out_dir."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(_SEED)
    time_embed_dim, pooled_dim = 8, 32
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        # SDXL: the context is both text encoders' hidden states concatenated (32 + 32), and the
        # pooled embedding plus six size/crop ids feed the added time embedding.
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim, norm_num_groups=16,
    )
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32))
    with tempfile.TemporaryDirectory() as tok_tmp:
        tokenizer = _tokenizer(Path(tok_tmp), pad_token="<|endoftext|>")
        tokenizer_2 = _tokenizer(Path(tok_tmp), pad_token="!")
        pipe = StableDiffusionXLControlNetPipeline(
            vae=_vae(0.13025), text_encoder=CLIPTextModel(_text_config()),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(projection_dim=pooled_dim)),
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, controlnet=controlnet,
            scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
        )
        pipe.save_pretrained(out_dir)


def _world_stamp(weights_dir: Path | None = None) -> str:
    """What a tiny-sd15 folder is built from: the sha256 of a world.json ('' where there is none)."""
    meta = (WORLD_WEIGHTS if weights_dir is None else weights_dir) / "world.json"
    return hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else ""


def _is_current(root: Path) -> bool:
    """Whether a built embedded folder is complete and, for tiny-sd15, not built from a world other than
    the one that ships now (a folder without a stamp was built before stamps, from an older world)."""
    if not (root / "model_index.json").is_file():
        return False
    if root.name != "tiny-sd15":
        return True
    stamp = root / WORLD_STAMP_FILE
    if not stamp.is_file():
        return False
    try:
        meta = json.loads(stamp.read_text())
    except (OSError, ValueError):  # an unreadable stamp says nothing about the folder: rebuild it
        return False
    return not meta.get("shipped", True) or meta.get("world_sha256") == _world_stamp()


def ensure_embedded(path: str | os.PathLike[str]) -> Path:
    """Build the embedded model that `path` points into, once, atomically; return its root folder.

    A tiny-sd15 folder built from another embedded world (an older poseloop) is rebuilt in place."""
    p = Path(path)
    root = p
    while root.name not in EMBEDDED_NAMES:
        if root.parent == root:
            raise ValueError(f"{path} is not inside an embedded model folder ({', '.join(EMBEDDED_NAMES)})")
        root = root.parent
    if _is_current(root):
        return root
    stale = (root / "model_index.json").is_file()
    if stale:
        print(f"{root}: built from another embedded world than this poseloop ships; rebuilding it "
              "(LoRAs trained on the old one do not fit the new one)", file=sys.stderr)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves a half model behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    old = root.with_name(f".{root.name}-stale-{os.getpid()}")
    try:
        (build_tiny_sd15 if root.name == "tiny-sd15" else build_tiny_sdxl)(tmp)
        if stale:
            try:
                os.rename(root, old)
            except OSError:  # another process moved it first
                pass
        try:
            os.rename(tmp, root)
        except OSError:
            if not _is_current(root):  # another process did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return root
