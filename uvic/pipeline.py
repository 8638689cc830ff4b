"""UViCPipeline: sampling from a U-ViT / U-ViC with any diffusers scheduler.

Classifier-free guidance follows U-ViT: the conditional and the null-class halves run in one
batch and ε̂ = ε_uncond + w (ε_cond − ε_uncond). w = 1 is no guidance (the conditional model
alone, one forward pass); U-ViT's "scale 0.4" (ε_cond + 0.4 (ε_cond − ε_uncond)) is w = 1.4;
w = 0 is the unconditional (null-class) model alone.

Saved pipelines load with `UViCPipeline.from_pretrained(folder)`, or through diffusers' custom
pipeline route, with the one-line `pipeline.py` that `save_pretrained` writes beside model_index.json:

    DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline", trust_remote_code=True)

The denoiser component is `transformer` (diffusers' name for transformer backbones); folders saved
when it was called `model` (a model/ subfolder, model_index.json key "model") still load.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .diffusion import PAPER_SAMPLERS, SCHEDULERS, make_scheduler, model_time  # noqa: F401 (re-exported)
from .model import UViT

# Written beside model_index.json: diffusers' custom-pipeline route imports the class from it.
PIPELINE_FILE = "pipeline.py"
_PIPELINE_SHIM = '''"""UViCPipeline for DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline", trust_remote_code=True)."""

from uvic.pipeline import UViCPipeline  # noqa: F401  (pip install uvic)
'''
LEGACY_TRANSFORMER_KEY = "model"  # the denoiser's component name before it became `transformer`


class UViCPipeline(DiffusionPipeline):
    """Sampling pipeline: `transformer` (UViT), `scheduler` (any diffusers scheduler), optional `vae`.

    With a `vae` (diffusers AutoencoderKL) the model works on latents, decoded as
    vae.decode(latents / vae.config.scaling_factor).

    timestep_offset: added to a discrete scheduler's timestep before the model sees it. 0 for uvic
    models (trained on diffusers' 0..T-1); 1 for the reference discrete-time U-ViT checkpoints (ImageNet
    H), trained with n = 1..N where diffusers' index n-1 has the same noise level. Continuous-time
    models carry their VP-SDE in the scheduler config instead (uvic.diffusion.model_time is the map).
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: UViT, scheduler, vae=None, timestep_offset: int = 0):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(timestep_offset=int(timestep_offset))

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / PIPELINE_FILE).write_text(_PIPELINE_SHIM)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading; a local folder of the old layout (`model` component) loads its UViT
        from model/ as the transformer."""
        folder = Path(pretrained_model_name_or_path)
        index = folder / "model_index.json"
        if "transformer" not in kwargs and index.is_file():
            components = json.loads(index.read_text())
            if LEGACY_TRANSFORMER_KEY in components and "transformer" not in components:
                kwargs["transformer"] = UViT.from_pretrained(folder / LEGACY_TRANSFORMER_KEY,
                                                             torch_dtype=kwargs.get("torch_dtype"))
        return super().from_pretrained(os.fspath(pretrained_model_name_or_path), **kwargs)

    # ------------------------------------------------------------------ what the pipeline produces
    @property
    def num_real_classes(self) -> int:
        """Classes a user may ask for (the last label of the table is the null class); 0 if unconditional."""
        n = self.transformer.config.num_classes
        return n - 1 if n > 0 else 0

    @property
    def image_shape(self) -> tuple:
        """(C, H, W) of the images this pipeline returns (after VAE decoding for latent models)."""
        cfg = self.transformer.config
        if self.vae is None:
            return (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.out_channels, cfg.sample_size * factor, cfg.sample_size * factor)

    def check_inputs(self, batch_size: int, class_labels, guidance_scale: float) -> Optional[torch.Tensor]:
        """Validate labels and guidance against the model; returns labels as a (B,) long tensor or None.

        class_labels: None (classes 0, 1, ... in turn), one int for the whole batch, or one per sample.
        """
        if self.num_real_classes == 0:
            if class_labels is not None:
                raise ValueError("this model is unconditional: class_labels must be None")
            if guidance_scale != 1.0:
                raise ValueError(f"guidance needs a class-conditional model; got guidance_scale={guidance_scale}")
            return None
        if class_labels is None:
            class_labels = torch.arange(batch_size) % self.num_real_classes
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"got {labels.numel()} class labels for batch_size={batch_size}")
        if labels.min() < 0 or labels.max() >= self.num_real_classes:
            raise ValueError(
                f"class labels must lie in 0..{self.num_real_classes - 1}, got {labels.min().item()}..{labels.max().item()}"
            )
        return labels

    # ------------------------------------------------------------------ sampling
    def predict(self, x: torch.Tensor, t, labels: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
        """Model output at x_t (B, C, H, W), with classifier-free guidance when guidance_scale != 1."""
        t = model_time(t, self.scheduler.config, self.config.get("timestep_offset", 0))
        if labels is None or guidance_scale == 1.0:
            return self.transformer(x, t, class_labels=labels).sample
        null = torch.full_like(labels, self.transformer.config.num_classes - 1)
        if guidance_scale == 0.0:
            return self.transformer(x, t, class_labels=null).sample
        both = self.transformer(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample  # (2B, C, H, W)
        cond, uncond = both.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int = 50,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
    ):
        """Sample `batch_size` images. A list of generators (one per sample) makes each image
        depend only on its own generator, whatever the batch it is drawn in. `latents`: the initial
        x_T (B, C, H, W) instead of one drawn from `generator` (which still drives stochastic samplers).

        Returns ImagePipelineOutput(images): PIL list, NHWC float numpy in [0, 1] ("np") or NCHW
        float tensor in [0, 1] ("pt").
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}")
        labels = self.check_inputs(batch_size, class_labels, guidance_scale)
        device, dtype = self._execution_device, self.transformer.dtype
        cfg = self.transformer.config
        shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
        if latents is None:
            x = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)  # x_T, kept in float32
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        else:
            x = latents.to(device=device, dtype=torch.float32)
        if labels is not None:
            labels = labels.to(device)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t).to(dtype)
            out = self.predict(model_input, t, labels, guidance_scale).float()
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
        if not torch.isfinite(x).all():  # one check per call, not per step (a device sync)
            raise ValueError(
                f"{type(self.scheduler).__name__} produced non-finite samples (NaN/inf). Known case: euler-a in float32 "
                "with a schedule whose last ᾱ_t is ~0 (squaredcos_cap_v2); choose another scheduler (dpm++2m, euler, "
                "ddim, ...), else check the model weights"
            )

        if self.vae is not None:
            x = self.vae.decode((x / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()
        images = (x / 2 + 0.5).clamp(0, 1)  # (B, C, H, W) in [0, 1]
        if output_type != "pt":
            images = images.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def save_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, min_cell: int = 64) -> Path:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid of `nrow` columns. Small images are first
    enlarged by the integer factor that makes each cell at least `min_cell` pixels, with nearest-
    neighbour (every model pixel stays one sharp square), so a grid of 8 px digits can be looked at."""
    from torchvision.utils import save_image

    factor = max(1, -(-min_cell // min(images.shape[-2:])))  # ceil(min_cell / side)
    if factor > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, str(path), nrow=nrow, padding=padding)
    return path
