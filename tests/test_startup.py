"""Start-up: a script's --help imports no torch (nor diffusers, transformers, sqlalchemy), and still prints its
flags; an argument error is still a one-line error with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("generate.py", "train_reward.py", "train_policy.py", "evaluate.py")
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "sqlalchemy", "scipy", "matplotlib",
         "open_clip", "controlnet_aux")

# Runs a script as __main__ with the given arguments, then reports its exit status and the heavy modules loaded.
PROBE = """
import json, runpy, sys
script, args = sys.argv[1], sys.argv[2:]
sys.argv = [script, *args]
code = 0
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit as e:
    code = e.code
print("\\nPROBE " + json.dumps({"code": code, "loaded": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def probe(script: str, *args: str) -> tuple[dict, str, str]:
    """(report, stdout, stderr) of running script with args in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PROBE, script, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stderr[-2000:]
    return json.loads(line[-1][6:]), proc.stdout, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_imports_no_torch(script: str) -> None:
    """--help exits 0, lists the config flags, and loads none of the heavy libraries."""
    report, out, err = probe(script, "--help")
    assert report["code"] in (0, None), err[-2000:]
    assert "--preset" in out and "--set FIELD=VALUE" in out
    assert report["loaded"] == [], f"{script} --help imported {report['loaded']}"


def test_argument_errors_stay_one_line_without_torch() -> None:
    """A bad value fails validation before any model import: one line naming the field, exit 2."""
    report, _, err = probe("train_policy.py", "--train.timestep_fraction", "0")
    assert report["code"] == 2, err[-2000:]
    assert "error: train.timestep_fraction: must be in (0, 1]" in err.strip().splitlines()[-1]
    assert "torch" not in report["loaded"]


def test_a_model_load_error_is_still_one_line(models_dir: Path, tmp_path: Path, capsys) -> None:
    """user_errors learns ModelLoadError once poseloop.models.loading is loaded: a broken ControlNet folder is one line, 2."""
    import generate as generate_script

    (tmp_path / "empty").mkdir()
    argv = ["--model.base", str(models_dir / "tiny-sd15"), "--model.controlnet", str(tmp_path / "empty"),
            "--store.samples_dir", str(tmp_path / "s"), "--data.poses", "jumping", "--data.prompts", "a kid"]
    with pytest.raises(SystemExit) as exc:
        generate_script.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: model.controlnet: could not load the folder" in err and "Traceback" not in err
