"""Fine-tune the generator: DDPO against a reward, or D3PO from the human preferences in the database.

    python train_policy.py --algo ddpo --reward latest            # the learned reward model
    python train_policy.py --algo ddpo --reward 'pose_accuracy*0.5 + text_alignment*0.5'
    python train_policy.py --algo d3po                            # human preferences, no reward model
    python train_policy.py --preset sd15 --target.kind controlnet
    accelerate launch train_policy.py --preset sd15 ...           # several GPUs
    python train_policy.py --parent base ...                      # start from the base model, not the last policy
    python train_policy.py --lineage latest                       # what a policy was trained on, back to the base

Each run continues the newest policy of the same base model and target (--parent auto; the run's first line
names it) and its export holds the whole model. A run is named by what it resolved to: the config, the
reward model version, the preference pairs and the parent, so new labels train a new run.

Exports go to models/policies/<version>/ (kohya + diffusers LoRA or a ControlNet folder, config.json,
README.md) with models/policies/latest naming the newest; re-running the same command resumes.
See docs/POLICY.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
from collections.abc import Sequence

from poseloop.config.lib import parse_config
from poseloop.cli import user_errors
from poseloop.policy.lineage import lineage_lines
from poseloop.config.policy import PRESETS, PolicyConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, train, print a one-line summary."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--lineage", default=None)
    known, rest = pre.parse_known_args(argv)
    cfg, _ = parse_config(PolicyConfig, PRESETS, "tiny", rest, description=__doc__, prog="train_policy.py")
    if known.lineage is not None:
        with user_errors():
            print("\n".join(lineage_lines(cfg.export_root, known.lineage)))
        return 0
    try:
        with user_errors():
            from poseloop.policy.trainer import train  # torch and diffusers: after --help and argument errors

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
