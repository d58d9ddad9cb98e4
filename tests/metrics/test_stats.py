"""poseloop.metrics.stats: bootstrap intervals of a mean (plain, paired, clustered) on cases checkable by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from poseloop.metrics.stats import bootstrap_ci, grouped, mean_and_ci


def test_two_values_give_the_whole_range_by_hand() -> None:
    # Means of resamples of [0, 1]: 0, 0.5, 1 with chances 1/4, 1/2, 1/4; the 2.5% and 97.5% points are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)


def test_clusters_by_hand() -> None:
    """Groups A=[1,1], B=[0], C=[1,0,0]: drawing B three times (chance 1/27 = 3.7% > 2.5%) gives a pooled mean of
    0 and A three times gives 1, so the group interval is (0, 1). Resampling the six values alone, all six zeros
    has chance 1/64 = 1.6% < 2.5% and at most one 1 has chance 7/64 = 10.9%: the 2.5% point is 1/6, the 97.5%
    point 5/6. 20000 resamples put the estimated chances within 0.2% (3 standard errors) of these."""
    values, labels = [1, 1, 0, 1, 0, 0], [0, 0, 1, 2, 2, 2]
    lo, hi = bootstrap_ci(values, groups=labels, n_resamples=20000)
    assert (lo, hi) == (0.0, 1.0)
    lo, hi = bootstrap_ci(values, n_resamples=20000)
    assert lo == pytest.approx(1 / 6, abs=1e-12) and hi == pytest.approx(5 / 6, abs=1e-12)


def test_interval_of_a_normal_mean_covers_it_at_the_stated_rate() -> None:
    """600 samples of 50 from N(2, 1): a 95% interval should miss 2 about 5% of the time. The percentile bootstrap
    runs a little narrow at n = 50 (its spread uses 1/n, not 1/(n-1), and normal, not t, quantiles: about 94%
    expected); with 600 trials the rate's standard error is 1%, so [0.91, 0.98] is a 3-sigma band around it. A
    wrong scale (say the standard deviation in place of the standard error, or a 68% interval) lands far outside."""
    rng = np.random.default_rng(0)
    hits = widths = 0.0
    for trial in range(600):
        x = rng.normal(2.0, 1.0, size=50)
        lo, hi = bootstrap_ci(x, n_resamples=1000, seed=trial)
        hits += lo <= 2.0 <= hi
        widths += hi - lo
    assert 0.91 <= hits / 600 <= 0.98, hits / 600
    # The width is that of the normal interval, 2 * 1.96 / sqrt(50) = 0.554, less the 1/n bias (1%) and the
    # bootstrap's own noise.
    assert widths / 600 == pytest.approx(2 * 1.96 / math.sqrt(50), rel=0.06)


@pytest.mark.parametrize("method", ["percentile", "basic", "BCa"])
def test_every_method_is_close_to_the_normal_interval_on_a_large_sample(method: str) -> None:
    x = np.random.default_rng(1).normal(0.5, 2.0, size=2000)
    lo, hi = bootstrap_ci(x, 0.9, method=method)
    se = x.std(ddof=1) / math.sqrt(x.size)
    # 1.645 standard errors either side of the mean, up to the resampling noise of a 2000-draw quantile (~5%).
    assert lo == pytest.approx(x.mean() - 1.645 * se, abs=0.1 * se)
    assert hi == pytest.approx(x.mean() + 1.645 * se, abs=0.1 * se)


def test_paired_difference_cancels_what_the_pair_shares() -> None:
    """Each pair shares a large effect (the prompt, pose and seed); the candidate adds 0.1 with small noise. The
    paired interval is the one of the differences (the same draws of pairs) and far narrower than the two
    means' intervals, which carry the shared spread."""
    rng = np.random.default_rng(2)
    shared = rng.normal(0, 1.0, size=64)
    baseline = shared + rng.normal(0, 0.05, size=64)
    candidate = shared + 0.1 + rng.normal(0, 0.05, size=64)
    lo, hi = bootstrap_ci(candidate, paired=baseline, seed=5)
    assert 0 < lo < 0.1 < hi < 0.2
    d_lo, d_hi = bootstrap_ci(candidate - baseline, seed=5)
    # Same pairs drawn; only the order of the float subtraction and the sum differs.
    assert lo == pytest.approx(d_lo, abs=1e-12) and hi == pytest.approx(d_hi, abs=1e-12)
    b_lo, b_hi = bootstrap_ci(baseline, seed=5)
    assert (hi - lo) * 5 < b_hi - b_lo
    assert mean_and_ci(candidate, paired=baseline, seed=5) == (pytest.approx(float((candidate - baseline).mean())), lo, hi)


