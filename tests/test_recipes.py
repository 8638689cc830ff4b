"""The paper's recipes: U-ViT's official samplers against independent restatements of baofff/U-ViT's
code (sde.py, dpm_solver_pytorch.py, dpm_solver_pp.py) on a Gaussian toy whose exact ε is known, the
continuous-time VP-SDE training and time map, and the reference configs of the published checkpoints.

The restatements below are plain loops written from the papers' update rules and the official step/grid
logic; they use nothing of uvic.diffusion, so a mistake there cannot be shared by them."""

import math

import numpy as np
import pytest
import torch

from uvic.diffusion import make_scheduler, vp_sde_of
from uvic.model import UViT, UViTOutput
from uvic.pipeline import UViCPipeline

SHAPE = (6, 2, 4, 4)  # (B, C, H, W) of the small toy
MU, STD = 0.1, 0.2  # the toy data: x_0 ~ N(MU, STD^2) per pixel
N = 1000


# ---------------------------------------------------------------------- the toy and the two schedules, restated
def vp_log_alpha(t, beta_0=0.1, beta_1=20.0):  # log sqrt(ᾱ(t)) of the linear VP-SDE
    return -0.25 * t**2 * (beta_1 - beta_0) - 0.5 * t * beta_0


SD_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, N, dtype=torch.float64) ** 2  # train_ldm_discrete.py
SD_LOG_ALPHA = (0.5 * torch.cumsum(torch.log(1.0 - SD_BETAS), 0)).numpy()  # (N,) log α at t_n = n/N, n = 1..N
SD_T = np.arange(1, N + 1, dtype=np.float64) / N


def sd_log_alpha(t: float) -> float:  # dpm_solver_pp's discrete schedule: log α piecewise linear in t over t_n
    return float(np.interp(t, SD_T, SD_LOG_ALPHA))


def exact_eps(x, log_alpha):
    """E[ε | x_t] for x_0 ~ N(MU, STD²): σ (x − α MU) / (α² STD² + σ²)."""
    a2 = math.exp(2 * float(log_alpha))
    return math.sqrt(1 - a2) * (x - math.sqrt(a2) * MU) / (a2 * STD**2 + 1 - a2)


def exact_flow(x_T, log_alpha_T, log_alpha_t):
    """The probability-flow ODE's exact solution for the toy: per pixel an affine map keeping the z-score."""
    a_T, a_t = math.exp(log_alpha_T), math.exp(log_alpha_t)
    z = (x_T - a_T * MU) / math.sqrt(a_T**2 * STD**2 + 1 - a_T**2)
    return a_t * MU + math.sqrt(a_t**2 * STD**2 + 1 - a_t**2) * z


class GaussianToy(UViT):
    """A UViT-shaped model whose output is the exact ε of the toy at the time it is given.
    `times` lists the model time input of every evaluation."""

    def __init__(self, time_to_log_alpha, shape=SHAPE):
        super().__init__(sample_size=shape[2], in_channels=shape[1], patch_size=2, embed_dim=8, depth=2, num_heads=1)
        self.time_to_log_alpha = time_to_log_alpha
        self.times = []

    def forward(self, sample, timestep, class_labels=None, **kwargs):
        time = float(torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0])
        self.times.append(time)
        return UViTOutput(sample=exact_eps(sample.double(), self.time_to_log_alpha(time)).to(sample.dtype))


def continuous_toy(shape=SHAPE):  # model input 999·t
    return GaussianToy(lambda time: vp_log_alpha(time / 999.0), shape)


def discrete_toy(shape=SHAPE):  # model input n (= N·t); official H models see n = 1..N
    return GaussianToy(lambda time: sd_log_alpha(time / N), shape)


def run_pipeline(model, scheduler, steps, x_T, offset=0, generator=None):
    pipe = UViCPipeline(transformer=model, scheduler=scheduler, timestep_offset=offset)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=x_T.shape[0], num_inference_steps=steps, latents=x_T, generator=generator,
                  output_type="pt").images
    return images.double() * 2 - 1  # back to x_0 (clamped to [-1, 1], as the restatements' results are below)


def continuous_base():
    from uvic.config import load_config
    from uvic.diffusion import build_scheduler

    return build_scheduler(load_config(None, ["diffusion.schedule=vp_continuous", "diffusion.clip_sample=false"]).diffusion)


def discrete_base():  # train_ldm_discrete.py's schedule as a diffusers scheduler (the model adds offset 1)
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


# ---------------------------------------------------------------------- restatements of the official samplers
def fast_orders(steps):
    """DPM-Solver-fast's orders (both official files): K = steps // 3 + 1 steps, order 3 but at the end."""
    k = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (k - 2) + [2, 1]
    if steps % 3 == 1:
        return [3] * (k - 1) + [1]
    return [3] * (k - 1) + [2]


def official_euler_maruyama(x, steps, generator, times, eps=1e-3):
    """sde.euler_maruyama(ReverseSDE(ScoreModel(noise_pred, VPSDE()))): model input 999·t.
    Appends each evaluation's model time to `times`."""
    beta = lambda t: 0.1 + t * (20.0 - 0.1)
    grid = [0.0] + np.linspace(eps, 1.0, steps).tolist()
    x = x.double()
    for s, t in list(zip(grid, grid[1:]))[::-1]:
        times.append(999.0 * t)
        cum_beta = -math.expm1(2 * vp_log_alpha(t))
        score = -exact_eps(x, vp_log_alpha(t)) / math.sqrt(cum_beta)
        drift = -0.5 * beta(t) * x - beta(t) * score
        mean = x + drift * (s - t)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        x = mean + math.sqrt(beta(t) * (t - s)) * noise if s != 0 else mean
    return x


