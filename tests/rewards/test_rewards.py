"""Tests for poseloop.rewards.builtin: every built-in reward on tiny random models loaded through the real code paths."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from poseloop.rewards import spec as RS
from poseloop.rewards import builtin as R
from poseloop.data.poses import BUILTIN_POSES, OPENPOSE18_NAMES, Pose
from poseloop.config.reward import RewardModelConfig

TINY_CLIP = "poseloop-test-tiny-clip"


def _meta(n: int, poses: list[list[Pose]] | None = None) -> list[dict]:
    return [
        {"keypoints": None if poses is None else [p.to_dict() for p in poses[i]], "width": 64, "height": 64,
         "source_image": None, "group_id": 100 + i}
        for i in range(n)
    ]  # fmt: skip


def _rand_images(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Fixtures: tiny random models saved to files, so the real loading code runs


@pytest.fixture
def openpose_dir(openpose_weights: Path) -> Path:
    """OpenPose weight files with random weights (tests/conftest.py)."""
    return openpose_weights


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registered tiny open_clip config (embed 16, 32 px) and its random weights saved as a file."""
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    torch.save(model.state_dict(), d / "tiny_clip.bin")
    return d / "tiny_clip.bin"


# ---------------------------------------------------------------------------------------------
# Registry, spec grammar


def test_available_rewards_and_protocol() -> None:
    names = RS.available_rewards()
    assert set(names) == {"brightness", "warmth", "prompt_attributes", "jpeg_compressibility", "jpeg_incompressibility",
                          "pose_accuracy", "text_alignment", "aesthetic", "latent", "pickscore", "hps",
                          "image_reward"}  # fmt: skip
    assert all(isinstance(h, str) and h and "\n" not in h for h in names.values())
    assert all("SYNTHETIC" in names[n] for n in ("brightness", "warmth", "prompt_attributes"))
    for spec in ("brightness", "jpeg_compressibility", "jpeg_incompressibility", "brightness*2", "prompt_attributes"):
        assert isinstance(RS.build_reward(spec), R.Reward)


def test_parse_good_specs() -> None:
    T = RS.RewardTerm
    assert RS.parse_reward_spec("brightness") == [T("brightness", {}, None)]
    assert RS.parse_reward_spec("pose_accuracy:weights=/a/annotators*0.5 + text_alignment*0.5") == [
        T("pose_accuracy", {"weights": "/a/annotators"}, 0.5), T("text_alignment", {}, 0.5)]  # fmt: skip
    assert RS.parse_reward_spec("0.25*jpeg_compressibility:quality=80+ 2 * brightness") == [
        T("jpeg_compressibility", {"quality": "80"}, 0.25), T("brightness", {}, 2.0)]  # fmt: skip
    # '+' inside a file name is not a separator (the LAION file is sac+logos+ava1-l14-linearMSE.pth) ...
    assert RS.parse_reward_spec("aesthetic:weights=m/sac+logos+ava1-l14-linearMSE.pth,clip_arch=ViT-L-14+brightness*-1") == [
        T("aesthetic", {"weights": "m/sac+logos+ava1-l14-linearMSE.pth", "clip_arch": "ViT-L-14"}, None),
        T("brightness", {}, -1.0)]  # fmt: skip
    # ... and quotes protect commas and '+name' look-alikes.
    assert RS.parse_reward_spec("text_alignment:weights='/x,y/+brightness.bin',arch=ViT-B-32,scale=100") == [
        T("text_alignment", {"weights": "/x,y/+brightness.bin", "arch": "ViT-B-32", "scale": "100"}, None)]  # fmt: skip
    assert RS.parse_reward_spec("latent:latest") == [T("latent", {"version": "latest"}, None)]
    assert RS.parse_reward_spec("latent:models/reward/v3") == [T("latent", {"version": "models/reward/v3"}, None)]
    assert RS.parse_reward_spec("latent:version=v=2") == [T("latent", {"version": "v=2"}, None)]
    assert RS.parse_reward_spec("1e-1*latent") == [T("latent", {}, 0.1)]


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("", ["empty", "brightness"]),
        ("   ", ["empty"]),
        ("brightness:foo=1", ["brightness", "no option 'foo'", "none"]),
        ("jpeg_compressibility:quality=high", ["quality", "'high'", "int"]),
        ("jpeg_compressibility:quality=1,quality=2", ["twice"]),
        ("jpeg_compressibility:95", ["not key=value", "quality"]),
        ("2*brightness*3", ["two weights"]),
        ("brightness*abc", ["cannot parse"]),
        ("brightness +", ["cannot parse"]),
        ("brightness + + jpeg_compressibility", ["empty term"]),
        ("brightness+sharpness", ["cannot parse", "jpeg_compressibility"]),
        ("text_alignment:weights='abc", ["unbalanced"]),
        ("text_alignment:scale=x", ["scale", "float"]),
    ],
)  # fmt: skip
def test_parse_bad_specs(spec: str, needles: list[str]) -> None:
    with pytest.raises(ValueError) as e:
        RS.build_reward(spec)
    for n in needles:
        assert n in str(e.value), (n, str(e.value))


