"""uvic.stats: the interval arithmetic against hand computations (t-table quantiles), the bootstrap, and the
sign convention of the paired comparison; the paired tests, multiplicity adjustments, alpha-spending boundaries
and planning figures against hand computations, printed tables, scipy's own routines and simulation."""

import math

import numpy as np
import pytest

from scipy import stats as scipy_stats

from uvic import stats
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
    uvit = {0: 12.0, 1: 15.0, 2: 13.0, 3: 1.0}  # seed 3 has no partner: left out, and named
    cmp = paired_difference(uvic, uvit)
    assert cmp.seeds == (0, 1, 2) and cmp.differences == (-2.0, -3.0, -2.0)
    assert cmp.a_only == () and cmp.b_only == (3,)
    assert cmp.unpaired_note("U-ViC", "U-ViT") == "unpaired, left out: U-ViT seed 3 (no U-ViC partner)"
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


def test_sign_flip_test_is_exact_over_all_sign_patterns():
    # [1..5]: only the all-plus and all-minus patterns reach |sum| = 15: p = 2 / 2^5
    assert stats.sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0]) == (0.0625, True)
    # [1, -2, 3]: sums of ±1 ±2 ±3 are 6, 0, 2, -4, 4, -2, 0, -6; six of eight reach |2|
    assert stats.sign_flip_p([1.0, -2.0, 3.0]) == (0.75, True)


def test_sign_flip_test_beyond_the_exact_limit_matches_the_binomial_law():
    # 20 differences of size 1, 15 positive: the flipped sum is 2·Binomial(20, 1/2) − 20, |sum| >= 10 iff B >= 15
    p, exact = stats.sign_flip_p([1.0] * 15 + [-1.0] * 5)
    assert not exact
    assert p == pytest.approx(2 * scipy_stats.binom.sf(14, 20, 0.5), abs=0.002)


def test_wilcoxon_matches_a_brute_force_enumeration_of_signed_ranks():
    d = np.array([1.5, -0.5, 2.0, 3.0, 4.5, -1.0, 2.5, 3.5])
    ranks = scipy_stats.rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    sums = np.array([ranks[np.array(s, bool)].sum() for s in np.ndindex(*(2,) * len(d))])  # every sign pattern
    p_hand = 2 * min(np.mean(sums >= w_plus), np.mean(sums <= w_plus))
    assert stats.wilcoxon_p(d) == pytest.approx(p_hand)
    assert stats.wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)  # textbook: n = 5, all positive


def test_effect_size_dz_interval_covers_the_true_effect_95_percent_of_the_time():
    rng = np.random.default_rng(3)
    iv = stats.effect_size_dz([1.0, 2.0, 3.0, 4.0, 5.0])
    assert iv.mean == pytest.approx(3 / math.sqrt(2.5))  # mean 3, s = √2.5
    hits = [stats.effect_size_dz(rng.normal(0.5, 1.0, 8)).contains(0.5) for _ in range(400)]
    assert np.mean(hits) == pytest.approx(0.95, abs=0.035)


def test_ratio_on_log_scores_is_the_geometric_mean_ratio_with_its_interval():
    iv = stats.ratio_interval({0: 2.0, 1: 8.0}, {0: 1.0, 1: 2.0})  # log ratios ln 2, ln 4
    # mean 1.5 ln 2, s = ln2 / √2, s/√2 = ln2 / 2, half-width t_{.975,1} · ln2 / 2 with t_{.975,1} = 12.706
    half = 12.706 * math.log(2) / 2
    assert iv.mean == pytest.approx(2 ** 1.5)
    assert iv.low == pytest.approx(math.exp(1.5 * math.log(2) - half), rel=1e-3)
    assert iv.high == pytest.approx(math.exp(1.5 * math.log(2) + half), rel=1e-3)
    with pytest.raises(ValueError, match="positive"):
        stats.ratio_interval({0: 0.0}, {0: 1.0})


def test_tost_is_the_larger_of_two_one_sided_t_tests():
    d = np.array([0.1, -0.2, 0.15, 0.05, 0.0, -0.05, 0.2, 0.1])
    eq = stats.tost(d, margin=0.3)
    p_low = scipy_stats.ttest_1samp(d, -0.3, alternative="greater").pvalue
    p_high = scipy_stats.ttest_1samp(d, 0.3, alternative="less").pvalue
    assert eq.p == pytest.approx(max(p_low, p_high))
    assert eq.equivalent and -0.3 < eq.interval.low and eq.interval.high < 0.3  # the 90 % interval fits
    assert eq.interval.confidence == pytest.approx(0.90)
    wide = stats.tost([0.5, -0.6, 0.4, -0.3, 0.1], margin=0.3)  # inconclusive: the 90 % interval sticks out
    assert not wide.equivalent and (wide.interval.low < -0.3 or wide.interval.high > 0.3)
    with pytest.raises(ValueError, match="positive"):
        stats.tost(d, margin=0.0)


