"""Diffusion schedules, the timestep -> model-time map, training loss, and U-ViT's official samplers.

Two schedules (`diffusion.schedule`):

- "discrete": a diffusers DDPMScheduler (beta_schedule, beta_start, beta_end); the model sees the
  integer timestep i in 0..T-1 plus `diffusion.timestep_offset` (1 for U-ViT's discrete ImageNet H
  models, trained on n = 1..N where diffusers' index n-1 has the same noise level).
- "vp_continuous": U-ViT's VP-SDE (baofff/U-ViT sde.py): β(t) = β_min + t (β_max − β_min) on
  t ∈ [0, 1], log α_t = −¼ t² (β_max − β_min) − ½ t β_min with x_t = α_t x_0 + σ_t ε, σ_t² = 1 − α_t².
  The model sees 999·t. Training draws t ~ U(t_min, 1). For diffusers samplers the saved scheduler is a
  discrete proxy: a DDPMScheduler whose ᾱ_i is the SDE's ᾱ at t = (i+1)/T, so index i maps to model
  time 999·(i+1)/T. The SDE facts travel in the scheduler config under SCHEDULE_KEY (a private key
  that diffusers' from_config carries over to every sampler built from it).

`model_time` is the one place a sampler's timestep becomes the model's time input.

Official samplers, restated as diffusers schedulers (set_timesteps / step) so UViCPipeline runs them:

- EulerMaruyamaScheduler: Euler–Maruyama on the reverse VP-SDE (sde.py `euler_maruyama` with
  `ReverseSDE`): U-ViT-S/2 on CIFAR-10, 1,000 steps, FID 3.11.
- DPMSolverFastScheduler: DPM-Solver "fast" for noise prediction (dpm_solver_pytorch.py, as eval_ldm.py
  calls it: single-step orders 3,…,3 then 2 or 1, logSNR-uniform steps, t from 1 to 1e-4): U-ViT-L/2
  (ImageNet 256, FID 3.40) and L/4 (ImageNet 512, FID 4.67), 50 evaluations.
- DPMSolverFastScheduler(algorithm_type="dpmsolver++", skip_type="time_uniform") on the discrete SD
  schedule with timestep offset 1: the H and MS-COCO models' DPM-Solver++ (dpm_solver_pp.py "fast", as
  eval_ldm_discrete.py calls it). Its intermediate points are the points of one time-uniform grid that fall
  inside each step (r from λ at them), not λ-fractions. diffusers' DPMSolverSinglestepScheduler(order 3,
  dpmsolver++, trailing) comes within 7e-5 at 50 steps on the test's toy but evaluates the model at integer
  timesteps (up to 0.5 from the official times) and orders other step counts differently (0.2 away at 48).

The loss: mean over pixels of the squared error to the target (ε, v or x_0; vp_continuous: ε, as
U-ViT's LSimple), optionally min-SNR-γ weighted (Hang et al., ICCV 2023): min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR + 1) for v, min(SNR, γ) for x_0.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor


# scheduler-config entry: {"schedule": "vp_continuous", "beta_min", "beta_max", "t_min"} or
# {"schedule": "discrete", "timestep_offset"}; absent = discrete, offset 0
SCHEDULES = ("discrete", "vp_continuous")  # discrete: diffusers betas; vp_continuous: U-ViT's VP-SDE, model time 999·t
SCHEDULE_KEY = "_uvic_schedule"
VP_TIME_SCALE = 999.0  # U-ViT feeds a continuous-time model 999·t (sde.ScoreModel.predict)


# ---------------------------------------------------------------------- the continuous VP-SDE
@dataclass(frozen=True)
class VPSDE:
    """Linear-β VP-SDE on t ∈ [0, 1]. Functions take float64 tensors of t (any shape)."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def beta(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_alpha(self, t):  # log α_t, α_t = sqrt(ᾱ_t)
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha_bar(self, t):
        return torch.exp(2.0 * self.log_alpha(t))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t):  # half log-SNR: log α_t − log σ_t
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def inverse_lambda(self, lam):
        """t with λ(t) = lam: the positive root of the quadratic ¼ t² Δβ + ½ t β_min = ½ log(1 + e^{−2λ})."""
        delta = self.beta_max - self.beta_min
        c = 2.0 * delta * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        return c / (torch.sqrt(self.beta_min**2 + c) + self.beta_min) / delta