def _lam(log_alpha):  # half log-SNR λ = log α − log σ
    return log_alpha - 0.5 * math.log(-math.expm1(2 * log_alpha))


def official_dpm_solver_fast(x, steps, times, eps=1e-4):
    """dpm_solver_pytorch.DPM_Solver(fast_version=True) with NoiseScheduleVP('linear'), time input 999·t
    (eval_ldm.py): K + 1 logSNR-uniform times, DPM-Solver-1/2/3 steps (Lu et al. 2022, noise prediction)
    with their default r = 1/2 and r = 1/3, 2/3 of each step's h."""
    b0, b1 = 0.1, 20.0
    la = lambda t: vp_log_alpha(t, b0, b1)
    sig = lambda t: math.sqrt(-math.expm1(2 * la(t)))

    def inv(lam):
        tmp = 2.0 * (b1 - b0) * math.log1p(math.exp(-2.0 * lam))
        return tmp / (math.sqrt(b0**2 + tmp) + b0) / (b1 - b0)

    def model(x, t):
        times.append(999.0 * t)
        return exact_eps(x, la(t))

    orders = fast_orders(steps)
    lams = np.linspace(_lam(la(1.0)), _lam(la(eps)), len(orders) + 1).tolist()
    ts = [inv(v) for v in lams]
    x = x.double()
    for i, order in enumerate(orders):
        s, t = ts[i], ts[i + 1]
        h = _lam(la(t)) - _lam(la(s))
        n_s = model(x, s)
        if order == 1:
            x = math.exp(la(t) - la(s)) * x - sig(t) * math.expm1(h) * n_s
        elif order == 2:
            r1 = 0.5
            s1 = inv(_lam(la(s)) + r1 * h)
            x_s1 = math.exp(la(s1) - la(s)) * x - sig(s1) * math.expm1(r1 * h) * n_s
            n_s1 = model(x_s1, s1)
            x = (math.exp(la(t) - la(s)) * x - sig(t) * math.expm1(h) * n_s
                 - (0.5 / r1) * sig(t) * math.expm1(h) * (n_s1 - n_s))
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = inv(_lam(la(s)) + r1 * h), inv(_lam(la(s)) + r2 * h)
            x_s1 = math.exp(la(s1) - la(s)) * x - sig(s1) * math.expm1(r1 * h) * n_s
            n_s1 = model(x_s1, s1)
            phi_22 = math.expm1(r2 * h) / (r2 * h) - 1
            x_s2 = (math.exp(la(s2) - la(s)) * x - sig(s2) * math.expm1(r2 * h) * n_s
                    - r2 / r1 * sig(s2) * phi_22 * (n_s1 - n_s))
            n_s2 = model(x_s2, s2)
            phi_2 = math.expm1(h) / h - 1
            x = (math.exp(la(t) - la(s)) * x - sig(t) * math.expm1(h) * n_s
                 - (1 / r2) * sig(t) * phi_2 * (n_s2 - n_s))
    return x


def official_dpm_solver_pp(x, steps, times):
    """dpm_solver_pp.DPM_Solver(model_fn, NoiseScheduleVP('discrete', betas), predict_x0=True)
    .sample(x, steps, eps=1/N, T=1) as eval_ldm_discrete.py calls it, i.e. with sample()'s defaults
    order=3, skip_type='time_uniform', method='fast', no final denoise; model_fn feeds the network N·t.

    Grid and steps (sample(method='fast')): the orders of DPM-Solver-fast, and one time-uniform grid of
    steps + 1 points from 1 to 1/N. Step k of order p runs from grid[i] to grid[i + p] (i = orders before
    it summed), and its intermediate points are the grid points in between: r_j = (λ(grid[i + j]) − λ(grid[i])) / h,
    h = λ(grid[i + p]) − λ(grid[i]); the model is evaluated at s_j = t_λ(λ_s + r_j h) (= grid[i + j]).
    Updates: DPM-Solver++ with data prediction x_θ = (x − σ ε̂) / α (Lu et al. 2022, "DPM-Solver++"):
    order 1 is DDIM, order 2 is DPM-Solver++(2S) (their Algorithm 1) with this r_1, order 3 the third-order
    single-step update of DPM-Solver (Lu et al. 2022a, Algorithm 2) written for x_θ (h → −h, α ↔ σ)."""
    la = sd_log_alpha
    sig = lambda t: math.sqrt(-math.expm1(2 * la(t)))
    lam = lambda t: _lam(la(t))

    def inv(lam_value):  # t_λ: log α = −½ log(1 + e^{−2λ}), then t from the table, interpolated back
        log_alpha = -0.5 * math.log1p(math.exp(-2.0 * lam_value))
        return float(np.interp(log_alpha, SD_LOG_ALPHA[::-1], SD_T[::-1]))

    def data_pred(x, t):  # x_θ(x, t) from the noise model at input N·t
        times.append(N * t)
        return (x - sig(t) * exact_eps(x, la(t))) / math.exp(la(t))

    phi_2 = lambda h: math.expm1(-h) / h + 1  # (e^{−h} − 1)/h + 1

    grid = np.linspace(1.0, 1.0 / N, steps + 1).tolist()
    x, i = x.double(), 0
    for order in fast_orders(steps):
        s, t = grid[i], grid[i + order]
        h = lam(t) - lam(s)
        r = [(lam(grid[i + j]) - lam(s)) / h for j in range(1, order)]  # the grid points inside the step
        m_s = data_pred(x, s)
        if order == 1:
            x = sig(t) / sig(s) * x - math.exp(la(t)) * math.expm1(-h) * m_s
        elif order == 2:  # DPM-Solver++(2S)
            s1 = inv(lam(s) + r[0] * h)
            u = sig(s1) / sig(s) * x - math.exp(la(s1)) * math.expm1(-r[0] * h) * m_s
            d = (1 - 1 / (2 * r[0])) * m_s + 1 / (2 * r[0]) * data_pred(u, s1)
            x = sig(t) / sig(s) * x - math.exp(la(t)) * math.expm1(-h) * d
        else:
            r1, r2 = r
            s1, s2 = inv(lam(s) + r1 * h), inv(lam(s) + r2 * h)
            u1 = sig(s1) / sig(s) * x - math.exp(la(s1)) * math.expm1(-r1 * h) * m_s
            m_s1 = data_pred(u1, s1)
            u2 = (sig(s2) / sig(s) * x - math.exp(la(s2)) * math.expm1(-r2 * h) * m_s
                  + r2 / r1 * math.exp(la(s2)) * phi_2(r2 * h) * (m_s1 - m_s))
            m_s2 = data_pred(u2, s2)
            x = (sig(t) / sig(s) * x - math.exp(la(t)) * math.expm1(-h) * m_s
                 + 1 / r2 * math.exp(la(t)) * phi_2(h) * (m_s2 - m_s))
        i += order
    return x


