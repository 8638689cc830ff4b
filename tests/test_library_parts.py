"""The library parts that replaced hand-written ones agree with independent references: diffusers' compute_snr
(min-SNR weights) and torch-fidelity's fid_statistics_to_metric (the Fréchet distance)."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from uvic.diffusion import min_snr_weights, snr
from uvic.fid import frechet_distance


@pytest.mark.parametrize("kwargs", [{}, {"beta_schedule": "squaredcos_cap_v2"},
                                    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}])
def test_snr_is_the_float64_quotient_of_the_schedule_within_float32_rounding(kwargs):
    scheduler = DDPMScheduler(**kwargs)
    t = torch.arange(scheduler.config.num_train_timesteps)
    alpha_bar = scheduler.alphas_cumprod.double()  # the scheduler's ᾱ_t (float32 values), the quotient in float64
    exact = alpha_bar / (1 - alpha_bar)
    assert torch.allclose(snr(scheduler, t).double(), exact, rtol=1e-6, atol=0)  # measured: 3.4e-7


@pytest.mark.parametrize("prediction_type, divide", [("epsilon", 0.0), ("v_prediction", 1.0)])
def test_min_snr_weights_are_the_min_snr_papers(prediction_type, divide):
    """Hang et al. 2023: w = min(SNR, γ) / SNR for ε, / (SNR + 1) for v (diffusers' train_text_to_image.py)."""
    values = torch.tensor([0.01, 1.0, 5.0, 50.0])
    expected = torch.tensor([min(v, 5.0) / (v + divide) for v in values.tolist()])
    assert torch.allclose(min_snr_weights(values, prediction_type, 5.0), expected)


def test_frechet_distance_of_rank_deficient_statistics_matches_the_symmetric_square_root():
    """Fewer samples (40) than features (64): Σ1 is singular; tr (Σ1 Σ2)^½ = tr (Σ1^½ Σ2 Σ1^½)^½."""
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(40, 64)) @ rng.normal(size=(64, 64)) * 0.3 + rng.normal(size=64) for _ in range(2)]
    (mu1, s1), (mu2, s2) = ((f.mean(0), np.cov(f, rowvar=False)) for f in feats)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # Σ1^½, symmetric
    tr = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)  # measured: 5.3e-9
    assert frechet_distance(mu1.astype(np.float32), s1.astype(np.float32), mu2, s2) == pytest.approx(expected, rel=1e-6)
