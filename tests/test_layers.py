"""The package's layering: import-linter's contracts in pyproject.toml hold, and constants kept low agree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contracts_hold() -> None:
    # In a child process: lint-imports configures logging (dictConfig), which would disable this process's loggers.
    code = ("import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, "an import breaks a layer or makes a circle:\n" + out.stdout[-4000:] + out.stderr[-2000:]


def test_the_layers_are_checked_for_every_subpackage() -> None:
    """A new subpackage of poseloop must be placed in a layer, or its imports would go unchecked."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in conf if c["type"] == "layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    graph = grimp.build_graph("poseloop", cache_dir=None)
    children = {m.split(".")[1] for m in graph.find_children("poseloop")}
    assert children == named, f"subpackages {sorted(children - named)} are in no layer; layers name {sorted(named - children)} that do not exist"


def test_the_configs_algorithm_names_are_the_registered_ones() -> None:
    from poseloop.config.policy import ALGORITHM_NAMES
    from poseloop.policy.algos import ALGORITHMS

    assert set(ALGORITHM_NAMES) == set(ALGORITHMS)
