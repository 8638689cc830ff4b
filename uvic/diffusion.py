"""The training side of diffusion: the noise scheduler, targets, loss weighting, label dropout.

Forward process and targets come from diffusers' DDPMScheduler (add_noise, get_velocity), so
the scheduler saved beside the model is exactly the one sampling starts from:

    x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε
    target = ε (epsilon) | sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0 (v_prediction) | x_0 (sample)

min-SNR-γ (Hang et al., ICCV 2023) weights each example's MSE by min(SNR_t, γ) / SNR_t for ε,
min(SNR_t, γ) / (SNR_t + 1) for v and min(SNR_t, γ) for x_0, with SNR_t = ᾱ_t / (1 - ᾱ_t).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler



def build_scheduler(diffusion_cfg) -> DDPMScheduler:
    """The training DDPMScheduler of a validated `diffusion` config section (uvic.config checks its values)."""
    return DDPMScheduler(
        num_train_timesteps=diffusion_cfg.num_train_timesteps,
        beta_start=diffusion_cfg.beta_start,
        beta_end=diffusion_cfg.beta_end,
        beta_schedule=diffusion_cfg.beta_schedule,
        prediction_type=diffusion_cfg.prediction_type,
        clip_sample=diffusion_cfg.clip_sample,
        clip_sample_range=diffusion_cfg.clip_sample_range,
        # explicit, so a sampler built from this scheduler (in training or from the saved folder) inherits it
        timestep_spacing=diffusion_cfg.get("timestep_spacing", "leading"),
    )


def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 - ᾱ_t) for (B,) integer timesteps -> (B,) float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the network should output at x_t, by the scheduler's prediction type (one of config.PREDICTION_TYPES)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return {"epsilon": noise, "sample": x0}[kind]


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: Optional[float]) -> torch.Tensor:
    """(B,) per-example weights of the MSE: ones, or min-SNR-γ for the scheduler's prediction type."""
    if snr_gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=snr_gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / s
    if kind == "v_prediction":
        return clipped / (s + 1.0)
    return clipped  # sample


def drop_labels(labels: torch.Tensor, p_uncond: float, null_label: int) -> torch.Tensor:
    """Replace each label by the null class with probability p_uncond (classifier-free guidance)."""
    if p_uncond <= 0:
        return labels
    drop = torch.rand(labels.shape, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def diffusion_loss(
    model,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    class_labels: Optional[torch.Tensor] = None,
    snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """Mean (weighted) MSE between model(x_t, t, y) and the target, t ~ U{0..T-1}, ε ~ N(0, I).

    x0: (B, C, H, W) clean images/latents; class_labels: (B,) already label-dropped, or None.
    Randomness comes from the global torch RNG (seeded per process, saved in checkpoints).
    """
    batch = x0.shape[0]
    noise = torch.randn_like(x0)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=x0.device)
    x_t = scheduler.add_noise(x0, noise, timesteps)  # (B, C, H, W)
    target = training_target(scheduler, x0, noise, timesteps)
    prediction = model(x_t, timesteps, class_labels=class_labels).sample
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_example * loss_weights(scheduler, timesteps, snr_gamma)).mean()
