"""Rebuild the embedded pose world: renders, VAE, pose detector, UNet + OpenPose ControlNet + text encoder,
and the LCM-LoRA and preview decoder distilled from them.

    python scripts/train_world.py                  # the shipped weights (50 min on 2 cores, +17 for the LCM-LoRA and preview decoder)
    python scripts/train_world.py --preset smoke   # every stage for a few steps (about a minute)

Writes fp16 weights to poseloop/models/world_weights (what the package ships; models/tiny-sd15 is built
from them on first use) and loss plots, sample grids and metrics to models/world_run. Stages that
finished are kept in the run folder and skipped when the command is run again.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poseloop.config.lib import parse_config  # noqa: E402
from poseloop.cli import user_errors  # noqa: E402
from poseloop.world.train_config import PRESETS, WorldConfig  # noqa: E402
from poseloop.world.training import train_world  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Train every stage and print the measured quality in one line."""
    cfg, _ = parse_config(WorldConfig, PRESETS, "full", argv, description=__doc__, prog="train_world.py")
    with user_errors():
        metrics = train_world(cfg)
    print("embedded world: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v
                                            for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
