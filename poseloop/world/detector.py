"""The embedded world's keypoint detector: a small heatmap CNN that finds OpenPose-18 body points.

It lets pose_accuracy (OKS) and evaluate.py run offline on the embedded model, where OpenPose's
own weights are not available. Trained by poseloop.world.training (no training code here), shipped
inside the embedded model folder as ``pose_detector/`` (config.json + model.safetensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from poseloop.data.poses import BODY_POINTS, Pose

DETECTOR_FOLDER = "pose_detector"
WEIGHTS_FILE = "model.safetensors"


def _block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class KeypointNet(nn.Module):
    """U-shaped CNN: [B, 3, S, S] images in -1..1 -> [B, 18, S/2, S/2] heatmap logits."""

    def __init__(self, width: int = 32, points: int = BODY_POINTS, size: int = 64) -> None:
        super().__init__()
        self.config = {"width": width, "points": points, "size": size}
        w = width
        self.stem = nn.Sequential(_block(3, w // 2), _block(w // 2, w, stride=2), _block(w, w))  # S/2
        self.down = nn.Sequential(_block(w, 2 * w, stride=2), _block(2 * w, 2 * w),
                                  _block(2 * w, 2 * w, dilation=2), _block(2 * w, 2 * w, dilation=4))  # S/4
        self.up = nn.Sequential(_block(3 * w, w + w // 2), _block(w + w // 2, w + w // 2))
        self.head = nn.Conv2d(w + w // 2, points, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Heatmap logits at half the input resolution."""
        skip = self.stem(x)
        deep = F.interpolate(self.down(skip), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.up(torch.cat([skip, deep], dim=1)))


def soft_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected (x, y) in 0..1 of each heatmap's softmax and its peak probability: [B, K, h, w] -> [B, K, 2], [B, K]."""
    b, k, h, w = logits.shape
    prob = logits.flatten(2).softmax(-1).view(b, k, h, w)
    # Pixel centres: cell i covers [i, i+1) / w.
    xs = (torch.arange(w, dtype=prob.dtype, device=prob.device) + 0.5) / w
    ys = (torch.arange(h, dtype=prob.dtype, device=prob.device) + 0.5) / h
    x = (prob.sum(2) * xs).sum(-1)
    y = (prob.sum(3) * ys).sum(-1)
    return torch.stack([x, y], dim=-1), prob.flatten(2).amax(-1)


def images_to_input(images: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """uint8 [B, H, W, 3] arrays or float [B, 3, H, W] tensors in 0..1 -> [B, 3, size, size] in -1..1."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    x = images.float()
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x * 2.0 - 1.0


class WorldPoseDetector:
    """Detects the one person of an embedded-world image; the interface PoseAccuracyReward calls."""

    def __init__(self, net: KeypointNet) -> None:
        self.net = net.eval()
        self.size = int(net.config["size"])

    @torch.no_grad()
    def keypoints(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """[B, 18, 3] normalised (x, y, peak probability) for uint8 HWC arrays or 0..1 BCHW tensors."""
        x = images_to_input(images, self.size).to(next(self.net.parameters()).device)
        xy, peak = soft_argmax(self.net(x).float())
        return torch.cat([xy, peak[..., None]], dim=-1).cpu().numpy()

    def detect(self, images: torch.Tensor | np.ndarray) -> list[list[Pose]]:
        """One list of Poses per image (always one person: the world has exactly one)."""
        out = []
        for kp in self.keypoints(images):
            kp = kp.copy()
            # OKS counts a point with confidence 0 as missing; every world image shows all 18.
            kp[:, 2] = np.maximum(kp[:, 2], 1e-3)
            out.append([Pose(body=kp, name="detected")])
        return out


def save_detector(net: KeypointNet, folder: Path, metrics: dict | None = None) -> None:
    """Write config.json and model.safetensors (fp16) into folder."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in net.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / "config.json").write_text(json.dumps({**net.config, "metrics": metrics or {}}, indent=2))


def is_detector_folder(folder: str | Path) -> bool:
    """Whether folder holds a world detector (rather than OpenPose's .pth files)."""
    return (Path(folder) / WEIGHTS_FILE).is_file() and (Path(folder) / "config.json").is_file()


def load_detector(folder: str | Path, device: str = "cpu") -> WorldPoseDetector:
    """Load a detector saved by save_detector; FileNotFoundError names the missing file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("config.json", WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing; the embedded world's pose detector is built with "
                                    "the embedded model (models/tiny-sd15/pose_detector) or by scripts/train_world.py")
    cfg = json.loads((folder / "config.json").read_text())
    net = KeypointNet(width=int(cfg["width"]), points=int(cfg["points"]), size=int(cfg["size"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}
    net.load_state_dict(state)
    return WorldPoseDetector(net.to(device))
