"""Bootstrap confidence intervals of a mean: of values, of paired differences, or of values in groups.

One helper over `scipy.stats.bootstrap` (percentile, basic or BCa intervals; seeded, so the same data and
seed give the same interval), for every interval poseloop reports. Imports only numpy and scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

METHODS = ("percentile", "basic", "BCa")
# Values per resampling batch: scipy holds (batch, n) resamples (and BCa's (batch, n - 1) jackknife) at once.
_BATCH_VALUES = 4_000_000


def bootstrap_ci(values: ArrayLike, confidence: float = 0.95, *, paired: ArrayLike | None = None,
                 groups: ArrayLike | None = None, n_resamples: int = 2000, method: str = "percentile",
                 seed: int = 0) -> tuple[float, float]:
    """Two-sided bootstrap interval of mean(values), or of mean(values - paired) when `paired` is given.

    paired: the other member of each pair (same length); a pair is resampled as one, so what the two share
    (the same prompt, pose and seed) cancels. groups: one label per value; whole groups are resampled (a
    cluster bootstrap) and the statistic is the pooled mean of the drawn groups' values. Use it when values
    of a group are correlated (the pairs of one group share images): resampling single values would then
    give an interval that is too narrow. Empty input gives (nan, nan); one value, one group or constant
    values give the point itself.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: {confidence!r} must be in (0, 1), e.g. 0.95")
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples: {n_resamples} must be >= 1")
    x = np.asarray(values, dtype=np.float64).reshape(-1)  # (n,)
    y = None
    if paired is not None:
        y = np.asarray(paired, dtype=np.float64).reshape(-1)  # (n,)
        if y.shape != x.shape:
            raise ValueError(f"paired: {y.size} values for {x.size}; give one partner per value")
    if x.size == 0:
        return (math.nan, math.nan)
    kwargs: dict[str, Any] = dict(n_resamples=n_resamples, confidence_level=confidence, method=method,
                                  rng=np.random.default_rng(seed), vectorized=True)
    if groups is not None:
        labels = np.asarray(groups).reshape(-1)
        if labels.shape != x.shape:
            raise ValueError(f"groups: {labels.size} labels for {x.size} values; give one group label per value")
        d = x if y is None else x - y
        _, inverse = np.unique(labels, return_inverse=True)
        sums = np.bincount(inverse, weights=d)  # (k,) per group
        counts = np.bincount(inverse).astype(np.float64)  # (k,)
        if sums.size < 2 or np.ptp(sums / counts) == 0:
            point = float(sums.sum() / counts.sum())
            return (point, point)

        def pooled_mean(idx: np.ndarray, axis: int = -1) -> np.ndarray:
            """Pooled mean of the values of the drawn groups; idx: (..., k) group indices."""
            i = idx.astype(np.intp)
            return sums[i].sum(axis=axis) / counts[i].sum(axis=axis)

        data: tuple[np.ndarray, ...] = (np.arange(sums.size),)
        res = stats.bootstrap(data, pooled_mean, batch=_batch(sums.size, n_resamples), **kwargs)
    else:
        d = x if y is None else x - y
        if d.size < 2 or np.ptp(d) == 0:
            point = float(d.mean())
            return (point, point)
        if y is None:
            res = stats.bootstrap((x,), np.mean, batch=_batch(x.size, n_resamples), **kwargs)
        else:
            res = stats.bootstrap((x, y), _mean_difference, paired=True, batch=_batch(x.size, n_resamples), **kwargs)
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def _batch(n: int, n_resamples: int) -> int:
    return max(1, min(n_resamples, _BATCH_VALUES // max(n, 1)))


def mean_and_ci(values: ArrayLike, confidence: float = 0.95, **kwargs: Any) -> tuple[float, float, float]:
    """(mean, low, high): the mean of values (or of values - paired) and its bootstrap_ci interval."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    paired = kwargs.get("paired")
    d = x if paired is None else x - np.asarray(paired, dtype=np.float64).reshape(-1)
    mean = float(d.mean()) if d.size else math.nan
    return (mean, *bootstrap_ci(x, confidence, **kwargs))


def grouped(per_group: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(values, group labels) of nested per-group values, for bootstrap_ci(values, groups=labels)."""
    values = np.array([float(v) for g in per_group for v in g], dtype=np.float64)
    labels = np.array([i for i, g in enumerate(per_group) for _ in g], dtype=np.intp)
    return values, labels
