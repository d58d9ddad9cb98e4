"""The built package: every data file ships, and setuptools has nothing to warn about."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folders whose files are package data: configs of single-file checkpoints, the embedded world, the rating page.
DATA_DIRS = ("poseloop/models/configs", "poseloop/models/world_weights", "webapp/static", "webapp/templates")


def test_the_wheel_ships_every_data_file_without_setuptools_warnings(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("poseloop", "webapp"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    # setuptools warns once per data folder that is not a listed package (it printed ~640 lines for 16 folders).
    assert "would be ignored" not in log and "absent from the `packages`" not in log, log[-3000:]
    (wheel,) = (tmp_path / "dist").glob("poseloop-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(src).as_posix() for d in DATA_DIRS for p in (src / d).rglob("*") if p.is_file()}
    assert any(name.endswith(".safetensors") for name in expected) and any(
        name.startswith("webapp/templates/") for name in expected)
    assert not expected - shipped, sorted(expected - shipped)
    assert not [n for n in shipped if n.startswith(("tests/", "bench/", "scripts/"))]