@dataclass(frozen=True)
class DiscreteVP:
    """A discrete schedule as dpm_solver_pp.py sees it: t_n = n/T (n = 1..T) carries ᾱ_n, log α is
    piecewise linear in t between them. log_alphas: (T,) float64, ½ log ᾱ_n."""

    log_alphas: torch.Tensor

    @property
    def t_grid(self) -> torch.Tensor:
        n = len(self.log_alphas)
        return torch.arange(1, n + 1, dtype=torch.float64) / n

    def log_alpha(self, t):
        return _interp(torch.as_tensor(t, dtype=torch.float64), self.t_grid, self.log_alphas)

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t):
        return self.log_alpha(t) - torch.log(self.sigma(t))

    def inverse_lambda(self, lam):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        return _interp(log_alpha, self.log_alphas.flip(0), self.t_grid.flip(0))


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through (xp, fp), xp increasing, extrapolating the end segments."""
    i = torch.clamp(torch.searchsorted(xp, x.reshape(-1).contiguous()), 1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return (f0 + (x.reshape(-1) - x0) * (f1 - f0) / (x1 - x0)).reshape(x.shape)


def vp_sde_of(scheduler_config) -> Optional[VPSDE]:
    """The VP-SDE a scheduler config was made from, or None for a discrete schedule."""
    facts = scheduler_config.get(SCHEDULE_KEY) if scheduler_config is not None else None
    if not facts or facts.get("schedule") != "vp_continuous":
        return None
    return VPSDE(float(facts["beta_min"]), float(facts["beta_max"]))


def model_time(timestep, scheduler_config, timestep_offset: int = 0):
    """The model's time input for a sampler's timestep (the one map, in training and sampling).

    discrete: timestep + offset, the offset being `timestep_offset` (a pipeline's) if nonzero, else the
    scheduler's own (SCHEDULE_KEY, from diffusion.timestep_offset). vp_continuous: diffusers index i
    stands for t = (i+1)/T and the model sees 999·t (the official samplers' timesteps use the same units).
    """
    facts = (scheduler_config.get(SCHEDULE_KEY) if scheduler_config is not None else None) or {}
    if facts.get("schedule") == "vp_continuous":
        n = scheduler_config["num_train_timesteps"]
        return (torch.as_tensor(timestep, dtype=torch.float64) + 1.0) * (VP_TIME_SCALE / n)
    offset = timestep_offset or facts.get("timestep_offset", 0)
    return timestep + offset if offset else timestep


def vp_proxy_alphas_cumprod(sde: VPSDE, num_train_timesteps: int) -> torch.Tensor:
    """(T,) float64: ᾱ at t = (i+1)/T, the discrete grid diffusers samplers see for a continuous model."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return sde.alpha_bar(t)


def build_scheduler(diffusion_cfg) -> DDPMScheduler:
    """The training DDPMScheduler of a validated `diffusion` config section (for vp_continuous: the proxy grid)."""
    schedule = diffusion_cfg.get("schedule", "discrete")
    common = dict(
        num_train_timesteps=diffusion_cfg.num_train_timesteps,
        prediction_type=diffusion_cfg.prediction_type,
        clip_sample=diffusion_cfg.clip_sample,
        clip_sample_range=diffusion_cfg.clip_sample_range,
        # explicit, so a sampler built from this scheduler (in training or from the saved folder) inherits it
        timestep_spacing=diffusion_cfg.get("timestep_spacing", "leading"),
    )
    if schedule == "discrete":
        scheduler = DDPMScheduler(
            beta_start=diffusion_cfg.beta_start,
            beta_end=diffusion_cfg.beta_end,
            beta_schedule=diffusion_cfg.beta_schedule,
            **common,
        )
        offset = int(diffusion_cfg.get("timestep_offset", 0))
        if offset:  # U-ViT's H models: trained on n = i + 1
            scheduler.register_to_config(**{SCHEDULE_KEY: {"schedule": "discrete", "timestep_offset": offset}})
        return scheduler
    sde = VPSDE(float(diffusion_cfg.beta_min), float(diffusion_cfg.beta_max))
    return vp_proxy_scheduler(sde, diffusion_cfg.get("t_min", 0.0), **common)


def vp_proxy_betas(sde: VPSDE, num_train_timesteps: int) -> List[float]:
    """The β_i whose cumulative product is vp_proxy_alphas_cumprod."""
    alphas_cumprod = vp_proxy_alphas_cumprod(sde, num_train_timesteps)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1.0 - alphas_cumprod / previous).tolist()


def vp_proxy_scheduler(sde: VPSDE, t_min: float = 0.0, num_train_timesteps: int = 1000, **config) -> DDPMScheduler:
    """The DDPMScheduler that stands for a continuous VP-SDE model (proxy grid + SCHEDULE_KEY)."""
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps,
                              trained_betas=vp_proxy_betas(sde, num_train_timesteps), **config)
    scheduler.register_to_config(**{SCHEDULE_KEY: vp_schedule_facts(sde, t_min)})
    return scheduler


