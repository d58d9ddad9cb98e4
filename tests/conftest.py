"""Shared fixtures: the embedded tiny models, built once per test session in a temporary folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Nothing in the tests may touch the model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# scripts/test.sh runs the suite on two pytest-xdist workers: each gets one of the two cores, so a test that
# would use two threads uses one there (two 2-thread processes on 2 cores spin against each other, 3-10x slower).
XDIST_WORKER = bool(os.environ.get("PYTEST_XDIST_WORKER"))
TEST_THREADS = 1 if XDIST_WORKER else 2


@pytest.fixture(scope="session", autouse=True)
def _worker_threads() -> None:
    """One torch thread per xdist worker (torch's default is every core)."""
    if XDIST_WORKER:
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the embedded tiny-sd15 and tiny-sdxl models, built through ensure_embedded."""
    from poseloop.models.embedded import ensure_embedded

    root = tmp_path_factory.mktemp("models")
    ensure_embedded(root / "tiny-sd15")
    ensure_embedded(root / "tiny-sdxl")
    return root


def _cfg(preset: str, models_dir: Path, tmp_path: Path):  # -> GenerateConfig
    from poseloop.config.generation import PRESETS

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
    from poseloop.config.generation import PRESETS
    from poseloop.models.loading import load_components

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


@pytest.fixture(scope="session")
def openpose_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three OpenPose networks saved the way lllyasviel/Annotators ships them: random body weights.

    The hand and face nets get zeros of the right shapes: built on the meta device, which skips the
    slow random initialisation of ~40 M parameters that no test runs.
    """
    import torch
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    d = tmp_path_factory.mktemp("annotators")
    torch.manual_seed(0)
    # Published body/hand files drop the first key component ("model0."); controlnet_aux adds it back.
    torch.save({k.split(".", 1)[1]: v.half() for k, v in bodypose_model().state_dict().items()},
               d / "body_pose_model.pth")
    with torch.device("meta"):
        hand, face = handpose_model().state_dict(), FaceNet().state_dict()
    torch.save({k.split(".", 1)[1]: torch.zeros(v.shape, dtype=torch.half) for k, v in hand.items()},
               d / "hand_pose_model.pth")
    torch.save({k: torch.zeros(v.shape, dtype=torch.half) for k, v in face.items()}, d / "facenet.pth")
    return d


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: on the shared 2-core machines one thread is several times faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:  # -> pg_server.PostgresServer
    """A throwaway PostgreSQL server for the session, started on first use; missing binaries fail, never skip."""
    from pg_server import PostgresServer, PostgresUnavailable

    problem = None
    try:
        server = PostgresServer()
        try:
            server.start()
        except PostgresUnavailable:
            server.stop()
            raise
    except PostgresUnavailable as e:
        problem = str(e)
    if problem is not None:  # outside the except block, so the report is the one line, not a chained traceback
        pytest.fail(f"PostgreSQL tests cannot run: {problem}", pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def db_backend() -> str:
    """The database a test runs on: "sqlite" unless the test parametrizes it (e.g. over ["sqlite", "postgresql"]).

    POSELOOP_TEST_DB=postgresql runs every test that uses this fixture on PostgreSQL instead.
    """
    return os.environ.get("POSELOOP_TEST_DB", "sqlite")


@pytest.fixture
def backend_db_url(db_backend: str, request: pytest.FixtureRequest) -> str | None:
    """None for SQLite (the samples folder's default file); a fresh PostgreSQL database's URL otherwise."""
    if db_backend == "sqlite":
        return None
    assert db_backend == "postgresql", db_backend
    return request.getfixturevalue("postgres_server").create_database()