def test_holm_adjusts_step_down_as_a_hand_computation():
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> monotone 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, None, 0.9]) == [pytest.approx(1.0), None, pytest.approx(1.0)]


def test_dunnett_adjustment_matches_the_printed_table_and_scipy():
    # Dunnett's two-sided 5 % table, df = 10: 2 treatments 2.57, 3 treatments 2.76 (correlation 1/2)
    assert stats.dunnett_adjust([2.57, 0.0], 10, np.full((2, 2), 0.5) + 0.5 * np.eye(2))[0] == pytest.approx(0.05, abs=0.002)
    assert stats.dunnett_adjust([2.76, 0.0, 0.0], 10, np.full((3, 3), 0.5) + 0.5 * np.eye(3))[0] == pytest.approx(0.05, abs=0.002)
    rng = np.random.default_rng(0)
    control, *arms = (rng.normal(m, 1.0, 6) for m in (0.0, 1.2, 0.3))
    ref = scipy_stats.dunnett(*arms, control=control, rng=1)  # independent groups of 6: df = 18 − 3
    t = [(a.mean() - control.mean()) / math.sqrt(np.mean([x.var(ddof=1) for x in (control, *arms)]) * 2 / 6)
         for a in arms]
    ours = stats.dunnett_adjust(t, 15, np.array([[1.0, 0.5], [0.5, 1.0]]))
    assert ours == pytest.approx(list(ref.pvalue), abs=0.002)


def test_paired_dunnett_lies_between_the_unadjusted_and_the_bonferroni_p():
    rng = np.random.default_rng(1)
    control = {s: float(v) for s, v in enumerate(rng.normal(1.0, 0.3, 8))}
    arms = {name: {s: control[s] + shift + float(rng.normal(0, 0.2)) for s in control}
            for name, shift in (("a", 0.25), ("b", 0.1), ("c", 0.0))}
    adjusted = stats.dunnett_paired(arms, control)
    for name, arm in arms.items():
        raw = paired_difference(arm, control).p_value
        assert raw <= adjusted[name] <= min(1.0, 3 * raw) + 1e-3
    single = stats.dunnett_paired({"a": arms["a"]}, control)
    assert single["a"] == pytest.approx(paired_difference(arms["a"], control).p_value)


def test_basic_bootstrap_of_two_resampled_sets_matches_scipy():
    rng = np.random.default_rng(2)
    x, y = rng.exponential(1.0, 300), rng.exponential(1.5, 200)

    def diff(a, b):
        return np.mean(a) - np.mean(b)

    ours = bootstrap_interval((x, y), diff, resamples=4000, seed=0, method="basic")
    ref = scipy_stats.bootstrap((x, y), diff, n_resamples=4000, method="basic", vectorized=False, rng=0)
    half = ours.half_width
    assert ours.mean == pytest.approx(diff(x, y))
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.1 * half)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.1 * half)
    pct = bootstrap_interval((x, y), diff, resamples=4000, seed=0)
    assert ours.low == pytest.approx(2 * ours.mean - pct.high) and ours.high == pytest.approx(2 * ours.mean - pct.low)


def test_alpha_spending_boundaries_match_the_printed_values_and_a_simulation():
    assert stats.sequential_boundaries([1.0]) == [pytest.approx(1.959964, abs=1e-5)]
    # Lan-DeMets Pocock type, two equally spaced looks, two-sided 5 %: 2.157, 2.201 (DeMets & Lan 1994)
    assert stats.sequential_boundaries([0.5, 1.0], spending="pocock") == pytest.approx([2.157, 2.201], abs=1e-3)
    t = np.array([1 / 3, 2 / 3, 1.0])
    bounds = stats.sequential_boundaries(t, spending="obrien-fleming")
    assert bounds[0] == pytest.approx(1.959964 / math.sqrt(1 / 3), abs=1e-5)  # first look: z_{.975} / √t
    rng = np.random.default_rng(0)
    paths = np.cumsum(rng.normal(0, 1, (400_000, 3)) * np.sqrt(np.diff(t, prepend=0)), axis=1)  # B(t_k)
    crossed = np.abs(paths / np.sqrt(t)) >= np.array(bounds)
    first = np.cumsum(crossed, axis=1) > 0
    for k in range(3):  # the chance of having stopped by look k is the alpha spent by then
        spent = stats.alpha_spent(t[k])
        assert first[:, k].mean() == pytest.approx(spent, abs=4 * math.sqrt(spent / 400_000) + 1e-4)
    with pytest.raises(ValueError, match="increase"):
        stats.sequential_boundaries([0.6, 0.4])


