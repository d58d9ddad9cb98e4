"""Tests for poseloop.rewards.image_reward: a tiny random ImageReward saved in upstream's file format, scored via the spec.

The reference is a minimal forward written in this file from upstream's code (image-reward 1.5:
ImageReward.py score(), models/BLIP/vit.py VisionTransformer, models/BLIP/med.py BertModel in its default
"multimodal" mode), on the raw upstream state-dict keys; it shares no code with transformers' BLIP classes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from poseloop.rewards import image_reward as IR
from poseloop.rewards import spec as RS

torch.set_num_threads(1)

# Tiny sizes: ViT width 128 (2 heads of 64, as upstream's width // 64), 2 blocks, 32 px, patch 16; BERT width 64.
VIT_W, VIT_DEPTH, IMG, PATCH = 128, 2, 32, 16
WORDS = ["a", "photo", "of", "cat", "dog", "red", "blue", "person", "dancing", "##s"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
MED = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 4,
    "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2,  # + [DEC], [ENC]
    "encoder_width": 768, "add_cross_attention": True,
}


def _lin(sd: dict, key: str, out_f: int, in_f: int, g: torch.Generator) -> None:
    sd[key + ".weight"] = torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)
    sd[key + ".bias"] = torch.randn(out_f, generator=g) * 0.1


def _ln(sd: dict, key: str, n: int, g: torch.Generator) -> None:
    sd[key + ".weight"] = 1 + 0.1 * torch.randn(n, generator=g)
    sd[key + ".bias"] = 0.1 * torch.randn(n, generator=g)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under upstream ImageReward's state-dict keys (plus unused blip.vision_proj / text_proj)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    sd[v + "patch_embed.proj.weight"] = torch.randn(VIT_W, 3, PATCH, PATCH, generator=g) / math.sqrt(3 * PATCH * PATCH)
    sd[v + "patch_embed.proj.bias"] = torch.randn(VIT_W, generator=g) * 0.1
    sd[v + "cls_token"] = torch.randn(1, 1, VIT_W, generator=g) * 0.5
    sd[v + "pos_embed"] = torch.randn(1, (IMG // PATCH) ** 2 + 1, VIT_W, generator=g) * 0.5
    for i in range(VIT_DEPTH):
        b = f"{v}blocks.{i}."
        _ln(sd, b + "norm1", VIT_W, g)
        _lin(sd, b + "attn.qkv", 3 * VIT_W, VIT_W, g)
        _lin(sd, b + "attn.proj", VIT_W, VIT_W, g)
        _ln(sd, b + "norm2", VIT_W, g)
        _lin(sd, b + "mlp.fc1", 4 * VIT_W, VIT_W, g)
        _lin(sd, b + "mlp.fc2", VIT_W, 4 * VIT_W, g)
    _ln(sd, v + "norm", VIT_W, g)
    t, H = "blip.text_encoder.", MED["hidden_size"]
    sd[t + "embeddings.word_embeddings.weight"] = torch.randn(MED["vocab_size"], H, generator=g)
    sd[t + "embeddings.position_embeddings.weight"] = torch.randn(MED["max_position_embeddings"], H, generator=g)
    sd[t + "embeddings.position_ids"] = torch.arange(MED["max_position_embeddings"]).expand(1, -1)
    _ln(sd, t + "embeddings.LayerNorm", H, g)
    for i in range(MED["num_hidden_layers"]):
        L = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", H), ("crossattention", VIT_W)):
            _lin(sd, L + att + ".self.query", H, H, g)
            _lin(sd, L + att + ".self.key", H, kv_in, g)
            _lin(sd, L + att + ".self.value", H, kv_in, g)
            _lin(sd, L + att + ".output.dense", H, H, g)
            _ln(sd, L + att + ".output.LayerNorm", H, g)
        _lin(sd, L + "intermediate.dense", MED["intermediate_size"], H, g)
        _lin(sd, L + "output.dense", H, MED["intermediate_size"], g)
        _ln(sd, L + "output.LayerNorm", H, g)
    _lin(sd, "blip.vision_proj", 256, VIT_W, g)
    _lin(sd, "blip.text_proj", 256, H, g)
    for idx, (o, i) in zip((0, 2, 4, 6, 7), ((1024, H), (128, 1024), (64, 128), (16, 64), (1, 16))):
        _lin(sd, f"mlp.layers.{idx}", o, i, g)
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out as <models_dir>/ImageReward: ImageReward.pt, med_config.json, bert-base-uncased/vocab.txt."""
    root = tmp_path_factory.mktemp("models")
    d = root / "ImageReward"
    (d / "bert-base-uncased").mkdir(parents=True)
    torch.save(tiny_state_dict(), d / "ImageReward.pt")
    (d / "med_config.json").write_text(json.dumps(MED))
    (d / "bert-base-uncased" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# Reference forward, transcribed from upstream vit.py / med.py / ImageReward.py


def _ref_vit(sd: dict, x: torch.Tensor) -> torch.Tensor:
    v = "blip.visual_encoder."
    x = F.conv2d(x, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # PatchEmbed
    x = torch.cat([sd[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd[v + "pos_embed"][:, : x.shape[1] + 1]
    B, N, C = x.shape
    heads = VIT_W // 64
    for i in range(VIT_DEPTH):
        b = f"{v}blocks.{i}."
        h = F.layer_norm(x, (C,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]).reshape(B, N, 3, heads, C // heads)
        q, k, val = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ val).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(h, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (C,), sd[v + "norm.weight"], sd[v + "norm.bias"], eps=1e-6)


def _ref_attention(sd: dict, p: str, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    H, nh = MED["hidden_size"], MED["num_attention_heads"]
    eps = MED["layer_norm_eps"]

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], nh, H // nh).permute(0, 2, 1, 3)

    q = heads(F.linear(x, sd[p + "self.query.weight"], sd[p + "self.query.bias"]))
    k = heads(F.linear(kv, sd[p + "self.key.weight"], sd[p + "self.key.bias"]))
    val = heads(F.linear(kv, sd[p + "self.value.weight"], sd[p + "self.value.bias"]))
    ext = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py get_extended_attention_mask (encoder)
    probs = ((q @ k.transpose(-1, -2)) / math.sqrt(H // nh) + ext).softmax(dim=-1)
    ctx = (probs @ val).permute(0, 2, 1, 3).reshape(x.shape)
    out = F.linear(ctx, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
    return F.layer_norm(out + x, (H,), sd[p + "output.LayerNorm.weight"], sd[p + "output.LayerNorm.bias"], eps=eps)


def reference_scores(sd: dict, pixel_values: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ImageReward.score on preprocessed images: ViT -> BERT with cross-attention -> [CLS] -> MLP -> standardise."""
    img = _ref_vit(sd, pixel_values)
    t, H, eps = "blip.text_encoder.", MED["hidden_size"], MED["layer_norm_eps"]
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    x = F.layer_norm(x, (H,), sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"], eps=eps)
    img_mask = torch.ones(img.shape[:2], dtype=torch.long)
    for i in range(MED["num_hidden_layers"]):
        L = f"{t}encoder.layer.{i}."
        x = _ref_attention(sd, L + "attention.", x, x, mask)
        x = _ref_attention(sd, L + "crossattention.", x, img, img_mask)  # mode == 'multimodal'
        h = F.gelu(F.linear(x, sd[L + "intermediate.dense.weight"], sd[L + "intermediate.dense.bias"]))
        h = F.linear(h, sd[L + "output.dense.weight"], sd[L + "output.dense.bias"])
        x = F.layer_norm(h + x, (H,), sd[L + "output.LayerNorm.weight"], sd[L + "output.LayerNorm.bias"], eps=eps)
    r = x[:, 0, :]
    for idx in (0, 2, 4, 6, 7):  # upstream MLP: Linears only (the ReLUs are commented out), Dropout off in eval
        r = F.linear(r, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
    return ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Tests


def _meta(n: int) -> list[dict]:
    return [{"keypoints": None, "width": IMG, "height": IMG, "source_image": None, "group_id": i} for i in range(n)]


PROMPTS = ["a photo of a red cat", "a person dancing", "blue dogs"]


def test_registry_entry() -> None:
    assert "image_reward" in RS.available_rewards()


def test_scores_match_reference(files: Path) -> None:
    reward = RS.build_reward("image_reward", models_dir=str(files))
    assert reward.name == "image_reward" and reward.differentiable
    images = torch.rand(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    got = reward(images, None, PROMPTS, _meta(3))
    ids, mask = reward.tokens(PROMPTS)
    # BLIP's tokenizer on the tiny vocab: [CLS] words [SEP], padded to 35 ([CLS] stays first, as ImageReward.score).
    assert ids.shape == (3, 35) and ids[0, 0].item() == VOCAB.index("[CLS]")
    assert ids[0, :8].tolist() == [VOCAB.index(w) for w in ["[CLS]", "a", "photo", "of", "a", "red", "cat", "[SEP]"]]
    assert ids[2, :4].tolist() == [2, VOCAB.index("blue"), VOCAB.index("dog"), VOCAB.index("##s")]
    assert mask[1].sum().item() == 5 and reward.tokenizer.convert_tokens_to_ids("[ENC]") == len(VOCAB) + 1
    sd = torch.load(files / "ImageReward" / "ImageReward.pt", weights_only=True)
    mean = torch.tensor(IR.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IR.STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = reference_scores(sd, (images - mean) / std, ids, mask)
    diff = (got - want).abs().max().item()
    print(f"max |poseloop - reference| = {diff:.3g}; scores {got.tolist()}")
    assert want.std() > 0.05  # distinct scores, so the comparison is not vacuous
    # fp32 with different kernel order (SDPA-free eager vs hand matmuls): ~1e-6 expected, 1e-4 allowed.
    assert diff < 1e-4


def test_preprocessing_matches_torchvision(files: Path) -> None:
    """Non-square images: the torch preprocessing equals torchvision's Resize(bicubic) + CenterCrop + Normalize."""
    import torchvision.transforms as tv  # pinned beside torch (pyproject.toml)

    reward = RS.build_reward("image_reward", models_dir=str(files))
    images = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    pipe = tv.Compose([tv.Resize(IMG, interpolation=tv.InterpolationMode.BICUBIC, antialias=True), tv.CenterCrop(IMG),
                       tv.Normalize(IR.MEAN, IR.STD)])
    torch.testing.assert_close(reward.pixel_values(images), pipe(images), atol=1e-5, rtol=0)


def test_gradient_reaches_images(files: Path) -> None:
    reward = RS.build_reward("image_reward", models_dir=str(files))
    images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    reward(images, None, PROMPTS[:2], _meta(2)).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())  # frozen


@pytest.mark.parametrize("missing,option", [("ImageReward.pt", "weights"), ("med_config.json", "med_config"),
                                            ("bert-base-uncased/vocab.txt", "tokenizer")])
def test_missing_file_one_line_error(files: Path, tmp_path: Path, missing: str, option: str) -> None:
    d = tmp_path / "ImageReward"
    (d / "bert-base-uncased").mkdir(parents=True)
    for name in ("ImageReward.pt", "med_config.json", "bert-base-uncased/vocab.txt"):
        if name != missing:
            (d / name).write_bytes((files / "ImageReward" / name).read_bytes())
    with pytest.raises(FileNotFoundError) as e:
        RS.build_reward("image_reward", models_dir=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"image_reward: {option}=") and missing.split("/")[-1] in msg
    assert "huggingface-cli download" in msg


def test_options_override_paths(files: Path) -> None:
    d = files / "ImageReward"
    spec = f"image_reward:weights={d / 'ImageReward.pt'},med_config={d / 'med_config.json'},tokenizer={d / 'bert-base-uncased'}"
    reward = RS.build_reward(spec, models_dir="/nonexistent")
    assert reward(torch.rand(1, 3, IMG, IMG), None, PROMPTS[:1], _meta(1)).shape == (1,)


def test_wrong_checkpoint_is_one_error(files: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="expected ImageReward's state dict"):
        IR.load_image_reward(bad, files / "ImageReward" / "med_config.json")


# ---------------------------------------------------------------------------------------------
# Optional: against the upstream package's own code (needs its wheel; not a dependency of this project)


def _import_upstream(wheel: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(vit, med) modules of image-reward's BLIP, made importable on transformers 5 / timm 1 by stubs (undone after)."""
    import sys
    import types
    import zipfile

    import timm.layers
    import timm.models._manipulate as manipulate
    import timm.models.vision_transformer as timm_vit
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    zipfile.ZipFile(wheel).extractall(tmp)
    # The three helpers med.py imports from transformers.modeling_utils (removed in transformers 5).
    monkeypatch.setattr(mu, "apply_chunking_to_forward", pu.apply_chunking_to_forward, raising=False)
    monkeypatch.setattr(mu, "prune_linear_layer", pu.prune_linear_layer, raising=False)
    monkeypatch.setattr(mu, "find_pruneable_heads_and_indices", lambda *a, **k: None, raising=False)
    monkeypatch.setattr(timm_vit, "_cfg", getattr(timm_vit, "_cfg", lambda **k: k), raising=False)

    def stub(name: str, path: str | None = None, **attrs: Any) -> None:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        if path is not None:
            m.__path__ = [path]  # a package without running its __init__ (which imports OpenAI's clip)
        monkeypatch.setitem(sys.modules, name, m)

    # timm 0.6 module paths and fairscale, which vit.py imports.
    stub("timm.models.registry", register_model=lambda f: f)
    stub("timm.models.helpers", named_apply=manipulate.named_apply, adapt_input_conv=manipulate.adapt_input_conv)
    monkeypatch.setitem(sys.modules, "timm.models.layers", timm.layers)
    for name in ("fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        stub(name)
    stub("fairscale.nn.checkpoint.checkpoint_activations", checkpoint_wrapper=lambda m: m)
    for name, sub in (("ImageReward", ""), ("ImageReward.models", "models"), ("ImageReward.models.BLIP", "models/BLIP")):
        stub(name, str(tmp / "ImageReward" / sub))
    for name in ("ImageReward.models.BLIP.vit", "ImageReward.models.BLIP.med"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    import importlib

    vit = importlib.import_module("ImageReward.models.BLIP.vit")
    med = importlib.import_module("ImageReward.models.BLIP.med")
    # transformers 4 PreTrainedModel helpers med.py's BertModel calls, also gone in 5 (same semantics).
    monkeypatch.setattr(med.BertModel, "init_weights", lambda self: None)
    monkeypatch.setattr(med.BertModel, "invert_attention_mask",
                        lambda self, m: (1.0 - m[:, None, None, :].float()) * torch.finfo(torch.float32).min, raising=False)
    monkeypatch.setattr(med.BertModel, "get_head_mask", lambda self, h, n, **k: [None] * n, raising=False)
    return vit, med


def test_matches_upstream_package(files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores equal image-reward 1.5's own BLIP modules (the wheel `scripts/setup.sh --test` downloads, not installed)."""
    import os

    default = Path(__file__).resolve().parents[2] / ".test_wheels" / "image_reward-1.5-py3-none-any.whl"
    wheel = Path(os.environ.get("POSELOOP_IMAGE_REWARD_WHEEL", default))
    assert wheel.is_file(), (f"image-reward wheel not found at {wheel}: run `bash scripts/setup.sh --test` (it runs "
                             "pip download image-reward==1.5 --no-deps -d .test_wheels) or set POSELOOP_IMAGE_REWARD_WHEEL")
    vit, med = _import_upstream(wheel, tmp_path, monkeypatch)
    sd = tiny_state_dict()
    visual = vit.VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=VIT_W, depth=VIT_DEPTH, num_heads=VIT_W // 64)
    cfg = med.BertConfig.from_dict(MED)
    cfg.encoder_width = VIT_W  # as BLIP_Pretrain
    text = med.BertModel(config=cfg, add_pooling_layer=False)
    visual.load_state_dict({k[len("blip.visual_encoder."):]: v for k, v in sd.items() if k.startswith("blip.visual_encoder.")})
    text.load_state_dict({k[len("blip.text_encoder."):]: v for k, v in sd.items() if k.startswith("blip.text_encoder.")})
    visual.eval(), text.eval()
    reward = RS.build_reward("image_reward", models_dir=str(files))
    images = torch.rand(3, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    got = reward(images, None, PROMPTS, _meta(3))
    ids, mask = reward.tokens(PROMPTS)
    mean, std = torch.tensor(IR.MEAN).view(1, 3, 1, 1), torch.tensor(IR.STD).view(1, 3, 1, 1)
    with torch.no_grad():  # ImageReward.score from here on
        emb = visual((images - mean) / std)
        out = text(ids, attention_mask=mask, encoder_hidden_states=emb,
                   encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long), return_dict=True)
        r = out.last_hidden_state[:, 0, :].float()
        for idx in (0, 2, 4, 6, 7):
            r = F.linear(r, sd[f"mlp.layers.{idx}.weight"], sd[f"mlp.layers.{idx}.bias"])
        want = ((r - 0.16717362830052426) / 1.0333394966054072).squeeze(-1)
    diff = (got - want).abs().max().item()
    print(f"max |poseloop - upstream package| = {diff:.3g}")
    assert diff < 1e-4