# ---------------------------------------------------------------------- the restatements themselves
def test_official_dpm_solver_pp_restatement_evaluates_on_the_time_uniform_grid_and_solves_the_flow():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    times = []
    x = official_dpm_solver_pp(x_T, 50, times)
    # eval_ldm_discrete.py's 50 evaluations: n = 1000, 980.02, 960.04, ..., 40.96, 20.98 (grid step 19.98)
    assert len(times) == 50
    assert np.allclose(times[:4], [1000.0, 980.02, 960.04, 940.06], atol=1e-6)
    assert np.allclose(times[-3:], [60.94, 40.96, 20.98], atol=1e-6)
    assert np.allclose(times, 1000.0 - 19.98 * np.arange(50), atol=1e-6)
    # a good 50-step solver of the toy's probability flow (the exact map is affine per pixel)
    exact = exact_flow(x_T.double(), sd_log_alpha(1.0), sd_log_alpha(1.0 / N))
    assert (x - exact).abs().max() < 5e-2


def test_official_dpm_solver_fast_restatement_solves_the_flow():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    times = []
    x = official_dpm_solver_fast(x_T, 50, times)
    assert len(times) == 50 and times[0] == pytest.approx(999.0) and np.all(np.diff(times) < 0)
    assert (x - exact_flow(x_T.double(), vp_log_alpha(1.0), vp_log_alpha(1e-4))).abs().max() < 5e-2


# ---------------------------------------------------------------------- each published recipe against its official sampler
REFERENCE_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "reference"
RECIPES = {  # reference config -> the official evaluation's sampler (restated above), steps, tolerance
    "cifar10_uvit_s2": ("euler-maruyama", 1000, 5e-5),  # sde.euler_maruyama, 1,000 steps (train.py eval)
    "imagenet256_uvit_l2": ("dpm-solver-fast", 50, 5e-5),  # eval_ldm.py
    "imagenet512_uvit_l4": ("dpm-solver-fast", 50, 5e-5),
    "imagenet256_uvit_h2": ("dpm-solver++-fast", 50, 1e-4),  # eval_ldm_discrete.py
    "imagenet512_uvit_h4": ("dpm-solver++-fast", 50, 1e-4),
    "mscoco_uvit_s2": ("dpm-solver++-fast", 50, 1e-4),  # eval_t2i_discrete.py
    "mscoco_uvit_s2_deep": ("dpm-solver++-fast", 50, 1e-4),
    "celeba64_uvit_s4": ("euler-maruyama", 1000, 5e-5),  # eval.py
    "imagenet64_uvit_m4": ("dpm-solver-fast", 50, 5e-5),  # eval.py's dpm_solver branch
    "imagenet64_uvit_l4": ("dpm-solver-fast", 50, 5e-5),
}


def recipe_run(name, batch=2, seed=0):
    """(ours, official, our model times, official model times): the recipe's reference YAML through uvic's
    route (reference_scheduler, make_scheduler, UViCPipeline with its offset) and the official sampler,
    both from the same x_T (batch, C, H, W) of the published model's latent shape and the same noise."""
    from omegaconf import OmegaConf

    from uvic.diffusion import reference_scheduler

    cfg = OmegaConf.to_container(OmegaConf.load(REFERENCE_DIR / f"{name}.yaml"))
    sampler, steps, _ = RECIPES[name]
    shape = (batch, cfg["nnet"]["in_chans"], cfg["nnet"]["img_size"], cfg["nnet"]["img_size"])
    assert cfg["sample"]["scheduler"] == sampler and cfg["sample"]["steps"] == steps
    base, offset = reference_scheduler(cfg["schedule"])
    continuous = cfg["schedule"]["kind"] == "vp_continuous"
    model = continuous_toy(shape) if continuous else discrete_toy(shape)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    ours = run_pipeline(model, make_scheduler(sampler, base.config), steps, x_T, offset=offset,
                        generator=torch.Generator().manual_seed(seed + 1))
    times = []
    if sampler == "euler-maruyama":
        official = official_euler_maruyama(x_T, steps, torch.Generator().manual_seed(seed + 1), times)
    elif sampler == "dpm-solver-fast":
        official = official_dpm_solver_fast(x_T, steps, times)
    else:
        official = official_dpm_solver_pp(x_T, steps, times)
    return ours, official.clamp(-1, 1), np.array(model.times), np.array(times)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_each_published_recipe_samples_like_its_official_evaluation_script(name):
    ours, official, our_times, official_times = recipe_run(name)
    assert our_times.shape == official_times.shape, (our_times.shape, official_times.shape)
    time_error, sample_error = np.abs(our_times - official_times).max(), (ours - official).abs().max().item()
    ends = [0, 1, 2, -2, -1]
    print(f"{name}: max |Δ model time| {time_error:.2g}, max |Δ sample| {sample_error:.2g}; model times "
          f"ours {np.round(our_times[ends], 2)}, official {np.round(official_times[ends], 2)}")
    assert time_error <= 1e-3, f"model times differ by up to {time_error:.3g}"
    assert sample_error <= RECIPES[name][2], f"final samples differ by up to {sample_error:.3g}"


