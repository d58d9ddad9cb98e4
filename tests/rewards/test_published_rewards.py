"""Tests for poseloop.rewards.published: PickScore and HPSv2 on tiny random models saved in the real file formats."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from poseloop.rewards import published as P
from poseloop.rewards import spec as RS
from poseloop.rewards import builtin as R
from tiny_helpers import CLIP_MEAN, CLIP_STD, save_tiny_clipmodel, save_tiny_open_clip

torch.set_num_threads(1)

TINY_HPS_ARCH = "poseloop-test-tiny-hps"
MEAN, STD = CLIP_MEAN, CLIP_STD


def _meta(n: int) -> list[dict]:
    return [{"keypoints": None, "width": 32, "height": 32, "source_image": None, "group_id": i} for i in range(n)]


def _uint8_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Images in 0..1 on the uint8 grid, so a PIL round trip is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g).float() / 255


def _pil(images: torch.Tensor) -> list[Image.Image]:
    arr = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


# ---------------------------------------------------------------------------------------------
# Tiny models in the published formats


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, processor folder) of a tiny PickScore-architecture CLIP."""
    d = tmp_path_factory.mktemp("pickscore")
    save_tiny_clipmodel(d / "PickScore_v1", d / "processor")
    return d / "PickScore_v1", d / "processor"


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny open_clip config registered by name and its random weights saved as HPSv2 does: {'state_dict': ...}."""
    d = tmp_path_factory.mktemp("hps")
    return save_tiny_open_clip(d, TINY_HPS_ARCH, d / "HPS_v2.1_compressed.pt")


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_has_published_rewards() -> None:
    names = RS.available_rewards()
    assert "pickscore" in names and "hps" in names
    (t,) = RS.parse_reward_spec("pickscore:model=/m,processor=/p")
    assert t.options == {"model": "/m", "processor": "/p"}
    (t,) = RS.parse_reward_spec("2*hps:weights=/w/HPS_v2.1_compressed.pt,arch=ViT-H-14,scale=100")
    assert t.weight == 2.0 and t.options["scale"] == "100"
    with pytest.raises(ValueError, match="no option 'arch'"):
        RS.parse_reward_spec("pickscore:arch=x")


# ---------------------------------------------------------------------------------------------
# PickScore


def test_pickscore_formula_matches_clipmodel_forward(pickscore_dirs: tuple[Path, Path]) -> None:
    from transformers import AutoProcessor, CLIPModel

    model_dir, proc_dir = pickscore_dirs
    r = RS.build_reward(f"pickscore:model={model_dir},processor={proc_dir}")
    assert isinstance(r, P.PickScoreReward) and r.differentiable and r.needs_images
    imgs = _uint8_images(3, 32, 32)
    prompts = ["a dancer", "a red car", "a dancer jumping high"]
    out = r(imgs, None, prompts, _meta(3))
    # Independent: the processor on PIL images + CLIPModel's own forward (logits_per_image = scale * cos).
    proc = AutoProcessor.from_pretrained(str(proc_dir))
    model = CLIPModel.from_pretrained(str(model_dir)).eval()
    inputs = proc(text=prompts, images=_pil(imgs), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    assert math_close(out, logits.diagonal(), 1e-4)
    assert abs(model.logit_scale.exp().item() - 3.0) > 1  # logit_scale.exp() = e^3, not 1: the factor is really applied
    # The prompt order and batch composition do not change a pair's score (text cache).
    again = r(imgs[[2, 0]], None, [prompts[2], prompts[0]], _meta(2))
    assert math_close(again, out[[2, 0]], 1e-5)


def math_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> bool:
    """allclose with a useful failure message."""
    ok = a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=atol)
    assert ok, f"{a.tolist()} != {b.tolist()}"
    return ok


def test_pickscore_preprocessing_matches_processor_on_resized_images(pickscore_dirs: tuple[Path, Path]) -> None:
    model_dir, proc_dir = pickscore_dirs
    r = RS.build_reward(f"pickscore:model={model_dir},processor={proc_dir}")
    for h, w in ((48, 80), (96, 64), (64, 64), (512, 768)):
        noise = _uint8_images(2, h, w, seed=h + w)
        smooth = F.interpolate(_uint8_images(2, 8, 8, seed=h), size=(h, w), mode="bilinear", align_corners=False)
        smooth = (smooth * 255).round() / 255
        for kind, imgs in (("smooth", smooth), ("noise", noise)):
            ours = r.pixel_values(imgs)
            ref = r.processor(images=_pil(imgs), return_tensors="pt")["pixel_values"]
            assert ours.shape == ref.shape == (2, 3, 32, 32)
            # Same geometry and kernel (transformers 5's processor is torchvision-backed), but it resizes uint8
            # and rounds: up to 0.5/255/0.26 = 0.0075 in normalised units, mean ~0.004. Pixel noise resized by
            # non-integer factors differs more at single pixels (measured 0.115 at 48x80), never on average.
            diff = (ours - ref).abs()
            assert diff.mean() < 0.006, (h, w, kind, diff.mean().item())
            assert diff.max() < (0.02 if kind == "smooth" else 0.15), (h, w, kind, diff.max().item())


def test_pickscore_is_differentiable_in_the_pixels(pickscore_dirs: tuple[Path, Path]) -> None:
    from poseloop.policy.algos.refl import refuse_non_differentiable

    model_dir, _ = pickscore_dirs
    r = P.PickScoreReward(*P.load_pickscore(model_dir, pickscore_dirs[1]))
    refuse_non_differentiable(r, "refl")  # declares itself differentiable: ReFL/DRaFT accept it
    imgs = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    r(imgs, None, ["a", "b"], _meta(2)).sum().backward()
    assert imgs.grad is not None and torch.isfinite(imgs.grad).all() and imgs.grad.abs().sum() > 0
    assert all(p.grad is None for p in r.model.parameters())  # the reward model stays frozen


def test_pickscore_missing_folders(tmp_path: Path, pickscore_dirs: tuple[Path, Path]) -> None:
    with pytest.raises(FileNotFoundError) as e:
        RS.build_reward("pickscore", models_dir=str(tmp_path))
    msg = str(e.value)
    assert "model=" in msg and str(tmp_path / "pickscore" / "PickScore_v1") in msg and "yuvalkirstain/PickScore_v1" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError) as e:
        RS.build_reward(f"pickscore:model={pickscore_dirs[0]}")  # the model folder holds no processor
    msg = str(e.value)
    assert "processor=" in msg and "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" in msg
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="model="):
        RS.build_reward(f"pickscore:model={tmp_path / 'broken'},processor={pickscore_dirs[1]}")


# ---------------------------------------------------------------------------------------------
# HPSv2


def test_hps_loads_state_dict_and_scores_cosine(hps_file: Path) -> None:
    import open_clip

    r = RS.build_reward(f"hps:weights={hps_file},arch={TINY_HPS_ARCH}")
    assert isinstance(r, P.HPSReward) and r.differentiable
    imgs = _uint8_images(3, 32, 32, seed=2)  # model-sized: the transform is only the normalisation
    prompts = ["a dancer", "a red car", "a dancer"]
    out = r(imgs, None, prompts, _meta(3))
    # Independent: a fresh model, the checkpoint's state_dict, HPSv2's diag(img_n @ txt_n.T).
    model = open_clip.create_model(TINY_HPS_ARCH, pretrained=None).eval()
    model.load_state_dict(torch.load(hps_file, weights_only=True)["state_dict"])
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        a = F.normalize(model.encode_image((imgs - mean) / std), dim=-1)
        t = F.normalize(model.encode_text(open_clip.get_tokenizer(TINY_HPS_ARCH)(prompts)), dim=-1)
    expected = torch.diagonal(a @ t.T)
    assert math_close(out, expected, 1e-5)
    scaled = RS.build_reward(f"hps:weights={hps_file},arch={TINY_HPS_ARCH},scale=100")(imgs, None, prompts, _meta(3))
    assert math_close(scaled, 100 * expected, 1e-3)
    # A model with other weights scores differently: the checkpoint was really loaded.
    torch.manual_seed(99)
    other = open_clip.create_model(TINY_HPS_ARCH, pretrained=None).eval()
    with torch.no_grad():
        assert not torch.allclose(F.normalize(other.encode_image((imgs - mean) / std), dim=-1), a, atol=1e-3)


def test_hps_preprocessing_is_resize_longest_and_black_padding() -> None:
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    # HPSv2's ResizeMaxSize(32, fill=0): longest side 80 -> 32, short side round(48 * 0.4) = 19, padded 6 above, 7 below.
    ref = TF.resize(x, [19, 32], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ref = TF.normalize(TF.pad(ref, [0, 6, 0, 7], fill=0.0), list(MEAN), list(STD))
    ours = P.resize_longest_pad(x, 32, MEAN, STD)
    assert ours.shape == (2, 3, 32, 32) and torch.allclose(ours, ref, atol=1e-4)
    # Padding is black before normalisation: the pad rows hold -mean/std.
    assert torch.allclose(ours[0, :, 0, 0], -torch.tensor(MEAN) / torch.tensor(STD), atol=1e-6)
    # A square image at the model size is untouched but for the normalisation.
    sq = torch.rand(1, 3, 32, 32)
    assert torch.allclose(P.resize_longest_pad(sq, 32, MEAN, STD), TF.normalize(sq, list(MEAN), list(STD)), atol=1e-6)


def test_hps_gradients_reach_non_square_images(hps_file: Path) -> None:
    r = RS.build_reward(f"0.5*hps:weights={hps_file},arch={TINY_HPS_ARCH}")  # inside a weighted mix
    imgs = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    r(imgs, None, ["a", "b"], _meta(2)).sum().backward()
    assert imgs.grad is not None and torch.isfinite(imgs.grad).all() and imgs.grad.abs().sum() > 0


def test_hps_errors(tmp_path: Path, hps_file: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        RS.build_reward("hps", models_dir=str(tmp_path))
    msg = str(e.value)
    assert "weights=" in msg and str(tmp_path / "hps" / "HPS_v2.1_compressed.pt") in msg and "xswu/HPSv2" in msg
    assert "\n" not in msg
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="state_dict"):
        RS.build_reward(f"hps:weights={tmp_path / 'plain.pt'},arch={TINY_HPS_ARCH}")
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(ValueError, match="junk.pt"):
        RS.build_reward(f"hps:weights={tmp_path / 'junk.pt'},arch={TINY_HPS_ARCH}")
    with pytest.raises(ValueError, match="no-such-arch"):
        RS.build_reward(f"hps:weights={hps_file},arch=no-such-arch")
    # The real architecture by default (building ViT-H-14 itself would take ~4 GB and a minute on CPU).
    assert RS._REGISTRY["hps"].options["arch"].default == "ViT-H-14"
    assert RS._typed_options(RS.parse_reward_spec(f"hps:weights={hps_file}")[0])["arch"] == "ViT-H-14"
    # A checkpoint of another architecture is refused with the mismatch, not half-loaded.
    import open_clip

    torch.save({"state_dict": open_clip.create_model("RN50", pretrained=None).visual.attnpool.state_dict()},
               tmp_path / "other.pt")  # fmt: skip
    with pytest.raises(ValueError, match=f"do not fit open_clip {TINY_HPS_ARCH}"):
        RS.build_reward(f"hps:weights={tmp_path / 'other.pt'},arch={TINY_HPS_ARCH}")


# ---------------------------------------------------------------------------------------------
# LAION aesthetic v2 against the reference (improved-aesthetic-predictor, simple_inference.py)


def test_aesthetic_matches_reference_layout_and_openai_clip(tmp_path: Path) -> None:
    import open_clip

    # The reference MLP: Linear 768-1024, Dropout .2, 1024-128, Dropout .2, 128-64, Dropout .1, 64-16, 16-1.
    mlp = R.AestheticMLP(768)
    layers = list(mlp.layers)
    assert [type(m).__name__ for m in layers] == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout",
                                                  "Linear", "Linear"]  # fmt: skip
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, torch.nn.Linear)] == [
        (768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]  # fmt: skip
    assert [m.p for m in layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]
    # The reference file's keys load (its state dict is the nn.Sequential's under "layers.").
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    head = R.load_aesthetic_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    assert not head.training  # dropout off, as the reference's eval()
    # The head was trained on OpenAI CLIP ViT-L/14, which uses QuickGELU: the default architecture says so,
    # because open_clip's plain ViT-L-14 (GELU) with the OpenAI weights gives other embeddings.
    arch = RS._REGISTRY["aesthetic"].options["clip_arch"].default
    assert arch == "ViT-L-14-quickgelu" and arch in open_clip.list_models()
    with pytest.raises(FileNotFoundError, match="ViT-L-14-quickgelu"):
        RS.build_reward(f"aesthetic:weights={tmp_path / 'sac+logos+ava1-l14-linearMSE.pth'}", models_dir=str(tmp_path))
