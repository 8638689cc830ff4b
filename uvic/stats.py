"""Uncertainty of scores over seeds and samples: t-intervals, bootstrap, paired tests, multiplicity, sequential looks.

Pure functions of numbers (no files, no models). A figure from one seed has no interval: it is
reported as one seed (`Interval.low` / `high` are None), never with an interval invented for it.

    paired tests     t-interval and p, exact sign-flip (permutation) test, Wilcoxon signed-rank, d_z with its
                     noncentral-t interval, the ratio a/b from log differences, TOST equivalence for a margin
    multiplicity     Holm's step-down adjustment; Dunnett's many-to-one adjustment for arms sharing one control
    bootstrap        percentile or basic intervals, one sample or several resampled independently
    sequential       Lan-DeMets alpha spending (O'Brien-Fleming or Pocock type): the boundary at each look
    planning         paired seeds for a power; the exact (Clopper-Pearson) interval of a failure rate
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import stats as scipy_stats
from scipy.optimize import brentq

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


BOOTSTRAP_METHODS = ("percentile", "basic")


def bootstrap_interval(data, statistic: Callable, *, resamples: int = 200, seed: int = 0,
                       confidence: float = CONFIDENCE, method: str = "percentile") -> Interval:
    """Bootstrap over the rows of `data` (N, ...), or of each array of a tuple `data` resampled independently
    (samples *and* reference: `statistic(*arrays)`). `statistic` of `resamples` resamples drawn with replacement
    (numpy Generator seeded with `seed`); `mean` is the statistic of `data` itself.

    percentile: the quantiles q_lo, q_hi of the resampled statistics. basic: 2·θ̂ − q_hi, 2·θ̂ − q_lo, which
    corrects the shift of a biased statistic (FID rises when samples repeat) instead of copying it.
    """
    if resamples < 2:
        raise ValueError(f"bootstrap needs at least 2 resamples, got {resamples}")
    if method not in BOOTSTRAP_METHODS:
        raise ValueError(f"bootstrap method {method!r} is not valid; choose one of {', '.join(BOOTSTRAP_METHODS)}")
    arrays = data if isinstance(data, tuple) else (data,)
    rng = np.random.default_rng(seed)
    values = [statistic(*(a[rng.integers(0, len(a), len(a))] for a in arrays)) for _ in range(resamples)]
    q_lo, q_hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    estimate = float(statistic(*arrays))
    low, high = (q_lo, q_hi) if method == "percentile" else (2 * estimate - q_hi, 2 * estimate - q_lo)
    return Interval(estimate, float(low), float(high), len(arrays[0]), confidence)


# ---------------------------------------------------------------------- paired tests
def t_test_p(values: Sequence[float]) -> Optional[float]:
    """Two-sided p of the one-sample t-test of mean 0 (None below 2 values or with no spread)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2 or x.std(ddof=1) == 0:
        return None
    t = x.mean() / (x.std(ddof=1) / math.sqrt(len(x)))
    return float(2 * scipy_stats.t.sf(abs(t), len(x) - 1))


EXACT_SIGN_FLIP_MAX = 16  # 2^16 sign vectors enumerated; above, a seeded Monte Carlo of SIGN_FLIP_DRAWS


SIGN_FLIP_DRAWS = 200_000


def sign_flip_p(differences: Sequence[float], seed: int = 0) -> Tuple[Optional[float], bool]:
    """(two-sided p, exact?) of the sign-flip permutation test of a zero-centred symmetric distribution: the share
    of the 2^n sign patterns whose |Σ ±d_i| reaches the observed |Σ d_i|. Exact for n <= EXACT_SIGN_FLIP_MAX."""
    d = np.asarray(differences, np.float64)
    if len(d) < 1:
        return None, True
    exact = len(d) <= EXACT_SIGN_FLIP_MAX
    if exact:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))  # (2^n, n)
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(SIGN_FLIP_DRAWS, len(d)))
    observed = abs(d.sum())
    tol = 1e-9 * max(np.abs(d).sum(), 1e-300)  # a pattern equal to the observed one counts, despite rounding
    return float(np.mean(np.abs(signs @ d) >= observed - tol)), exact


