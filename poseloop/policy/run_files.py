"""What a policy run writes besides its weights: RNG states (checkpoint), tracker config, metrics CSV and plot, grids."""

from __future__ import annotations

import csv
import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states, as tensors, ints and tuples only.

    numpy's key array is stored as a tensor so that the file loads with torch.load(weights_only=True).
    """
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(np.asarray(key, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state() output."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, cached = state["numpy"]
    key = key.numpy() if isinstance(key, torch.Tensor) else np.asarray(key)
    np.random.set_state((name, key.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointFileError(ValueError):
    """A resume file holds something other than tensors and plain containers; the message names the file."""


def _numpy_globals() -> list[Any]:
    """What a numpy array in an older rng.pt needs: the array type, its dtypes and numpy's rebuild function."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_resume_file(path: Path) -> Any:
    """torch.load(weights_only=True) of optimizer.pt / rng.pt: code planted in a pickle never runs.

    Checkpoints written before rng.pt held only tensors stored numpy's key array; numpy arrays (no other
    class) are allowed for them.
    """
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, RuntimeError, EOFError, ... by file
        reason = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise CheckpointFileError(
            f"{path}: refused, not a resume file of tensors and plain values ({reason}); it was not written by "
            "train_policy.py or is damaged: delete the checkpoint folder or pass --train.resume false to start "
            "over") from None


def write_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], optimizer: dict[str, Any],
                     state: dict[str, Any]) -> Path:
    """Atomically replace <run_dir>/checkpoint: weights, optimizer state, RNG states (now) and state.json.

    optimizer.pt and rng.pt hold tensors and plain containers only, so load_resume_file reads them without
    running pickled code."""
    from safetensors.torch import save_file

    final = run_dir / "checkpoint"
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", suffix=".tmp", dir=run_dir))
    try:
        save_file(weights, str(tmp / "weights.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state))
        old = run_dir / ".checkpoint.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {"section.field": value} (what the accelerate trackers take)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    """Rewrite the metrics CSV (all rows; columns = union of keys in first-seen order) atomically."""
    from poseloop.data.store import atomic_write

    cols = list(dict.fromkeys(k for r in rows for k in r))

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def plot_history(rows: list[dict[str, float]], path: Path, algo: str) -> None:
    """Curves of the logged metrics (PNG, matplotlib Agg)."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from poseloop.data.store import atomic_write

    keys = [k for k in ("reward_mean", "eval_reward", "heldout_reward", "pair_accuracy", "margin", "loss",
                        "approx_kl", "clipfrac") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["epoch"], r[key]) for r in rows if key in r]
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", ms=2)
        if key == "reward_mean":
            std = np.array([r.get("reward_std", 0.0) for r in rows if key in r])
            ax.fill_between(xs, np.array(ys) - std, np.array(ys) + std, alpha=0.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{algo} training", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
    plt.close(fig)


def save_grid(poses: list[Image.Image], images: list[Image.Image], path: Path, labels: list[str] | None = None) -> None:
    """Two rows: pose conditions above the generated images (PNG), with optional reward labels."""
    from PIL import ImageDraw

    from poseloop.data.store import save_png

    w, h = images[0].size
    scale = max(1, -(-160 // min(w, h)))  # small renders are enlarged so that a person can see them
    w, h = w * scale, h * scale
    grid = Image.new("RGB", (w * len(images), 2 * h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (p, im) in enumerate(zip(poses, images)):
        grid.paste(p.resize((w, h)), (i * w, 0))
        grid.paste(im.resize((w, h), Image.Resampling.NEAREST), (i * w, h))
        if labels:
            draw.rectangle((i * w, h, i * w + 7 * len(labels[i]) + 6, h + 14), fill=(0, 0, 0))
            draw.text((i * w + 3, h + 2), labels[i], fill=(255, 255, 0))
    save_png(grid, path)
