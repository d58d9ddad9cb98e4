"""Installing what a lent GPU machine lacks (bench/gpu_check.py): diffusers, trl and their dependencies
from carried wheels (scripts/gpu_wheels.sh), into a private target directory only the check's processes see."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEEL_DIRS = (ROOT / ".gpu_wheels", ROOT / "shared_wheels")
# import name -> distribution whose wheel provides it: what the device may lack. diffusers imports
# requests (+ its four dependencies) at import time, poseloop.sampling.round imports sqlalchemy and all of
# poseloop imports PIL; torch/transformers/accelerate/peft pull in none of them.
NEEDED = {"diffusers": "diffusers", "requests": "requests", "urllib3": "urllib3", "idna": "idna",
          "certifi": "certifi", "charset_normalizer": "charset_normalizer", "sqlalchemy": "sqlalchemy",
          "PIL": "pillow"}


def find_wheel_dir(explicit: str) -> Path | None:
    """The carried wheel folder: --wheels, else .gpu_wheels or shared_wheels when present."""
    if explicit:
        return Path(explicit).resolve()
    return next((d for d in WHEEL_DIRS if d.is_dir()), None)


def missing_modules(names: list[str]) -> list[str]:
    """Import names that cannot be found on sys.path (checked without importing them)."""
    return [n for n in names if importlib.util.find_spec(n) is None]


def wheel_for(wheel_dir: Path, dist: str) -> Path | None:
    """The wheel of `dist` in wheel_dir that this Python can use (pure, or this CPython's tag)."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    prefix = dist.lower().replace("-", "_") + "-"
    for whl in sorted(wheel_dir.glob("*.whl")):
        if whl.name.lower().startswith(prefix) and ("-py3-none-any" in whl.name or f"-{tag}-{tag}-" in whl.name):
            return whl
    return None


def install_missing(wheel_dir: Path | None, want_trl: bool) -> tuple[Path | None, list[str]]:
    """Install the missing packages from the carried wheels into a private target dir; return (dir, notes)."""
    notes: list[str] = []
    wanted = dict(NEEDED)
    if want_trl:
        wanted["trl"] = "trl"
    missing = missing_modules(list(wanted))
    if not missing:
        return None, notes
    if wheel_dir is None:
        notes.append(f"missing {', '.join(missing)} and no wheel folder (run scripts/gpu_wheels.sh and carry it)")
        return None, notes
    dists = {m: wanted[m] for m in missing}
    wheels = {m: wheel_for(wheel_dir, d) for m, d in dists.items()}
    absent = [m for m, w in wheels.items() if w is None]
    if absent:
        notes.append(f"no usable wheel in {wheel_dir} for {', '.join(absent)}")
    found = sorted({str(w) for w in wheels.values() if w is not None})
    if not found:
        return None, notes
    key = hashlib.sha1("\n".join(found + [sys.version]).encode()).hexdigest()[:12]
    site = Path(tempfile.gettempdir()) / f"poseloop-gpu-site-{key}"
    if not (site / ".complete").is_file():
        shutil.rmtree(site, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
               "--disable-pip-version-check", "--target", str(site), *found]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            # No pip on the device: a wheel is a zip archive, and these import straight from its contents.
            notes.append(f"pip failed ({proc.stderr.strip()[-200:]}); unpacked the wheels instead")
            for whl in found:
                with zipfile.ZipFile(whl) as z:
                    z.extractall(site)
        (site / ".complete").write_text("\n".join(found))
    notes.append(f"installed from {wheel_dir.name}: {', '.join(Path(w).name for w in found)}")
    return site, notes


def pandas_stub(site_root: Path) -> Path:
    """A folder holding a stand-in `pandas`: trl's trainer utils import it, its DDPO code never calls it."""
    stub = site_root / "poseloop-pandas-stub"
    (stub / "pandas").mkdir(parents=True, exist_ok=True)
    (stub / "pandas" / "__init__.py").write_text(
        '"""Stand-in for pandas (bench/gpu_check.py): trl.trainer.utils annotates with pd.DataFrame."""\n\n\n'
        "class DataFrame:\n    pass\n")
    return stub