def wilcoxon_p(differences: Sequence[float]) -> Optional[float]:
    """Two-sided p of the Wilcoxon signed-rank test (scipy: exact for small n without ties, zeros dropped)."""
    d = np.asarray(differences, np.float64)
    if np.count_nonzero(d) < 1:
        return None
    return float(scipy_stats.wilcoxon(d).pvalue)


def effect_size_dz(differences: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """d_z = mean / s of paired differences, its interval by inverting the noncentral t: t = d_z·√n has a
    noncentral t distribution with n − 1 degrees of freedom and noncentrality δ·√n (Steiger & Fouladi 1997)."""
    d = np.asarray(differences, np.float64)
    n = len(d)
    if n < 2 or d.std(ddof=1) == 0:
        return Interval(float("nan"), None, None, n, confidence)
    dz = d.mean() / d.std(ddof=1)
    t, df = dz * math.sqrt(n), n - 1

    def noncentrality(q):  # the δ·√n whose noncentral t puts probability q below the observed t
        span = 8 * math.sqrt(1 + t * t / (2 * df)) + 1  # about 8 SDs of the noncentral t around t
        def below(nc):  # P(T <= t) falls from 1 to 0 as nc grows; scipy returns NaN far out in the tails
            p = scipy_stats.nct.cdf(t, df, nc)
            return (1.0 if nc < t else 0.0) if np.isnan(p) else p

        return brentq(lambda nc: below(nc) - q, t - span, t + span)

    low = noncentrality((1 + confidence) / 2) / math.sqrt(n)
    high = noncentrality((1 - confidence) / 2) / math.sqrt(n)
    return Interval(float(dz), float(low), float(high), n, confidence)


def ratio_interval(a: Dict[Hashable, float], b: Dict[Hashable, float], confidence: float = CONFIDENCE) -> Interval:
    """a / b as a geometric mean over the paired seeds: exp of the t-interval of log a − log b. FID is a
    scale-type score whose spread grows with its size, so a ratio (U-ViC 20 % worse) travels across levels."""
    seeds = sorted(set(a) & set(b))
    if any(a[s] <= 0 or b[s] <= 0 for s in seeds):
        raise ValueError("ratio_interval needs positive scores (a log is taken)")
    iv = t_interval([math.log(a[s]) - math.log(b[s]) for s in seeds], confidence)
    if iv.low is None:
        return Interval(math.exp(iv.mean), None, None, iv.n, confidence)
    return Interval(math.exp(iv.mean), math.exp(iv.low), math.exp(iv.high), iv.n, confidence)


@dataclass(frozen=True)
class Equivalence:
    """TOST for |mean difference| < margin: p = the larger of the two one-sided t-tests; equivalent when p < α,
    i.e. the (1 − 2α) t-interval lies inside (−margin, margin)."""

    margin: float
    p: Optional[float]
    interval: Interval  # the (1 − 2α) interval
    alpha: float

    @property
    def equivalent(self) -> bool:
        return self.p is not None and self.p < self.alpha


def tost(differences: Sequence[float], margin: float, alpha: float = 1 - CONFIDENCE) -> Equivalence:
    """Two one-sided tests (Schuirmann 1987) of H0: mean <= −margin and H0: mean >= margin."""
    if not margin > 0:
        raise ValueError(f"an equivalence margin must be positive, got {margin}")
    d = np.asarray(differences, np.float64)
    iv = t_interval(d, 1 - 2 * alpha)
    if len(d) < 2 or d.std(ddof=1) == 0:
        return Equivalence(margin, None, iv, alpha)
    se, df = d.std(ddof=1) / math.sqrt(len(d)), len(d) - 1
    p_low = scipy_stats.t.sf((d.mean() + margin) / se, df)  # H0: mean <= −margin
    p_high = scipy_stats.t.cdf((d.mean() - margin) / se, df)  # H0: mean >= margin
    return Equivalence(margin, float(max(p_low, p_high)), iv, alpha)


@dataclass(frozen=True)
class PairedComparison:
    """a − b over the seeds both have: differences (by seed), their t-interval and tests; the seeds only one
    side has are named (a_only, b_only), never dropped silently."""

    seeds: tuple
    differences: tuple
    interval: Interval
    a_only: tuple = ()
    b_only: tuple = ()

    @property
    def p_value(self) -> Optional[float]:
        """Two-sided paired t-test p."""
        return t_test_p(self.differences)

    @property
    def sign_flip(self) -> Tuple[Optional[float], bool]:
        return sign_flip_p(self.differences)

    @property
    def wilcoxon(self) -> Optional[float]:
        return wilcoxon_p(self.differences)

    @property
    def dz(self) -> Interval:
        return effect_size_dz(self.differences, self.interval.confidence)

    def unpaired_note(self, name_a: str = "a", name_b: str = "b") -> str:
        """Which seeds had no partner (empty when every seed is paired)."""
        parts = [f"{name} seed{'s' if len(only) > 1 else ''} {', '.join(map(str, only))} (no {other} partner)"
                 for name, other, only in ((name_a, name_b, self.a_only), (name_b, name_a, self.b_only)) if only]
        return "unpaired, left out: " + "; ".join(parts) if parts else ""

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
    """Differences a[seed] − b[seed] over the seeds in both (sorted), with their t-interval; the seeds of one
    side only are kept in a_only / b_only."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"no seed in common: {sorted(a)} vs {sorted(b)}")
    diffs = tuple(float(a[s]) - float(b[s]) for s in seeds)
    return PairedComparison(seeds, diffs, t_interval(diffs, confidence), tuple(sorted(set(a) - set(b))),
                            tuple(sorted(set(b) - set(a))))


# ---------------------------------------------------------------------- multiplicity
def holm(pvalues: Sequence[Optional[float]]) -> List[Optional[float]]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: the i-th smallest p times (m − i + 1),
    made monotone and capped at 1. None (no test) stays None and does not count in m."""
    known = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    m, out, running = len(known), [None] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(sorted(known)):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def dunnett_adjust(t_stats: Sequence[float], df: float, corr: np.ndarray, seed: int = 0) -> List[float]:
    """Single-step many-to-one adjusted p: P(max_j |T_j| >= |t_k|) for T multivariate t with `df` degrees of
    freedom and correlation `corr` (k, k) (Dunnett 1955; scipy's multivariate t CDF, seeded quasi-Monte Carlo)."""
    t = np.abs(np.asarray(t_stats, np.float64))
    corr = np.asarray(corr, np.float64)
    if len(t) == 1:
        return [float(2 * scipy_stats.t.sf(t[0], df))]
    mvt = scipy_stats.multivariate_t(np.zeros(len(t)), corr, df=df, allow_singular=True)
    rng = np.random.default_rng(seed)
    return [float(min(1.0, max(0.0, 1 - mvt.cdf(np.full(len(t), tk), lower_limit=np.full(len(t), -tk),
                                                 maxpts=200_000, random_state=rng)))) for tk in t]


def dunnett_paired(arms: Dict[str, Dict[Hashable, float]], control: Dict[Hashable, float]) -> Dict[str, float]:
    """Dunnett-adjusted p of each arm − control, paired by seed over the seeds every arm and the control share:
    the paired t of each arm, their correlation that of the per-seed differences, df = n − 1."""
    seeds = sorted(set(control).intersection(*arms.values()))
    if len(seeds) < 3:
        raise ValueError(f"Dunnett needs at least 3 seeds shared by every arm and the control, got {len(seeds)}")
    diffs = np.array([[arm[s] - control[s] for s in seeds] for arm in arms.values()])  # (k, n)
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / math.sqrt(len(seeds)))
    corr = np.atleast_2d(np.corrcoef(diffs))
    return dict(zip(arms, dunnett_adjust(t, len(seeds) - 1, corr)))


