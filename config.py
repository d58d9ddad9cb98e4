"""Show or check a configuration without running anything.

    python config.py                      # the default (tiny) generation config as JSON
    python config.py --preset sdxl --set sample.steps=30

The configuration classes and presets live in poseloop/config/generation.py; every script takes the same flags.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from poseloop.config.generation import PRESETS, GenerateConfig
from poseloop.config.lib import parse_config, to_dict


def main(argv: Sequence[str] | None = None) -> int:
    """Parse and validate a generation config, print it as JSON."""
    cfg, _ = parse_config(GenerateConfig, PRESETS, "tiny", argv, description=__doc__, prog="config.py")
    print(json.dumps(to_dict(cfg), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