def _clustered(rng: np.random.Generator, n_groups: int, size: int, icc: float) -> tuple[np.ndarray, np.ndarray]:
    """Values with mean 0 and variance 1, of which a share `icc` is common to the group."""
    effect = rng.normal(0, math.sqrt(icc), size=n_groups)
    values = np.repeat(effect, size) + rng.normal(0, math.sqrt(1 - icc), size=n_groups * size)
    return values, np.repeat(np.arange(n_groups), size)


def test_cluster_interval_is_wider_than_iid_when_groups_are_correlated_and_covers_the_mean() -> None:
    """30 groups of 8 with 80% of the variance shared by the group: the design effect 1 + (8 - 1) * 0.8 = 6.6 makes
    the honest interval sqrt(6.6) = 2.6 times as wide as the iid one, which then misses the true mean far more
    often than 5%. 150 trials: the coverage's standard error is about 2%."""
    rng = np.random.default_rng(3)
    cover = {"cluster": 0, "iid": 0}
    ratio = []
    for trial in range(150):
        values, labels = _clustered(rng, 30, 8, 0.8)
        c_lo, c_hi = bootstrap_ci(values, groups=labels, n_resamples=1000, seed=trial)
        i_lo, i_hi = bootstrap_ci(values, n_resamples=1000, seed=trial)
        cover["cluster"] += c_lo <= 0 <= c_hi
        cover["iid"] += i_lo <= 0 <= i_hi
        ratio.append((c_hi - c_lo) / (i_hi - i_lo))
    assert 2.0 < float(np.median(ratio)) < 3.2, np.median(ratio)
    assert cover["cluster"] / 150 >= 0.86, cover
    assert cover["iid"] / 150 <= 0.75, cover


def test_cluster_interval_matches_iid_when_groups_are_independent() -> None:
    values, labels = _clustered(np.random.default_rng(4), 60, 5, 0.0)
    c_lo, c_hi = bootstrap_ci(values, groups=labels)
    i_lo, i_hi = bootstrap_ci(values)
    assert (c_hi - c_lo) == pytest.approx(i_hi - i_lo, rel=0.25)


def test_cluster_pools_unequal_groups_and_accepts_any_labels() -> None:
    per_group = [[True, True, False], [False], [True, False, True, True], [False, False]]
    values, labels = grouped(per_group)
    assert values.tolist() == [1, 1, 0, 0, 1, 0, 1, 1, 0, 0] and labels.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3]
    mean, lo, hi = mean_and_ci(values, groups=labels)
    assert mean == 0.5 and lo < 0.5 < hi
    # Labels are names, not positions: renaming the groups changes nothing.
    names = np.array(["c", "c", "c", "a", "z", "z", "z", "z", "b", "b"])
    renamed = bootstrap_ci(values, groups=names)
    assert renamed[1] - renamed[0] == pytest.approx(hi - lo, rel=0.2)


def test_seeded_and_degenerate_cases() -> None:
    x = np.random.default_rng(6).normal(size=50)
    assert bootstrap_ci(x, seed=1) == bootstrap_ci(x, seed=1)
    assert bootstrap_ci(x, seed=1) != bootstrap_ci(x, seed=2)
    assert all(math.isnan(v) for v in bootstrap_ci([]))
    assert bootstrap_ci([3.0]) == (3.0, 3.0)
    assert bootstrap_ci([2.0] * 5, method="BCa") == (2.0, 2.0)  # BCa of constant data is undefined in scipy
    assert bootstrap_ci([1.0, 2.0, 3.0], groups=[0, 0, 0]) == (2.0, 2.0)  # one group: nothing to resample
    assert mean_and_ci([1.0, 3.0])[0] == 2.0


@pytest.mark.parametrize("kwargs, needle", [
    ({"paired": [1.0]}, "paired: 1 values for 3"),
    ({"groups": [0, 1]}, "groups: 2 labels for 3"),
    ({"confidence": 95}, "confidence: 95 must be in (0, 1)"),
    ({"method": "bca"}, "method: 'bca' is not one of percentile, basic, BCa"),
])
def test_bad_arguments_name_the_argument(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as exc:
        bootstrap_ci([1.0, 2.0, 4.0], **kwargs)
    assert needle in str(exc.value)