def test_paired_seeds_for_power_and_exact_failure_rate_interval():
    # the power analysis: paired SD 0.485, difference 0.3, 80 % power: 23 seeds; Bonferroni over 4: 33
    assert stats.paired_seeds_for_power(0.3, 0.485) == 23
    assert stats.paired_seeds_for_power(0.3, 0.485, alpha=0.05 / 4) == 33
    iv = stats.binomial_interval(0, 24)  # no failure in 24: upper bound 1 − 0.025^(1/24)
    assert (iv.mean, iv.low) == (0.0, 0.0) and iv.high == pytest.approx(1 - 0.025 ** (1 / 24))
    assert stats.binomial_interval(3, 10).low == pytest.approx(scipy_stats.beta.ppf(0.025, 3, 8))


def test_kid_of_two_equal_sets_is_torch_fidelitys_unbiased_mmd():
    from torch_fidelity.metric_kid import kid_features_to_metric

    import torch

    from uvic.fid import kid_with_se

    rng = np.random.default_rng(4)
    x, y = rng.normal(0.0, 1.0, (60, 5)), rng.normal(0.3, 1.1, (60, 5))
    # one subset of all 60 (drawn without replacement: a permutation) is the full-set estimator
    ref = kid_features_to_metric(torch.from_numpy(x), torch.from_numpy(y), kid_subsets=1, kid_subset_size=60,
                                 verbose=False, rng_seed=0, kid_kernel="poly", kid_kernel_poly_degree=3,
                                 kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
    kid, _ = kid_with_se(x, y)
    assert kid == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)


def test_kid_standard_error_is_the_jackknife_and_matches_the_spread_over_replications():
    from uvic.fid import kid_with_se

    def mmd(a, b):  # the unbiased MMD² recomputed from scratch
        k = lambda p, q: (p @ q.T / p.shape[1] + 1) ** 3  # noqa: E731
        kaa, kbb = k(a, a), k(b, b)
        n, m = len(a), len(b)
        return ((kaa.sum() - np.trace(kaa)) / (n * (n - 1)) + (kbb.sum() - np.trace(kbb)) / (m * (m - 1))
                - 2 * k(a, b).mean())

    rng = np.random.default_rng(5)
    x, y = rng.normal(0.0, 1.0, (12, 3)), rng.normal(0.5, 1.0, (9, 3))
    loo_x = np.array([mmd(np.delete(x, i, 0), y) for i in range(12)])
    loo_y = np.array([mmd(x, np.delete(y, j, 0)) for j in range(9)])
    var = 11 / 12 * ((loo_x - loo_x.mean()) ** 2).sum() + 8 / 9 * ((loo_y - loo_y.mean()) ** 2).sum()
    kid, se = kid_with_se(x, y)
    assert kid == pytest.approx(mmd(x, y)) and se == pytest.approx(math.sqrt(var))
    draws = [kid_with_se(rng.normal(0, 1, (150, 4)), rng.normal(0.3, 1, (100, 4))) for _ in range(60)]
    spread = np.std([d[0] for d in draws], ddof=1)
    assert np.mean([d[1] for d in draws]) == pytest.approx(spread, rel=0.3)


def test_fid_bootstrap_resamples_the_reference_too_and_basic_is_centred_on_the_fid():
    from uvic.fid import FIDStatistics, bootstrap_fid

    rng = np.random.default_rng(6)
    x, r = rng.normal(0.0, 1.0, (200, 4)), rng.normal(0.2, 1.0, (150, 4))
    ref = FIDStatistics.from_features(r)
    samples_only = bootstrap_fid(x, ref, resamples=300, seed=0, method="percentile")
    both = bootstrap_fid(x, ref, resamples=300, seed=0, method="percentile", ref_features=r)
    assert both.half_width > samples_only.half_width  # the reference's finite size adds spread
    basic = bootstrap_fid(x, ref, resamples=300, seed=0, ref_features=r)
    # percentile intervals of a biased-upward statistic sit above it; the basic one reflects them about it
    assert both.low > basic.low and basic.contains(basic.mean)
