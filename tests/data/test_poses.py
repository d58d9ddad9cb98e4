"""Tests for poseloop.data.poses: built-in poses, rendering, keypoint files, detector loading (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poseloop.data import openpose
from poseloop.data import pose_files
from poseloop.data import poses as P
from poseloop.data.poses import BUILTIN_POSES, OPENPOSE18_NAMES, Pose

IDX = {n: i for i, n in enumerate(OPENPOSE18_NAMES)}
# controlnet_aux's body keypoint colours (RGB), indexed like OPENPOSE18_NAMES.
BODY_COLORS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip


def _xy(pose: Pose, name: str) -> tuple[float, float]:
    x, y, _ = pose.body[IDX[name]]
    return float(x), float(y)


def _write(tmp_path: Path, name: str, data: object) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return p


# ---------------------------------------------------------------------------------------------
# Built-in poses and rendering


def test_builtin_names_and_geometry() -> None:
    assert len(OPENPOSE18_NAMES) == 18
    for required in ("standing", "arms_raised", "t_pose", "hands_on_hips", "waving", "walking", "running",
                     "sitting", "kneeling", "jumping", "pointing", "arms_crossed"):  # fmt: skip
        assert required in BUILTIN_POSES
    for name, pose in BUILTIN_POSES.items():
        b = pose.body
        assert b.shape == (18, 3) and b.dtype == np.float32
        assert np.all(b[:, 2] > 0), name
        assert np.all((b[:, :2] > 0.02) & (b[:, :2] < 0.98)), name
        # Facing the camera: the person's right side is on the image's left.
        assert _xy(pose, "right_shoulder")[0] < _xy(pose, "left_shoulder")[0], name
        assert _xy(pose, "right_hip")[0] < _xy(pose, "left_hip")[0], name
        assert _xy(pose, "right_eye")[0] < _xy(pose, "left_eye")[0], name
        # Head above neck above hips.
        assert _xy(pose, "nose")[1] < _xy(pose, "neck")[1] < _xy(pose, "right_hip")[1], name
        assert pose.name == name


def test_builtin_poses_look_like_their_names() -> None:
    std, raised = BUILTIN_POSES["standing"], BUILTIN_POSES["arms_raised"]
    height = _xy(std, "right_ankle")[1] - (_xy(std, "nose")[1] - 0.07)
    assert 0.7 < height < 0.9  # fills ~80 % of the canvas height
    for w in ("right_wrist", "left_wrist"):
        assert _xy(raised, w)[1] < _xy(raised, "nose")[1]
        assert _xy(std, w)[1] > _xy(std, "right_elbow")[1]
    t = BUILTIN_POSES["t_pose"]
    for side in ("right", "left"):
        assert abs(_xy(t, f"{side}_wrist")[1] - _xy(t, f"{side}_shoulder")[1]) < 0.02
    assert _xy(t, "right_wrist")[0] < 0.25 and _xy(t, "left_wrist")[0] > 0.75
    sit = BUILTIN_POSES["sitting"]
    # Hips are much lower than when standing and the (foreshortened) thighs are short.
    assert _xy(sit, "right_hip")[1] > _xy(std, "right_hip")[1] + 0.05
    assert abs(_xy(sit, "right_knee")[1] - _xy(sit, "right_hip")[1]) < 0.08
    wave = BUILTIN_POSES["waving"]
    assert _xy(wave, "left_wrist")[1] < _xy(wave, "nose")[1] and _xy(wave, "right_wrist")[1] > _xy(wave, "neck")[1]
    point = BUILTIN_POSES["pointing"]
    assert _xy(point, "right_wrist")[0] < _xy(point, "right_elbow")[0] < _xy(point, "right_shoulder")[0]
    crossed = BUILTIN_POSES["arms_crossed"]
    assert _xy(crossed, "right_wrist")[0] > _xy(crossed, "left_wrist")[0]  # forearms cross over
    jump = BUILTIN_POSES["jumping"]
    assert max(_xy(jump, "right_ankle")[1], _xy(jump, "left_ankle")[1]) < _xy(std, "right_ankle")[1] - 0.03


@pytest.mark.parametrize("name", sorted(BUILTIN_POSES))
def test_render_builtin(name: str) -> None:
    pose = BUILTIN_POSES[name]
    w, h = 320, 256  # not square, to catch x/y mix-ups
    img = openpose.render_pose(pose, w, h)
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (w, h)
    arr = np.asarray(img)
    assert arr[:8, :8].max() == 0 and arr[-8:, -8:].max() == 0  # background stays black
    for i, (x, y, _) in enumerate(pose.body):
        px, py = int(x * w), int(y * h)
        assert arr[max(py - 2, 0):py + 3, max(px - 2, 0):px + 3].max() > 0, (name, OPENPOSE18_NAMES[i])
    # Keypoint circles in controlnet_aux's colours, RGB order (the nose is pure red).
    nx, ny = _xy(pose, "neck")
    assert tuple(arr[int(ny * h), int(nx * w)]) == BODY_COLORS[IDX["neck"]]
    ox, oy = _xy(pose, "nose")
    assert tuple(arr[int(oy * h), int(ox * w)]) == BODY_COLORS[IDX["nose"]]


def test_render_multiple_people_hands_and_face() -> None:
    left = BUILTIN_POSES["standing"]
    hand = np.zeros((21, 3), np.float32)
    hand[:, 0] = np.linspace(0.70, 0.80, 21)
    hand[:, 1] = 0.5
    hand[:, 2] = 1.0
    hand[5] = 0  # a missing point must not crash drawing
    face = np.zeros((68, 3), np.float32)
    face[:, 0] = np.linspace(0.45, 0.55, 68)
    face[:, 1] = 0.15
    face[:, 2] = 1.0
    person = Pose(body=left.body, left_hand=hand, face=face)
    with_all = np.asarray(openpose.render_pose([person], 200, 200))
    no_extras = np.asarray(openpose.render_pose([person], 200, 200, draw_hands=False, draw_face=False))
    assert with_all[100, 150].max() > 0 and no_extras[100, 150].max() == 0  # hand at x=0.75, y=0.5
    assert (with_all == 255).all(axis=2).sum() > (no_extras == 255).all(axis=2).sum()  # white face dots
    two = np.asarray(openpose.render_pose([left, left.flipped()], 100, 100))
    assert two.shape == (100, 100, 3)


def test_render_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        openpose.render_pose(BUILTIN_POSES["standing"], 0, 64)


# ---------------------------------------------------------------------------------------------
# Pose type


def test_dict_round_trip_and_json() -> None:
    pose = BUILTIN_POSES["waving"]
    hand = np.random.default_rng(0).random((21, 3)).astype(np.float32)
    pose = Pose(body=pose.body, right_hand=hand, name="x")
    d = json.loads(json.dumps(pose.to_dict()))
    back = Pose.from_dict(d)
    assert back == pose
    assert np.array_equal(back.body, pose.body) and np.array_equal(back.right_hand, hand)
    assert back.left_hand is None and back.face is None and back.name == "x"
    assert back != Pose(body=pose.body, name="x")


def test_from_dict_validates_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(18, 3\)"):
        Pose.from_dict({"body": [[0.5, 0.5, 1.0]] * 17})
    with pytest.raises(ValueError, match="left_hand"):
        Pose.from_dict({"body": [[0.5, 0.5, 1.0]] * 18, "left_hand": [[0.1, 0.1]] * 21})
    with pytest.raises(ValueError):
        Pose.from_dict({"nobody": []})


def test_flipped() -> None:
    for pose in BUILTIN_POSES.values():
        f = pose.flipped()
        assert f.flipped() == pose
        # The mirrored person's right shoulder is where the original's left shoulder was, mirrored.
        assert _xy(f, "right_shoulder")[0] == pytest.approx(1 - _xy(pose, "left_shoulder")[0], abs=1e-6)
        assert _xy(f, "right_shoulder")[1] == pytest.approx(_xy(pose, "left_shoulder")[1], abs=1e-6)
    # Symmetric poses mirror onto themselves; an asymmetric one does not.
    assert BUILTIN_POSES["standing"].flipped() == BUILTIN_POSES["standing"]
    wave = BUILTIN_POSES["waving"].flipped()
    assert wave != BUILTIN_POSES["waving"] and _xy(wave, "right_wrist")[1] < _xy(wave, "nose")[1]
    hand = np.zeros((21, 3), np.float32)
    hand[:, :] = (0.2, 0.3, 1.0)
    face = np.zeros((68, 3), np.float32)
    face[36] = (0.4, 0.2, 1.0)  # outer corner of the right eye
    p = Pose(body=BUILTIN_POSES["standing"].body, left_hand=hand, face=face)
    f = p.flipped()
    assert f.left_hand is None and f.right_hand is not None
    assert f.right_hand[0, 0] == pytest.approx(0.8)
    assert f.face is not None and f.face[45, 0] == pytest.approx(0.6) and f.face[36, 2] == 0


def test_get_builtin_pose() -> None:
    p = P.get_builtin_pose("t_pose")
    assert p == BUILTIN_POSES["t_pose"]
    p.body[0, 0] = 0.0  # a copy: editing it leaves the table alone
    assert BUILTIN_POSES["t_pose"].body[0, 0] != 0.0
    with pytest.raises(ValueError) as e:
        P.get_builtin_pose("moonwalk")
    assert "moonwalk" in str(e.value) and "standing" in str(e.value) and "arms_raised" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Keypoint files


def _openpose_person(points: list[tuple[float, float, float]]) -> dict:
    return {"pose_keypoints_2d": [v for p in points for v in p]}


def test_load_openpose_pixels(tmp_path: Path) -> None:
    pts = [(10.0 * i + 20, 5.0 * i + 40, 0.9) for i in range(18)]
    pts[16] = (0.0, 0.0, 0.0)  # OpenPose's "not found"
    person = _openpose_person(pts)
    person["hand_left_keypoints_2d"] = [100.0, 200.0, 0.5] * 21
    person["hand_right_keypoints_2d"] = []
    person["face_keypoints_2d"] = [300.0, 100.0, 0.7] * 70  # OpenPose writes 70 (68 + 2 pupils)
    f = _write(tmp_path, "op.json", {"version": 1.3, "people": [person], "canvas_width": 400, "canvas_height": 200})
    (pose,) = pose_files.load_keypoint_file(f)
    assert pose.body[0].tolist() == pytest.approx([20 / 400, 40 / 200, 0.9])
    assert pose.body[5].tolist() == pytest.approx([70 / 400, 65 / 200, 0.9])
    assert pose.body[16].tolist() == [0.0, 0.0, 0.0]
    assert pose.left_hand is not None and pose.left_hand[3].tolist() == pytest.approx([0.25, 1.0, 0.5])
    assert pose.right_hand is None
    assert pose.face is not None and pose.face.shape == (68, 3)
    assert pose.face[0].tolist() == pytest.approx([0.75, 0.5, 0.7])


def test_load_openpose_size_from_arguments_and_body25(tmp_path: Path) -> None:
    pts25 = [(float(i + 1), float(2 * i + 2), 1.0) for i in range(25)]
    f = _write(tmp_path, "b25.json", {"people": [_openpose_person(pts25)]})
    (pose,) = pose_files.load_keypoint_file(f, width=100, height=50)
    # BODY_25 index 9 (right hip) becomes OpenPose-18 index 8; mid-hip (8) is dropped.
    assert pose.body[8, :2].tolist() == pytest.approx([10 / 100, 20 / 50])
    assert pose.body[7, :2].tolist() == pytest.approx([8 / 100, 16 / 50])


def test_load_our_format_normalised(tmp_path: Path) -> None:
    body: list = [[0.5, 0.1 + 0.04 * i] for i in range(18)]
    body[3] = None
    body[4] = [0.3, 0.3, 0.0]
    body[5] = [0.6, 0.25, 0.8]
    f = _write(tmp_path, "ours.json", {"body": body, "name": "mine"})
    (pose,) = pose_files.load_keypoint_file(f)
    assert pose.name == "mine"
    assert pose.body[0].tolist() == pytest.approx([0.5, 0.1, 1.0])
    assert pose.body[3].tolist() == [0, 0, 0] and pose.body[4].tolist() == [0, 0, 0]
    assert pose.body[5].tolist() == pytest.approx([0.6, 0.25, 0.8])
    # A list of pose objects, and Pose.to_dict output, load as well.
    g = _write(tmp_path, "list.json", [BUILTIN_POSES["standing"].to_dict(), BUILTIN_POSES["sitting"].to_dict()])
    loaded = pose_files.load_keypoint_file(g)
    assert loaded == [BUILTIN_POSES["standing"], BUILTIN_POSES["sitting"]]


def test_load_our_format_pixels(tmp_path: Path) -> None:
    body = [[64.0 + i, 128.0 + 2 * i] for i in range(18)]
    f = _write(tmp_path, "px.json", {"body": body, "width": 256, "height": 512})
    (pose,) = pose_files.load_keypoint_file(f)
    assert pose.body[2].tolist() == pytest.approx([66 / 256, 132 / 512, 1.0])


@pytest.mark.parametrize(
    "fname, content, needles",
    [
        ("short.json", {"people": [_openpose_person([(1.0, 2.0, 1.0)] * 17)]},
         ["people[0].pose_keypoints_2d", "51 numbers", "expected 54"]),
        ("nosize.json", {"people": [_openpose_person([(100.0, 200.0, 1.0)] * 18)]},
         ["people[0]", "canvas_width", "canvas_height"]),
        ("empty.json", {"people": []}, ["people", "empty"]),
        ("hand.json", {"people": [dict(_openpose_person([(0.5, 0.5, 1.0)] * 18), hand_left_keypoints_2d=[0.1] * 60)]},
         ["people[0].hand_left_keypoints_2d", "60 numbers", "63"]),
        ("ours17.json", {"body": [[0.5, 0.5]] * 17}, ["body", "17 points", "expected 18"]),
        ("badpt.json", [{"body": [[0.5, 0.5]] * 17 + [[0.5, "x"]]}], ["[0].body[17]", "[x, y"]),
        ("ourspx.json", {"body": [[10.0, 20.0]] * 18}, ["width/height"]),
        ("what.json", {"keypoints": []}, ["people", "body", "keypoints"]),
        ("nobody.json", {"body": [None] * 18}, ["no visible body points"]),
    ],
)  # fmt: skip
def test_load_errors(tmp_path: Path, fname: str, content: object, needles: list[str]) -> None:
    f = _write(tmp_path, fname, content)
    with pytest.raises(ValueError) as e:
        pose_files.load_keypoint_file(f)
    msg = str(e.value)
    assert fname in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_load_malformed_json_names_line(tmp_path: Path) -> None:
    f = _write(tmp_path, "broken.json", '{\n  "people": [\n    {"pose_keypoints_2d": [1, 2,]}\n  ]\n}\n')
    with pytest.raises(ValueError, match=r"broken\.json.*line 3"):
        pose_files.load_keypoint_file(f)


# ---------------------------------------------------------------------------------------------
# controlnet_aux bridge and detector


def test_result_round_trip() -> None:
    hand = np.zeros((21, 3), np.float32)
    hand[:10] = (0.4, 0.6, 1.0)
    pose = Pose(body=BUILTIN_POSES["kneeling"].body, right_hand=hand)
    pose.body[16] = 0
    result = openpose.pose_to_result(pose)
    assert result.body.keypoints[16] is None and result.body.total_parts == 17
    assert result.right_hand is not None and len(result.right_hand) == 21 and result.left_hand is None
    assert openpose.pose_from_result(result) == pose


@pytest.fixture
def random_weights(openpose_weights: Path) -> Path:
    """OpenPose weight files with random weights (tests/conftest.py)."""
    return openpose_weights


def test_detector_with_random_weights(random_weights: Path) -> None:
    det = openpose.load_openpose_detector(random_weights)
    assert det.body_estimation is not None and det.hand_estimation is not None and det.face_estimation is not None
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))
    found = openpose.detect_poses(img, det)
    assert isinstance(found, list) and all(isinstance(p, Pose) for p in found)
    for p in found:
        assert p.body.shape == (18, 3)

    # Random weights rarely find a body, so feed a known body through the detector's own hand-box
    # logic; the hand net is stubbed (its 4-scale CPU pass takes ~30 s) to return one peak.
    from controlnet_aux.open_pose.body import Body

    std = BUILTIN_POSES["standing"].body

    class KnownBody:
        format_body_result = staticmethod(Body.format_body_result)

        def __call__(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            h, w = img.shape[:2]
            cand = np.array([[x * w, y * h, 0.9, i] for i, (x, y, _) in enumerate(std)])
            subset = np.concatenate([np.arange(18.0), [16.2, 18.0]])[None]
            return cand, subset

    def one_peak_hand(crop: np.ndarray) -> np.ndarray:
        peaks = np.zeros((21, 2), np.float32)  # (0, 0) = not found, as controlnet_aux's Hand returns
        peaks[0] = (crop.shape[1] / 2, crop.shape[0] / 2)
        return peaks

    det.body_estimation = KnownBody()
    det.hand_estimation = one_peak_hand
    det.face_estimation = None
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8))
    (p,) = openpose.detect_poses(img, det)
    assert np.allclose(p.body[:, :2], std[:, :2], atol=1e-5) and np.allclose(p.body[:, 2], 0.9)
    for hand, wrist in ((p.left_hand, "left_wrist"), (p.right_hand, "right_wrist")):
        assert hand is not None and hand.shape == (21, 3)
        assert np.all(hand[1:] == 0) and hand[0, 2] > 0  # unfound points become missing
        # The hand box is centred a little beyond the wrist, away from the elbow.
        assert abs(hand[0, 0] - _xy(BUILTIN_POSES["standing"], wrist)[0]) < 0.08
        assert hand[0, 1] > _xy(BUILTIN_POSES["standing"], wrist)[1] - 0.02
    assert p.face is None
    assert openpose.detect_poses(img, det, include_hands=False)[0].left_hand is None


def test_detect_poses_converts_coordinates() -> None:
    """detect_poses keeps the detector's scores and normalises pixel coordinates by the image size."""
    from controlnet_aux.open_pose.body import Body

    class FakeBody:
        format_body_result = staticmethod(Body.format_body_result)

        def __call__(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            assert img.shape == (100, 200, 3)
            assert tuple(img[0, 0]) == (3, 2, 1)  # BGR, as the networks expect
            candidate = np.array([[50.0, 20.0, 0.7, 0], [150.0, 80.0, 0.4, 1]])
            subset = -np.ones((1, 20))
            subset[0, 0], subset[0, 1], subset[0, 18], subset[0, 19] = 0, 1, 1.1, 2
            return candidate, subset

    class FakeDetector:
        body_estimation = FakeBody()
        hand_estimation = None
        face_estimation = None

    img = np.zeros((100, 200, 3), np.uint8)
    img[0, 0] = (1, 2, 3)
    (pose,) = openpose.detect_poses(Image.fromarray(img), FakeDetector())
    assert pose.body[0].tolist() == pytest.approx([0.25, 0.2, 0.7])
    assert pose.body[1].tolist() == pytest.approx([0.75, 0.8, 0.4])
    assert np.all(pose.body[2:] == 0)


def test_detector_missing_files(tmp_path: Path, random_weights: Path) -> None:
    with pytest.raises(FileNotFoundError) as e:
        openpose.load_openpose_detector(tmp_path / "nowhere")
    for f in ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth", "lllyasviel/Annotators"):
        assert f in str(e.value)
    (tmp_path / "body_pose_model.pth").write_bytes((random_weights / "body_pose_model.pth").read_bytes())
    with pytest.raises(FileNotFoundError) as e:
        openpose.load_openpose_detector(tmp_path)
    assert "hand_pose_model.pth" in str(e.value) and "facenet.pth" in str(e.value)
    assert "body_pose_model.pth" not in str(e.value).split("huggingface-cli")[0]


def test_detector_corrupt_file_named(tmp_path: Path) -> None:
    for f in openpose.WEIGHT_FILES:
        (tmp_path / f).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="body_pose_model.pth"):
        openpose.load_openpose_detector(tmp_path)


def test_modules_import_without_controlnet_aux() -> None:
    import subprocess
    import sys

    code = ("import poseloop.data.poses, poseloop.data.pose_files, poseloop.data.openpose, sys; "
            "assert 'controlnet_aux' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