def reference_scheduler(schedule: dict) -> Tuple[DDPMScheduler, int]:
    """(scheduler, timestep offset) of a reference config's `schedule` section:

        {kind: vp_continuous, beta_min: 0.1, beta_max: 20}             # train.py, train_ldm.py
        {kind: discrete, beta_schedule: scaled_linear, beta_start: 0.00085, beta_end: 0.012,
         num_train_timesteps: 1000, timestep_offset: 1}                  # train_ldm_discrete.py
    """
    schedule = dict(schedule)
    kind = schedule.pop("kind", None)
    if kind not in SCHEDULES:
        raise ValueError(f"schedule.kind={kind!r} is not valid; choose one of: {', '.join(SCHEDULES)}")
    if kind == "vp_continuous":
        unknown = set(schedule) - {"beta_min", "beta_max", "num_train_timesteps"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} in a vp_continuous schedule; valid: beta_min, beta_max, num_train_timesteps")
        sde = VPSDE(float(schedule.get("beta_min", 0.1)), float(schedule.get("beta_max", 20.0)))
        return vp_proxy_scheduler(sde, num_train_timesteps=schedule.get("num_train_timesteps", 1000), clip_sample=False), 0
    offset = int(schedule.pop("timestep_offset", 0))
    return DDPMScheduler(clip_sample=False, **schedule), offset


def vp_schedule_facts(sde: VPSDE, t_min: float = 0.0) -> dict:
    """What SCHEDULE_KEY holds for a continuous VP-SDE model."""
    return {"schedule": "vp_continuous", "beta_min": sde.beta_min, "beta_max": sde.beta_max, "t_min": float(t_min)}