# ---------------------------------------------------------------------- group-sequential looks
SPENDING = ("obrien-fleming", "pocock")


def alpha_spent(fraction, alpha: float = 1 - CONFIDENCE, spending: str = "obrien-fleming"):
    """Lan-DeMets (1983) spending functions, the two-sided alpha used up by information fraction t in (0, 1]:
    O'Brien-Fleming type 2 − 2·Φ(z_{1−α/2} / √t); Pocock type α · ln(1 + (e − 1)·t)."""
    t = np.asarray(fraction, np.float64)
    if spending == "obrien-fleming":
        return 2 * scipy_stats.norm.sf(scipy_stats.norm.isf(alpha / 2) / np.sqrt(t))
    if spending == "pocock":
        return alpha * np.log1p((math.e - 1) * t)
    raise ValueError(f"alpha spending {spending!r} is not valid; choose one of {', '.join(SPENDING)}")


def sequential_boundaries(fractions: Sequence[float], alpha: float = 1 - CONFIDENCE,
                          spending: str = "obrien-fleming", grid: int = 2001) -> List[float]:
    """Two-sided z boundaries c_k of looks at information fractions t_1 < ... < t_K: the chance of crossing at
    look k first, under the null, is α(t_k) − α(t_{k−1}). Z_k = B(t_k) / √t_k for a Brownian motion B; the
    density of B on the region not yet stopped is carried from look to look by numerical integration
    (Armitage, McPherson & Rowe 1969) on `grid` points."""
    t = np.asarray(fractions, np.float64)
    if len(t) == 0 or np.any(np.diff(t) <= 0) or t[0] <= 0 or t[-1] > 1 + 1e-12:
        raise ValueError(f"information fractions must increase within (0, 1], got {list(fractions)}")
    spent = alpha_spent(t, alpha, spending)
    bounds, x, dens = [], None, None
    for k, tk in enumerate(t):
        increment = spent[k] - (spent[k - 1] if k else 0.0)
        if k == 0:
            c = float(scipy_stats.norm.isf(increment / 2))
        else:
            s = math.sqrt(tk - t[k - 1])

            def crossing(c):  # P(not stopped before, |B(t_k)| >= c·√t_k)
                b = c * math.sqrt(tk)
                return np.trapezoid(dens * (scipy_stats.norm.sf((b - x) / s) + scipy_stats.norm.cdf((-b - x) / s)), x)

            c = float(brentq(lambda c: crossing(c) - increment, 1e-3, 40.0, xtol=1e-10))
        bounds.append(c)
        y = np.linspace(-c * math.sqrt(tk), c * math.sqrt(tk), grid)  # (G,) the region not stopped at look k
        if k == 0:
            dens = scipy_stats.norm.pdf(y, scale=math.sqrt(tk))
        else:
            dens = np.trapezoid(dens[None, :] * scipy_stats.norm.pdf((y[:, None] - x[None, :]) / s) / s, x, axis=1)
        x = y
    return bounds


