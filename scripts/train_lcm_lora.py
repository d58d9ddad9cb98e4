"""Distil the embedded world into an LCM-LoRA: 4-step rounds (generate.py --preset tiny-lcm).

    python scripts/train_lcm_lora.py                  # the shipped LoRA (~15-20 min on 2 cores)
    python scripts/train_lcm_lora.py --preset smoke   # a few steps, end to end

Run it after scripts/train_world.py (a rebuilt world needs its own LCM-LoRA). Writes
poseloop/world_weights/lcm_lora.safetensors (diffusers LoRA keys, fp16) and a loss plot to
models/world_run/lcm.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poseloop.configlib import parse_config  # noqa: E402
from poseloop.errors import user_errors  # noqa: E402
from poseloop.lcm_distill import PRESETS, LcmDistillConfig, distill  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Distil, write the LoRA and print a one-line summary."""
    cfg, _ = parse_config(LcmDistillConfig, PRESETS, "full", argv, description=__doc__, prog="train_lcm_lora.py")
    with user_errors():
        summary = distill(cfg)
    print("LCM-LoRA: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
