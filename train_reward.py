"""Fit the learned reward model on the labels rated so far and report held-out quality.

    python train_reward.py                                   # every rated round, improved CNN, 3-member ensemble
    python train_reward.py --data.rounds round-0001 --data.labels prefs
    python train_reward.py --preset almostperfect            # AlmostPerfect's CNN + MSE on scores, for comparison
    python train_reward.py --set train.epochs=40 --output.version my-reward

Writes models/reward/<version>/ (weights, config, metrics, training_curve.png, calibration.png) and
points models/reward/latest at it; load it with poseloop.rewards.loading.load_reward_model("latest").
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from poseloop.config.lib import parse_config
from poseloop.cli import user_errors
from poseloop.config.reward import PRESETS, TrainRewardConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, train one version, print a one-line summary."""
    cfg, _ = parse_config(TrainRewardConfig, PRESETS, "default", argv, description=__doc__, prog="train_reward.py")
    with user_errors():  # LabelDataError is an InputError: bad labels print one line and exit 2
        from poseloop.rewards.training import train_reward  # torch: after --help and argument errors

        result = train_reward(cfg)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