@pytest.mark.parametrize("spec", ["sharpness", "brightness + clip_score*2", "Pose_Accuracy"])
def test_unknown_name_lists_available(spec: str) -> None:
    with pytest.raises(ValueError) as e:
        RS.build_reward(spec)
    msg = str(e.value)
    assert "unknown reward" in msg
    for name in RS.available_rewards():
        assert name in msg


def test_import_is_light() -> None:
    code = ("import sys, poseloop.rewards.builtin, poseloop.rewards.spec; bad = [m for m in ('open_clip', 'controlnet_aux', 'lpips') if m in sys.modules];"
            " assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# Brightness, JPEG, weighted mixes


def test_brightness() -> None:
    imgs = torch.stack([torch.full((3, 8, 8), 0.2), torch.full((3, 8, 8), 0.9), _rand_images(1, 8)[0]])
    r = RS.build_reward("brightness")
    out = r(imgs, None, ["a"] * 3, _meta(3))
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out.tolist() == pytest.approx([0.2, 0.9, imgs[2].mean().item()])
    assert r.needs_images and r.name == "brightness"
    with pytest.raises(ValueError, match="needs decoded images"):
        r(None, torch.zeros(3, 4, 1, 1), ["a"] * 3, _meta(3))
    with pytest.raises(ValueError, match="metadata"):
        r(imgs, None, ["a"] * 3, _meta(2))


def test_warmth_is_red_minus_blue_as_the_world_measures_it() -> None:
    from poseloop.world.render import warmth

    warm = torch.tensor([0.9, 0.5, 0.3]).view(3, 1, 1).expand(3, 8, 8)
    imgs = torch.stack([warm, warm.flip(0), _rand_images(1, 8)[0]])
    r = RS.build_reward("warmth")
    out = r(imgs, None, ["a"] * 3, _meta(3))
    assert out.dtype == torch.float32 and out.shape == (3,) and r.needs_images and r.name == "warmth"
    assert out[:2].tolist() == pytest.approx([0.6, -0.6], abs=1e-6)
    # The scripted rater's taste (world.warmth on the saved uint8 PNG) agrees up to the uint8 rounding:
    # half a level in red and in blue each, so 1/255 in their difference (plus float32 fuzz).
    as_png = (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert out.tolist() == pytest.approx(warmth(as_png).tolist(), abs=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match="needs decoded images"):
        r(None, torch.zeros(3, 4, 1, 1), ["a"] * 3, _meta(3))


def _jpeg_kb(img: torch.Tensor, quality: int = 95) -> float:
    arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000


def test_jpeg_flat_more_compressible_than_noise() -> None:
    imgs = torch.cat([torch.full((1, 3, 64, 64), 0.5), _rand_images(1)])
    comp = RS.build_reward("jpeg_compressibility")(imgs, None, ["a", "b"], _meta(2))
    incomp = RS.build_reward("jpeg_incompressibility")(imgs, None, ["a", "b"], _meta(2))
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    assert comp.tolist() == pytest.approx([-_jpeg_kb(imgs[0]), -_jpeg_kb(imgs[1])], rel=1e-6)
    assert incomp.tolist() == pytest.approx((-comp).tolist())
    q10 = RS.build_reward("jpeg_incompressibility:quality=10")(imgs, None, ["a", "b"], _meta(2))
    assert q10[1].item() == pytest.approx(_jpeg_kb(imgs[1], 10)) and q10[1] < incomp[1]
    with pytest.raises(ValueError, match="1..100"):
        RS.build_reward("jpeg_compressibility:quality=0")


def test_weighted_mix_is_weighted_sum() -> None:
    imgs = torch.cat([torch.full((1, 3, 32, 32), 0.1), _rand_images(2, 32)])
    meta, prompts = _meta(3), ["a", "b", "c"]
    mix = RS.build_reward("brightness*0.3 + 2*jpeg_compressibility + jpeg_incompressibility:quality=50")
    assert isinstance(mix, R.WeightedReward) and mix.needs_images
    assert mix.name == "0.3*brightness + 2*jpeg_compressibility + 1*jpeg_incompressibility"
    total = mix(imgs, None, prompts, meta)
    b = R.BrightnessReward()(imgs, None, prompts, meta)
    j = R.JpegCompressibilityReward()(imgs, None, prompts, meta)
    ji = R.JpegCompressibilityReward(True, 50)(imgs, None, prompts, meta)
    assert total.shape == (3,) and total.tolist() == pytest.approx((0.3 * b + 2 * j + ji).tolist(), rel=1e-6)
    assert set(mix.last_components) == {"brightness", "jpeg_compressibility", "jpeg_incompressibility"}
    assert torch.equal(mix.last_components["brightness"], b)  # unweighted member values, for logging
    assert mix.weights == {"brightness": 0.3, "jpeg_compressibility": 2.0, "jpeg_incompressibility": 1.0}
    # Same reward twice: distinct log keys.
    dup = RS.build_reward("brightness + brightness*-2")
    assert dup(imgs, None, prompts, meta).tolist() == pytest.approx((-b).tolist())
    assert list(dup.last_components) == ["brightness", "brightness#2"]


# ---------------------------------------------------------------------------------------------
# Learned latent reward


class _FakeRewardModel:
    def __init__(self) -> None:
        self.device = "cpu"

    def score(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.flatten(1).sum(1)

    def to(self, device: str) -> "_FakeRewardModel":
        self.device = device
        return self


def test_latent_reward_injected_model() -> None:
    lat = torch.arange(2 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 4, 2, 2)
    r = R.LatentReward(model=_FakeRewardModel())
    assert r.needs_images is False and isinstance(r, R.Reward)
    assert r(None, lat, ["a", "b"], _meta(2)).tolist() == [lat[0].sum().item(), lat[1].sum().item()]
    with pytest.raises(ValueError, match="latents is None"):
        r(None, None, ["a", "b"], _meta(2))
    mix = R.WeightedReward([(r, 0.5)])
    assert mix.needs_images is False  # the trainer may skip decoding
    assert mix(None, lat, ["a", "b"], _meta(2)).tolist() == pytest.approx([0.5 * lat[0].sum().item(), 0.5 * lat[1].sum().item()])


def test_latent_reward_built_through_reward_model_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_reward_model(spec: str, models_dir: str = "models", device: str = "cpu") -> _FakeRewardModel:
        calls.append((spec, models_dir))
        return _FakeRewardModel()

    # Stand-ins: the lazy import inside LatentReward must find load_reward_model in poseloop.rewards.loading;
    # the latent entry asks the folder's kind first (a clip-kind folder builds ClipHeadReward).
    monkeypatch.setitem(sys.modules, "poseloop.rewards.loading", types.SimpleNamespace(load_reward_model=load_reward_model))
    monkeypatch.setattr("poseloop.rewards.versions.reward_model_kind", lambda *a, **k: "latent")
    r = RS.build_reward("latent:models/reward/v3", models_dir="/m")
    assert calls == [("models/reward/v3", "/m")] and r.name == "latent"
    RS.build_reward("latent")
    assert calls[-1] == ("latest", "models")
    assert r(None, torch.ones(1, 4, 2, 2), ["p"], _meta(1)).tolist() == [16.0]


def test_latent_reward_real_saved_model(tmp_path: Path) -> None:
    """End to end with poseloop.rewards.model: a saved ensemble, found via 'latest' and by version name."""
    from poseloop.rewards import model as RM
    from poseloop.rewards.versions import save_reward_model, write_latest

    torch.manual_seed(0)
    model = RM.LatentRewardModel(RewardModelConfig(), (4, 8, 8), ensemble_size=2, version="v1").eval()
    save_reward_model(model, tmp_path / "reward" / "v1")
    write_latest(tmp_path, "v1")
    lat = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.score(lat)
    for spec in ("latent:latest", "latent", "latent:v1", f"latent:{tmp_path / 'reward' / 'v1'}"):
        r = RS.build_reward(spec, models_dir=str(tmp_path))
        assert isinstance(r, R.LatentReward) and r.needs_images is False
        with torch.no_grad():
            out = r(None, lat, ["a", "b", "c"], _meta(3))
        assert out.shape == (3,) and torch.allclose(out, expected, atol=1e-6), spec
    # Differentiable in the latents (the model itself is frozen).
    g = lat.clone().requires_grad_(True)
    r(None, g, ["a", "b", "c"], _meta(3)).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    with pytest.raises(FileNotFoundError, match="v9"):
        RS.build_reward("latent:v9", models_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Pose accuracy


def _detection(poses: list[Pose], w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """controlnet_aux Body output (candidate, subset) that reports ``poses`` in a w x h image."""
    cand, subset = [], []
    for p in poses:
        row = -np.ones(20)
        for k, (x, y, c) in enumerate(p.body):
            if c > 0:
                row[k] = len(cand)
                cand.append([x * w, y * h, 0.9, len(cand)])
        row[18], row[19] = 10.0, float((row[:18] >= 0).sum())
        subset.append(row)
    return np.array(cand).reshape(-1, 4), np.array(subset).reshape(-1, 20)


class _ScriptedDetector:
    """A detector whose body net 'finds' a scripted list of people per call, in order."""

    def __init__(self, script: list[list[Pose]]) -> None:
        from controlnet_aux.open_pose.body import Body

        outer = self

        class _Body:
            format_body_result = staticmethod(Body.format_body_result)

            def __call__(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
                return _detection(outer.script.pop(0), img.shape[1], img.shape[0])

        self.script = list(script)
        self.body_estimation = _Body()
        self.hand_estimation = None
        self.face_estimation = None


def test_pose_accuracy_real_loader_random_weights(openpose_dir: Path) -> None:
    r = RS.build_reward(f"pose_accuracy:weights={openpose_dir}")
    assert isinstance(r, R.PoseAccuracyReward) and r.needs_images
    # One image only: the body net always works at 184 px height whatever the input size (~3 s on CPU).
    gt = [[BUILTIN_POSES["t_pose"], BUILTIN_POSES["sitting"]]]
    out = r(_rand_images(1), None, ["a"], _meta(1, gt))
    # Random weights find nobody (or junk): the value must still be a finite OKS value in 0..1.
    assert out.shape == (1,) and out.dtype == torch.float32
    assert torch.all(torch.isfinite(out)) and torch.all((out >= 0) & (out <= 1))
    assert len(r.last_detections) == 1


def test_pose_accuracy_scores_with_known_detections() -> None:
    std, tp = BUILTIN_POSES["standing"], BUILTIN_POSES["t_pose"]
    nose = OPENPOSE18_NAMES.index("nose")
    moved = Pose.from_dict(std.to_dict())
    moved.body[nose, 0] += 4 / 64  # the nose 4 px to the right in a 64 px image
    xs, ys = std.body[[i for i in range(18) if i != 1], 0] * 64, std.body[[i for i in range(18) if i != 1], 1] * 64
    area = float((xs.max() - xs.min()) * (ys.max() - ys.min()))
    # Expected by hand: 16 of 17 points exact, the nose at d = 4 px with sigma 0.026.
    expected_moved = (16 + math.exp(-(4**2) / (2 * area * (2 * 0.026) ** 2))) / 17
    script = [[std], [], [moved, tp], [tp]]
    gts = [[std], [std], [std], [std, tp]]
    r = R.PoseAccuracyReward(detector=_ScriptedDetector(script))
    out = r(_rand_images(4), None, ["p"] * 4, _meta(4, gts))
    # exact -> 1; nobody -> 0; the moved person is matched despite the decoy; 1 of 2 people found -> 0.5.
    assert out.tolist() == pytest.approx([1.0, 0.0, expected_moved, 0.5], abs=1e-5)
    assert 0.9 < expected_moved < 1.0
    assert [len(d) for d in r.last_detections] == [1, 0, 2, 1]


def test_pose_accuracy_requires_ground_truth() -> None:
    r = R.PoseAccuracyReward(detector=_ScriptedDetector([[]] * 3))
    meta = _meta(3, [[BUILTIN_POSES["standing"]]] * 3)
    meta[1]["keypoints"] = None
    with pytest.raises(ValueError, match=r"sample 1 \(group_id=101\) has no ground-truth keypoints"):
        r(_rand_images(3), None, ["p"] * 3, meta)
    # Group.keypoints_json (a JSON string) is accepted as is.
    meta[1]["keypoints"] = json.dumps([BUILTIN_POSES["standing"].to_dict()])
    assert r(_rand_images(3), None, ["p"] * 3, meta).tolist() == [0.0, 0.0, 0.0]


def test_pose_accuracy_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        RS.build_reward("pose_accuracy", models_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "annotators") in msg and "body_pose_model.pth" in msg and "lllyasviel/Annotators" in msg


# ---------------------------------------------------------------------------------------------
# CLIP: text alignment and aesthetic


def _tiny_clip_model(path: Path) -> torch.nn.Module:
    import open_clip

    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def _normalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)  # OpenAI CLIP statistics
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    return (images - mean) / std


def test_clip_preprocess_matches_torchvision() -> None:
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(2, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    ref = TF.normalize(
        TF.center_crop(TF.resize(x, 32, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [32, 32]), mean, std
    )
    assert torch.allclose(R.clip_preprocess(x, 32, mean, std), ref, atol=1e-4)


def test_text_alignment_is_hand_cosine_and_differentiable(tiny_clip: Path) -> None:
    import open_clip

    r = RS.build_reward(f"text_alignment:arch={TINY_CLIP},weights={tiny_clip}")
    assert isinstance(r, R.TextAlignmentReward)
    imgs = _rand_images(3, 32)  # already CLIP-sized: preprocessing is just the normalisation
    prompts = ["a dancer", "a red car", "a dancer"]
    out = r(imgs, None, prompts, _meta(3))
    model = _tiny_clip_model(tiny_clip)
    with torch.no_grad():
        a = model.encode_image(_normalised(imgs))
        t = model.encode_text(open_clip.get_tokenizer(TINY_CLIP)(prompts))
    expected = (a * t).sum(1) / (a.norm(dim=1) * t.norm(dim=1))
    assert out.shape == (3,) and torch.allclose(out, expected, atol=1e-5)
    # The text embedding of the same prompt equals itself, so cosine(t, t) = 1 is the top score.
    assert r.clip.text_features(["a dancer"])[0] @ r.clip.text_features(["a dancer"])[0] > 0
    assert torch.allclose(RS.build_reward(f"text_alignment:arch={TINY_CLIP},weights={tiny_clip},scale=100")(
        imgs, None, prompts, _meta(3)), 100 * expected, atol=1e-3)  # fmt: skip
    # Differentiable w.r.t. the pixels (for ReFL), with larger, non-square images through the resize.
    big = _rand_images(2, 48).requires_grad_(True)
    r(big, None, prompts[:2], _meta(2)).sum().backward()
    assert big.grad is not None and torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0


def test_clip_missing_and_bad_weights(tmp_path: Path, tiny_clip: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        RS.build_reward("text_alignment", models_dir=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "open_clip" / "ViT-L-14" / "open_clip_pytorch_model.bin") in msg
    assert "laion/CLIP-ViT-L-14-laion2B-s32B-b82K" in msg
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.bin"):
        RS.build_reward(f"text_alignment:arch={TINY_CLIP},weights={bad}")
    with pytest.raises(ValueError, match="no-such-arch"):
        RS.build_reward(f"text_alignment:arch=no-such-arch,weights={tiny_clip}")


def test_aesthetic_mlp_and_linear(tmp_path: Path, tiny_clip: Path) -> None:
    torch.manual_seed(5)
    mlp = R.AestheticMLP(16)
    sd = mlp.state_dict()
    assert sorted(k for k in sd if k.endswith("weight")) == [f"layers.{i}.weight" for i in (0, 2, 4, 6, 7)]
    torch.save(sd, tmp_path / "head.pth")
    r = RS.build_reward(f"aesthetic:weights={tmp_path / 'head.pth'},clip_arch={TINY_CLIP},clip_weights={tiny_clip}")
    imgs = _rand_images(2, 32)
    out = r(imgs, None, ["a", "b"], _meta(2))
    with torch.no_grad():
        x = _tiny_clip_model(tiny_clip).encode_image(_normalised(imgs))
        x = x / x.norm(dim=1, keepdim=True)  # L2-normalised, as improved-aesthetic-predictor does
        for i in (0, 2, 4, 6, 7):  # dropouts are identity at inference
            x = F.linear(x, sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"])
    assert out.shape == (2,) and torch.allclose(out, x[:, 0], atol=1e-5)
    # A linear probe head (weight [1, D]) loads too.
    torch.save({"weight": torch.ones(1, 16), "bias": torch.tensor([2.0])}, tmp_path / "lin.pth")
    head = R.load_aesthetic_head(tmp_path / "lin.pth")
    assert isinstance(head, torch.nn.Linear) and head(torch.ones(1, 16)).item() == 18.0
    # A head for another embedding width is refused with both widths named.
    torch.save(R.AestheticMLP(768).state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="768.*16"):
        RS.build_reward(f"aesthetic:weights={tmp_path / 'l14.pth'},clip_arch={TINY_CLIP},clip_weights={tiny_clip}")
    torch.save({"foo": torch.ones(2)}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="odd.pth"):
        R.load_aesthetic_head(tmp_path / "odd.pth")


def test_aesthetic_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        RS.build_reward("aesthetic", models_dir=str(tmp_path))
    msg = str(e.value)
    assert "sac+logos+ava1-l14-linearMSE.pth" in msg and "christophschuhmann/improved-aesthetic-predictor" in msg
    # The '+' in an explicit path is kept by the parser and the file is named.
    with pytest.raises(FileNotFoundError, match=r"x/sac\+logos\+ava1-l14-linearMSE\.pth"):
        RS.build_reward(f"aesthetic:weights={tmp_path}/x/sac+logos+ava1-l14-linearMSE.pth")


def test_pose_plus_text_mix(tiny_clip: Path) -> None:
    """The pose-ControlNet recipe: pose accuracy + text alignment, with per-member values kept."""
    text = RS.build_reward(f"text_alignment:arch={TINY_CLIP},weights={tiny_clip}")
    std = BUILTIN_POSES["standing"]
    pose = R.PoseAccuracyReward(detector=_ScriptedDetector([[std], []]))
    mix = R.WeightedReward([(pose, 0.5), (text, 0.5)])
    imgs = _rand_images(2, 32)
    out = mix(imgs, None, ["a", "b"], _meta(2, [[std], [std]]))
    t = text(imgs, None, ["a", "b"], _meta(2))
    assert out.tolist() == pytest.approx((0.5 * torch.tensor([1.0, 0.0]) + 0.5 * t).tolist(), abs=1e-6)
    assert mix.last_components["pose_accuracy"].tolist() == [1.0, 0.0]

