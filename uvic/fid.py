"""Distances between feature sets: the Fréchet distance between Gaussians fitted to features, the statistics
files that hold them, the bootstrap interval of an FID over samples and reference, and KID with its standard
error. Pure numpy: no feature extractor here (see uvic.metrics).

    d² = ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)        (Heusel et al. 2017; Dowson & Landau 1982)
    KID = unbiased MMD² with k(x, y) = (xᵀy / D + 1)³     (Bińkowski et al. 2018; torch-fidelity's kernel)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .stats import Interval, bootstrap_interval

SYMMETRY_RTOL = 1e-6  # of the largest |entry|: float32-stored covariances are symmetric to rounding
PSD_RTOL = 1e-4  # of the largest |entry|: rounding leaves eigenvalues of a rank-deficient covariance near -eps·D


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), in float64, by torch-fidelity's fid_statistics_to_metric.

    It replaced uvic's own eigh-based formula after a side-by-side measurement (tests/test_library_parts.py):
    the two agree to 6.4e-8 relative, rank-deficient Σ (fewer samples than features) included, in the same
    time at 2048 features. Here only the shapes are checked and both sides cast to float64 (torch-fidelity
    asserts equal dtypes).
    """
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}"
        )
    stats = ({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2})
    return float(fid_statistics_to_metric(*stats, verbose=False)[KEY_METRIC_FID])


@dataclass
class FIDStatistics:
    """Mean (D,) and covariance (D, D) of features, and which features they are (None: unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    extractor: Optional[str] = None  # torch-fidelity feature extractor name
    layer: Optional[str] = None  # its feature layer
    weights: Optional[str] = None  # sha256 prefix of the extractor weights
    num_samples: Optional[int] = None

    @classmethod
    def from_features(cls, features, **tags) -> "FIDStatistics":
        """(N, D) features -> statistics (np.cov: unbiased, as TTUR, pytorch-fid and torch-fidelity)."""
        f = np.asarray(features, dtype=np.float64)
        return cls(f.mean(axis=0), np.cov(f, rowvar=False), num_samples=len(f), **tags)

    def problem(self) -> Optional[str]:
        """None if these are statistics a Fréchet distance can use, else what is wrong: shapes (D,) and (D, D),
        finite values, a covariance symmetric and positive semi-definite within float rounding (a covariance
        is both by definition; a negated or damaged one would give a negative or infinite FID)."""
        mu, sigma = self.mu, self.sigma
        d = mu.shape[0] if mu.ndim == 1 else -1
        if d < 1 or sigma.shape != (d, d):
            return f"mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D)"
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            return "mu or sigma holds non-finite values (nan or inf)"
        scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
        if np.abs(sigma - sigma.T).max() > SYMMETRY_RTOL * scale:
            return f"sigma is not symmetric (largest |sigma - sigma.T| {np.abs(sigma - sigma.T).max():.3g})"
        lowest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2)[0])
        if lowest < -PSD_RTOL * scale:
            return f"sigma is not positive semi-definite (smallest eigenvalue {lowest:.3g}, largest |entry| {scale:.3g})"
        return None

    def validate(self, source: str) -> "FIDStatistics":
        """self, or ValueError naming `source` when problem() finds something."""
        problem = self.problem()
        if problem is not None:
            raise ValueError(f"{source} holds unusable FID statistics: {problem}; recompute them (eval_fid.py "
                             f"REF --save-stats PATH)")
        return self

    @property
    def tagged(self) -> bool:
        return self.extractor is not None

    def describe(self) -> str:
        if not self.tagged:
            return f"untagged {self.mu.shape[0]}-d statistics"
        return f"{self.extractor} layer {self.layer} (weights {self.weights})"

    def save(self, path) -> Path:
        """A .npz readable by pytorch-fid / U-ViT / ADM tools (mu, sigma) that also names its features."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"statistics file {path} must end in .npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        tags = {k: np.str_(v) for k, v in (("extractor", self.extractor), ("layer", self.layer),
                                           ("weights", self.weights)) if v is not None}
        if self.num_samples is not None:
            tags["num_samples"] = np.int64(self.num_samples)
        np.savez(path, mu=self.mu, sigma=self.sigma, **tags)
        return path

    @classmethod
    def load(cls, path) -> "FIDStatistics":
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f.files or "sigma" not in f.files:
                raise ValueError(f"{path} is not a statistics file: it has {f.files}, expected mu and sigma")
            tag = {k: str(f[k]) for k in ("extractor", "layer", "weights") if k in f.files}
            n = int(f["num_samples"]) if "num_samples" in f.files else None
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
        return cls(mu, sigma, num_samples=n, **tag).validate(str(path))


