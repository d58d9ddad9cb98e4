"""The embedded default models: tiny SD1.5- and SDXL-architecture ControlNet pipelines built offline.

They use diffusers' and transformers' real classes with small configs and random (seeded) weights,
and are saved with save_pretrained so that they load through exactly the same from_pretrained path
as a real checkpoint. Their images are noise-like: they exist to exercise the whole loop anywhere.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_NAMES = ("tiny-sd15", "tiny-sdxl")
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


def build_tiny_sd15(out_dir: Path) -> None:
    """Build and save the tiny SD1.5-architecture pipeline (+ ControlNet) into out_dir."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(_SEED)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
    )
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32))
    with tempfile.TemporaryDirectory() as tok_tmp:
        tokenizer = _tokenizer(Path(tok_tmp), pad_token="<|endoftext|>")
        pipe = StableDiffusionControlNetPipeline(
            vae=_vae(0.18215), text_encoder=CLIPTextModel(_text_config()), tokenizer=tokenizer, unet=unet,
            controlnet=controlnet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out_dir)


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


def is_embedded(path: str | os.PathLike[str]) -> bool:
    """Whether a model path names one of the embedded tiny models (or its controlnet subfolder)."""
    parts = Path(path).parts
    return any(name in parts for name in EMBEDDED_NAMES)


def ensure_embedded(path: str | os.PathLike[str]) -> Path:
    """Build the embedded model that `path` points into, once, atomically; return its root folder."""
    p = Path(path)
    root = p
    while root.name not in EMBEDDED_NAMES:
        if root.parent == root:
            raise ValueError(f"{path} is not inside an embedded model folder ({', '.join(EMBEDDED_NAMES)})")
        root = root.parent
    if (root / "model_index.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never leaves a half model behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        (build_tiny_sd15 if root.name == "tiny-sd15" else build_tiny_sdxl)(tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "model_index.json").is_file():  # another process did not win the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
