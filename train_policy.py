"""Fine-tune the generator: DDPO against a reward, or D3PO from the human preferences in the database.

    python train_policy.py --algo ddpo --reward latest            # the learned reward model
    python train_policy.py --algo ddpo --reward 'pose_accuracy*0.5 + text_alignment*0.5'
    python train_policy.py --algo d3po                            # human preferences, no reward model
    python train_policy.py --preset sd15 --target.kind controlnet
    accelerate launch train_policy.py --preset sd15 ...           # several GPUs

Exports go to models/policies/<version>/ (kohya + diffusers LoRA or a ControlNet folder, config.json,
README.md) with models/policies/latest naming the newest; re-running the same command resumes.
See docs/POLICY.md.
"""

from __future__ import annotations

import faulthandler
import sys
from collections.abc import Sequence

from poseloop.configlib import parse_config
from poseloop.errors import user_errors
from poseloop.policy_config import PRESETS, PolicyConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, train, print a one-line summary."""
    cfg, _ = parse_config(PolicyConfig, PRESETS, "tiny", argv, description=__doc__, prog="train_policy.py")
    try:
        with user_errors():
            from poseloop.training import train  # torch and diffusers: after --help and argument errors

            result = train(cfg)
    except KeyboardInterrupt:
        return 130
    print(result.summary())
    return 0


if __name__ == "__main__":
    # A fatal signal (e.g. an abort inside a process group's C++ teardown under `accelerate launch`) prints every
    # thread's Python stack to stderr, so a crash names where it happened.
    faulthandler.enable()
    sys.exit(main())