# ---------------------------------------------------------------------- training loss
def snr(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR_t = ᾱ_t / (1 - ᾱ_t) for (B,) integer timesteps -> (B,) float32: diffusers' compute_snr (its min-SNR
    training scripts' own; within 3.5e-7 relative of the direct quotient, tests/test_library_parts.py)."""
    from diffusers.training_utils import compute_snr

    return compute_snr(scheduler, timesteps)


def training_target(scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the network should output at x_t, by the scheduler's prediction type (one of config.PREDICTION_TYPES)."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    return {"epsilon": noise, "sample": x0}[kind]


def min_snr_weights(snr_values: torch.Tensor, prediction_type: str, snr_gamma: Optional[float]) -> torch.Tensor:
    """(B,) min-SNR-γ weights of the MSE for per-example SNRs (ones when snr_gamma is None)."""
    if snr_gamma is None:
        return torch.ones_like(snr_values)
    clipped = torch.clamp(snr_values, max=snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr_values
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped  # sample


def loss_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, snr_gamma: Optional[float]) -> torch.Tensor:
    """(B,) per-example weights of the MSE: ones, or min-SNR-γ for the scheduler's prediction type."""
    if snr_gamma is None:
        return torch.ones(timesteps.shape, device=timesteps.device)
    return min_snr_weights(snr(scheduler, timesteps), scheduler.config.prediction_type, snr_gamma)


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
    encoder_hidden_states: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean (weighted) MSE between model(x_t, time, y) and the target, ε ~ N(0, I).
    encoder_hidden_states: text-to-image context (B, L, D), already dropped to the empty prompt's, or None.

    discrete: t ~ U{0..T-1}, time = t. vp_continuous: t ~ U(t_min, 1), time = 999·t, target ε.
    x0: (B, C, H, W) clean images/latents; class_labels: (B,) already label-dropped, or None.
    Randomness comes from the global torch RNG (seeded per process, saved in checkpoints).
    """
    batch = x0.shape[0]
    noise = torch.randn_like(x0)
    sde = vp_sde_of(scheduler.config)
    if sde is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=x0.device)
        x_t = scheduler.add_noise(x0, noise, timesteps)  # (B, C, H, W)
        target = training_target(scheduler, x0, noise, timesteps)
        time_input = model_time(timesteps, scheduler.config)
        weights = loss_weights(scheduler, timesteps, snr_gamma)
    else:
        t_min = float(scheduler.config[SCHEDULE_KEY].get("t_min", 0.0))
        t = t_min + (1.0 - t_min) * torch.rand(batch, device=x0.device, dtype=torch.float64)  # (B,)
        alpha, sigma = torch.exp(sde.log_alpha(t)), sde.sigma(t)
        x_t = (alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * noise).to(x0.dtype)
        target = noise
        time_input = (VP_TIME_SCALE * t).float()
        weights = min_snr_weights((alpha / sigma).square().float(), "epsilon", snr_gamma)
    text = {} if encoder_hidden_states is None else {"encoder_hidden_states": encoder_hidden_states}
    prediction = model(x_t, time_input, class_labels=class_labels, **text).sample
    per_example = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    return (per_example * weights).mean()


# ---------------------------------------------------------------------- official samplers
class _OfficialSampler(SchedulerMixin, ConfigMixin):
    """Shared parts of the official samplers: their noise schedule (`sde`), times in diffusers index units,
    the loop counter. `timesteps` hold T·t − 1, so `model_time` maps them to 999·t for a VP-SDE model (as
    for the discrete proxy) and, with offset 1, to n = T·t for U-ViT's discrete H models."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]  # their config keys pass silently in from_config
    order = 1
    init_noise_sigma = 1.0

    def _setup(self):
        self.sde = VPSDE(self.config.beta_min, self.config.beta_max)
        # every sampler built from this one carries the schedule, so `model_time` knows it
        self.register_to_config(**{SCHEDULE_KEY: vp_schedule_facts(self.sde)})
        self.timesteps = torch.zeros(0, dtype=torch.float64)
        self._step_index = 0

    def _expose(self, times: torch.Tensor, device) -> None:
        """times: (M,) float64 continuous t at which the model is evaluated, in order."""
        self._eval_times = times
        self.timesteps = (times * self.config.num_train_timesteps - 1.0).to(device)
        self.num_inference_steps = len(times)
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _next(self):
        if self._step_index >= len(self.timesteps):
            raise RuntimeError(f"{type(self).__name__}.step called more often than set_timesteps allows")
        i = self._step_index
        self._step_index += 1
        return i


class EulerMaruyamaScheduler(_OfficialSampler):
    """Euler–Maruyama on the reverse VP-SDE dx = [f(x,t) − g(t)² ∇log p_t(x)] dt + g(t) dw̄ (sde.py).

    Times: t_k = linspace(t_eps, 1, N) from 1 down, then a last, noiseless step to t = 0; the model is
    evaluated at each t_k (N evaluations). With f = −½β(t)x, g² = β(t) and ∇log p_t = −ε̂/σ_t, one step
    from t to s < t is x ← x + [−½β x + β ε̂/σ_t](s − t) + sqrt(β (t − s)) z, z ~ N(0, I) (z = 0 into s = 0).
    Reproduces U-ViT-S/2 on CIFAR-10 (FID 3.11) with N = 1000.
    """

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_min: float = 0.1, beta_max: float = 20.0,
                 t_eps: float = 1e-3, prediction_type: str = "epsilon"):
        if prediction_type != "epsilon":
            raise ValueError(f"EulerMaruyamaScheduler takes noise predictions; prediction_type={prediction_type!r}")
        self._setup()

    def set_timesteps(self, num_inference_steps: int, device=None):
        times = torch.linspace(self.config.t_eps, 1.0, num_inference_steps, dtype=torch.float64)
        self._times = torch.cat([torch.zeros(1, dtype=torch.float64), times]).flip(0)  # 1 ... t_eps, 0
        self._expose(self._times[:-1], device)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        i = self._next()
        t, s = self._times[i], self._times[i + 1]
        beta, sigma = float(self.sde.beta(t)), float(self.sde.sigma(t))
        x = sample.float()
        drift = -0.5 * beta * x + (beta / sigma) * model_output.float()  # (B, C, H, W)
        x = x + drift * float(s - t)
        if s > 0:
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + math.sqrt(beta * float(t - s)) * noise
        return SchedulerOutput(prev_sample=x) if return_dict else (x,)


# dpm_solver_pytorch's intermediate points of a single-step DPM-Solver step of each order, as fractions r of
# h = λ_t − λ_s (its defaults, used with logSNR steps; dpm_solver_pp's time-uniform "fast" takes them from its grid)
_DPM_FRACTIONS = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


class DPMSolverFastScheduler(_OfficialSampler):
    """U-ViT's DPM-Solver samplers (Lu et al. 2022): single-step, orders 3,…,3 then 2 or 1 so the model is
    evaluated exactly `steps` times (K = steps//3 + 1 steps), no final denoise.

    algorithm_type "dpmsolver" (noise prediction, dpm_solver_pytorch.py "fast", as eval_ldm.py runs it):
    logSNR-uniform steps from t = 1 to 1e-4 on the VP-SDE; U-ViT-L/2 (ImageNet 256, FID 3.40) and L/4
    (ImageNet 512, FID 4.67) with 50 evaluations. "dpmsolver++" (data prediction, dpm_solver_pp.py as
    eval_ldm_discrete.py runs it): time-uniform from t = 1 to 1/T on the discrete schedule (log α linear
    in t between t_n = n/T), the model seeing T·t = n; U-ViT-H/2 (FID 2.29), H/4 (4.05) and MS-COCO S/2 (5.95),
    50 evaluations.
    A step s → t (h = λ_t − λ_s) evaluates at s and at λ_s + r_j h, j < order:
    - logSNR (dpm_solver_pytorch): r = 1/3, 2/3 for order 3, r = 1/2 for order 2, of K + 1 logSNR-uniform times;
    - time_uniform (dpm_solver_pp): one time-uniform grid u_0 = 1, …, u_steps = t_eps; a step of order p spans p
      of its intervals, u_i → u_{i+p}, and its intermediate points are the grid points inside it,
      r_j = (λ(u_{i+j}) − λ(u_i)) / h; the model sees every grid point but the last (n = 1000, 980.02, …, 20.98).
    Timesteps are T·t − 1 (diffusers index units): `model_time` with offset 1 gives n for the discrete
    H models and 999·t for a VP-SDE model.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        schedule: str = "vp_continuous",  # or "discrete": the betas below, as DDPMScheduler builds them
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[List[float]] = None,
        algorithm_type: str = "dpmsolver",
        skip_type: str = "logSNR",  # or "time_uniform"
        t_eps: Optional[float] = None,  # end time; None = 1e-4 (vp_continuous) or 1/T (discrete)
        prediction_type: str = "epsilon",
    ):
        checks = [("schedule", schedule, SCHEDULES), ("algorithm_type", algorithm_type, ("dpmsolver", "dpmsolver++")),
                  ("skip_type", skip_type, ("logSNR", "time_uniform")), ("prediction_type", prediction_type, ("epsilon",))]
        for key, value, valid in checks:
            if value not in valid:
                raise ValueError(f"DPMSolverFastScheduler {key}={value!r} is not valid; choose one of: {', '.join(valid)}")
        if schedule == "vp_continuous":
            self._setup()
        else:
            betas = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                  beta_schedule=beta_schedule, trained_betas=trained_betas).betas
            self.sde = DiscreteVP(0.5 * torch.cumsum(torch.log1p(-betas.double()), 0))
            self.timesteps = torch.zeros(0, dtype=torch.float64)
            self._step_index = 0

    def set_timesteps(self, num_inference_steps: int, device=None):
        sde, cfg = self.sde, self.config
        t_eps = cfg.t_eps if cfg.t_eps is not None else (1e-4 if cfg.schedule == "vp_continuous" else 1.0 / cfg.num_train_timesteps)
        self._orders = dpm_solver_fast_orders(num_inference_steps)
        if cfg.skip_type == "logSNR":
            lam_T, lam_0 = sde.lambda_(torch.tensor([1.0, t_eps], dtype=torch.float64)).tolist()
            self._outer = sde.inverse_lambda(torch.linspace(lam_T, lam_0, len(self._orders) + 1, dtype=torch.float64))
            self._fractions = [_DPM_FRACTIONS[order] for order in self._orders]
        else:  # a time-uniform grid of `steps` intervals; step k spans orders[k] of them, r_j from the points inside
            uniform = torch.linspace(1.0, t_eps, num_inference_steps + 1, dtype=torch.float64)  # (steps + 1,)
            starts = torch.cumsum(torch.tensor([0] + self._orders), 0).tolist()  # (K + 1,) grid index of each end
            self._outer = uniform[starts]
            lam = sde.lambda_(uniform)
            self._fractions = [tuple(((lam[i + j] - lam[i]) / (lam[i + order] - lam[i])).item()
                                     for j in range(1, order)) for i, order in zip(starts, self._orders)]
        self._plan: List[Tuple[int, int]] = []  # (step k, point j) of each model evaluation
        times = []
        for k, order in enumerate(self._orders):
            s, t = self._outer[k], self._outer[k + 1]
            lam_s, h = sde.lambda_(s), sde.lambda_(t) - sde.lambda_(s)
            for j, r in enumerate((0.0,) + self._fractions[k]):
                times.append(s if j == 0 else sde.inverse_lambda(lam_s + r * h))
                self._plan.append((k, j))
        self._expose(torch.stack(times), device)

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        i = self._next()
        k, j = self._plan[i]
        order, sde = self._orders[k], self.sde
        s, t = self._outer[k], self._outer[k + 1]
        lam_s = sde.lambda_(s)
        h = sde.lambda_(t) - lam_s
        x = sample.float()
        if j == 0:
            self._x_s, self._m = x, []
        u = t if j == order - 1 else sde.inverse_lambda(lam_s + self._fractions[k][j] * h)  # where this moves to
        eps = model_output.float()
        if self.config.algorithm_type == "dpmsolver":
            self._m.append(eps)
        else:  # the data prediction x̂_0 = (x − σ ε̂) / α at the point just evaluated
            here = self._eval_times[i]
            self._m.append((x - float(sde.sigma(here)) * eps) / float(torch.exp(sde.log_alpha(here))))
        x = self._update(j, order, self._fractions[k], s, u, h)
        return SchedulerOutput(prev_sample=x) if return_dict else (x,)

    def _update(self, j: int, order: int, fractions: Tuple[float, ...], s, u, h):
        """The state at u: the next intermediate point of the step (j < order − 1) or its end t.

        noise prediction:  x_u = α_u/α_s x_s − σ_u (e^{h_u} − 1) ε_s − correction
        data prediction:   x_u = σ_u/σ_s x_s − α_u (e^{−h_u} − 1) x̂_s + correction
        with corrections of DPM-Solver-2/-3 from the slopes between the evaluated points.
        """
        sde, m, x_s = self.sde, self._m, self._x_s
        final = j == order - 1
        h_u = h if final else fractions[j] * h
        log_alpha_s, log_alpha_u = sde.log_alpha(s), sde.log_alpha(u)
        if self.config.algorithm_type == "dpmsolver":
            sign, scale = 1.0, sde.sigma(u)  # y = ε, moves with σ_u (e^{h} − 1)
            x = float(torch.exp(log_alpha_u - log_alpha_s)) * x_s
            phi_1 = torch.expm1(h_u)
        else:
            sign, scale = -1.0, torch.exp(log_alpha_u)  # y = x̂_0, moves with α_u (e^{−h} − 1)
            x = float(sde.sigma(u) / sde.sigma(s)) * x_s
            phi_1 = torch.expm1(-h_u)
        x = x - float(scale * phi_1) * m[0]
        if final and order == 2:
            x = x - float((0.5 / fractions[0]) * scale * phi_1) * (m[1] - m[0])
        elif (final and order == 3) or (not final and j == 1):
            # φ₂-correction: order 3's end uses the slope to its second point, its second point the slope to its first
            r_last, r_ref = (fractions[1], 1.0) if final else (fractions[0], fractions[1])
            phi_2 = torch.expm1(sign * h_u) / h_u - sign  # (e^{h}−1)/h − 1, or (e^{−h}−1)/h + 1
            ratio = r_ref / r_last if not final else 1.0 / r_last
            x = x - sign * float(ratio * scale * phi_2) * (m[-1] - m[0])
        return x


def dpm_solver_fast_orders(steps: int) -> List[int]:
    """DPM-Solver-fast's orders for `steps` evaluations: K = steps//3 + 1 steps, third order but the end."""
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


# ---------------------------------------------------------------------- sampler construction
_TRAILING = {"timestep_spacing": "trailing"}  # ODE samplers start at the last training timestep

# name -> (scheduler class, config overrides). Every one is built with `from_config` of the training
# scheduler, so the noise schedule, prediction type and SCHEDULE_KEY carry over (see make_scheduler).
SCHEDULERS = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, _TRAILING),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_TRAILING}),
    "dpm++3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3, **_TRAILING}),
    "dpm++2m-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_TRAILING}),
    "euler": (EulerDiscreteScheduler, _TRAILING),
    "euler-a": (EulerAncestralDiscreteScheduler, _TRAILING),
    "heun": (HeunDiscreteScheduler, _TRAILING),
    "unipc": (UniPCMultistepScheduler, _TRAILING),
    "deis": (DEISMultistepScheduler, _TRAILING),
    "lms": (LMSDiscreteScheduler, _TRAILING),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    # the paper's samplers (PAPER_SAMPLERS says which published checkpoint each reproduces)
    "euler-maruyama": (EulerMaruyamaScheduler, {}),
    "dpm-solver-fast": (DPMSolverFastScheduler, {"algorithm_type": "dpmsolver", "skip_type": "logSNR"}),
    "dpm-solver++-fast": (DPMSolverFastScheduler, {"algorithm_type": "dpmsolver++", "skip_type": "time_uniform"}),
}

