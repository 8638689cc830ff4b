"""The paper's recipes: U-ViT's official samplers against independent restatements of baofff/U-ViT's
code (sde.py, dpm_solver_pytorch.py, dpm_solver_pp.py) on a Gaussian toy whose exact ε is known, the
continuous-time VP-SDE training and time map, and the reference configs of the published checkpoints."""

import math

import pytest
import torch

from uvic.diffusion import make_scheduler, vp_sde_of
from uvic.model import UViT, UViTOutput
from uvic.pipeline import UViCPipeline

SHAPE = (6, 2, 4, 4)  # (B, C, H, W) of the toy
MU, STD = 0.1, 0.2  # the toy data: x_0 ~ N(MU, STD^2) per pixel
N = 1000


# ---------------------------------------------------------------------- the toy and the two schedules, restated
def vp_log_alpha(t, beta_0=0.1, beta_1=20.0):  # log sqrt(ᾱ(t)) of the linear VP-SDE
    return -0.25 * t**2 * (beta_1 - beta_0) - 0.5 * t * beta_0


SD_BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, N, dtype=torch.float64) ** 2  # train_ldm_discrete.py
SD_LOG_ALPHA = 0.5 * torch.cumsum(torch.log(1.0 - SD_BETAS), 0)  # log α at t_n = n/N, n = 1..N
SD_T = torch.arange(1, N + 1, dtype=torch.float64) / N


def sd_log_alpha(t):  # dpm_solver_pp's discrete schedule: log α piecewise linear in t over t_n = n/N
    return torch.from_numpy(__import__("numpy").interp(t.numpy(), SD_T.numpy(), SD_LOG_ALPHA.numpy()))


def exact_eps(x, log_alpha):
    """E[ε | x_t] for x_0 ~ N(MU, STD²): σ (x − α MU) / (α² STD² + σ²)."""
    a2 = math.exp(2 * float(log_alpha))
    return math.sqrt(1 - a2) * (x - math.sqrt(a2) * MU) / (a2 * STD**2 + 1 - a2)


class GaussianToy(UViT):
    """A UViT-shaped model whose output is the exact ε of the toy at the time it is given."""

    def __init__(self, time_to_log_alpha):
        super().__init__(sample_size=SHAPE[2], in_channels=SHAPE[1], patch_size=2, embed_dim=8, depth=2, num_heads=1)
        self.time_to_log_alpha = time_to_log_alpha

    def forward(self, sample, timestep, class_labels=None, **kwargs):
        time = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)[0]
        return UViTOutput(sample=exact_eps(sample.double(), self.time_to_log_alpha(time)).to(sample.dtype))


def continuous_toy():  # model input 999·t
    return GaussianToy(lambda time: vp_log_alpha(time / 999.0))


def discrete_toy():  # model input n (= N·t); official H models see n = 1..N
    return GaussianToy(lambda time: sd_log_alpha(time.reshape(1) / N)[0])


def run_pipeline(model, scheduler, steps, x_T, offset=0, generator=None):
    pipe = UViCPipeline(transformer=model, scheduler=scheduler, timestep_offset=offset)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=SHAPE[0], num_inference_steps=steps, latents=x_T, generator=generator,
                  output_type="pt").images
    return images.double() * 2 - 1  # back to x_0 (the toy stays inside [-1, 1])


def continuous_base():
    from uvic.config import load_config
    from uvic.diffusion import build_scheduler

    return build_scheduler(load_config(None, ["diffusion.schedule=vp_continuous", "diffusion.clip_sample=false"]).diffusion)


# ---------------------------------------------------------------------- restatements of the official samplers
def official_euler_maruyama(x, steps, generator, eps=1e-3):
    """sde.euler_maruyama(ReverseSDE(ScoreModel(noise_pred, VPSDE()))): model input 999·t."""
    beta = lambda t: 0.1 + t * (20.0 - 0.1)
    grid = [0.0] + torch.linspace(eps, 1.0, steps, dtype=torch.float64).tolist()
    x = x.double()
    for s, t in list(zip(grid, grid[1:]))[::-1]:
        cum_beta = -math.expm1(2 * vp_log_alpha(t))
        score = -exact_eps(x, vp_log_alpha(999.0 * t / 999.0)) / math.sqrt(cum_beta)
        drift = -0.5 * beta(t) * x - beta(t) * score
        mean = x + drift * (s - t)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        x = mean + math.sqrt(beta(t) * (t - s)) * noise if s != 0 else mean
    return x


def _lam(log_alpha):
    return log_alpha - 0.5 * math.log(-math.expm1(2 * log_alpha))