@pytest.mark.parametrize("steps", [49, 48])  # the other two order patterns: 3,…,3,1 and 3,…,3,2,1
def test_dpm_solvers_match_the_official_for_every_order_pattern(steps):
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    for name, toy, base, offset, official_fn, tolerance in (
        ("dpm-solver-fast", continuous_toy(), continuous_base(), 0, official_dpm_solver_fast, 5e-5),
        ("dpm-solver++-fast", discrete_toy(), discrete_base(), 1, official_dpm_solver_pp, 1e-4),
    ):
        ours = run_pipeline(toy, make_scheduler(name, base.config), steps, x_T, offset=offset)
        times = []
        official = official_fn(x_T, steps, times)
        time_error, sample_error = np.abs(np.array(toy.times) - times).max(), (ours - official).abs().max().item()
        print(f"{name}, {steps} steps: max |Δ model time| {time_error:.2g}, max |Δ sample| {sample_error:.2g}")
        assert len(toy.times) == steps and time_error <= 1e-3, f"{name}: model times differ by up to {time_error:.3g}"
        assert sample_error <= tolerance, f"{name}: final samples differ by up to {sample_error:.3g}"


def test_euler_maruyama_matches_the_official_in_distribution():
    """CIFAR-10's 1,000-step Euler–Maruyama, ours and the official with independent noise: mean and std of
    24,576 draws agree within a few standard errors, and both sample the toy."""
    shape = (1536, 1, 4, 4)  # 24,576 draws
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ours = run_pipeline(continuous_toy(shape), make_scheduler("euler-maruyama", continuous_base().config), 1000, x_T,
                        generator=torch.Generator().manual_seed(6))
    official = official_euler_maruyama(torch.randn(shape, generator=torch.Generator().manual_seed(7)), 1000,
                                       torch.Generator().manual_seed(8), []).clamp(-1, 1)
    n = ours.numel()
    standard_error = STD / math.sqrt(n)  # of a mean; a std's is about STD / sqrt(2n)
    assert abs(ours.mean() - official.mean()) <= 5 * math.sqrt(2) * standard_error
    assert abs(ours.std() - official.std()) <= 5 * standard_error
    for x in (ours, official):
        assert abs(x.mean() - MU) <= 5 * standard_error + 2e-3 and abs(x.std() - STD) <= 5 * standard_error + 2e-3


# ---------------------------------------------------------------------- sampler construction
def test_ode_samplers_start_at_the_last_training_timestep():
    from diffusers import DDPMScheduler

    base = DDPMScheduler(timestep_spacing="leading")
    for name in ("ddim", "dpm++2m", "euler", "unipc"):
        s = make_scheduler(name, base.config)
        s.set_timesteps(50)
        assert int(s.timesteps[0]) == 999, name  # "leading" would start at 980


def test_vp_samplers_refuse_a_discrete_model_and_keep_the_proxy_grid():
    from diffusers import DDPMScheduler

    with pytest.raises(ValueError, match="euler-maruyama.*continuous-time VP-SDE"):
        make_scheduler("euler-maruyama", DDPMScheduler().config)
    paper = make_scheduler("dpm-solver-fast", continuous_base().config)
    again = make_scheduler("dpm++2m", paper.config)  # from a paper sampler back to a diffusers one
    expected = torch.exp(2 * vp_log_alpha(torch.arange(1, N + 1, dtype=torch.float64) / N))
    assert (again.alphas_cumprod.double() - expected).abs().max() <= 1e-6
    assert vp_sde_of(again.config) is not None


# ---------------------------------------------------------------------- continuous-time training and its time map
def test_continuous_loss_decreases_on_digits():
    from uvic.data import DigitsDataset
    from uvic.diffusion import diffusion_loss

    torch.manual_seed(0)
    x0 = DigitsDataset(8).images[:32]
    model = UViT(sample_size=8, in_channels=1, patch_size=2, embed_dim=32, depth=2, num_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    base, losses = continuous_base(), []
    for _ in range(40):
        loss = diffusion_loss(model, base, x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8])


