"""Proof that the loop learns: a scripted rater labels a round through the JSON API, and the reward
model, DDPO (on that reward model), D3PO (from the pairs) and DDPO on pose accuracy, all with the
tiny preset's defaults, each move what they should on data they never saw. bench/bench_learning.py
runs the same with larger budgets and prints the effect sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from poseloop.scripted import RULE, LearningBudget, run_learning_check


@pytest.mark.slow
def test_the_loop_learns_what_the_rater_prefers(models_dir: Path, tmp_path: Path) -> None:
    r = run_learning_check(tmp_path, models_dir / "tiny-sd15", LearningBudget(threads=1))
    assert r["labels"] == {"scores": 96, "pairs": 144}

    # (a) The reward model ranks pairs of a fresh round as the rater would.
    acc = r["reward_fresh_pair_accuracy"]
    assert acc["pairs"] == 144 and acc["mean"] >= 0.75, acc

    # (b) DDPO on that reward model and (c) D3PO from the rater's pairs make images the rater prefers,
    # on a round of shared seeds neither saw: the paired difference's 95% interval is above 0.
    for run in ("ddpo_reward_model", "d3po_pairs"):
        diff = r[run][RULE]
        assert diff["n"] == 48 and diff["ci"][0] > 0, (run, diff)

    # (d) DDPO with pose_accuracy (the embedded detector) makes the figures follow the pose better.
    pose = r["ddpo_pose_accuracy"]["pose_accuracy"]
    assert pose["ci"][0] > 0, pose
