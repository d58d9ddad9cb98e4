"""Tests for poseloop.metrics.scores: OKS against hand-computed values, the OpenPose->COCO mapping, matching, LPIPS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from poseloop.metrics import scores as M
from poseloop.data.poses import BUILTIN_POSES, OPENPOSE18_NAMES, Pose


def _pose(points: dict[str, tuple[float, float]]) -> Pose:
    body = np.zeros((18, 3), np.float32)
    for name, (x, y) in points.items():
        body[OPENPOSE18_NAMES.index(name)] = (x, y, 1.0)
    return Pose(body=body)


def test_openpose_to_coco_named_points() -> None:
    # Every OpenPose point gets a distinct x, so the COCO row can be traced back by name.
    body = np.zeros((18, 3), np.float32)
    for i in range(18):
        body[i] = (i / 100.0, 0.5, 1.0)
    coco = M.openpose_to_coco(body)
    assert coco.shape == (17, 3)
    for ci, cname in enumerate(M.COCO17_NAMES):
        assert coco[ci, 0] == pytest.approx(OPENPOSE18_NAMES.index(cname) / 100.0), cname
    # Spot checks spelled out: COCO 1 is the LEFT eye (OpenPose 15), COCO 6 the right shoulder (OpenPose 2).
    assert coco[1, 0] == pytest.approx(0.15) and coco[6, 0] == pytest.approx(0.02)
    assert coco[16, 0] == pytest.approx(0.10)  # right ankle
    assert 1 not in M.OPENPOSE18_TO_COCO17  # the neck is dropped
    assert sorted(M.OPENPOSE18_TO_COCO17) == [i for i in range(18) if i != 1]
    with pytest.raises(ValueError):
        M.openpose_to_coco(np.zeros((17, 3)))


def test_oks_hand_computed() -> None:
    # 100 x 200 px canvas; three visible GT points (the neck is visible too but is not a COCO point).
    gt = _pose({"nose": (0.4, 0.1), "left_shoulder": (0.2, 0.2), "right_hip": (0.6, 0.7), "neck": (0.9, 0.9)})
    # Nose 3 px to the right, left shoulder 4 px down, right hip exact; the neck is far off (ignored);
    # an extra point the GT lacks (left knee) is ignored too.
    pred = _pose({"nose": (0.43, 0.1), "left_shoulder": (0.2, 0.22), "right_hip": (0.6, 0.7), "neck": (0.1, 0.1),
                  "left_knee": (0.5, 0.5)})  # fmt: skip
    # GT pixels: nose (40, 20), L-sh (20, 40), R-hip (60, 140) -> bbox 40 x 120 = 4800 px^2.
    area = 40 * 120
    e_nose = 3**2 / (2 * area * (2 * 0.026) ** 2)  # sigma(nose) = 0.026
    e_lsh = 4**2 / (2 * area * (2 * 0.079) ** 2)  # sigma(shoulder) = 0.079
    expected = (math.exp(-e_nose) + math.exp(-e_lsh) + 1.0) / 3
    # By hand: e_nose = 9 / 25.958 = 0.3467 -> 0.7070; e_lsh = 16 / 239.65 = 0.0668 -> 0.9354; (0.7070 + 0.9354 + 1) / 3
    assert expected == pytest.approx(0.8808, abs=1e-4)
    assert M.keypoint_bbox_area(gt, 100, 200) == pytest.approx(area)
    assert M.oks(gt, pred, width=100, height=200) == pytest.approx(expected, rel=1e-5)
    # An explicit area replaces the bbox default.
    e2 = (3**2 / (2 * 1000 * (2 * 0.026) ** 2), 4**2 / (2 * 1000 * (2 * 0.079) ** 2))
    assert M.oks(gt, pred, 1000.0, width=100, height=200) == pytest.approx(
        (math.exp(-e2[0]) + math.exp(-e2[1]) + 1) / 3, rel=1e-5
    )
    # A GT point the prediction misses scores 0.
    pred.body[OPENPOSE18_NAMES.index("right_hip")] = 0
    assert M.oks(gt, pred, width=100, height=200) == pytest.approx((math.exp(-e_nose) + math.exp(-e_lsh)) / 3, rel=1e-5)


def test_oks_identical_is_one_and_scale_invariant() -> None:
    for pose in BUILTIN_POSES.values():
        assert M.oks(pose, pose, width=512, height=512) == pytest.approx(1.0)
    a, b = BUILTIN_POSES["standing"], BUILTIN_POSES["walking"]
    v = M.oks(a, b, width=64, height=64)
    assert 0 < v < 1
    # With the default (bbox) area a common scale of the canvas cancels out.
    assert M.oks(a, b, width=640, height=640) == pytest.approx(v)
    with pytest.raises(ValueError, match="visible"):
        M.oks(_pose({"neck": (0.5, 0.5)}), a)


def test_matching_greedy_multi_person() -> None:
    a, b = BUILTIN_POSES["standing"], BUILTIN_POSES["t_pose"]

    def shifted(p: Pose, dx: float) -> Pose:
        q = Pose.from_dict(p.to_dict())
        q.body[q.body[:, 2] > 0, 0] += dx
        return q

    a2, b2 = shifted(a, 0.3), shifted(b, -0.3)
    # Predictions listed in the other order; the matching must pair by OKS, not by index.
    preds = [b2, a2]
    m = M.oks_matrix([a2, b2], preds, width=100, height=100)
    assert m.shape == (2, 2) and m[0, 1] == pytest.approx(1.0) and m[1, 0] == pytest.approx(1.0)
    assert M.match_poses([a2, b2], preds) == [(0, 1, pytest.approx(1.0)), (1, 0, pytest.approx(1.0))]
    assert M.multi_person_oks([a2, b2], preds) == pytest.approx(1.0)
    # One detection for two people: one GT matched (OKS 1), the other scores 0 -> mean 0.5.
    assert M.multi_person_oks([a2, b2], [a2]) == pytest.approx(0.5)
    assert M.match_poses([a2, b2], [a2])[1] == (1, None, 0.0)
    assert M.multi_person_oks([a2], []) == 0.0
    with pytest.raises(ValueError):
        M.multi_person_oks([], [a2])


def test_clip_score_is_scaled_cosine() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    assert M.clip_score(x, y).tolist() == pytest.approx([1.0, 1 / math.sqrt(2)])
    assert M.clip_score(x, y, scale=100).tolist() == pytest.approx([100.0, 100 / math.sqrt(2)])


def test_lpips_identical_zero_different_positive() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 32, 32, generator=g)
    b = torch.rand(2, 3, 32, 32, generator=g)
    with pytest.warns(UserWarning, match="RANDOM backbone"):
        d_same = M.lpips_distance(a, a.clone())
    d_diff = M.lpips_distance(a, b)
    assert d_same.shape == (2,) and torch.all(d_same.abs() < 1e-7)
    assert torch.all(d_diff > 1e-4)
    with pytest.raises(ValueError):
        M.lpips_distance(a, b[:1])


def test_lpips_backbone_weights(tmp_path) -> None:
    import torchvision

    with pytest.raises(FileNotFoundError, match="alexnet-owt"):
        M.lpips_distance(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), lpips_weights=tmp_path / "no.pth")
    # A torchvision-format AlexNet state dict (as alexnet-owt-*.pth) must be mapped into LPIPS' slices.
    torch.manual_seed(1)
    tv = torchvision.models.alexnet(weights=None)
    torch.save(tv.state_dict(), tmp_path / "alex.pth")
    model = M._lpips_model("alex", tmp_path / "alex.pth", "cpu")
    assert torch.equal(getattr(model.net.slice2, "3").weight, tv.features[3].weight)
    assert torch.equal(getattr(model.net.slice5, "10").bias, tv.features[10].bias)