def test_continuous_model_sees_999t_in_training_and_when_reloaded(tmp_path):
    from uvic.config import load_config
    from uvic.diffusion import DPMSolverFastScheduler, diffusion_loss
    from uvic.trainer import Trainer

    seen = []

    def spy(module, args, kwargs):
        seen.append(torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"], dtype=torch.float64).reshape(-1))

    # training: t ~ U(t_min, 1) enters as 999·t
    model = UViT(sample_size=8, in_channels=1, patch_size=2, embed_dim=16, depth=2, num_heads=2)
    handle = model.register_forward_pre_hook(spy, with_kwargs=True)
    base = continuous_base()
    base.register_to_config(_uvic_schedule={**base.config["_uvic_schedule"], "t_min": 0.5})
    diffusion_loss(model, base, torch.zeros(64, 1, 8, 8))
    assert 0.5 * 999 <= seen[0].min() and seen[0].max() <= 999 and seen[0].max() > 990
    handle.remove()

    # a trained run's final/ knows its schedule: every sampler maps its timesteps to 999·t
    cfg = load_config(None, [
        "model.sample_size=8", "model.in_channels=1", "model.patch_size=2", "model.embed_dim=16", "model.depth=2",
        "model.num_heads=2", "data.name=digits", "data.limit=32", "train.batch_size=16", "train.steps=2",
        "train.warmup_steps=1", "train.sample_every=0", "train.checkpoint_every=0", "train.ema_warmup=false",
        "diffusion.schedule=vp_continuous", "diffusion.clip_sample=false", "train.sample_scheduler=dpm-solver-fast",
        "train.sample_steps=3", "train.sample_num=2"])
    pipe = UViCPipeline.from_pretrained(Trainer(cfg, tmp_path / "run").train())
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    for name, first, last in (("ddim", 999.0, 999.0 * 200 / 1000), ("dpm-solver-fast", 999.0, None)):
        seen.clear()
        pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
        pipe(batch_size=1, num_inference_steps=5, output_type="pt")
        times = torch.cat([s[:1] for s in seen])
        assert abs(times[0].item() - first) < 1e-3, name  # an off-by-one map gives 998.001
        if last is not None:
            assert abs(times[-1].item() - last) < 1e-3, name
    assert isinstance(pipe.scheduler, DPMSolverFastScheduler)
    assert times[-1].item() > 999 * 1e-4 and times.diff().lt(0).all()  # it ends at t = 1e-4, evaluated above it


# ---------------------------------------------------------------------- the reference configs of the published checkpoints
REFERENCE = {  # file -> (published parameters in millions, exact count where the paper's code gives it)
    "cifar10_uvit_s2": (44, 44_255_328),
    "imagenet256_uvit_l2": (287, None),
    "imagenet256_uvit_h2": (501, None),
    "imagenet512_uvit_l4": (287, None),
    "imagenet512_uvit_h4": (501, None),
    "celeba64_uvit_s4": (44, None),
    "imagenet64_uvit_m4": (131, None),
    "imagenet64_uvit_l4": (287, None),
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_config_builds_the_published_model_schedule_and_sampler(name):
    from omegaconf import OmegaConf

    from uvic.diffusion import PAPER_SAMPLERS, reference_scheduler
    from uvic.model import config_from_reference

    cfg = OmegaConf.to_container(OmegaConf.load(REFERENCE_DIR / f"{name}.yaml"))
    with torch.device("meta"):
        model = UViT(**config_from_reference(cfg["nnet"]))
    count = sum(p.numel() for p in model.parameters())
    millions, exact = REFERENCE[name]
    assert round(count / 1e6) == millions and (exact is None or count == exact), count

    scheduler, offset = reference_scheduler(cfg["schedule"])
    n = torch.arange(1, N + 1, dtype=torch.float64)
    if cfg["schedule"]["kind"] == "vp_continuous":  # sde.VPSDE at t = n/N, which the model sees as 999·t
        official, expected_offset = torch.exp(2 * vp_log_alpha(n / N)), 0
    else:  # train_ldm_discrete.py: ᾱ_n = Π_{k<=n} (1 − β_k), the model sees n
        official, expected_offset = torch.cumprod(1 - SD_BETAS, 0), 1
    assert (scheduler.alphas_cumprod.double() - official).abs().max() <= 1e-6
    assert offset == expected_offset
    sample = cfg["sample"]
    assert sample["scheduler"] in PAPER_SAMPLERS
    make_scheduler(sample["scheduler"], scheduler.config).set_timesteps(sample["steps"])


def test_reference_pth_samples_with_the_paper_sampler_and_a_latent_one_needs_its_schedule(tmp_path):
    import yaml

    from uvic.diffusion import EulerMaruyamaScheduler
    from uvic.loading import load_pipeline
    from uvic.sampling import main

    nnet = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=16, depth=2, num_heads=2, num_classes=-1)
    from uvic.model import config_from_reference

    torch.save(UViT(**config_from_reference(nnet)).state_dict(), tmp_path / "nnet_ema.pth")
    ref = {"nnet": nnet, "schedule": {"kind": "vp_continuous", "beta_min": 0.1, "beta_max": 20.0},
           "sample": {"scheduler": "euler-maruyama", "steps": 3, "guidance": 1.0}}
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(ref))
    pipe = load_pipeline(tmp_path / "nnet_ema.pth", reference_config=tmp_path / "ref.yaml")
    assert isinstance(pipe.scheduler, EulerMaruyamaScheduler)
    grid = main([str(tmp_path / "nnet_ema.pth"), "--reference-config", str(tmp_path / "ref.yaml"), "--grid", "2",
                 "--out", str(tmp_path / "g.png"), "--no-progress", "--device", "cpu"])
    assert grid.name == "g.png" and grid.is_file()

    latent = {**nnet, "in_chans": 4}
    torch.save(UViT(**config_from_reference(latent)).state_dict(), tmp_path / "latent.pth")
    (tmp_path / "bare.yaml").write_text(yaml.safe_dump({"nnet": latent}))
    with pytest.raises(ValueError, match="configs/reference/.*imagenet256_uvit_l2"):
        load_pipeline(tmp_path / "latent.pth", reference_config=tmp_path / "bare.yaml")


