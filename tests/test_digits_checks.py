"""Class histogram and nearest-neighbour memorisation check of digits sample sets, against the real digits'
labels, scipy's chi-square test, a brute-force nearest neighbour and sets whose answer is known."""

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from uvic.digits_checks import (_classifier_input, check_lines, class_balance, class_histogram, digits_checks,
                                memorisation, nearest_distances)
from uvic.digits_classifier import digits_images, split_index


@pytest.fixture(scope="module")
def digits():
    images, labels = digits_images()
    return images, labels, split_index("train"), split_index("heldout")


def test_the_histogram_of_real_held_out_digits_follows_their_labels(digits):
    images, labels, _, heldout = digits
    counts = class_histogram(images[heldout])
    truth = np.bincount(labels[heldout], minlength=10)
    assert counts.sum() == len(heldout) and np.abs(counts - truth).sum() <= 0.05 * len(heldout)
    threes = class_histogram(images[labels == 3])
    assert threes[3] >= 0.9 * (labels == 3).sum()  # the CNN: 97.5 % on the held-out digits, 94 % on the 3s


def test_class_balance_agrees_with_scipy_and_names_a_missing_class():
    counts, reference = np.array([30, 25, 0, 40, 20, 22, 18, 35, 10, 50]), np.full(10, 36)
    balance = class_balance(counts, reference)
    chi2, p = scipy_stats.chisquare(counts, f_exp=np.full(10, counts.sum() / 10))
    assert balance["chi2"] == pytest.approx(chi2) and balance["p"] == pytest.approx(p)
    assert balance["missing"] == [2]
    assert class_balance(np.eye(10)[0] * 100, reference)["tv"] == pytest.approx(0.9)  # all one class of ten
    assert class_balance(reference * 3, reference)["tv"] == 0.0


def test_nearest_distances_are_the_brute_force_ones():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(7, 1, 16, 16, generator=g), torch.rand(11, 1, 16, 16, generator=g)
    brute = [min(float(np.linalg.norm((x - y).numpy())) for y in b) for x in a]
    assert torch.allclose(nearest_distances(a, b), torch.tensor(brute, dtype=torch.float64), atol=1e-9)
    assert (nearest_distances(b, b, exclude_self=True) > 0).all()


def test_new_digits_score_the_quantile_and_copies_score_all(digits):
    images, _, train, heldout = digits
    x_train, x_new = _classifier_input(images[train]), _classifier_input(images[heldout])
    calibrate, unseen = x_new[0::2], x_new[1::2]  # two halves of the held-out digits: both new to the model
    new = memorisation(unseen, x_train, calibrate)["closer"]
    assert new.low <= 0.05 <= new.high and new.n == len(unseen)
    noisy_copies = (x_train[:200] + 0.01 * torch.randn(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    copies = memorisation(noisy_copies, x_train, x_new)
    assert copies["closer"].mean >= 0.99 and copies["median_sample"] < copies["median_heldout"] / 5


def test_digits_checks_of_a_sample_set_and_its_report_lines(digits):
    images, labels, train, _ = digits
    samples = images[train[:300]][..., None]  # "samples" that are training digits: (N, 8, 8, 1) uint8
    checks = digits_checks(samples)
    assert checks["memorisation"]["closer"].mean == 1.0
    lines = check_lines("copier", checks)
    assert "100.0% [" in lines[1] and "copies approach 100 %" in lines[1]
    assert sum(checks["counts"]) == 300 and checks["balance"]["tv"] < 0.1
