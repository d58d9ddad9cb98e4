"""Per-prompt advantage normalisation on hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from poseloop.policy.advantages import PerPromptStatTracker


def test_batch_statistics_until_a_prompt_has_min_count_then_its_own_buffer() -> None:
    t = PerPromptStatTracker(buffer_size=3, min_count=3, eps=0.0)
    # Both keys have fewer than 3 rewards: batch mean 2.5, batch std sqrt(1.25).
    adv = t.update(["a", "a", "b", "b"], [1.0, 2.0, 3.0, 4.0])
    s = np.sqrt(1.25)
    np.testing.assert_allclose(adv, [(1 - 2.5) / s, (2 - 2.5) / s, (3 - 2.5) / s, (4 - 2.5) / s], rtol=1e-6)
    # "a" now buffers [1, 2, 5] (3 values: its own mean 8/3); "b" buffers [3, 4, 10] likewise.
    adv = t.update(["a", "b"], [5.0, 10.0])
    a_std, b_std = np.std([1.0, 2.0, 5.0]), np.std([3.0, 4.0, 10.0])
    np.testing.assert_allclose(adv, [(5 - 8 / 3) / a_std, (10 - 17 / 3) / b_std], rtol=1e-6)
    # The buffer keeps the last 3 rewards: "a" drops its 1.
    adv = t.update(["a"], [2.0])
    np.testing.assert_allclose(adv, [(2 - 3.0) / np.std([2.0, 5.0, 2.0])], rtol=1e-6)


def test_buffer_size_zero_uses_this_updates_rewards_of_each_key_alone() -> None:
    t = PerPromptStatTracker(buffer_size=0, min_count=16, eps=0.0)
    t.update(["a", "a"], [100.0, -100.0])  # an earlier visit: forgotten
    adv = t.update(["a", "a", "b", "b", "b"], [1.0, 3.0, 2.0, 4.0, 9.0])
    b = np.array([2.0, 4.0, 9.0])
    np.testing.assert_allclose(adv, [-1.0, 1.0, *((b - 5.0) / b.std())], rtol=1e-6)
    assert t.buffers == {}
    # One image has nothing to be compared with (with the default eps: 0 / 1e-6).
    assert PerPromptStatTracker(buffer_size=0).update(["c"], [7.0]).tolist() == [0.0]
    with pytest.raises(ValueError, match="buffer_size must be >= 0"):
        PerPromptStatTracker(buffer_size=-1)


def test_state_round_trip_and_bad_input() -> None:
    t = PerPromptStatTracker(buffer_size=4, min_count=1)
    t.update(["x", "y"], [1.0, 2.0])
    u = PerPromptStatTracker()
    u.load_state_dict(t.state_dict())
    assert u.update(["x"], [3.0]).tolist() == pytest.approx(t.update(["x"], [3.0]).tolist())
    with pytest.raises(ValueError, match="2 keys but 1 rewards"):
        t.update(["x", "y"], [1.0])
