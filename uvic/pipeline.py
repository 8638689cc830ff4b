"""UViCPipeline: sampling from a U-ViT / U-ViC with any diffusers scheduler.

Classifier-free guidance follows U-ViT: the conditional and the null-class halves run in one
batch and ε̂ = ε_uncond + w (ε_cond − ε_uncond). w = 1 is no guidance (the conditional model
alone, one forward pass); U-ViT's "scale 0.4" (ε_cond + 0.4 (ε_cond − ε_uncond)) is w = 1.4;
w = 0 is the unconditional (null-class) model alone.

Saved pipelines load with `UViCPipeline.from_pretrained(folder)`, or as a Hub custom pipeline: save_pretrained
writes the one-line `pipeline.py` beside model_index.json and names it there the Hub way,
`"_class_name": ["pipeline", "UViCPipeline"]`, so that diffusers' own loader finds the class:

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

(without trust_remote_code diffusers refuses with its own "contains custom code" message).

A pipeline saved by the trainer (final/) holds the sampler of train.sample_scheduler and its
train.sample_steps as the default `num_inference_steps`, so `pipe()` samples as sample.py and the training grids do.

The denoiser component is `transformer` (diffusers' name for transformer backbones); folders saved
when it was called `model` (a model/ subfolder, model_index.json key "model") still load.

Text-to-image models (transformer.config.context_dim > 0) take `prompt=[...]` (through the optional
`tokenizer` / `text_encoder`, CLIP's text model) or `prompt_embeds` (B, 77, 768). Their guidance
is U-ViT's: the unconditional half sees the empty prompt's features (`empty_context`, computed once
and saved as empty_context.safetensors beside model_index.json).
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .diffusion import PAPER_SAMPLERS, SCHEDULERS, make_scheduler, model_time  # noqa: F401 (re-exported)
from .model import COG_BACKEND_HINT, UViT
from .text import empty_context as encode_empty_context
from .text import encode_prompts, load_text_encoder

# Written beside model_index.json: diffusers' custom-pipeline route imports the class from it.
PIPELINE_FILE = "pipeline.py"
HUB_CLASS_NAME = [Path(PIPELINE_FILE).stem, "UViCPipeline"]  # model_index.json "_class_name": [module, class]
_PIPELINE_SHIM = '''"""UViCPipeline for DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)."""

from uvic.pipeline import UViCPipeline  # noqa: F401  (pip install uvic)
'''
EMPTY_CONTEXT_FILE = "empty_context.safetensors"  # text-to-image: the empty prompt's features (L, D)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def check_latent_scale(vae, latent_scale: float):
    """Refuse a VAE that would decode the model's latents with another scale than it was trained with."""
    given = float(vae.config.scaling_factor)
    if abs(given - float(latent_scale)) > 1e-6 * max(1.0, abs(float(latent_scale))):
        raise ValueError(
            f"the VAE's scaling_factor {given:g} differs from the model's latent scale {float(latent_scale):g} (the "
            "factor its training latents were scaled by): attach the VAE with uvic.latents.attach_vae, which gives "
            "it the model's scale, or use the VAE the model was trained with"
        )


