"""Experiment configuration: one schema of defaults, YAML files and `key=value` overrides.

    cfg = load_config("configs/digits_uvic.yaml", ["train.lr=1e-4", "model.attention_type=softmax"])

Sections: model (UViT's config fields, or a `preset` plus overrides), diffusion (the training
noise scheduler and loss), data, train (optimisation, logging, checkpoints), eval (FID during
training). Every default lives in the dataclasses below; a YAML file only says what differs.
An unknown key fails at once with a message naming it and the valid keys at its level.
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .attention import attention_mechanism
from .diffusion import SCHEDULERS, SCHEDULES
from .model import UViT, preset_config, softmax_block_indices

SECTIONS = ("model", "diffusion", "data", "train", "eval")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
DATASETS = ("digits", "cifar10", "imagefolder", "latents")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "linear", "cosine")  # after the linear warm-up
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class ModelConfig:
    """UViT architecture. None = the preset's value if `preset` is set, else UViT's default.
    Resolved to explicit values by `load_config`, so the saved config.yaml is complete."""

    preset: Optional[str] = None  # e.g. "uvit-s/2"; fields set here override the preset
    sample_size: Optional[int] = None  # image (or latent) side in pixels
    in_channels: Optional[int] = None
    patch_size: Optional[int] = None
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    mlp_ratio: Optional[float] = None
    qkv_bias: Optional[bool] = None
    mlp_time_embed: Optional[bool] = None
    num_classes: Optional[int] = None  # derived from the data when data.conditional (classes + 1, null last)
    use_final_conv: Optional[bool] = None
    long_skip: Optional[bool] = None
    attention_type: Optional[str] = None  # "softmax" (U-ViT) or "cog" (U-ViC)
    softmax_blocks: Any = None  # block indices or a preset name (uvic.model.SOFTMAX_BLOCK_PRESETS); None = [0, depth]
    context_dim: Optional[int] = None  # text-to-image: width of the text tokens (768 for CLIP ViT-L/14), 0 = none
    num_context_tokens: Optional[int] = None  # text-to-image: number of text tokens (77)
    gradient_checkpointing: bool = False


@dataclass
class DiffusionConfig:
    """The noise schedule (uvic.diffusion: a diffusers DDPMScheduler, or U-ViT's continuous VP-SDE) and the loss."""

    schedule: str = "discrete"  # one of uvic.diffusion.SCHEDULES; vp_continuous: U-ViT's VP-SDE, model time 999·t
    beta_min: float = 0.1  # vp_continuous: β(t) = beta_min + t (beta_max - beta_min), t in [0, 1]
    beta_max: float = 20.0
    t_min: float = 0.0  # vp_continuous: training draws t ~ U(t_min, 1) (U-ViT: 0)
    timestep_offset: int = 0  # discrete: the model sees index + offset (U-ViT's H models: 1, trained on 1..N)
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # one of BETA_SCHEDULES
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"  # one of PREDICTION_TYPES
    clip_sample: bool = True  # True for pixels in [-1, 1], False for latents
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"  # inherited by every sampler built from the saved scheduler
    snr_gamma: Optional[float] = None  # min-SNR-γ loss weighting (Hang et al. 2023); None = plain MSE
    p_uncond: float = 0.1  # class-conditional: probability a label is dropped to the null class


@dataclass
class DataConfig:
    name: str = "digits"  # one of DATASETS
    path: Optional[str] = None  # data root (cifar10: default ./data) / image folder / latents file
    download: bool = False  # cifar10: fetch it if absent
    conditional: bool = False  # train class-conditional (labels needed)
    random_flip: bool = False  # random horizontal flip (applied on the batch, resume-exact)
    limit: Optional[int] = None  # use only the first N examples (quick tests, overfitting checks)
    split: str = "all"  # digits: all, train (1,437) or heldout (360; the reference digits-heldout, never trained on)
    scale_factor: Optional[float] = None  # latents: multiply latents by this (None = the file's own)
    check_images: bool = True  # imagefolder: open every file once up front, skip unreadable ones
    fail_on_corrupt: bool = False  # imagefolder: raise on the first unreadable file instead
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False


@dataclass
class TrainConfig:
    """Optimisation, logging and checkpoints. Defaults: the U-ViT paper's CIFAR-10 recipe."""

    seed: int = 0  # every random source of a run: python, numpy, torch (accelerate set_seed), data order
    steps: int = 500_000  # optimizer steps
    batch_size: int = 128  # GLOBAL batch: processes x grad_accum x per-process batch
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.03
    betas: List[float] = field(default_factory=lambda: [0.99, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 2500
    lr_schedule: str = "constant"  # after warm-up; one of LR_SCHEDULES
    max_grad_norm: Optional[float] = 1.0  # None = no clipping (the norm is still logged)
    mixed_precision: str = "no"  # one of MIXED_PRECISION
    ema_decay: float = 0.9999
    ema_update_after_step: int = 0
    ema_warmup: bool = True  # diffusers' EMA decay warm-up; false = the fixed decay of U-ViT's code
    log_every: int = 50
    sample_every: int = 5000  # 0 = only at the end
    sample_num: int = 64  # unconditional grid size (class-conditional: 8 per class row)
    sample_scheduler: str = "dpm++2m"  # a name in uvic.pipeline.SCHEDULERS
    sample_steps: int = 25
    sample_guidance: float = 1.0  # class-conditional grids: classifier-free guidance w (1 = off)
    sample_seed: int = 0
    checkpoint_every: int = 5000  # 0 = only at the end
    keep_checkpoints: int = 2  # the last N complete checkpoints on the checkpoint_every schedule are kept, and the newest (>= 1)
    max_nonfinite_steps: int = 5  # stop after this many steps in a row with a non-finite loss / grad norm (skipped)
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # FSDP2: weights, gradients, AdamW and EMA states sharded over the processes (README "DDP or FSDP")
    cpu_threads: Optional[int] = None  # on the CPU: torch intra-op threads (None = torch's default)
    init_from: Optional[str] = None  # fine-tune: initial weights (uvic.finetune: a published .pth, final/, a checkpoint)
    init_reset: Optional[List[str]] = None  # parts re-initialised instead: label_emb, head, patch_embed


@dataclass
class EvalConfig:
    """FID during training (uvic.metrics.pipeline_fid on the EMA pipeline)."""

    fid_every: int = 0  # 0 = off
    fid_num_samples: int = 10_000
    fid_ref: Optional[str] = None  # reference statistics / data set name for uvic.metrics
    # the evaluation protocol: None = the recipe's (train.sample_scheduler, sample_steps, sample_guidance), filled
    # in at load so config.yaml and metrics.csv say which sampler, steps and guidance each FID used
    fid_scheduler: Optional[str] = None
    fid_steps: Optional[int] = None
    fid_guidance: Optional[float] = None  # classifier-free guidance w of the FID samples (1 = off)
    fid_batch_size: int = 64


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------------- loading
def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Schema defaults <- YAML file `path` <- dotted `overrides` ("train.lr=1e-4"); validated, model resolved."""
    schema = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} not found")
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # YAML syntax
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(layer, DictConfig):
            raise ValueError(f"config file {path} must be a mapping of sections ({', '.join(SECTIONS)}), "
                             f"not a {type(layer).__name__}")
        layers.append((layer, f"config file {path}"))
    overrides = list(overrides)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like section.key=value, got {bad}")
    if overrides:
        layers.append((override_layer(overrides, schema), "command line"))
    cfg = schema
    for layer, source in layers:
        _check_keys(layer, schema, "", source)
        if OmegaConf.select(layer, "train.mixed_precision") is False:  # YAML 1.1 reads an unquoted `no` as false
            layer.train.mixed_precision = "no"
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:  # a wrong type, e.g. train.steps=abc
            raise ValueError(f"bad value in {source}: {getattr(e, 'msg', None) or e}") from None
    cfg = resolve_eval(resolve_model(cfg))
    validate_config(cfg)
    return cfg


def override_layer(overrides: Sequence[str], schema: DictConfig) -> DictConfig:
    """`key=value` overrides as one config layer, values parsed as YAML (numbers, lists, null), except that a string
    field keeps the word typed where YAML 1.1 would read a boolean (`train.mixed_precision=no` is "no", not false)."""
    layer = OmegaConf.from_dotlist(list(overrides))
    for item in overrides:
        key, text = item.split("=", 1)
        if isinstance(OmegaConf.select(layer, key), bool) and _is_str_field(schema, key):
            OmegaConf.update(layer, key, text.strip("'\""))
    return layer


def _is_str_field(schema: DictConfig, key: str) -> bool:
    section, _, name = key.rpartition(".")
    node = OmegaConf.select(schema, section) if section else schema
    return isinstance(node, DictConfig) and name in node and node._get_node(name)._metadata.ref_type is str


def resolve_eval(cfg: DictConfig) -> DictConfig:
    """In-training FID samples as the recipe does unless told otherwise: eval.fid_scheduler, fid_steps and
    fid_guidance default to train.sample_scheduler, sample_steps and sample_guidance."""
    cfg = cfg.copy()
    for fid_key, train_key in (("fid_scheduler", "sample_scheduler"), ("fid_steps", "sample_steps"),
                               ("fid_guidance", "sample_guidance")):
        if cfg.eval[fid_key] is None:
            cfg.eval[fid_key] = cfg.train[train_key]
    return cfg


def _check_keys(node: Any, schema: Any, prefix: str, source: str) -> None:
    """Fail on the first key of `node` that the schema does not have, naming the valid keys there."""
    if not isinstance(node, DictConfig) or not isinstance(schema, DictConfig):
        return
    valid = list(schema.keys())
    for key in node.keys():
        name = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean {prefix}{close[0]!s}?)" if close else ""
            where = f"'{prefix[:-1]}'" if prefix else "the top level"
            raise ValueError(f"unknown config key {name!r} in {source}{hint}; valid keys at {where}: {', '.join(valid)}")
        _check_keys(node[key], schema[key], f"{name}.", source)


def resolve_model(cfg: DictConfig) -> DictConfig:
    """Fill every model field: explicit value > preset > UViT's default (num_classes stays as given)."""
    defaults = {
        name: p.default for name, p in inspect.signature(UViT.__init__).parameters.items() if name != "self"
    }
    given = {k: v for k, v in OmegaConf.to_container(cfg.model).items() if v is not None}
    preset = given.pop("preset", None)
    base = preset_config(preset) if preset else {}
    resolved = {**defaults, **base, **given}
    resolved["num_classes"] = given.get("num_classes", -1)
    cfg = cfg.copy()
    for key, value in resolved.items():
        if key in cfg.model:
            cfg.model[key] = list(value) if isinstance(value, (tuple, ListConfig)) else value
    return cfg


def validate_config(cfg: DictConfig) -> None:
    """Fail fast on values no run could use (each message names the key and what is valid). The files a config
    names (train.init_from, eval.fid_ref) are checked where a run starts (uvic.launch.check_inputs), not here: a
    saved run's config stays readable after they moved."""
    check_choices(cfg)
    check_model(cfg.model)
    check_ranges(cfg)
    check_diffusion(cfg.diffusion)
    check_sampling(cfg)
    check_finite(cfg)  # last: the checks above name a NaN in their own terms where they have one
    if cfg.data.name in ("imagefolder", "latents") and not cfg.data.path:
        raise ValueError(f"data.name={cfg.data.name!r} needs data.path (the {cfg.data.name} location)")


def check_choices(cfg: DictConfig) -> None:
    """Every name-valued setting of the diffusion, data, train and eval sections is one of its valid names."""
    d, data, t, e = cfg.diffusion, cfg.data, cfg.train, cfg.eval
    choices = [
        ("diffusion.schedule", d.schedule, SCHEDULES),
        ("diffusion.prediction_type", d.prediction_type, PREDICTION_TYPES),
        ("diffusion.beta_schedule", d.beta_schedule, BETA_SCHEDULES),
        ("diffusion.timestep_spacing", d.timestep_spacing, TIMESTEP_SPACINGS),
        ("data.name", data.name, DATASETS),
        ("train.mixed_precision", t.mixed_precision, MIXED_PRECISION),
        ("train.lr_schedule", t.lr_schedule, LR_SCHEDULES),
        ("train.sample_scheduler", t.sample_scheduler, tuple(SCHEDULERS)),
        ("eval.fid_scheduler", e.fid_scheduler, tuple(SCHEDULERS)),
    ]
    for key, value, valid in choices:
        if value not in valid:
            raise ValueError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def check_ranges(cfg: DictConfig) -> None:
    """Counts, rates and probabilities within their bounds."""
    d, data, t, e = cfg.diffusion, cfg.data, cfg.train, cfg.eval
    at_least_one = [
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum", t.grad_accum),
        ("diffusion.num_train_timesteps", d.num_train_timesteps),
        ("train.sample_steps", t.sample_steps),
        ("train.log_every", t.log_every),
        ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps),
        ("train.sample_num", t.sample_num),
        ("data.limit", data.limit),
        ("eval.fid_num_samples", e.fid_num_samples),
        ("eval.fid_steps", e.fid_steps),
        ("eval.fid_batch_size", e.fid_batch_size),
        ("train.cpu_threads", t.cpu_threads),
    ]
    for key, value in at_least_one:
        if value is not None and value < 1:
            null = " (or null)" if key in ("data.limit", "train.cpu_threads") else ""
            raise ValueError(f"{key} must be >= 1{null}, got {value}")
    at_least_zero = [
        ("train.warmup_steps", t.warmup_steps),
        ("train.weight_decay", t.weight_decay),
        ("train.sample_every", t.sample_every),
        ("train.checkpoint_every", t.checkpoint_every),
        ("train.ema_update_after_step", t.ema_update_after_step),
        ("eval.fid_every", e.fid_every),
        ("data.num_workers", data.num_workers),
        ("diffusion.timestep_offset", d.timestep_offset),
    ]
    for key, value in at_least_zero:
        if value < 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    for key, value in (("train.lr", t.lr), ("train.adam_eps", t.adam_eps), ("diffusion.beta_start", d.beta_start),
                       ("diffusion.beta_end", d.beta_end), ("diffusion.clip_sample_range", d.clip_sample_range)):
        if not value > 0 or value == float("inf"):  # also refuses nan
            raise ValueError(f"{key} must be a finite number > 0, got {value}")
    if t.max_grad_norm is not None and not t.max_grad_norm > 0:
        raise ValueError(f"train.max_grad_norm must be > 0 (or null for no clipping), got {t.max_grad_norm}")
    if not 0.0 < t.ema_decay < 1.0:
        raise ValueError(f"train.ema_decay must lie in (0, 1) (U-ViT: 0.9999), got {t.ema_decay}")
    if not 0.0 <= d.p_uncond < 1.0:
        raise ValueError(f"diffusion.p_uncond must lie in [0, 1), got {d.p_uncond}")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ValueError(f"train.betas must be two numbers (beta1, beta2) in [0, 1), got {list(t.betas)}")


def check_diffusion(d: DictConfig) -> None:
    """The noise schedule's parameters (U-ViT's VP-SDE or a discrete beta schedule)."""
    if d.schedule == "vp_continuous":
        if d.prediction_type != "epsilon":
            raise ValueError(
                f"diffusion.schedule=vp_continuous trains noise prediction; diffusion.prediction_type="
                f"{d.prediction_type!r} is not valid there; use epsilon"
            )
        if not 0.0 < d.beta_min < d.beta_max:
            raise ValueError(f"diffusion.beta_min, beta_max must satisfy 0 < beta_min < beta_max, got {d.beta_min}, {d.beta_max}")
        if not 0.0 <= d.t_min < 1.0:
            raise ValueError(f"diffusion.t_min must lie in [0, 1), got {d.t_min}")
    if d.snr_gamma is not None and d.snr_gamma <= 0:
        raise ValueError(f"diffusion.snr_gamma must be > 0 or null, got {d.snr_gamma}")
    if d.schedule == "discrete" and d.beta_schedule != "squaredcos_cap_v2" and not 0.0 < d.beta_start < d.beta_end < 1.0:
        raise ValueError(f"diffusion.beta_start, beta_end must satisfy 0 < beta_start < beta_end < 1, got "
                         f"{d.beta_start}, {d.beta_end}")


def check_sampling(cfg: DictConfig) -> None:
    """The grid and in-training FID samplers fit the model: steps, guidance, a continuous-time sampler's schedule."""
    m, d, data, t, e = cfg.model, cfg.diffusion, cfg.data, cfg.train, cfg.eval
    for key, name in (("train.sample_scheduler", t.sample_scheduler), ("eval.fid_scheduler", e.fid_scheduler)):
        if name == "euler-maruyama" and d.schedule != "vp_continuous":
            raise ValueError(f"{key}=euler-maruyama samples a diffusion.schedule=vp_continuous model; this one is {d.schedule}")
    for key, guidance in (("train.sample_guidance", t.sample_guidance), ("eval.fid_guidance", e.fid_guidance)):
        if guidance != 1.0 and not (data.conditional or m.get("context_dim")):
            raise ValueError(f"{key} != 1 needs a conditional run (data.conditional=true, or a text "
                             "model with model.context_dim)")
    if e.fid_every > 0 and not e.fid_ref:
        raise ValueError("eval.fid_every > 0 needs eval.fid_ref (reference statistics for FID)")
    for key, steps, sampler in (("train.sample_steps", t.sample_steps, t.sample_scheduler),
                                ("eval.fid_steps", e.fid_steps, e.fid_scheduler)):
        problem = sampler_steps_problem(sampler, steps, d.num_train_timesteps)
        if problem and (key == "train.sample_steps" or e.fid_every > 0):
            raise ValueError(f"{key}={steps}: {problem}")


CONTINUOUS_TIME_SAMPLERS = ("euler-maruyama", "dpm-solver-fast", "dpm-solver++-fast", "EulerMaruyamaScheduler",
                            "DPMSolverFastScheduler")  # their steps split continuous time: any number


def sampler_steps_problem(sampler: str, steps: int, num_train_timesteps: int) -> Optional[str]:
    """Why `steps` steps of `sampler` (a uvic.pipeline.SCHEDULERS name or a scheduler class name) cannot sample
    a model trained on `num_train_timesteps` timesteps, or None: a discrete-time sampler visits distinct
    training timesteps, so it has at most as many steps as the schedule has timesteps."""
    if sampler in CONTINUOUS_TIME_SAMPLERS or steps <= num_train_timesteps:
        return None
    return (f"{sampler} takes at most as many steps as the schedule has timesteps ({num_train_timesteps}, "
            f"diffusion.num_train_timesteps); use at most {num_train_timesteps}")


def check_finite(cfg: DictConfig) -> None:
    """NaN and inf are refused in every float of the config (a NaN compares false with every bound)."""
    for key, value in _flatten(OmegaConf.to_container(cfg)).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{key}={v} is not a finite number")


def check_model(m: DictConfig) -> None:
    """A registered attention mechanism, sizes that fit together, softmax blocks that exist."""
    try:
        attention_mechanism(m.attention_type)
    except ValueError as err:
        raise ValueError(f"model.{err}") from None
    check_model_sizes(m)
    blocks = m.softmax_blocks
    try:  # a preset name or indices; a typo fails here, also where attention_type="softmax" ignores it
        softmax_block_indices(list(blocks) if isinstance(blocks, ListConfig) else blocks, m.depth)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model.{err}" if isinstance(err, ValueError) else
                         f"model.softmax_blocks={blocks!r}: expected a preset name or a list of block indices") from None


def check_model_sizes(m: DictConfig) -> None:
    """Positive sizes; the patches tile the image and the heads split the width."""
    for key in ("sample_size", "in_channels", "patch_size", "embed_dim", "depth", "num_heads"):
        if not m[key] >= 1:
            raise ValueError(f"model.{key} must be >= 1, got {m[key]}")
    if not m.mlp_ratio > 0:
        raise ValueError(f"model.mlp_ratio must be > 0, got {m.mlp_ratio}")
    if m.sample_size % m.patch_size:
        raise ValueError(
            f"model.sample_size={m.sample_size} is not divisible by model.patch_size={m.patch_size}"
        )
    if m.embed_dim % m.num_heads:
        raise ValueError(f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads} "
                         f"(each head takes embed_dim / num_heads channels)")


def model_kwargs(cfg: DictConfig) -> dict:
    """UViT's keyword arguments from a resolved config (the model section less the non-architecture keys)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.model).items() if k not in ("preset", "gradient_checkpointing")}


def save_config(cfg: DictConfig, path) -> None:
    OmegaConf.save(cfg, path)


def config_diff(a: DictConfig, b: DictConfig) -> List[str]:
    """Dotted keys whose values differ between two configs (for 'this folder holds another run')."""
    fa = _flatten(OmegaConf.to_container(a))
    fb = _flatten(OmegaConf.to_container(b))
    # a key one side lacks was added to uvic after that config was saved: not a difference of the run
    return sorted(k for k in set(fa) & set(fb) if fa[k] != fb[k])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