def bootstrap_fid(features, ref: FIDStatistics, *, resamples: int = 200, seed: int = 0, ref_features=None,
                  method: str = "basic") -> Interval:
    """FID of (N, D) sample features against `ref` with a bootstrap interval: the sample features and, when
    `ref_features` (M, D) are given, the reference features too are resampled with replacement (independently)
    and the FID recomputed `resamples` times (seeded). basic (default): 2·FID − quantiles, which undoes the rise
    of FID under resampling instead of copying it; percentile: the quantiles themselves."""
    def fid_of(f, r=None):  # (N, D), (M, D) -> FID
        mu_r, sigma_r = (ref.mu, ref.sigma) if r is None else (r.mean(axis=0), np.cov(r, rowvar=False))
        return frechet_distance(f.mean(axis=0), np.cov(f, rowvar=False), mu_r, sigma_r)

    data = np.asarray(features, np.float64)
    if ref_features is not None:
        data = (data, np.asarray(ref_features, np.float64))
    return bootstrap_interval(data, fid_of, resamples=resamples, seed=seed, method=method)


def _cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + 1.0) ** 3  # (N, M)


def kid_with_se(features, ref_features, *, max_n: int = 5000, seed: int = 0) -> Tuple[float, float]:
    """(KID, its standard error): the unbiased MMD² of all sample features (N, D) against all reference features
    (M, D) (each capped at max_n, a seeded subset: the kernel matrices are N², M²), and the two-sample
    delete-one jackknife SE (Arvesen 1969): var = (N−1)/N Σ_i (θ₋ᵢ − θ̄)² over samples plus the same over
    reference. torch-fidelity's "± std" is the spread over overlapping subsets, not a standard error."""
    rng = np.random.default_rng(seed)
    x, y = (np.asarray(a, np.float64) for a in (features, ref_features))
    x, y = (a[np.sort(rng.choice(len(a), max_n, replace=False))] if len(a) > max_n else a for a in (x, y))
    n, m = len(x), len(y)
    if n < 3 or m < 3:
        raise ValueError(f"KID with a standard error needs at least 3 samples and 3 reference images, got {n}, {m}")
    kxx, kyy, kxy = _cubic_kernel(x, x), _cubic_kernel(y, y), _cubic_kernel(x, y)
    rx, ry = kxx.sum(1) - np.diag(kxx), kyy.sum(1) - np.diag(kyy)  # off-diagonal row sums
    sxx, syy, sxy = rx.sum(), ry.sum(), kxy.sum()

    def mmd(sxx, syy, sxy, n, m):
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)

    drop_x = mmd(sxx - 2 * rx, syy, sxy - kxy.sum(1), n - 1, m)  # (N,) without sample i
    drop_y = mmd(sxx, syy - 2 * ry, sxy - kxy.sum(0), n, m - 1)  # (M,) without reference j
    var = (n - 1) / n * ((drop_x - drop_x.mean()) ** 2).sum() + (m - 1) / m * ((drop_y - drop_y.mean()) ** 2).sum()
    return float(mmd(sxx, syy, sxy, n, m)), float(np.sqrt(var))