@pytest.mark.parametrize("name", ["euler-maruyama", "dpm-solver-fast", "dpm-solver++-fast"])
def test_paper_samplers_run_with_guidance_and_per_sample_generators(name):
    model = UViT(sample_size=8, in_channels=3, patch_size=2, embed_dim=16, depth=2, num_heads=2, num_classes=4)
    pipe = UViCPipeline(transformer=model.eval(), scheduler=make_scheduler(name, continuous_base().config))
    pipe.set_progress_bar_config(disable=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    kwargs = dict(batch_size=2, num_inference_steps=5, guidance_scale=1.5, class_labels=[0, 1], output_type="pt")
    first = pipe(generator=gens(), **kwargs).images
    assert first.shape == (2, 3, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(pipe(generator=gens(), **kwargs).images, first)  # the same generators, the same samples


def test_fixed_decay_ema_is_the_paper_decay_from_the_first_step_and_bad_sampler_choices_fail():
    from diffusers.training_utils import EMAModel

    from uvic.config import load_config
    from uvic.trainer import FixedDecayEMA

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert FixedDecayEMA(params, decay=0.9999).get_decay(1) == 0.9999
    assert EMAModel(params, decay=0.9999).get_decay(1) < 0.5  # diffusers warms up
    with pytest.raises(ValueError, match="eval.fid_scheduler=euler-maruyama.*vp_continuous"):
        load_config(None, ["eval.fid_scheduler=euler-maruyama"])
    with pytest.raises(ValueError, match="vp_continuous.*prediction_type='v_prediction'"):
        load_config(None, ["diffusion.schedule=vp_continuous", "diffusion.prediction_type=v_prediction"])


def test_the_reference_latent_scale_is_used_whichever_route_supplies_the_vae(tmp_path):
    """MS-COCO S/2 was trained on latents scaled by 0.23010; its VAE folder (SD v1's) says 0.18215. Both routes, the
    YAML's mapping and `--vae DIR`, decode with the model's 0.23010."""
    import yaml
    from diffusers import AutoencoderKL

    from uvic.latents import attach_vae
    from uvic.model import config_from_reference
    from uvic.loading import load_pipeline

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=8, scaling_factor=0.18215)
    vae.save_pretrained(tmp_path / "vae")
    nnet = dict(img_size=4, patch_size=2, in_chans=4, embed_dim=16, depth=2, num_heads=2, num_classes=-1)
    torch.save(UViT(**config_from_reference(nnet)).state_dict(), tmp_path / "latent.pth")
    ref = {"nnet": nnet, "schedule": {"kind": "discrete", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                        "timestep_offset": 1},
           "vae": {"source": str(tmp_path / "vae"), "scale_factor": 0.23010},
           "sample": {"scheduler": "dpm-solver++-fast", "steps": 3, "guidance": 1.0}}
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(ref))
    by_yaml = load_pipeline(tmp_path / "latent.pth", reference_config=tmp_path / "ref.yaml")
    by_flag = load_pipeline(tmp_path / "latent.pth", reference_config=tmp_path / "ref.yaml", vae=str(tmp_path / "vae"))
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").config.scaling_factor == 0.18215
    assert by_yaml.vae.config.scaling_factor == by_flag.vae.config.scaling_factor == 0.23010

    # a pipeline folder saved from it keeps the model's scale, also when another VAE folder is given to decode it
    by_flag.save_pretrained(tmp_path / "pipe")
    saved = load_pipeline(tmp_path / "pipe")
    assert saved.config.latent_scale == saved.vae.config.scaling_factor == 0.23010
    attach_vae(saved, str(tmp_path / "vae"))
    assert saved.vae.config.scaling_factor == 0.23010
    latents = torch.randn(1, 4, 4, 4)  # decoding divides by the model's scale, as the official decode (z / 0.23010)
    expected = vae.decode(latents / 0.23010).sample
    assert torch.allclose(saved.vae.decode(latents / saved.vae.config.scaling_factor).sample, expected, atol=1e-5)

    # a VAE that states another scale is refused, in one line, before anything is sampled
    with pytest.raises(ValueError, match=r"scaling_factor 0.18215 differs from the model's latent scale 0.2301") as err:
        UViCPipeline.from_pretrained(tmp_path / "pipe", vae=AutoencoderKL.from_pretrained(tmp_path / "vae"))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"latent scale 0.18215 .* differs from the model's 0.2301"):
        attach_vae(saved, str(tmp_path / "vae"), scale_factor=0.18215)
    bad = dict(ref, vae={"source": str(tmp_path / "vae"), "scale_factor": 0.18215})
    with pytest.raises(ValueError, match=r"differs from the model's 0.2301"):
        load_pipeline(tmp_path / "latent.pth", reference_config={**ref, "sample": ref["sample"]}, vae=bad["vae"])


