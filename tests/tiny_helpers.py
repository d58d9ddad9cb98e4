"""Small helpers shared by the tests that load the tiny models (import them; fixtures live in conftest)."""

from __future__ import annotations

from pathlib import Path

import torch

from poseloop.sampling import sampler as sampling
from poseloop.config.generation import ModelConfig, SampleConfig, tiny
from poseloop.models.loading import Components
from poseloop.data.openpose import render_pose
from poseloop.data.poses import get_builtin_pose


def model_cfg(models_dir: Path, **overrides: object) -> ModelConfig:
    """The tiny SD1.5 model config pointing at the session's embedded model, with field overrides."""
    cfg = tiny().model
    cfg.base = str(models_dir / "tiny-sd15")
    cfg.controlnet = str(models_dir / "tiny-sd15" / "controlnet")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def eps_of(comp: Components) -> torch.Tensor:
    """Noise prediction (CFG + ControlNet) for fixed inputs: what a saved and reloaded model must reproduce."""
    pose = render_pose(get_builtin_pose("walking"), 64, 64)
    cfg = SampleConfig(guidance_scale=3.0)
    cond = sampling.make_conditioning(comp, ["a walking robot", "a cat"], [pose, pose], cfg, 64, 64)
    side = 64 // comp.vae_scale_factor
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return sampling.predict_noise(comp, x, torch.tensor(501), cond, cfg.guidance_scale, 1.0)


# ---- tiny random CLIPs in the published file formats (test_published_rewards, test_clip_reward) ----------------

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP statistics


def save_tiny_clipmodel(model_dir: Path, processor_dir: Path, seed: int = 0, image_size: int = 32) -> None:
    """A transformers CLIPModel folder (config.json + model.safetensors) and a CLIPProcessor folder, random weights."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    chars = list(bytes_to_unicode().values())
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tok = CLIPTokenizer(vocab=vocab, merges=[])  # character-level BPE: no merges needed for a tiny test vocabulary
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))  # fmt: skip
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(processor_dir)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    CLIPModel(cfg).save_pretrained(model_dir)


def save_tiny_open_clip(config_dir: Path, arch: str, weights: Path, seed: int = 1) -> Path:
    """A tiny open_clip config registered as `arch` and its random weights saved as HPSv2 does: {'state_dict': ...}."""
    import json

    import open_clip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (config_dir / f"{arch}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(config_dir / f"{arch}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(arch, pretrained=None)
    torch.save({"state_dict": model.state_dict()}, weights)
    return weights
