"""Uncertainty of scores over seeds and samples: t-intervals, percentile bootstrap, paired differences.

Pure functions of numbers (no files, no models). A figure from one seed has no interval: it is
reported as one seed (`Interval.low` / `high` are None), never with an interval invented for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Hashable, Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean (or point estimate) with its confidence interval over n values (low/high None when n < 2)."""

    mean: float
    low: Optional[float]
    high: Optional[float]
    n: int
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> Optional[float]:
        return None if self.low is None else (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        return self.low is not None and self.low <= value <= self.high

    def format(self, spec: str = ".3f") -> str:
        if self.low is None:
            return f"{self.mean:{spec}} (n = {self.n})"
        return f"{self.mean:{spec}} ± {self.half_width:{spec.replace('+', '')}} (n = {self.n})"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± t_{(1+c)/2, n−1} · s / √n, s the sample standard deviation (ddof = 1)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise ValueError(f"t_interval needs a non-empty list of values, got shape {x.shape}")
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, None, None, len(x), confidence)
    half = scipy_stats.t.ppf((1 + confidence) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return Interval(mean, mean - half, mean + half, len(x), confidence)


def bootstrap_interval(data: np.ndarray, statistic: Callable[[np.ndarray], float], *, resamples: int = 200,
                       seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Percentile bootstrap over the rows of `data` (N, ...): `statistic` of `resamples` resamples drawn with
    replacement (numpy Generator seeded with `seed`); `mean` is the statistic of `data` itself."""
    if resamples < 2:
        raise ValueError(f"bootstrap needs at least 2 resamples, got {resamples}")
    rng = np.random.default_rng(seed)
    n = len(data)
    values = [statistic(data[rng.integers(0, n, n)]) for _ in range(resamples)]
    low, high = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Interval(float(statistic(data)), float(low), float(high), n, confidence)


@dataclass(frozen=True)
class PairedComparison:
    """a − b over the seeds both have: differences (by seed) and their t-interval."""

    seeds: tuple
    differences: tuple
    interval: Interval

    def verdict(self, name_a: str = "a", name_b: str = "b") -> str:
        """For a score where lower is better (FID): a negative difference means a scores better than b."""
        iv = self.interval
        if iv.low is None:
            return f"one paired seed only (difference {iv.mean:+.3g}): no interval, no conclusion"
        if iv.contains(0.0):
            return f"no significant difference between {name_a} and {name_b} (the {iv.confidence * 100:.4g}% interval contains 0)"
        better, worse = (name_a, name_b) if iv.high < 0 else (name_b, name_a)
        return f"{better} is better (lower) than {worse} (the {iv.confidence * 100:.4g}% interval excludes 0)"

def paired_difference(a: Dict[Hashable, float], b: Dict[Hashable, float],
                      confidence: float = CONFIDENCE) -> PairedComparison:
    """Differences a[seed] − b[seed] over the seeds in both (sorted), with their t-interval."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} vs {sorted(b)}")
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    return PairedComparison(seeds, diffs, t_interval(diffs, confidence))
