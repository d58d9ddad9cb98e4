"""Compare a trained policy with a baseline on the same prompts, poses and seeds.

    python evaluate.py                                  # latest policy vs the base model, tiny preset
    python evaluate.py --policy run-0003 --baseline run-0002   (= --eval.policy / --eval.baseline)
    python evaluate.py --preset sd15 --eval.metrics "pose_accuracy:weights=models/annotators" lpips
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from poseloop.config.lib import parse_config
from poseloop.cli import user_errors
from poseloop.config.evaluation import PRESETS, EvaluateConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the evaluation, print a one-line summary."""
    cfg, _ = parse_config(EvaluateConfig, PRESETS, "tiny", argv, description=__doc__, prog="evaluate.py",
                          aliases={"policy": "eval.policy", "baseline": "eval.baseline"})
    with user_errors():
        from poseloop.evaluation.compare import evaluate  # torch and diffusers: after --help and argument errors

        result = evaluate(cfg)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
