"""Load a model from any path users give: one loader for sampling, reports, analysis, sweeps and fine-tuning.

    kind(path)             "pipeline" | "checkpoint" | "run" | "published" | None
    load_pipeline(path)    -> UViCPipeline (CPU, float32)

Accepted: a pipeline folder (model_index.json, e.g. runs/NAME/final), a run directory (final/, or a checkpoint with
`checkpoint=`), a checkpoint folder (model/, ema_model/, scheduler/) or a published U-ViT .pth (its reference config
recognised by the file name, configs/reference/, or given).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Optional, Union

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler
from omegaconf import OmegaConf
from safetensors import safe_open

from .diffusion import make_scheduler, reference_scheduler
from .latents import attach_vae
from .model import UViT, load_reference_checkpoint
from .pipeline import UViCPipeline
from .checkpoint import CHECKPOINT_MANIFEST, CheckpointError, checkpoint_problem
from .runs import CHECKPOINTS, RunDir

MODEL_KINDS = (
    "a pipeline folder (model_index.json, e.g. runs/NAME/final), a run directory (config.yaml, "
    "checkpoints/, final/), a checkpoint folder (model/, ema_model/, scheduler/) or a published "
    "U-ViT .pth (recognised by its file name, else with --reference-config)"
)


def _read_mapping(source) -> dict:
    """A dict, or a YAML / JSON file holding one."""
    if isinstance(source, dict):
        return dict(source)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"reference config {path} does not exist (expected a YAML or JSON file)")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
    else:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(data, dict):
        raise ValueError(f"reference config {path} must hold a mapping of the reference `nnet` keywords")
    return data


REFERENCE_CONFIGS = "configs/reference/"  # one YAML per published U-ViT checkpoint
# The file names of baofff/U-ViT's published checkpoints (its README's table) -> their reference config.
PUBLISHED_CHECKPOINTS = {
    "cifar10_uvit_small.pth": "cifar10_uvit_s2.yaml",
    "celeba64_uvit_small.pth": "celeba64_uvit_s4.yaml",
    "imagenet64_uvit_mid.pth": "imagenet64_uvit_m4.yaml",
    "imagenet64_uvit_large.pth": "imagenet64_uvit_l4.yaml",
    "imagenet256_uvit_large.pth": "imagenet256_uvit_l2.yaml",
    "imagenet256_uvit_huge.pth": "imagenet256_uvit_h2.yaml",
    "imagenet512_uvit_large.pth": "imagenet512_uvit_l4.yaml",
    "imagenet512_uvit_huge.pth": "imagenet512_uvit_h4.yaml",
    "mscoco_uvit_small.pth": "mscoco_uvit_s2.yaml",
    "mscoco_uvit_small_deep.pth": "mscoco_uvit_s2_deep.yaml",
}


def published_reference_config(path) -> Path:
    """The reference config of a published U-ViT checkpoint, recognised by its file name; any other name is
    refused with the list of known ones (a renamed file needs --reference-config)."""
    name = Path(path).name
    if name not in PUBLISHED_CHECKPOINTS:
        raise ValueError(f"{name} is not the name of a published U-ViT checkpoint ({', '.join(PUBLISHED_CHECKPOINTS)}): "
                         f"pass --reference-config (one of {REFERENCE_CONFIGS}*.yaml, or a YAML/JSON of the reference "
                         "`nnet` keywords)")
    # the repository's configs/reference/, else one under the working directory (an installed package)
    for root in (Path(__file__).resolve().parents[1], Path.cwd()):
        found = root / REFERENCE_CONFIGS / PUBLISHED_CHECKPOINTS[name]
        if found.is_file():
            return found
    raise FileNotFoundError(f"{name}: its reference config {REFERENCE_CONFIGS}{PUBLISHED_CHECKPOINTS[name]} is missing "
                            "(run from the uvic repository, or pass --reference-config)")


def load_reference_pipeline(path, reference_config, vae=None) -> UViCPipeline:
    """A published U-ViT .pth as a pipeline that samples as the official eval script does.

    reference_config: a YAML/JSON file or mapping (configs/reference/*.yaml) with sections `nnet` (the
    reference keywords: img_size, patch_size, in_chans, ...), `schedule` (how it was trained, see
    uvic.diffusion.reference_scheduler), optional `uvic` (UViT overrides such as attention_type),
    `vae` (hub id or folder, or a mapping {source, subfolder, scale_factor}) and `sample` (scheduler,
    steps, guidance: the paper's sampler, which becomes the pipeline's own). A flat mapping is the
    `nnet` keywords alone. Pixel models without `schedule` are U-ViT's continuous VP-SDE (train.py);
    a latent model without one is refused: the ImageNet L and H checkpoints differ there.
    Legacy: `scheduler` (DDPMScheduler keywords) with `timestep_offset` is an explicit discrete schedule.
    vae: overrides the config's VAE (a folder, hub id or AutoencoderKL).
    """
    cfg = _read_mapping(reference_config)
    sectioned = isinstance(cfg.get("nnet"), dict)
    nnet = cfg["nnet"] if sectioned else cfg
    overrides = cfg.get("uvic", {}) if sectioned else {}
    # the schedule and sampler first: a wrong one fails before the weights load
    if sectioned and cfg.get("scheduler") is not None:
        scheduler, offset = DDPMScheduler(**cfg["scheduler"]), cfg.get("timestep_offset", 0)
    elif sectioned and cfg.get("schedule") is not None:
        scheduler, offset = reference_scheduler(cfg["schedule"])
    elif nnet.get("in_chans", 3) == 3:
        scheduler, offset = reference_scheduler({"kind": "vp_continuous"})
    else:
        raise ValueError(
            f"{path}: a latent U-ViT checkpoint needs its noise schedule (`schedule:` in --reference-config): "
            f"ImageNet L models are continuous-time VP-SDEs, H models discrete with offset 1. Use the matching "
            f"file of {REFERENCE_CONFIGS} (imagenet256_uvit_l2, imagenet256_uvit_h2, imagenet512_uvit_l4, "
            "imagenet512_uvit_h4)"
        )
    sample = (cfg.get("sample") or {}) if sectioned else {}
    if sample.get("scheduler"):
        scheduler = make_scheduler(sample["scheduler"], scheduler.config)
    try:
        model = load_reference_checkpoint(str(path), nnet, **overrides).eval()
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:
        if "PytorchStreamReader" not in str(err) and not isinstance(err, (EOFError, pickle.UnpicklingError)):
            raise  # a mismatch of shapes and the like: load_reference_checkpoint's own message
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt: "
                         f"{str(err).split('. ')[0][:200]}); download it again") from None
    # the latent scale the model was trained with travels with its reference config and is saved in the pipeline,
    # whichever route supplies the VAE weights (a --vae folder's own scaling_factor is SD's 0.18215, not MS-COCO's 0.23010)
    reference_vae = cfg.get("vae") if sectioned else None
    latent_scale = reference_vae.get("scale_factor") if isinstance(reference_vae, dict) else None
    pipe = UViCPipeline(transformer=model, scheduler=scheduler, timestep_offset=offset, latent_scale=latent_scale,
                        null_label=bool(cfg.get("null_label", True)) if sectioned else True)
    vae = vae if vae is not None else reference_vae
    if vae is not None:
        scale_factor = None
        if isinstance(vae, dict):
            scale_factor = vae.get("scale_factor")
            if vae.get("subfolder"):
                vae = AutoencoderKL.from_pretrained(vae["source"], subfolder=vae["subfolder"]).eval()
            else:
                vae = vae["source"]
        attach_vae(pipe, vae, scale_factor=scale_factor)
    return pipe


def reference_sample_settings(reference_config) -> dict:
    """The `sample` section (scheduler, steps, guidance) of a reference config, or {}."""
    cfg = _read_mapping(reference_config)
    return dict(cfg.get("sample") or {}) if isinstance(cfg.get("nnet"), dict) else {}


def load_pipeline(model, checkpoint=None, ema: bool = True, reference_config=None, vae=None) -> UViCPipeline:
    """A UViCPipeline from `model`: a pipeline folder, a run directory, a checkpoint folder or a U-ViT .pth.

    Run directories give final/ (EMA weights) unless `checkpoint` ("latest" or a step) is set; then
    checkpoints/step_XXXXXXX with ema_model/ (ema=True) or model/. A .pth needs `reference_config`
    (see load_reference_pipeline; `vae` replaces its VAE). The pipeline is on the CPU in float32.
    """
    if isinstance(model, UViCPipeline):
        return model
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"MODEL {path} does not exist; expected {MODEL_KINDS}")
    if path.is_file():
        if checkpoint is not None:
            raise ValueError(f"--checkpoint applies to run directories, not to the file {path}")
        if reference_config is None:
            reference_config = published_reference_config(path)
        return load_reference_pipeline(path, reference_config, vae=vae)
    if reference_config is not None:
        raise ValueError(f"--reference-config applies to a published U-ViT .pth file, not to the folder {path}")

    found = kind(path)
    if found in ("pipeline", "checkpoint") and checkpoint is not None:
        raise ValueError(f"--checkpoint applies to run directories; {path} is a single model folder")
    if found == "pipeline":
        if not ema:
            raise ValueError(f"{path} holds EMA weights only; for the raw weights pass a run directory with --checkpoint")
        return pipeline_folder(path)  # its weights checked against its config first
    if found == "checkpoint":
        return checkpoint_pipeline(path, ema)
    if found == "run":
        return run_pipeline(RunDir(path), checkpoint, ema=ema)
    raise ValueError(f"MODEL {path} is none of the accepted kinds: {MODEL_KINDS}")


def checkpoint_pipeline(step_dir, ema: bool = True, run: Optional[RunDir] = None, verify: bool = True):
    """The pipeline of one checkpoint folder: ema_model/ (ema=True) or model/, with its scheduler/; for
    a latent run (`run`, found from the folder when None) the VAE its latents came from.
    verify: a folder with a manifest must match it (sizes and sha256), or CheckpointError."""
    step_dir = Path(step_dir)
    if verify and (step_dir / CHECKPOINT_MANIFEST).is_file():
        problem = checkpoint_problem(step_dir, full=True)
        if problem is not None:
            raise CheckpointError(f"checkpoint {step_dir} is damaged: {problem}")
    sub = step_dir / ("ema_model" if ema else "model")
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {step_dir} has no {sub.name}/ (expected UViT.save_pretrained output)")
    check_weights(sub)
    sched_dir = step_dir / "scheduler"
    if not (sched_dir / "scheduler_config.json").is_file():
        raise FileNotFoundError(f"checkpoint {step_dir} has no scheduler/ (expected the training scheduler)")
    class_name = json.loads((sched_dir / "scheduler_config.json").read_text()).get("_class_name", "DDPMScheduler")
    scheduler = getattr(diffusers, class_name, diffusers.DDPMScheduler).from_pretrained(sched_dir)
    pipe = UViCPipeline(transformer=UViT.from_pretrained(sub).eval(), scheduler=scheduler)
    if run is None and step_dir.parent.name == CHECKPOINTS:
        run = RunDir(step_dir.parent.parent)
    vae_source = run.vae_source() if run is not None else None
    if vae_source is not None:
        attach_vae(pipe, vae_source[0], scale_factor=vae_source[1])
    return pipe


def run_pipeline(run: RunDir, step: Optional[Union[str, int]] = None, ema: bool = True) -> UViCPipeline:
    """UViCPipeline of final/ (step None; EMA weights only) or of checkpoint `step` ("latest" or a
    number) with its EMA (ema=True) or raw weights, on the CPU in float32."""
    if step is None:
        if not run.finished():
            raise FileNotFoundError(
                f"run directory {run.path} has no final/ (training not finished?); pass --checkpoint latest "
                f"or one of the steps {run.checkpoints()}"
            )
        if not ema:
            raise ValueError(f"{run.final} holds EMA weights only; for the raw weights pass a checkpoint")
        return pipeline_folder(run.final)
    return checkpoint_pipeline(run.checkpoint(run.resolve_step(step, verify=True)), ema=ema, run=run, verify=False)


def kind(path) -> Optional[str]:
    """What a model path is: "pipeline", "checkpoint" (a step folder), "run", "published" (a .pth), or None."""
    path = Path(path)
    if path.is_file():
        return "published" if path.suffix == ".pth" else None
    if (path / "model_index.json").is_file():
        return "pipeline"
    if (path / "scheduler").is_dir() and ((path / "model").is_dir() or (path / "ema_model").is_dir()):
        return "checkpoint"
    return "run" if RunDir.is_run(path) else None


# ---------------------------------------------------------------------- weights against their config
def weights_problem(model_dir) -> Optional[str]:
    """None if the safetensors in `model_dir` hold exactly the UViT its config.json describes (keys and shapes,
    read from the files' headers: nothing is loaded), else the keys that are missing, unexpected or mis-shaped
    (a file that cannot be read: CheckpointError).
    An edited config.json (depth, embed_dim, ...) would otherwise drop weights or initialise them at random."""
    model_dir = Path(model_dir)
    with torch.device("meta"):  # shapes without memory
        expected = {k: tuple(v.shape) for k, v in UViT.from_config(UViT.load_config(model_dir)).state_dict().items()}
    found = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as f:
                found.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:  # not a mismatch: the file itself is damaged
            raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); restore it, or use "
                                  f"another checkpoint") from None
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shaped = sorted(f"{k} {found[k]} (config: {expected[k]})" for k in set(expected) & set(found)
                    if found[k] != expected[k])
    parts = [f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}" for what, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shaped)) if keys]
    return "; ".join(parts) or None


def check_weights(model_dir) -> None:
    problem = weights_problem(model_dir)
    if problem is not None:
        raise CheckpointError(f"{model_dir}: its weights do not match its config.json ({problem}); the config was "
                              f"edited or the files come from different models: restore them")


def pipeline_folder(path):
    """UViCPipeline.from_pretrained of a pipeline folder (final/), once its manifest (if any) and its transformer's
    weights against its config are checked."""
    path = Path(path)
    if (path / CHECKPOINT_MANIFEST).is_file():
        problem = checkpoint_problem(path, full=True)
        if problem is not None:
            raise CheckpointError(f"pipeline folder {path} is damaged or was edited: {problem}")
    check_weights(path / "transformer")
    return UViCPipeline.from_pretrained(path)
