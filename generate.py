"""Generate a round of pose-conditioned samples with their denoising trajectories.

    python generate.py                       # embedded tiny model, built-in poses
    python generate.py --preset sd15 --data.prompts_file prompts.txt
    python generate.py --set sample.steps=30 --data.poses standing sitting
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from poseloop.config import PRESETS, GenerateConfig
from poseloop.configlib import parse_config
from poseloop.errors import user_errors
from poseloop.generation import generate


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run one round, print a one-line summary."""
    cfg, _ = parse_config(GenerateConfig, PRESETS, "tiny", argv, description=__doc__, prog="generate.py")
    with user_errors():
        result = generate(cfg)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
