"""Training side of diffusion: the scheduler from the config, targets, min-SNR-γ, label dropout."""

import pytest
import torch
from diffusers import DDPMScheduler

from uvic.config import load_config
from uvic.diffusion import build_scheduler, diffusion_loss, drop_labels, loss_weights, snr, training_target
from uvic.model import UViT


def scheduler(**overrides):
    return build_scheduler(load_config(None, [f"diffusion.{k}={v}" for k, v in overrides.items()]).diffusion)


def test_scheduler_follows_the_config_and_round_trips(tmp_path):
    s = scheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  clip_sample=False)
    assert isinstance(s, DDPMScheduler)
    assert (s.config.num_train_timesteps, s.config.beta_schedule, s.config.prediction_type, s.config.clip_sample) == (
        50, "squaredcos_cap_v2", "v_prediction", False)
    s.save_pretrained(tmp_path)
    assert torch.equal(DDPMScheduler.from_pretrained(tmp_path).alphas_cumprod, s.alphas_cumprod)
    default = scheduler()
    assert default.config.beta_start == 1e-4 and default.config.beta_end == 0.02 and default.config.clip_sample


def test_unknown_prediction_type_fails_with_the_valid_ones():
    # checked once, where configs come in (uvic.config); build_scheduler trusts a validated section
    with pytest.raises(ValueError, match="diffusion.prediction_type='noise'.*epsilon, v_prediction, sample"):
        load_config(None, ["diffusion.prediction_type=noise"])


def test_targets_match_the_forward_process():
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = scheduler().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(training_target(scheduler(), x0, noise, t), noise)
    assert torch.equal(training_target(scheduler(prediction_type="sample"), x0, noise, t), x0)
    v = training_target(scheduler(prediction_type="v_prediction"), x0, noise, t)
    torch.testing.assert_close(v, a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_min_snr_weights():
    t = torch.tensor([0, 100, 999])
    s_eps, s_v = scheduler(), scheduler(prediction_type="v_prediction")
    ratio = snr(s_eps, t)
    assert ratio[0] > 5 > ratio[2]
    torch.testing.assert_close(loss_weights(s_eps, t, 5.0), torch.clamp(ratio, max=5.0) / ratio)
    torch.testing.assert_close(loss_weights(s_v, t, 5.0), torch.clamp(ratio, max=5.0) / (ratio + 1))
    assert torch.equal(loss_weights(s_eps, t, None), torch.ones(3))


def test_drop_labels_uses_the_null_class_at_rate_p_uncond():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (20_000,))
    dropped = drop_labels(labels, 0.1, null_label=10)
    changed = dropped != labels
    assert (dropped[changed] == 10).all()
    assert 0.09 < changed.float().mean() < 0.11
    assert torch.equal(drop_labels(labels, 0.0, 10), labels)


def test_loss_is_finite_and_trains_a_tiny_model():
    torch.manual_seed(0)
    model = UViT(sample_size=8, in_channels=1, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    s = scheduler(snr_gamma=5.0)
    x0 = torch.rand(16, 1, 8, 8) * 2 - 1
    labels = torch.randint(0, 3, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(model, s, x0, labels, snr_gamma=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) < sum(losses[:5])


def test_vp_continuous_scheduler_saves_its_sde_and_the_proxy_grid(tmp_path):
    from uvic.diffusion import model_time, vp_sde_of

    s = scheduler(schedule="vp_continuous", clip_sample=False, beta_max=15.0)
    s.save_pretrained(tmp_path)
    loaded = DDPMScheduler.from_pretrained(tmp_path)
    assert vp_sde_of(loaded.config).beta_max == 15.0
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    expected = torch.exp(-0.5 * t**2 * (15.0 - 0.1) - t * 0.1)  # ᾱ(t) of the VP-SDE
    assert (loaded.alphas_cumprod.double() - expected).abs().max() <= 1e-6
    assert float(model_time(999, loaded.config)) == pytest.approx(999.0)  # index 999 is t = 1
    assert float(model_time(0, loaded.config)) == pytest.approx(0.999)
    assert model_time(5, scheduler(timestep_offset=1).config) == 6 and model_time(5, default_config()) == 5


def default_config():
    return scheduler().config