# ---------------------------------------------------------------------- the published checkpoints, by file name
# baofff/U-ViT README's table: file name -> config.nnet of the official configs/*.py (transcribed; use_checkpoint
# dropped), its evaluation's sampler and steps (config.sample) and cfg scale (0: no guidance).
_S = dict(embed_dim=512, depth=12, num_heads=8, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_L = dict(embed_dim=1024, depth=20, num_heads=16, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False)
_H = dict(embed_dim=1152, depth=28, num_heads=16, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, conv=False)
_T2I = dict(name="uvit_t2i", img_size=32, in_chans=4, patch_size=2, clip_dim=768, num_clip_token=77)
OFFICIAL = {
    "cifar10_uvit_small.pth": (dict(name="uvit", img_size=32, patch_size=2, **_S, num_classes=-1), "euler_maruyama_sde", 1000, 0),
    "celeba64_uvit_small.pth": (dict(name="uvit", img_size=64, patch_size=4, **_S, num_classes=-1), "euler_maruyama_sde", 1000, 0),
    "imagenet64_uvit_mid.pth": (dict(name="uvit", img_size=64, patch_size=4, embed_dim=768, depth=16, num_heads=12, mlp_ratio=4,
                                     qkv_bias=False, mlp_time_embed=False, num_classes=1000), "dpm_solver", 50, 0),
    "imagenet64_uvit_large.pth": (dict(name="uvit", img_size=64, patch_size=4, **_L, num_classes=1000), "dpm_solver", 50, 0),
    "imagenet256_uvit_large.pth": (dict(name="uvit", img_size=32, patch_size=2, in_chans=4, **_L, num_classes=1001),
                                   "dpm_solver", 50, 0.4),
    "imagenet256_uvit_huge.pth": (dict(name="uvit", img_size=32, patch_size=2, in_chans=4, **_H, num_classes=1001),
                                  "dpm_solver_pp", 50, 0.4),  # eval_ldm_discrete.py
    "imagenet512_uvit_large.pth": (dict(name="uvit", img_size=64, patch_size=4, in_chans=4, **_L, num_classes=1001),
                                   "dpm_solver", 50, 0.7),
    "imagenet512_uvit_huge.pth": (dict(name="uvit", img_size=64, patch_size=4, in_chans=4, **_H, num_classes=1001),
                                  "dpm_solver_pp", 50, 0.7),
    "mscoco_uvit_small.pth": (dict(_T2I, **_S), "dpm_solver_pp", 50, 1.0),  # eval_t2i_discrete.py
    "mscoco_uvit_small_deep.pth": (dict(_T2I, **{**_S, "depth": 16}), "dpm_solver_pp", 50, 1.0),  # --config.nnet.depth=16
}
OFFICIAL_SAMPLERS = {"euler_maruyama_sde": "euler-maruyama", "dpm_solver": "dpm-solver-fast", "dpm_solver_pp": "dpm-solver++-fast"}


def official_state_layout(nnet: dict) -> dict:
    """key -> shape of the state dict of libs/uvit.py's UViT (uvit_t2i.py's for name uvit_t2i), read off its
    __init__ (timm's Mlp: fc1, fc2); written from the official code, not from uvic.model."""
    d, c, p = nnet["embed_dim"], nnet.get("in_chans", 3), nnet["patch_size"]
    hidden = int(d * nnet.get("mlp_ratio", 4))
    layout = {"patch_embed.proj.weight": (d, c, p, p), "patch_embed.proj.bias": (d,)}
    if nnet.get("mlp_time_embed", False):
        layout.update({"time_embed.0.weight": (4 * d, d), "time_embed.0.bias": (4 * d,),
                       "time_embed.2.weight": (d, 4 * d), "time_embed.2.bias": (d,)})
    if nnet.get("name") == "uvit_t2i":
        layout.update({"context_embed.weight": (d, nnet.get("clip_dim", 768)), "context_embed.bias": (d,)})
        extras = 1 + nnet.get("num_clip_token", 77)
    else:
        extras = 1 + (nnet.get("num_classes", -1) > 0)
        if nnet.get("num_classes", -1) > 0:
            layout["label_emb.weight"] = (nnet["num_classes"], d)
    layout["pos_embed"] = (1, extras + (nnet["img_size"] // p) ** 2, d)

    def block(prefix, skip):
        layout.update({f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,), f"{prefix}.attn.qkv.weight": (3 * d, d),
                       f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                       f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                       f"{prefix}.mlp.fc1.weight": (hidden, d), f"{prefix}.mlp.fc1.bias": (hidden,),
                       f"{prefix}.mlp.fc2.weight": (d, hidden), f"{prefix}.mlp.fc2.bias": (d,)})
        if nnet.get("qkv_bias", False):
            layout[f"{prefix}.attn.qkv.bias"] = (3 * d,)
        if skip:
            layout.update({f"{prefix}.skip_linear.weight": (d, 2 * d), f"{prefix}.skip_linear.bias": (d,)})

    for i in range(nnet["depth"] // 2):
        block(f"in_blocks.{i}", False)
    block("mid_block", False)
    for i in range(nnet["depth"] // 2):
        block(f"out_blocks.{i}", nnet.get("skip", True))
    layout.update({"norm.weight": (d,), "norm.bias": (d,), "decoder_pred.weight": (p * p * c, d), "decoder_pred.bias": (p * p * c,)})
    if nnet.get("conv", True):
        layout.update({"final_layer.weight": (c, c, 3, 3), "final_layer.bias": (c,)})
    return layout


def official_state_dict(nnet: dict, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.02 for k, shape in official_state_layout(nnet).items()}


def tiny_vae_folder(path):
    from diffusers import AutoencoderKL

    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=8).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_each_published_checkpoint_is_recognised_by_name_and_loads_strictly_in_the_official_layout(name, tmp_path):
    """The file name picks a reference YAML whose architecture and sampler are the official config's; the
    official state-dict layout (at depth 2, random weights) loads into it strictly, every tensor in place."""
    import yaml

    from uvic.loading import load_pipeline, published_reference_config

    nnet, algorithm, steps, scale = OFFICIAL[name]
    path = published_reference_config(name)
    cfg = yaml.safe_load(path.read_text())
    assert {"name": "uvit", **cfg["nnet"]} == {"in_chans": 3, **nnet}  # in_chans: libs/uvit.py's default where unset
    assert (cfg["sample"]["scheduler"], cfg["sample"]["steps"]) == (OFFICIAL_SAMPLERS[algorithm], steps)
    assert cfg["sample"]["guidance"] == pytest.approx(1 + scale)  # U-ViT's cond + s (cond - uncond) is w = 1 + s

    small = {**cfg["nnet"], "depth": 2}
    state = official_state_dict(small)
    torch.save(state, tmp_path / name)
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({**cfg, "nnet": small}))
    vae = str(tiny_vae_folder(tmp_path / "vae")) if small.get("in_chans", 3) == 4 else None
    pipe = load_pipeline(tmp_path / name, reference_config=tmp_path / "small.yaml", vae=vae)
    loaded = pipe.transformer.state_dict()
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    if vae is not None:  # the model's latent scale, whatever the VAE folder says
        assert pipe.vae.config.scaling_factor == pipe.config.latent_scale == cfg["vae"]["scale_factor"]
    if nnet.get("num_classes", -1) > 0:  # 1001 rows: 1000 classes + the null label; 1000 rows: no guidance
        assert pipe.num_real_classes == 1000
        if not cfg.get("null_label", True):
            with pytest.raises(ValueError, match="no null class"):
                pipe.check_inputs(1, 999, 1.4)


def test_sample_py_picks_the_reference_config_by_the_checkpoint_name_and_refuses_an_unknown_one(tmp_path, capsys):
    from uvic.sampling import main

    nnet = OFFICIAL["cifar10_uvit_small.pth"][0]
    torch.save(official_state_dict(nnet), tmp_path / "cifar10_uvit_small.pth")  # the full published layout
    grid = main([str(tmp_path / "cifar10_uvit_small.pth"), "--grid", "1", "--steps", "2", "--out", str(tmp_path / "g.png"),
                 "--no-progress", "--device", "cpu"])
    assert grid.is_file()
    said = capsys.readouterr().err
    assert "cifar10_uvit_small.pth is a published U-ViT checkpoint: reference config " in said
    assert said.rstrip().endswith("configs/reference/cifar10_uvit_s2.yaml")

    (tmp_path / "nnet_ema.pth").write_bytes((tmp_path / "cifar10_uvit_small.pth").read_bytes())
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "nnet_ema.pth"), "--grid", "1", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "sample.py: error: nnet_ema.pth is not the name of a published U-ViT checkpoint" in err
    assert all(known in err for known in OFFICIAL) and "--reference-config" in err


# ---------------------------------------------------------------------- the training recipes against the official configs
# baofff/U-ViT configs/*.py, transcribed: train.n_steps, batch_size; optimizer lr, weight_decay, betas; lr_scheduler
# warmup_steps; dataset p_uncond (None: unconditional); seed. train.py / train_ldm*.py / train_t2i_discrete.py use
# AdamW, a linear warm-up then a constant lr, an EMA of fixed rate 0.9999 and no gradient clipping.
OFFICIAL_TRAINING = {
    "cifar10_uvit_s2": (500_000, 128, 2e-4, 0.03, [0.99, 0.999], 2500, None, 1234),  # cifar10_uvit_small.py
    "imagenet256_uvit_l2": (300_000, 1024, 2e-4, 0.03, [0.99, 0.99], 5000, 0.15, 1234),  # imagenet256_uvit_large.py
    "imagenet256_uvit_h2": (500_000, 1024, 2e-4, 0.03, [0.99, 0.99], 5000, 0.1, 1234),
    "imagenet512_uvit_l4": (500_000, 1024, 2e-4, 0.03, [0.99, 0.99], 5000, 0.15, 1234),
    "imagenet512_uvit_h4": (500_000, 1024, 2e-4, 0.03, [0.99, 0.99], 5000, 0.1, 1234),
    "mscoco_uvit_s2": (1_000_000, 256, 2e-4, 0.03, [0.9, 0.9], 5000, 0.1, 1234),  # mscoco_uvit_small.py
}
# the official evaluation of each (sampler, steps, U-ViT's cfg scale): what in-training FID must use
OFFICIAL_EVALUATION = {"cifar10_uvit_s2": ("euler-maruyama", 1000, 0), "imagenet256_uvit_l2": ("dpm-solver-fast", 50, 0.4),
                       "imagenet256_uvit_h2": ("dpm-solver++-fast", 50, 0.4), "imagenet512_uvit_l4": ("dpm-solver-fast", 50, 0.7),
                       "imagenet512_uvit_h4": ("dpm-solver++-fast", 50, 0.7), "mscoco_uvit_s2": ("dpm-solver++-fast", 50, 1.0)}


@pytest.mark.parametrize("name", sorted(OFFICIAL_TRAINING))
@pytest.mark.parametrize("attention", ["uvit", "uvic"])
def test_each_paper_config_trains_and_scores_with_the_official_settings(name, attention):
    from uvic.config import load_config

    cfg = load_config(REFERENCE_DIR.parents[0] / f"{name.replace('uvit', attention)}.yaml")
    t, d, e = cfg.train, cfg.diffusion, cfg.eval
    steps, batch, lr, wd, betas, warmup, p_uncond, seed = OFFICIAL_TRAINING[name]
    assert (t.steps, t.batch_size, t.lr, t.weight_decay, list(t.betas), t.warmup_steps, t.seed) == (
        steps, batch, lr, wd, betas, warmup, seed)
    assert (t.lr_schedule, t.adam_eps, t.max_grad_norm, t.ema_decay, t.ema_warmup) == ("constant", 1e-8, None, 0.9999, False)
    if p_uncond is not None:
        assert d.p_uncond == p_uncond
    sampler, sample_steps, scale = OFFICIAL_EVALUATION[name]
    assert (e.fid_scheduler, e.fid_steps, e.fid_guidance) == (sampler, sample_steps, pytest.approx(1 + scale))