def nominal_p(z: float) -> float:
    """The two-sided p that a z boundary corresponds to: a look crosses when its p is at most this."""
    return float(2 * scipy_stats.norm.sf(z))


# ---------------------------------------------------------------------- planning and failure rates
def paired_seeds_for_power(delta: float, sd: float, power: float = 0.8, alpha: float = 1 - CONFIDENCE) -> int:
    """The least n of paired seeds whose two-sided paired t-test at level α detects a true mean difference
    `delta` (paired SD `sd`) with probability `power` (noncentral t with n − 1 df, noncentrality δ√n / sd)."""
    if not (delta > 0 and sd > 0 and 0 < power < 1):
        raise ValueError(f"need delta > 0, sd > 0 and 0 < power < 1, got {delta}, {sd}, {power}")
    for n in range(2, 100_000):
        crit, nc = scipy_stats.t.isf(alpha / 2, n - 1), delta * math.sqrt(n) / sd
        if scipy_stats.nct.sf(crit, n - 1, nc) + scipy_stats.nct.cdf(-crit, n - 1, nc) >= power:
            return n
    raise ValueError("power not reached below 100,000 pairs")


def binomial_interval(k: int, n: int, confidence: float = CONFIDENCE) -> Interval:
    """k failures of n runs: the rate k/n with its exact (Clopper-Pearson) interval."""
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence, method="exact")
    return Interval(k / n, float(ci.low), float(ci.high), n, confidence)
