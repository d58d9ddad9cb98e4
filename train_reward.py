"""Fit the learned reward model on the labels rated so far and report held-out quality.

    python train_reward.py                                   # every rated round, improved CNN, 3-member ensemble
    python train_reward.py --data.rounds round-0001 --data.labels prefs
    python train_reward.py --preset almostperfect            # AlmostPerfect's CNN + MSE on scores, for comparison
    python train_reward.py --set train.epochs=40 --output.version my-reward

Writes models/reward/<version>/ (weights, config, metrics, training_curve.png, calibration.png) and
points models/reward/latest at it; load it with poseloop.reward_model.load_reward_model("latest").
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, train one version, print a one-line summary."""
    from poseloop.configlib import parse_config
    from poseloop.reward_training import PRESETS, LabelDataError, TrainRewardConfig, train_reward

    cfg, _ = parse_config(TrainRewardConfig, PRESETS, "default", argv, description=__doc__, prog="train_reward.py")
    from poseloop.errors import user_errors

    with user_errors():
        try:
            result = train_reward(cfg)
        except LabelDataError as e:  # not one of user_errors' classes: bad labels, not bad config
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
