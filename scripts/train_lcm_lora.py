"""Distil the embedded world into an LCM-LoRA for 4-step rounds (latent consistency distillation).

    python scripts/train_lcm_lora.py                  # 600 steps (~10 min on 2 cores)
    python scripts/train_lcm_lora.py --preset smoke   # a few steps, end to end
    python generate.py --model.lcm_lora models/lcm_experiment/lcm_lora.safetensors \
        --sample.sampler lcm --sample.steps 4 --sample.guidance_scale 1

Writes models/lcm_experiment/lcm_lora.safetensors (peft lora_A/lora_B keys, fp16) and a loss plot beside it.
The shipped LoRA is made by scripts/train_world.py's last stage with these settings (docs/WORLD.md has
what other skips and step counts gave); this script runs the distillation alone for experiments.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from poseloop.config.lib import parse_config  # noqa: E402
from poseloop.cli import user_errors  # noqa: E402
from poseloop.world.lcm_distill import PRESETS, LcmDistillConfig, distill  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    """Distil, write the LoRA and print a one-line summary."""
    cfg, _ = parse_config(LcmDistillConfig, PRESETS, "full", argv, description=__doc__, prog="train_lcm_lora.py")
    with user_errors():
        summary = distill(cfg)
    print("LCM-LoRA: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
