"""Two checks of a digits sample set beside its FID: which classes it holds, and whether it copies training digits.

Class histogram: the digits CNN (uvic.digits_classifier, 98 % on the held-out digits) labels every sample; the
counts are compared with the held-out reference's class frequencies by total variation distance and Pearson's
chi-square test. A model that drops a class barely moves the Fréchet distance (class 8 dropped: 0.11, see
docs/results/digits_sanity.md) but shows here as a missing bar.

Memorisation (nearest neighbour): each image's distance to its nearest training digit, in the classifier's input
space (grey levels in [0, 1] at 16 x 16). A held-out digit is a new digit by construction, so the held-out digits'
own distances calibrate "new": the threshold is their 5 % quantile, and a model that does not copy puts about 5 %
of its samples below it. The fraction below, with its exact binomial interval, is the memorisation score (a
copying model approaches 100 %); the median distances are shown beside it.

    checks = digits_checks(samples)       # samples: uint8 (N, H, W, C), any size; train split = data.split=train
    lines = check_lines(checks)
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from scipy import stats as scipy_stats

from .digits_classifier import digits_images, load_digits_cnn, split_index, to_classifier_input
from .stats import Interval, binomial_interval

NUM_CLASSES = 10
COPY_QUANTILE = 0.05  # the held-out digits' distance quantile that calibrates "closer than new digits are"


def _classifier_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, 1, 16, 16) in [0, 1]."""
    x = torch.as_tensor(np.asarray(images))
    x = x[..., None] if x.ndim == 3 else x
    return to_classifier_input(x.permute(0, 3, 1, 2))


def class_histogram(images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """(10,) counts of the digits CNN's labels of uint8 images (N, H, W[, C])."""
    model, _ = load_digits_cnn()
    x = _classifier_input(images)
    with torch.no_grad():
        labels = torch.cat([model(x[i:i + batch_size])[1].argmax(1) for i in range(0, len(x), batch_size)])
    return np.bincount(labels.numpy(), minlength=NUM_CLASSES)


def class_balance(counts: np.ndarray, reference_counts: np.ndarray) -> Dict[str, object]:
    """counts against the reference's class frequencies: total variation distance ½ Σ |p_i − q_i|, Pearson's
    chi-square statistic and p-value (df = classes − 1), and the classes with no sample."""
    counts, reference_counts = np.asarray(counts, dtype=float), np.asarray(reference_counts, dtype=float)
    p, q = counts / counts.sum(), reference_counts / reference_counts.sum()
    expected = q * counts.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    return {"tv": float(0.5 * np.abs(p - q).sum()), "chi2": chi2,
            "p": float(scipy_stats.chi2.sf(chi2, len(counts) - 1)),
            "missing": [int(i) for i in np.flatnonzero(counts == 0)]}


def nearest_distances(images: torch.Tensor, train: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
    """(N,) Euclidean distance of each image (N, 1, 16, 16) to its nearest training image (M, 1, 16, 16);
    exclude_self: `images` are the training images, so each one's own zero distance is skipped."""
    d = torch.cdist(images.flatten(1).double(), train.flatten(1).double())  # (N, M)
    if exclude_self:
        d.fill_diagonal_(float("inf"))
    return d.min(dim=1).values


def memorisation(samples: torch.Tensor, train: torch.Tensor, heldout: torch.Tensor,
                 quantile: float = COPY_QUANTILE) -> Dict[str, object]:
    """The fraction of samples nearer a training image than the held-out images' `quantile` of that distance
    (about `quantile` when the model makes new digits), with its exact binomial interval. Inputs: (N, 1, 16, 16)."""
    new = nearest_distances(heldout, train)
    threshold = float(torch.quantile(new, quantile))
    d = nearest_distances(samples, train)
    closer = int((d < threshold).sum())
    return {"threshold": threshold, "quantile": quantile, "closer": binomial_interval(closer, len(d)),
            "median_sample": float(d.median()), "median_heldout": float(new.median())}


def digits_checks(samples: np.ndarray, train_split: str = "train") -> Dict[str, object]:
    """Class histogram and memorisation of a digits sample set (uint8 (N, H, W[, C])) against the held-out
    reference and the digits the diffusion model trained on (`train_split`, the run's data.split)."""
    images, labels = digits_images()
    heldout = split_index("heldout")
    train = split_index(train_split)
    counts = class_histogram(samples)
    reference = np.bincount(labels[heldout], minlength=NUM_CLASSES)
    return {"counts": counts.tolist(), "balance": class_balance(counts, reference),
            "memorisation": memorisation(_classifier_input(samples), _classifier_input(images[train]),
                                         _classifier_input(images[heldout])),
            "train_split": train_split}


def _interval(iv: Interval) -> str:
    return f"{iv.mean:.1%} [{iv.low:.1%}, {iv.high:.1%}]"


def check_lines(name: str, checks: Optional[Dict[str, object]]) -> List[str]:
    """Markdown lines of one run's digits_checks."""
    if checks is None:
        return []
    balance, memo = checks["balance"], checks["memorisation"]
    missing = f"; no sample of class {', '.join(map(str, balance['missing']))}" if balance["missing"] else ""
    return [
        f"- **{name}**: classes 0-9 {checks['counts']} (digits CNN labels); total variation vs the held-out "
        f"reference {balance['tv']:.3f}, chi-square p = {balance['p']:.3g}{missing}",
        f"  - nearest training digit ({checks['train_split']} split): {_interval(memo['closer'])} of the samples "
        f"are closer than {1 - memo['quantile']:.0%} of held-out digits are (about {memo['quantile']:.0%} for a "
        f"model that makes new digits; copies approach 100 %); median distance {memo['median_sample']:.3f} vs "
        f"{memo['median_heldout']:.3f} for held-out digits",
    ]
