"""Proof that the loop learns what a rater prefers: a scripted rater who likes a warm light labels a
round of the embedded world through the rating app's JSON API; then, on rounds the models never saw,
(a) the reward model trained on those labels ranks a FRESH round's images as the rater would,
(b) DDPO on that reward model and (c) D3PO from the rater's pairs, both with the tiny preset's
defaults, raise the rater's statistic on a shared-seed comparison round (paired bootstrap interval
above 0); (d) RLCM (DDPO's PPO over the world's 4-step LCM trajectories) on pose accuracy, training a
LoRA on the ControlNet as the pose-ControlNet RL reference trains the ControlNet, raises the detector's
OKS on seeds it never trained on; so does the tiny-rlcm-pose preset's own reward (half pose accuracy, half
the prompt's colours), which keeps the colours. DDPO on pose accuracy over the 10-step DDIM trajectories
is not reliable on this world, so it is only measured, in bench/bench_learning.py (docs/RESULTS.md)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from conftest import TEST_THREADS
from poseloop.checks.scripted import RULE, LearningBudget, run_learning_check


# One test per policy run, each from its own labelled round and reward model (the same, from the same seeds):
# on two xdist workers the runs go in parallel, and a failure names the run.
@pytest.mark.parametrize("run", [pytest.param("ddpo_reward_model", marks=pytest.mark.slow),
                                 pytest.param("d3po_pairs", marks=pytest.mark.slow)])
def test_the_loop_learns_the_raters_preference_on_fresh_rounds(run: str, models_dir: Path, tmp_path: Path) -> None:
    # The D3PO run also trains the conditioned reward model on the same labels (the DDPO run is the longer one).
    budget = LearningBudget(threads=TEST_THREADS, policies=(run,), conditioned=run == "d3po_pairs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_learning_check(tmp_path, models_dir / "tiny-sd15", budget)
    # A policy that learns is not called stalled (guard.min_kl 1e-6 warned here: DDPO's approx KL is 1e-7-2e-6).
    assert not [w for w in caught if "not moving" in str(w.message)]
    assert r["labels"] == {"scores": 96, "pairs": 144}
    acc = r["reward_fresh_pair_accuracy"]
    # (a) 144 within-group pairs of a round the model never saw; chance is 0.5 (measured here: 0.81).
    assert acc["pairs"] == 144 and acc["mean"] >= 0.75 and acc["ci"][0] > 0.6, acc
    if run == "d3po_pairs":
        # The conditioned kind (it also reads each sample's prompt and pose, issue 35) must not cost a taste that needs
        # no condition: on the same 144 fresh pairs, no worse than the latent kind within the paired interval over
        # the 24 groups. Measured (1 thread, under load): conditioned 0.806 [0.729, 0.875], latent 0.812,
        # conditioned - latent -0.007 [-0.083, +0.063].
        c = r["conditioned_reward"]
        assert c["conditioned"]["pairs"] == 144 and c["conditioned"]["mean"] >= 0.75, c
        assert c["conditioned_minus_latent"]["groups"] == 24 and c["conditioned_minus_latent"]["ci"][1] >= 0, c
    # (b) and (c): the rater's statistic on 48 shared-seed pairs, a bootstrap interval over the pairs (measured
    # values: docs/RESULTS.md).
    m = r[run][RULE]
    assert m["n"] == 48 and m["ci"][0] > 0, (run, m)


# (d): RLCM on pose accuracy alone (the check), and the tiny-rlcm-pose preset's own reward (half pose accuracy,
# half the prompt's attributes), each from its own run.
@pytest.mark.parametrize("run", [pytest.param("rlcm_pose_accuracy", marks=pytest.mark.slow),
                                 pytest.param("rlcm_pose_and_prompt", marks=pytest.mark.slow)])
def test_rlcm_on_pose_accuracy_raises_oks_on_fresh_seeds(run: str, models_dir: Path, tmp_path: Path) -> None:
    # No labels needed: the reward is the world's pose detector, the metric its OKS against the condition.
    budget = LearningBudget(threads=TEST_THREADS, policies=(run,))
    r = run_learning_check(tmp_path, models_dir / "tiny-sd15", budget)
    assert "labels" not in r and "ddpo_reward_model" not in r
    m, colours = r[run]["pose_accuracy"], r[run]["prompt_attributes"]
    # 96 shared-seed pairs at ControlNet scale 0.4. Beside the interval above 0 the gain must be at least 0.02: under
    # half the smallest gain measured on any run seed (+0.045; docs/RESULTS.md), above what a UNet LoRA reached.
    assert m["n"] == 96 and m["ci"][0] > 0 and m["diff"] > 0.02, m
    assert colours["n"] == 96, colours
    if run == "rlcm_pose_and_prompt":
        # The prompt's colours kept: pose accuracy alone lost up to 0.069 of them on one seed, the preset at most 0.014.
        assert colours["diff"] > -0.05, colours


def test_an_unknown_run_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown run\(s\) \['ddpo_pose'\]; choose from"):
        run_learning_check(tmp_path, tmp_path / "tiny-sd15", LearningBudget(policies=("ddpo_pose",)))
    assert not any(tmp_path.iterdir())  # nothing generated



# The three-round loop check (issue 31, item 6) runs as bench/bench_loop_rounds.py, not here: it does not pass yet
# (the loop drifts from the prompt by round 2-3; docs/RESULTS.md) and takes ~20 min under load. A test that cannot
# pass would only be skipped, so it is not in the suite until the loop keeps the condition.
def test_a_loop_check_with_an_unknown_rater_is_refused_before_any_work(tmp_path: Path) -> None:
    from poseloop.checks.scripted_loop import LoopBudget, run_loop_check

    with pytest.raises(ValueError, match=r"LoopBudget.rater: unknown rater 'likes-green'; choose from"):
        run_loop_check(tmp_path, tmp_path / "tiny-sd15", LoopBudget(rater="likes-green"))
    assert not any(tmp_path.iterdir())
