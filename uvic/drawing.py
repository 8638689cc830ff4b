"""Drawing samples from a UViCPipeline: per-sample randomness and labels, the sampler swap, one batch, grids.

Sample i is drawn from its own generator seeded from (seed, i), with its own label, so it is the same image
whatever the batch size, the number of processes or the order of the work (the sample sets of uvic.sample_sets
rely on it).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .pipeline import UViCPipeline, make_scheduler, save_grid


CLASS_MODES = ("uniform", "balanced")  # i.i.d. uniform labels (ADM, DiT) | label = index mod classes


# ---------------------------------------------------------------------- per-index randomness
def index_seeds(seed: int, index: int) -> tuple:
    """(noise seed, label draw) of sample `index`: functions of (seed, index) alone."""
    noise, label = np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)
    return int(noise >> np.uint64(1)), int(label)


def index_generators(seed: int, indices: Sequence[int]) -> List[torch.Generator]:
    """One CPU generator per sample, so a sample's noise does not depend on its batch or device."""
    return [torch.Generator().manual_seed(index_seeds(seed, int(i))[0]) for i in indices]


def resolve_classes(classes, num_real_classes: int):
    """Validate a class spec against the model: "uniform" | "balanced" | int | list of ints -> normalized spec.

    Unconditional models (num_real_classes == 0) accept only the modes (which then mean nothing): None.
    """
    if isinstance(classes, str):
        if classes not in CLASS_MODES:
            raise ValueError(f"classes={classes!r} is not valid; use one of {CLASS_MODES} or a list of class labels")
        return classes if num_real_classes else None
    if classes is None:
        return "uniform" if num_real_classes else None
    labels = [int(c) for c in (classes if isinstance(classes, (list, tuple, np.ndarray, torch.Tensor)) else [classes])]
    if not num_real_classes:
        raise ValueError(f"this model is unconditional: class labels {labels} cannot be used")
    if not labels:
        raise ValueError("class labels: the list is empty")
    bad = [c for c in labels if not 0 <= c < num_real_classes]
    if bad:
        raise ValueError(f"class labels {bad} out of range: this model has classes 0..{num_real_classes - 1}")
    return labels


def labels_for(indices: Sequence[int], classes, num_real_classes: int, seed: int) -> Optional[np.ndarray]:
    """(n,) int64 labels of samples `indices` under a resolved class spec; None for unconditional models."""
    if classes is None:
        return None
    indices = np.asarray(indices, dtype=np.int64)
    if classes == "uniform":
        return np.array([index_seeds(seed, int(i))[1] % num_real_classes for i in indices], dtype=np.int64)
    if classes == "balanced":
        return indices % num_real_classes
    return np.asarray(classes, dtype=np.int64)[indices % len(classes)]