# name -> (the official sampler it restates, the checkpoints and numbers it reproduces, their N)
PAPER_SAMPLERS = {
    "euler-maruyama": (
        "sde.euler_maruyama(ReverseSDE) of baofff/U-ViT (eval.py)",
        "U-ViT-S/2 CIFAR-10 (FID 3.11), U-ViT-S/4 CelebA 64 (FID 2.87)", 1000),
    "dpm-solver-fast": (
        "dpm_solver_pytorch DPM-Solver fast, noise prediction, logSNR steps, eps 1e-4 (eval.py, eval_ldm.py)",
        "U-ViT-M/4 ImageNet 64 (FID 5.85), U-ViT-L/4 ImageNet 64 (FID 4.26), U-ViT-L/2 ImageNet 256 (FID 3.40), "
        "U-ViT-L/4 ImageNet 512 (FID 4.67)", 50),
    "dpm-solver++-fast": (
        "dpm_solver_pp DPM-Solver++ single-step order 3, time-uniform n = 1000 to 1, timestep offset 1 "
        "(eval_ldm_discrete.py, eval_t2i_discrete.py)",
        "U-ViT-H/2 ImageNet 256 (FID 2.29), U-ViT-H/4 ImageNet 512 (FID 4.05), U-ViT-S/2 MS-COCO (FID 5.95), "
        "U-ViT-S/2-Deep MS-COCO (FID 5.48)", 50),
}