class UViCPipeline(DiffusionPipeline):
    """Sampling pipeline: `transformer` (UViT), `scheduler` (any diffusers scheduler), optional `vae`.

    With a `vae` (diffusers AutoencoderKL) the model works on latents, decoded as
    vae.decode(latents / vae.config.scaling_factor).

    default_num_inference_steps: the steps of `pipe()` without num_inference_steps (the trainer saves
    train.sample_steps with train.sample_scheduler's sampler).

    timestep_offset: added to a discrete scheduler's timestep before the model sees it. 0 for uvic
    models (trained on diffusers' 0..T-1); 1 for the reference discrete-time U-ViT checkpoints (ImageNet
    H), trained with n = 1..N where diffusers' index n-1 has the same noise level. Continuous-time
    models carry their VP-SDE in the scheduler config instead (uvic.diffusion.model_time is the map).
    latent_scale: the factor the model's latents were scaled by in training (MS-COCO U-ViT: 0.23010, SD's
    ImageNet latents: 0.18215), saved in model_index.json so it travels with the model; a `vae` whose
    config.scaling_factor differs is refused (uvic.latents.attach_vae gives a VAE the model's scale).
    null_label: the last label of the table is the null class of classifier-free guidance (uvic models,
    U-ViT's 1001-row ImageNet 256/512 tables); False for tables of real classes only (U-ViT's ImageNet
    64 models, trained without label dropout), which sample every class and refuse guidance.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(self, transformer: UViT, scheduler, vae=None, text_encoder=None, tokenizer=None,
                 timestep_offset: int = 0, latent_scale: Optional[float] = None, null_label: bool = True,
                 default_num_inference_steps: int = 50):
        super().__init__()
        if vae is not None and latent_scale is not None:
            check_latent_scale(vae, latent_scale)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.register_to_config(timestep_offset=int(timestep_offset), null_label=bool(null_label),
                                latent_scale=None if latent_scale is None else float(latent_scale),
                                default_num_inference_steps=int(default_num_inference_steps))
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)  # [-1, 1] -> pil / np / pt
        self.empty_context: Optional[torch.Tensor] = None  # (L, D), text-to-image; see set_empty_context

    # ------------------------------------------------------------------ text-to-image
    @property
    def is_text_conditional(self) -> bool:
        return int(self.transformer.config.get("context_dim", 0) or 0) > 0

    def set_empty_context(self, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Keep the unconditional context (L, D): the given features, else the empty prompt's through
        the pipeline's tokenizer and text encoder. Returns it."""
        if context is None:
            if self.tokenizer is None or self.text_encoder is None:
                raise ValueError("no empty_context and no text_encoder/tokenizer to compute it: pass the empty "
                                 "prompt's features, or attach the CLIP text encoder (--text-encoder DIR)")
            context = encode_empty_context(self.tokenizer, self.text_encoder, self.transformer.config.num_context_tokens)
        expected = (self.transformer.config.num_context_tokens, self.transformer.config.context_dim)
        context = torch.as_tensor(context).detach().float().cpu()
        if tuple(context.shape) != expected:
            raise ValueError(f"empty_context must have shape {expected} (tokens, context_dim), got {tuple(context.shape)}")
        self.empty_context = context
        return context

    def attach_text_encoder(self, name_or_path: str) -> "UViCPipeline":
        """Register the CLIP tokenizer and text encoder of a local folder (or a cached hub name; see
        uvic.text.load_text_encoder) and compute the empty context if there is none yet."""
        tokenizer, encoder = load_text_encoder(str(name_or_path))
        self.register_modules(tokenizer=tokenizer, text_encoder=encoder.to(self.transformer.device))
        if self.empty_context is None:
            self.set_empty_context()
        return self

    def encode_prompt(self, prompt: Union[str, List[str]]) -> torch.Tensor:
        """prompts (B strings) -> text features (B, L, D) through the pipeline's tokenizer and text encoder."""
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError("prompt= needs the pipeline's tokenizer and text_encoder (CLIP); attach them "
                             "(--text-encoder DIR) or pass prompt_embeds=")
        return encode_prompts(prompt, self.tokenizer, self.text_encoder, self.transformer.config.num_context_tokens)

    def text_context(self, batch_size: int, prompt, prompt_embeds, guidance_scale: float) -> torch.Tensor:
        """Check the text inputs against the model; returns the context (B, L, D) (B = batch_size, or
        the number of prompts when batch_size is 1) and makes sure an empty context exists for guidance."""
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("this model is text-conditional: pass prompt=[...] or prompt_embeds=")
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
            if batch_size > 1 and len(prompts) not in (1, batch_size):
                raise ValueError(f"got {len(prompts)} prompts for batch_size={batch_size}")
            context = self.encode_prompt(prompts)
        else:
            context = torch.as_tensor(prompt_embeds)
            if context.dim() == 2:
                context = context[None]
        cfg = self.transformer.config
        if context.dim() != 3 or tuple(context.shape[1:]) != (cfg.num_context_tokens, cfg.context_dim):
            raise ValueError(f"prompt_embeds must have shape (B, {cfg.num_context_tokens}, {cfg.context_dim}), "
                             f"got {tuple(context.shape)}")
        if context.shape[0] == 1 and batch_size > 1:
            context = context.expand(batch_size, -1, -1)
        elif batch_size > 1 and context.shape[0] != batch_size:
            raise ValueError(f"got {context.shape[0]} prompt_embeds for batch_size={batch_size}")
        if guidance_scale != 1.0 and self.empty_context is None:
            self.set_empty_context(self._saved_empty_context())
        return context

    def _saved_empty_context(self) -> Optional[torch.Tensor]:
        """The empty context saved beside model_index.json of the folder this pipeline was loaded from (also
        when diffusers' custom-pipeline route built it), or None."""
        path = Path(str(self.config.get("_name_or_path", "") or "")) / EMPTY_CONTEXT_FILE
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))["empty_context"]

    # ------------------------------------------------------------------ saving and loading
    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        (Path(save_directory) / PIPELINE_FILE).write_text(_PIPELINE_SHIM)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = HUB_CLASS_NAME  # the Hub custom-pipeline convention: [file stem, class]
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.empty_context is not None:
            from safetensors.torch import save_file

            save_file({"empty_context": self.empty_context.contiguous()}, str(Path(save_directory) / EMPTY_CONTEXT_FILE))

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' load_config; a Hub-style `_class_name` [module, class] becomes the class name when this class
        loads the folder itself (UViCPipeline.from_pretrained needs no remote code: the class is at hand)."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), (list, tuple)):
            config["_class_name"] = config["_class_name"][-1]
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loading, then the saved empty text context (text-to-image) put back."""
        pipe = super().from_pretrained(os.fspath(pretrained_model_name_or_path), **kwargs)
        saved = pipe._saved_empty_context()
        if saved is not None:
            pipe.set_empty_context(saved)
        return pipe

    # ------------------------------------------------------------------ what the pipeline produces
    @property
    def num_real_classes(self) -> int:
        """Classes a user may ask for (the last label of the table is the null class unless null_label is
        False); 0 if unconditional."""
        n = self.transformer.config.num_classes
        if n <= 0:
            return 0
        return n - 1 if self.config.get("null_label", True) else n

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

        class_labels: None (classes 0, 1, ... in turn), one int for the whole batch, or one per sample (with
        batch_size 1, as DiTPipeline: one sample per label). Text-to-image models take no labels (their prompts
        are checked by `text_context`).
        """
        if self.is_text_conditional:
            if class_labels is not None:
                raise ValueError("class_labels and prompt/prompt_embeds are mutually exclusive: this model is "
                                 "text-conditional, pass prompts instead of class labels")
            return None
        if self.num_real_classes == 0:
            if class_labels is not None:
                raise ValueError("this model is unconditional: class_labels must be None")
            if guidance_scale != 1.0:
                raise ValueError(f"guidance needs a class-conditional model; got guidance_scale={guidance_scale}")
            return None
        if guidance_scale != 1.0 and not self.config.get("null_label", True):
            raise ValueError(f"this model has no null class (null_label=False: trained without label dropout), so "
                             f"no classifier-free guidance; got guidance_scale={guidance_scale}, use 1")
        if class_labels is None:
            class_labels = torch.arange(batch_size) % self.num_real_classes
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size and batch_size != 1:
            raise ValueError(f"got {labels.numel()} class labels for batch_size={batch_size}")
        if labels.min() < 0 or labels.max() >= self.num_real_classes:
            raise ValueError(
                f"class labels must lie in 0..{self.num_real_classes - 1}, got {labels.min().item()}..{labels.max().item()}"
            )
        return labels

    # ------------------------------------------------------------------ sampling
    def predict(self, x: torch.Tensor, t, labels: Optional[torch.Tensor], guidance_scale: float,
                context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model output at x_t (B, C, H, W), with classifier-free guidance when guidance_scale != 1.
        context: text features (B, L, D) of a text-to-image model (then labels is None)."""
        t = model_time(t, self.scheduler.config, self.config.get("timestep_offset", 0))
        if context is not None:
            if guidance_scale == 1.0:
                return self.transformer(x, t, encoder_hidden_states=context).sample
            empty = self.empty_context.to(context).expand(x.shape[0], -1, -1)  # (B, L, D)
            if guidance_scale == 0.0:
                return self.transformer(x, t, encoder_hidden_states=empty).sample
            both = self.transformer(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([context, empty])).sample
            cond, uncond = both.chunk(2)
            return uncond + guidance_scale * (cond - uncond)
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
        num_inference_steps: Optional[int] = None,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        guidance_scale: float = 1.0,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        latents: Optional[torch.Tensor] = None,
        prompt: Optional[Union[str, List[str]]] = None,
        prompt_embeds: Optional[torch.Tensor] = None,
    ):
        """Sample `batch_size` images. Class-conditional: `class_labels` one per sample (with batch_size 1 the
        labels set the batch, as DiTPipeline). Text-to-image models take `prompt` (a string or one per sample;
        with batch_size 1, one sample per prompt) or `prompt_embeds` (B, L, D) instead of class labels.
        num_inference_steps: default the saved `default_num_inference_steps` (final/: train.sample_steps).
        A list of generators (one per sample) makes each image
        depend only on its own generator, whatever the batch it is drawn in. `latents`: the initial
        x_T (B, C, H, W) instead of one drawn from `generator` (which still drives stochastic samplers).

        Returns ImagePipelineOutput(images): PIL list, NHWC float numpy in [0, 1] ("np"), NCHW
        float tensor in [0, 1] ("pt"), or the model's own x_0 (B, C, h, w) float32 before any VAE decoding
        ("latent": latents as the VAE encodes them times its scaling_factor; pixels in [-1, 1]).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, got {output_type!r}")
        if num_inference_steps is None:
            num_inference_steps = int(self.config.get("default_num_inference_steps", 50))
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        context = None
        if self.is_text_conditional:
            if class_labels is not None:
                raise ValueError("class_labels and prompt/prompt_embeds are mutually exclusive: this model is "
                                 "text-conditional, pass prompt=[...] or prompt_embeds=")
            context = self.text_context(batch_size, prompt, prompt_embeds, guidance_scale)  # (B, L, D)
            batch_size, labels = context.shape[0], None
        elif prompt is not None or prompt_embeds is not None:
            raise ValueError("this model is not text-conditional: prompt and prompt_embeds must be None "
                             "(class-conditional models take class_labels)")
        if context is None:
            labels = self.check_inputs(batch_size, class_labels, guidance_scale)
            batch_size = batch_size if labels is None else labels.numel()
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for batch_size={batch_size}")
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
        if context is not None:
            context = context.to(device, dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        x = x * self.scheduler.init_noise_sigma
        accepts_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if accepts_generator else {}
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t).to(dtype)
            out = self.predict(model_input, t, labels, guidance_scale, context).float()
            x = self.scheduler.step(out, t, x, **step_kwargs).prev_sample
        if not torch.isfinite(x).all():  # one check per call, not per step (a device sync)
            raise ValueError(
                f"{type(self.scheduler).__name__} produced non-finite samples (NaN/inf). Known case: euler-a in float32 "
                "with a schedule whose last ᾱ_t is ~0 (squaredcos_cap_v2); choose another scheduler (dpm++2m, euler, "
                "ddim, ...), else check the model weights"
            )

        if self.vae is not None and output_type != "latent":
            x = self.vae.decode((x / self.vae.config.scaling_factor).to(self.vae.dtype)).sample.float()
        images = self.image_processor.postprocess(x, output_type=output_type)  # (B, C, H, W) in [-1, 1] ->
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


    # ------------------------------------------------------------------ diffusers' attention switches
    def enable_xformers_memory_efficient_attention(self, attention_op=None):
        raise NotImplementedError(COG_BACKEND_HINT)

    def enable_attention_slicing(self, slice_size="auto"):
        raise NotImplementedError(COG_BACKEND_HINT + "; for less memory use the 'chunked' Cog backend")


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
