"""ImageReward (THUDM, v1.0) on transformers' own BLIP classes, loaded from the user's files (nothing is downloaded).

The upstream ``image-reward`` package cannot be imported with transformers 5 (its BLIP ``med.py`` imports
``apply_chunking_to_forward``, ``find_pruneable_heads_and_indices`` and ``prune_linear_layer`` from
``transformers.modeling_utils``, which transformers 5 removed; see docs/REWARDS.md). Its checkpoint is a plain
state dict, so it is mapped here onto ``BlipVisionModel`` (BLIP's ViT) and ``BlipTextModel`` with cross-attention
(BLIP's ``med.py`` BertModel), and scored exactly as upstream ``ImageReward.score``:

    reward = (mlp(text_encoder(prompt ids, cross-attending to visual_encoder(image))[:, 0]) - 0.16717...) / 1.03333...

Preprocessing is done in torch on 0..1 tensors, so the score is differentiable in the images (ReFL / DRaFT).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poseloop.rewards.images import check_batch, normalise, resize

__all__ = ["ImageRewardModel", "ImageRewardReward", "load_image_reward", "IMAGE_REWARD_REPO"]

IMAGE_REWARD_REPO = "THUDM/ImageReward"  # Hugging Face repo holding ImageReward.pt and med_config.json
TOKENIZER_REPO = "google-bert/bert-base-uncased"  # BLIP's init_tokenizer: BertTokenizer('bert-base-uncased')
# ImageReward._transform / ImageReward.__init__ constants.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35  # ImageReward.score: padding="max_length", truncation=True, max_length=35


def _missing(option: str, path: Path, what: str, where: str) -> FileNotFoundError:
    return FileNotFoundError(f"image_reward: {option}={path}: {what} not found. {where}")


class ImageRewardModel(nn.Module):
    """BLIP visual encoder + cross-attending text encoder + ImageReward's MLP head (no nonlinearity, as upstream)."""

    def __init__(self, visual_encoder: nn.Module, text_encoder: nn.Module, text_width: int) -> None:
        super().__init__()
        self.visual_encoder = visual_encoder
        self.text_encoder = text_encoder
        # Indices 0, 2, 4, 6, 7 as upstream MLP.layers (Dropouts at 1, 3, 5), so checkpoint keys load unchanged.
        self.mlp = nn.Sequential(
            nn.Linear(text_width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised rewards [B] of preprocessed images [B, 3, S, S] and token ids [B, T]."""
        image_embeds = self.visual_encoder(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        # is_decoder=False: bidirectional self-attention, as BLIP's med.py BertModel in its default (encoder) use.
        out = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, is_decoder=False, return_dict=True,
        )
        reward = self.mlp(out.last_hidden_state[:, 0, :].float())
        return ((reward - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def _vision_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BLIP ViT keys (``blip.visual_encoder.``) renamed to BlipVisionModel's (as transformers' convert_blip script)."""
    out: dict[str, torch.Tensor] = {}
    prefix = "blip.visual_encoder."
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if k == "cls_token":
            k = "embeddings.class_embedding"
        elif k == "pos_embed":
            k = "embeddings.position_embedding"
        elif k.startswith("patch_embed.proj."):
            k = "embeddings.patch_embedding." + k[len("patch_embed.proj."):]
        elif k.startswith("norm."):
            k = "post_layernorm." + k[len("norm."):]
        elif k.startswith("blocks."):
            k = "encoder.layers." + k[len("blocks."):]
            for old, new in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("attn.qkv", "self_attn.qkv"),
                             ("attn.proj", "self_attn.projection")):
                k = k.replace(f".{old}.", f".{new}.")
        out[k] = value
    return out


def _vision_model(sd: dict[str, torch.Tensor], weights: Path) -> nn.Module:
    """A BlipVisionModel shaped after the checkpoint's ViT (upstream fixes ViT-L/16 at 224: 24 blocks, 16 heads)."""
    from transformers import BlipVisionConfig, BlipVisionModel

    try:
        width = sd["blip.visual_encoder.cls_token"].shape[-1]
        patch = sd["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
        n_pos = sd["blip.visual_encoder.pos_embed"].shape[1]
        mlp = sd["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"image_reward: weights={weights}: no BLIP visual encoder key {e} (not an ImageReward.pt?)") from e
    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("blip.visual_encoder.blocks."))
    side = round((n_pos - 1) ** 0.5)
    config = BlipVisionConfig(
        hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
        # Head count is not in the weights: upstream's ViT-L uses 16 (base 12), i.e. 64 channels per head.
        num_attention_heads=max(width // 64, 1), image_size=side * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6,  # nn.GELU (exact) and LayerNorm(eps=1e-6) in BLIP's vit.py
        attention_dropout=0.0,
    )
    model = BlipVisionModel(config)
    model.config._attn_implementation = "eager"
    return model


def _text_model(med_config: dict[str, Any], encoder_width: int) -> nn.Module:
    """A BlipTextModel with cross-attention layers from BLIP's med_config (BertConfig) and the ViT width."""
    from transformers import BlipTextConfig, BlipTextModel

    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "layer_norm_eps",
            "initializer_range", "pad_token_id")
    kwargs = {k: med_config[k] for k in keys if k in med_config}
    # BLIP_Pretrain overrides encoder_width with the ViT's width; is_decoder=True only makes BlipTextLayer
    # build its crossattention block (med.py does it for add_cross_attention); forward runs with is_decoder=False.
    vocab = int(kwargs.get("vocab_size", 30524))
    # BlipTextConfig's default bos/sep ids (30522, 102) are for generation only; dropped when outside a small vocab.
    special = {k: v for k, v in (("bos_token_id", 30522), ("sep_token_id", 102)) if v >= vocab}
    config = BlipTextConfig(**kwargs, **{k: None for k in special}, encoder_hidden_size=encoder_width, is_decoder=True)
    model = BlipTextModel(config, add_pooling_layer=False)
    model.config._attn_implementation = "eager"
    return model


def load_image_reward(weights: str | Path, med_config: str | Path, *, device: str = "cpu") -> ImageRewardModel:
    """An ImageRewardModel with an upstream ``ImageReward.pt`` state dict loaded, frozen and in eval mode."""
    weights, med_config = Path(weights).expanduser(), Path(med_config).expanduser()
    if not weights.is_file():
        raise _missing("weights", weights, "ImageReward.pt", f"It is in the Hugging Face repo {IMAGE_REWARD_REPO}: "
                       f"huggingface-cli download {IMAGE_REWARD_REPO} ImageReward.pt --local-dir {weights.parent}")
    if not med_config.is_file():
        raise _missing("med_config", med_config, "med_config.json", f"It is in the Hugging Face repo {IMAGE_REWARD_REPO}: "
                       f"huggingface-cli download {IMAGE_REWARD_REPO} med_config.json --local-dir {med_config.parent}")
    try:
        cfg = json.loads(med_config.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"image_reward: med_config={med_config}: not a JSON BERT config ({e})") from e
    try:
        sd = torch.load(str(weights), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects beyond tensors
        raise ValueError(f"image_reward: weights={weights}: not a torch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not any(str(k).startswith("blip.visual_encoder.") for k in sd):
        found = sorted(map(str, sd))[:6] if isinstance(sd, dict) else type(sd).__name__
        raise ValueError(f"image_reward: weights={weights}: expected ImageReward's state dict (blip.*, mlp.*); found {found}")
    vision = _vision_model(sd, weights)
    text = _text_model(cfg, vision.config.hidden_size)
    model = ImageRewardModel(vision, text, text.config.hidden_size)
    text_sd = {k[len("blip.text_encoder."):]: v for k, v in sd.items() if k.startswith("blip.text_encoder.")}
    text_sd.pop("embeddings.position_ids", None)  # a non-persistent buffer in transformers 5
    mlp_sd = {k[len("mlp.layers."):]: v for k, v in sd.items() if k.startswith("mlp.layers.")}
    # Strict per part; the rest of the checkpoint (blip.vision_proj / text_proj, ITM heads) is unused by the score.
    for part, module, part_sd in (("blip.visual_encoder", vision, _vision_state(sd)), ("blip.text_encoder", text, text_sd),
                                  ("mlp.layers", model.mlp, mlp_sd)):
        try:
            module.load_state_dict(part_sd)
        except RuntimeError as e:
            detail = " ".join(line.strip() for line in str(e).splitlines()[:2])
            raise ValueError(f"image_reward: weights={weights}: {part} does not fit med_config={med_config}: {detail}") from e
    return model.eval().requires_grad_(False).to(device)


def load_blip_tokenizer(folder: str | Path) -> Any:
    """BLIP's init_tokenizer from a local bert-base-uncased folder: BertTokenizer + [DEC] bos + [ENC] special token."""
    folder = Path(folder).expanduser()
    if not (folder / "vocab.txt").is_file():
        raise _missing("tokenizer", folder / "vocab.txt", "a BERT tokenizer folder (vocab.txt)",
                       f"Download it elsewhere and copy the folder here, e.g. huggingface-cli download {TOKENIZER_REPO} "
                       f"vocab.txt tokenizer_config.json --local-dir {folder}")
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageRewardReward:
    """ImageReward v1.0: BLIP image-text fusion -> MLP, standardised (about -2..2; higher is better)."""

    name = "image_reward"
    needs_images = True
    differentiable = True

    def __init__(self, model: ImageRewardModel, tokenizer: Any, *, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.eval().requires_grad_(False).to(self.device)  # frozen: gradients reach the images only
        self.tokenizer = tokenizer
        self.size = int(model.visual_encoder.config.image_size)
        self._token_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """ImageReward's transform in torch (differentiable): short side to size (bicubic), centre crop, normalise."""
        x = images.to(self.device).float()
        h, w = x.shape[-2:]
        # torchvision Resize(int): the long side is int(size * long / short), truncated.
        nh, nw = (self.size, int(self.size * w / h)) if h <= w else (int(self.size * h / w), self.size)
        x = resize(x, (nh, nw))
        # torchvision CenterCrop: top = round((h - crop) / 2).
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        return normalise(x[..., top : top + self.size, left : left + self.size], MEAN, STD)

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, 35] as ImageReward.score tokenises (cached per prompt)."""
        todo = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if todo:
            tok = self.tokenizer(todo, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            if len(self._token_cache) + len(todo) > 10000:  # bound memory for open-ended prompt streams
                self._token_cache.clear()
            self._token_cache.update({p: (tok["input_ids"][i], tok["attention_mask"][i]) for i, p in enumerate(todo)})
        ids = torch.stack([self._token_cache[p][0] for p in prompts]).to(self.device)
        mask = torch.stack([self._token_cache[p][1] for p in prompts]).to(self.device)
        return ids, mask

    def __call__(
        self, images: torch.Tensor | None, latents: torch.Tensor | None, prompts: list[str], metadata: list[dict]
    ) -> torch.Tensor:
        """ImageReward score per (image, prompt) pair [B]."""
        images = check_batch(self.name, images, prompts, metadata)
        ids, mask = self.tokens(list(prompts))
        return self.model(self.pixel_values(images), ids, mask).to(images.device)


def build(o: dict[str, Any], device: str, models_dir: str) -> ImageRewardReward:
    """The ``image_reward`` registry entry's builder: files from the options or under <models_dir>/ImageReward."""
    root = Path(models_dir) / "ImageReward"
    model = load_image_reward(o["weights"] or root / "ImageReward.pt", o["med_config"] or root / "med_config.json",
                              device=device)
    return ImageRewardReward(model, load_blip_tokenizer(o["tokenizer"] or root / "bert-base-uncased"), device=device)