# Facts of the trained model that every sampler must share. diffusers' from_config drops keys the source
# config left at their default (`_use_default_values`), so these are passed explicitly.
_TRAINING_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "rescale_betas_zero_snr",
)


def make_scheduler(name: str, base_config, **overrides):
    """A fresh scheduler `name` (see SCHEDULERS) sharing `base_config`'s noise schedule and prediction type.

    overrides: further config keys, e.g. timestep_spacing="leading". The official VP-SDE samplers
    (euler-maruyama, dpm-solver-fast) need a vp_continuous base (its β_min, β_max).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    sde = vp_sde_of(base_config)
    if cls is EulerMaruyamaScheduler and sde is None:
        raise ValueError(
            f"scheduler {name!r} samples a continuous-time VP-SDE model (diffusion.schedule=vp_continuous); "
            "this model has a discrete schedule: use dpm-solver++-fast, dpm++2m, ddim, ..."
        )
    if cls in (EulerMaruyamaScheduler, DPMSolverFastScheduler):
        facts = {"schedule": "vp_continuous", "beta_min": sde.beta_min, "beta_max": sde.beta_max} if sde else {
            "schedule": "discrete"}
        extra = {**extra, **{k: v for k, v in facts.items() if k in inspect.signature(cls.__init__).parameters}}
    accepted = inspect.signature(cls.__init__).parameters
    training = {k: base_config[k] for k in _TRAINING_KEYS if k in base_config and k in accepted}
    if sde is not None and "trained_betas" in accepted:  # the proxy grid follows from the SDE, whatever the base
        training["trained_betas"] = vp_proxy_betas(sde, base_config.get("num_train_timesteps", 1000))
    if training.get("trained_betas") is None:
        training.pop("trained_betas", None)
    return cls.from_config(base_config, **{**training, **extra, **overrides})
