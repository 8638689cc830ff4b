"""uvic.stats: the interval arithmetic against hand computations (t-table quantiles), the bootstrap, and the
sign convention of the paired comparison."""

import math

import numpy as np
import pytest

from uvic.stats import bootstrap_interval, paired_difference, t_interval

# two-sided 95 % quantiles t_{0.975, df} from a printed t-table
T_TABLE = {2: 4.3027, 4: 2.7764}


def test_t_interval_of_known_values_matches_a_hand_computation():
    iv = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, s = √2.5, s/√5 = √0.5, half-width t_{.975,4} · √0.5
    half = T_TABLE[4] * math.sqrt(0.5)
    assert iv.mean == pytest.approx(3.0) and iv.n == 5
    assert iv.low == pytest.approx(3.0 - half, abs=1e-4) and iv.high == pytest.approx(3.0 + half, abs=1e-4)
    assert iv.format(".2f") == "3.00 ± 1.96 (n = 5)" and t_interval([-1.0, -2.0]).format("+.1f").startswith("-1.5 ± 6.4")


def test_one_seed_is_reported_as_one_seed_without_interval():
    iv = t_interval([7.5])
    assert (iv.mean, iv.low, iv.high, iv.n) == (7.5, None, None, 1)
    assert iv.format(".1f") == "7.5 (n = 1)" and not iv.contains(7.5)
    with pytest.raises(ValueError, match="non-empty"):
        t_interval([])


def test_paired_difference_is_a_minus_b_over_common_seeds():
    uvic = {0: 10.0, 1: 12.0, 2: 11.0}
    uvit = {0: 12.0, 1: 15.0, 2: 13.0, 3: 1.0}  # seed 3 has no partner: left out
    cmp = paired_difference(uvic, uvit)
    assert cmp.seeds == (0, 1, 2) and cmp.differences == (-2.0, -3.0, -2.0)
    # mean −7/3, s = √(1/3), s/√3 = 1/3, half-width t_{.975,2} / 3
    half = T_TABLE[2] / 3
    assert cmp.interval.mean == pytest.approx(-7 / 3)
    assert cmp.interval.low == pytest.approx(-7 / 3 - half, abs=1e-4)
    assert cmp.interval.high == pytest.approx(-7 / 3 + half, abs=1e-4)
    assert cmp.verdict("U-ViC", "U-ViT").startswith("U-ViC is better (lower) than U-ViT")
    swapped = paired_difference(uvit, uvic)  # the sign follows the order of the arguments
    assert swapped.interval.mean == pytest.approx(7 / 3)
    assert swapped.verdict("U-ViT", "U-ViC").startswith("U-ViC is better")


def test_paired_interval_containing_zero_is_no_significant_difference():
    cmp = paired_difference({0: 10.0, 1: 12.0, 2: 11.0}, {0: 11.0, 1: 11.0, 2: 11.5})
    assert cmp.interval.contains(0.0)
    assert cmp.verdict("U-ViC", "U-ViT").startswith("no significant difference")
    one = paired_difference({0: 1.0}, {0: 2.0, 1: 3.0})
    assert one.interval.low is None and "no conclusion" in one.verdict()
    with pytest.raises(ValueError, match="no seed in common"):
        paired_difference({0: 1.0}, {1: 1.0})


def test_bootstrap_interval_is_reproducible_and_covers_the_mean():
    x = np.random.default_rng(0).normal(5.0, 2.0, size=400)
    a = bootstrap_interval(x, np.mean, resamples=200, seed=1)
    assert a == bootstrap_interval(x, np.mean, resamples=200, seed=1)  # fixed seed, same interval
    assert a.mean == pytest.approx(x.mean()) and a.low < a.mean < a.high and a.n == 400
    # the standard error of a mean is s/√n: the 95 % percentile interval is about ±1.96 of it
    assert a.half_width == pytest.approx(1.96 * x.std(ddof=1) / 20, rel=0.25)
    constant = bootstrap_interval(np.ones(10), np.mean, resamples=20)
    assert constant.low == constant.high == 1.0