# ---------------------------------------------------------------------- drawing
def with_scheduler(pipeline: UViCPipeline, scheduler=None, timestep_spacing: Optional[str] = None) -> UViCPipeline:
    """A pipeline sharing `pipeline`'s model and VAE with another sampler (name, scheduler object or None
    = the pipeline's own), without progress bar. `pipeline` itself is left unchanged."""
    if scheduler is None or isinstance(scheduler, str):
        base = pipeline.scheduler
        overrides = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
        if scheduler is None:
            scheduler = type(base).from_config(base.config, **overrides)
        else:
            scheduler = make_scheduler(scheduler, base.config, **overrides)
    pipe = UViCPipeline(transformer=pipeline.transformer, scheduler=scheduler, vae=pipeline.vae,
                        text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                        timestep_offset=pipeline.config.get("timestep_offset", 0),
                        latent_scale=pipeline.config.get("latent_scale"), null_label=pipeline.config.get("null_label", True))
    pipe.empty_context = pipeline.empty_context  # text-to-image: the unconditional context
    pipe.set_progress_bar_config(disable=True)
    return pipe


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, 3) uint8 (grey images repeated to RGB)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def draw(pipe: UViCPipeline, indices: Sequence[int], labels: Optional[np.ndarray], *, seed: int, steps: int,
         guidance: float, prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Samples `indices` in one batch -> (B, C, H, W) float in [0, 1]. prompts: one per index (text-to-image)."""
    text = {} if prompts is None else {"prompt": list(prompts)}
    return pipe(
        **text,
        batch_size=len(indices),
        num_inference_steps=steps,
        class_labels=None if labels is None else torch.as_tensor(labels),
        guidance_scale=guidance,
        generator=index_generators(seed, indices),
        output_type="pt",
    ).images


def check_prompts(pipe: UViCPipeline, prompts: Optional[Sequence[str]], guidance: float):
    """Prompts against the model, before any sampling: text-to-image models need them (and a text
    encoder), other models refuse them; guidance needs the empty context."""
    if not pipe.is_text_conditional:
        if prompts is not None:
            raise ValueError("this model is not text-conditional: --prompt/--prompts need a text-to-image model")
        return
    if prompts is None:
        raise ValueError("this model is text-to-image: give --prompt TEXT or --prompts FILE")
    if pipe.tokenizer is None or pipe.text_encoder is None:
        raise ValueError("this pipeline has no text encoder: pass --text-encoder DIR (CLIP ViT-L/14's tokenizer and "
                         "text model, openai/clip-vit-large-patch14)")
    if guidance != 1.0 and pipe.empty_context is None:
        pipe.set_empty_context()


def check_image_channels(pipe: UViCPipeline):
    channels = pipe.image_shape[0]
    if channels not in (1, 3):
        raise ValueError(
            f"the pipeline returns {channels}-channel samples: a latent model needs its VAE "
            "(a run of latents, --vae FOLDER or `vae:` in the reference config)"
        )


# ---------------------------------------------------------------------- grids
def grid_rows(pipe: UViCPipeline, per_row: int, class_labels=None) -> Optional[List[int]]:
    """The class of each grid row (None = unconditional, `per_row` rows): the given labels, all classes
    when there are at most 16, else `per_row` classes spread evenly over the label range."""
    classes = resolve_classes(class_labels if class_labels is not None else "uniform", pipe.num_real_classes)
    if classes is None:
        return None
    if isinstance(classes, list):
        return classes
    k = pipe.num_real_classes
    return list(range(k)) if k <= 16 else [round(i * (k - 1) / max(per_row - 1, 1)) for i in range(per_row)]


def sample_grid(pipeline: UViCPipeline, path, *, per_row: int = 8, seed: int = 0, scheduler=None, steps: int = 50,
                guidance: float = 1.0, class_labels=None, batch_size: int = 64, timestep_spacing=None,
                progress: bool = True, prompts: Optional[Sequence[str]] = None) -> Path:
    """One PNG grid of `per_row` columns: a row per prompt (text-to-image), a row per class
    (class-conditional) or `per_row` rows."""
    if per_row < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"grid size, batch size and steps must be at least 1; got {per_row}, {batch_size}, {steps}")
    pipe = with_scheduler(pipeline, scheduler, timestep_spacing)
    check_prompts(pipe, prompts, guidance)
    rows = list(prompts) if prompts is not None else grid_rows(pipe, per_row, class_labels)
    pipe.check_inputs(1, None if rows is None or prompts is not None else rows[0], guidance)
    check_image_channels(pipe)
    n = per_row * (len(rows) if rows is not None else per_row)
    row_prompts = None if prompts is None else [p for p in prompts for _ in range(per_row)]
    labels = None if rows is None or prompts is not None else np.repeat(np.asarray(rows, dtype=np.int64), per_row)
    images = []
    with tqdm(total=n, unit="img", desc="grid", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            idx = np.arange(start, min(start + batch_size, n))
            images.append(draw(pipe, idx, None if labels is None else labels[idx], seed=seed, steps=steps,
                               guidance=guidance,
                               prompts=None if row_prompts is None else [row_prompts[i] for i in idx]).cpu())
            bar.update(len(idx))
    return save_grid(torch.cat(images), path, nrow=per_row, padding=2)