def official_dpm_solver_fast(x, steps, eps=1e-4):
    """dpm_solver_pytorch.DPM_Solver(fast_version=True) with NoiseScheduleVP('linear'), time input 999·t."""
    b0, b1 = 0.1, 20.0
    la = lambda t: vp_log_alpha(t, b0, b1)
    sig = lambda t: math.sqrt(-math.expm1(2 * la(t)))

    def inv(lam):
        tmp = 2.0 * (b1 - b0) * math.log1p(math.exp(-2.0 * lam))
        return tmp / (math.sqrt(b0**2 + tmp) + b0) / (b1 - b0)

    model = lambda x, t: exact_eps(x, vp_log_alpha(999.0 * t / 999.0))
    k = steps // 3 + 1
    orders = [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
    lams = torch.linspace(_lam(la(1.0)), _lam(la(eps)), k + 1, dtype=torch.float64).tolist()
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


def official_dpm_solver_pp(x, steps):
    """dpm_solver_pp.DPM_Solver(predict_x0=True).sample(eps=1/N, T=1): single-step, order 3, time-uniform,
    discrete SD schedule (log α interpolated), model input N·t, no final denoise (eval_ldm_discrete.py)."""
    la = lambda t: float(sd_log_alpha(torch.tensor([t], dtype=torch.float64))[0])
    sig = lambda t: math.sqrt(-math.expm1(2 * la(t)))
    lam_grid, t_grid = torch.tensor([_lam(v) for v in SD_LOG_ALPHA.tolist()]), SD_T

    def inv(lam):  # t of λ: log α = −½ log(1 + e^{−2λ}), interpolated back on the table
        log_alpha = -0.5 * math.log1p(math.exp(-2.0 * lam))
        import numpy as np

        return float(np.interp(log_alpha, SD_LOG_ALPHA.flip(0).numpy(), t_grid.flip(0).numpy()))

    def data_pred(x, t):  # x0 prediction from the noise model
        e = exact_eps(x, sd_log_alpha(torch.tensor([N * t / N]))[0])
        return (x - sig(t) * e) / math.exp(la(t))

    k = steps // 3 + 1
    orders = [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + ([1] if steps % 3 == 1 else [2])
    uniform = torch.linspace(1.0, 1.0 / N, steps + 1, dtype=torch.float64)
    ts = uniform[torch.cumsum(torch.tensor([0] + orders), 0)].tolist()
    x = x.double()
    for i, order in enumerate(orders):
        s, t = ts[i], ts[i + 1]
        h = _lam(la(t)) - _lam(la(s))
        m_s = data_pred(x, s)
        a_t = math.exp(la(t))
        if order == 1:
            x = sig(t) / sig(s) * x - a_t * math.expm1(-h) * m_s
        elif order == 2:
            r1 = 0.5
            s1 = inv(_lam(la(s)) + r1 * h)
            x_s1 = sig(s1) / sig(s) * x - math.exp(la(s1)) * math.expm1(-r1 * h) * m_s
            m_s1 = data_pred(x_s1, s1)
            x = sig(t) / sig(s) * x - a_t * math.expm1(-h) * m_s - (0.5 / r1) * a_t * math.expm1(-h) * (m_s1 - m_s)
        else:
            r1, r2 = 1 / 3, 2 / 3
            s1, s2 = inv(_lam(la(s)) + r1 * h), inv(_lam(la(s)) + r2 * h)
            x_s1 = sig(s1) / sig(s) * x - math.exp(la(s1)) * math.expm1(-r1 * h) * m_s
            m_s1 = data_pred(x_s1, s1)
            phi_22 = math.expm1(-r2 * h) / (r2 * h) + 1
            x_s2 = (sig(s2) / sig(s) * x - math.exp(la(s2)) * math.expm1(-r2 * h) * m_s
                    + r2 / r1 * math.exp(la(s2)) * phi_22 * (m_s1 - m_s))
            m_s2 = data_pred(x_s2, s2)
            phi_2 = math.expm1(-h) / h + 1
            x = sig(t) / sig(s) * x - a_t * math.expm1(-h) * m_s + (1 / r2) * a_t * phi_2 * (m_s2 - m_s)
    return x


# ---------------------------------------------------------------------- the samplers against the restatements
def test_euler_maruyama_matches_the_official_reverse_sde_given_the_same_noise():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    steps = 1000
    ours = run_pipeline(continuous_toy(), make_scheduler("euler-maruyama", continuous_base().config), steps, x_T,
                        generator=torch.Generator().manual_seed(7))
    official = official_euler_maruyama(x_T, steps, torch.Generator().manual_seed(7))
    assert (ours - official).abs().max() <= 1e-4
    assert abs(official.std().item() - STD) < 0.1  # it does sample the toy


def test_dpm_solver_fast_matches_the_official_dpm_solver():
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    for steps in (50, 49, 48):  # all three order patterns
        ours = run_pipeline(continuous_toy(), make_scheduler("dpm-solver-fast", continuous_base().config), steps, x_T)
        official = official_dpm_solver_fast(x_T, steps)
        assert (ours - official).abs().max() <= 1e-4, steps


def test_dpm_solver_pp_fast_matches_the_official_h_sampler():
    from diffusers import DDPMScheduler

    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ours = run_pipeline(discrete_toy(), make_scheduler("dpm-solver++-fast", base.config), 50, x_T, offset=1)
    official = official_dpm_solver_pp(x_T, 50)
    assert (ours - official).abs().max() <= 1e-4


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
}
REFERENCE_DIR = __import__("pathlib").Path(__file__).resolve().parents[1] / "configs" / "reference"


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
    from uvic.sampling import load_pipeline, main

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
