"""Shared fixtures: the embedded tiny models, built once per test session in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing in the tests may touch the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the embedded tiny-sd15 and tiny-sdxl models, built through ensure_embedded."""
    from poseloop.tiny import ensure_embedded

    root = tmp_path_factory.mktemp("models")
    ensure_embedded(root / "tiny-sd15")
    ensure_embedded(root / "tiny-sdxl")
    return root


def _cfg(preset: str, models_dir: Path, tmp_path: Path):  # -> GenerateConfig
    from poseloop.config import PRESETS

    cfg = PRESETS[preset]()
    name = "tiny-sd15" if preset == "tiny" else "tiny-sdxl"
    cfg.model.base = str(models_dir / name)
    cfg.model.controlnet = str(models_dir / name / "controlnet")
    cfg.sample.width = cfg.sample.height = 64
    cfg.sample.steps = 4
    cfg.sample.images_per_group = 2
    cfg.sample.batch_size = 4
    cfg.data.prompts = ["a dancer"]
    cfg.data.poses = ["standing", "sitting"]
    cfg.store.samples_dir = str(tmp_path / "samples")
    return cfg


@pytest.fixture
def tiny_cfg(models_dir: Path, tmp_path: Path):  # -> GenerateConfig
    """A fast generation config on the tiny SD1.5 model: 2 groups x 2 images, 4 steps, 64 px."""
    return _cfg("tiny", models_dir, tmp_path)


@pytest.fixture
def tiny_sdxl_cfg(models_dir: Path, tmp_path: Path):  # -> GenerateConfig
    """The same on the tiny SDXL model."""
    return _cfg("tiny-sdxl", models_dir, tmp_path)


def _components(preset: str, models_dir: Path):  # -> Components
    from poseloop.config import PRESETS
    from poseloop.models import load_components

    cfg = PRESETS[preset]()
    name = "tiny-sd15" if preset == "tiny" else "tiny-sdxl"
    cfg.model.base = str(models_dir / name)
    cfg.model.controlnet = str(models_dir / name / "controlnet")
    return load_components(cfg.model)


@pytest.fixture(scope="session")
def sd15_components(models_dir: Path):  # -> Components
    """Loaded tiny SD1.5 components (shared: tests must not modify them)."""
    return _components("tiny", models_dir)


@pytest.fixture(scope="session")
def sdxl_components(models_dir: Path):  # -> Components
    """Loaded tiny SDXL components (shared: tests must not modify them)."""
    return _components("tiny-sdxl", models_dir)
