"""Sample grids and large sample sets (50K for FID) from a UViCPipeline: shards, resume, several processes.

Sample i of a set is drawn from its own generator seeded from (seed, i), with its own label, so it
is the same image whatever the batch size, the number of processes or the order of the work. A set
of N samples is cut into shards of `shard_size` consecutive indices; each shard is written to a
temporary name and renamed when complete, so an interrupted run resumes from the complete shards and
never takes a half-written one; the default shard size, min(1000, ceil(N / 10)), keeps most of the work
of an interrupted job of any size. manifest.json (strict JSON) records what the set is (model
fingerprint, seed, scheduler, steps, guidance, classes, ...) and its size; a rerun that would add other
samples to it, or shrink it, is refused (growing it is allowed: the complete shards are kept). It also
records samples.npz (count, shape, bytes, sha256): a rerun calls the set complete only when the file
matches, and otherwise rebuilds it from the shards (drawing missing ones again).

    OUT/manifest.json
    OUT/shards/shard_000000.npz   arr_0 (n, H, W, 3) uint8, indices (n,) int64, labels (n,) int64 if conditional
    OUT/samples.npz               arr_0 (N, H, W, 3) uint8 (+ labels): the ADM evaluator / DiT sample_ddp layout
    OUT/png/000000.png ...        with "png" in formats

Command line (sample.py, `uvic-sample`): see `main` and `python sample.py --help`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .cli import add_debug_option, command, progress_bars
from .config import TIMESTEP_SPACINGS, sampler_steps_problem
from .diffusion import SCHEDULE_KEY
from .pipeline import SCHEDULERS, UViCPipeline, make_scheduler, save_grid
from .loading import (MODEL_KINDS, PUBLISHED_CHECKPOINTS, REFERENCE_CONFIGS, load_pipeline, published_reference_config,
                      reference_sample_settings)
from .files import atomic_write, file_sha256
from .latents import attach_vae
from .runs import RunDir
from .text import read_prompts

CLASS_MODES = ("uniform", "balanced")  # i.i.d. uniform labels (ADM, DiT) | label = index mod classes
FORMATS = ("npz", "png")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SET_MANIFEST = "manifest.json"  # the sample set's record (a checkpoint's is uvic.runs.MANIFEST)
SAMPLES_NPZ = "samples.npz"
NPZ_RECORD = "samples_npz"  # manifest key: {count, shape, bytes, sha256} of samples.npz, written after it
MAX_SHARD_SIZE = 1000
# Manifest keys that define the set: a rerun into the same folder must agree on all of them.
IDENTITY_KEYS = ("model", "seed", "scheduler", "steps", "guidance", "classes", "shard_size", "image_shape", "dtype",
                 "prompts")
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


def model_fingerprint(pipeline: UViCPipeline) -> str:
    """sha256 (16 hex digits) of the model's and VAE's config and weights: which network made a set."""
    digest = hashlib.sha256(f"timestep_offset={pipeline.config.get('timestep_offset', 0)}".encode())
    schedule = pipeline.scheduler.config.get(SCHEDULE_KEY) or {}  # a continuous-time model or a trained-in offset
    facts = {k: v for k, v in schedule.items() if k in ("schedule", "beta_min", "beta_max", "timestep_offset")}
    if facts:
        digest.update(json.dumps(facts, sort_keys=True).encode())
    if pipeline.empty_context is not None:  # text-to-image
        digest.update(pipeline.empty_context.float().cpu().numpy().tobytes())
    for module in (pipeline.transformer, pipeline.vae, pipeline.text_encoder):
        if module is None:
            continue
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)  # transformers | diffusers
        config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- drawing
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


def _check_image_channels(pipe: UViCPipeline):
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
    from tqdm.auto import tqdm

    if per_row < 1 or batch_size < 1 or steps < 1:
        raise ValueError(f"grid size, batch size and steps must be at least 1; got {per_row}, {batch_size}, {steps}")
    pipe = with_scheduler(pipeline, scheduler, timestep_spacing)
    check_prompts(pipe, prompts, guidance)
    rows = list(prompts) if prompts is not None else grid_rows(pipe, per_row, class_labels)
    pipe.check_inputs(1, None if rows is None or prompts is not None else rows[0], guidance)
    _check_image_channels(pipe)
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


# ---------------------------------------------------------------------- sample sets
class _SingleProcess:
    """The slice of accelerate's PartialState used here, for one process."""

    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def _strict(value):
    """`value` with every non-finite float (NaN, ±inf) replaced by None: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _json_ready(value):
    return _strict(json.loads(json.dumps(value, sort_keys=True,
                                         default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v))))


def default_shard_size(num_samples: int) -> int:
    """min(1000, ceil(N / 10)): an interrupted job keeps at least ~90% of its finished work."""
    return min(MAX_SHARD_SIZE, max(1, math.ceil(num_samples / 10)))


def shard_ranges(num_samples: int, shard_size: int) -> List[range]:
    return [range(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def _shard_path(out_dir: Path, k: int) -> Path:
    return out_dir / "shards" / f"shard_{k:06d}.npz"


def _shard_complete(path: Path, indices: range) -> bool:
    try:
        with np.load(path) as shard:
            return np.array_equal(shard["indices"], np.arange(indices.start, indices.stop))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        return False


def _read_manifest(out_dir: Path) -> Optional[dict]:
    """The manifest of the set in out_dir (non-finite numbers as None), or None for a new folder."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder for the sample set")
    path = out_dir / SET_MANIFEST
    if not path.is_file():
        if (out_dir / "shards").exists() or (out_dir / SAMPLES_NPZ).exists():
            raise ValueError(f"{out_dir} holds samples without {SET_MANIFEST}; choose another --out")
        return None
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not valid JSON; choose another --out") from None
    if not isinstance(old, dict):
        raise ValueError(f"{path} is no sample-set manifest; choose another --out")
    return old


def _check_manifest(out_dir: Path, manifest: dict, old: Optional[dict]):
    """Refuse a folder that holds samples of another set, or more samples of this one (nothing is lost)."""
    if old is None:
        return
    diffs = [f"{k}: {old.get(k)!r} there, {manifest[k]!r} now" for k in IDENTITY_KEYS if old.get(k) != manifest[k]]
    if diffs:
        raise ValueError(
            f"{out_dir} already holds a different sample set ({'; '.join(diffs)}); "
            "use another --out, or the options that made it to continue it"
        )
    before = old.get("num_samples")
    if isinstance(before, int) and manifest["num_samples"] < before and not _prefix_held(out_dir, old,
                                                                                         manifest["num_samples"]):
        raise ValueError(
            f"{out_dir} holds a set of {before} samples; --num-samples {manifest['num_samples']} would shrink it "
            f"and lose samples, so nothing was changed. Use --num-samples {before} (or more, to extend it), "
            "or another --out"
        )


def _prefix_held(out_dir: Path, old: dict, num_samples: int) -> bool:
    """Whether an unfinished larger set (a growth that was interrupted) holds samples 0..num_samples-1 in complete
    shards: then the smaller set is served from them and nothing is drawn or lost. A finished set never shrinks."""
    before, size = old.get("num_samples"), old.get("shard_size")
    if not (isinstance(before, int) and isinstance(size, int) and size >= 1) or num_samples >= before:
        return False
    complete = [_shard_complete(_shard_path(out_dir, k), r) for k, r in enumerate(shard_ranges(before, size))]
    needed = math.ceil(num_samples / size)  # the shards holding indices 0..num_samples-1
    return not all(complete) and all(complete[:needed])


def _npz_verified(out_dir: Path, record, num_samples: int) -> bool:
    """Whether OUT/samples.npz is the complete file of this set: its manifest record (count, bytes, sha256) matches."""
    path = out_dir / SAMPLES_NPZ
    return (path.is_file() and isinstance(record, dict) and record.get("count") == num_samples
            and record.get("bytes") == path.stat().st_size and record.get("sha256") == file_sha256(path))


def generate_samples(
    pipeline: UViCPipeline,
    out_dir,
    *,
    num_samples: int,
    batch_size: int = 64,
    seed: int = 0,
    scheduler=None,
    steps: int = 50,
    guidance: float = 1.0,
    classes="uniform",
    formats=("npz",),
    accelerator=None,
    progress: bool = True,
    shard_size: Optional[int] = None,
    timestep_spacing: Optional[str] = None,
    prompts: Optional[Sequence[str]] = None,
) -> Path:
    """Write `num_samples` samples to out_dir (resumable; see the module docstring) -> OUT/samples.npz
    (OUT/png when formats has no "npz").

    scheduler: a SCHEDULERS name, a scheduler object or None (the pipeline's own). classes: "uniform"
    (i.i.d. uniform labels), "balanced" (index mod classes), an int or a list of labels taken in turn;
    ignored for unconditional models. accelerator: an accelerate Accelerator / PartialState; processes
    take disjoint shards and the set equals the one-process set. The pipeline should already be on its
    device and dtype. prompts (text-to-image): sample i is drawn from prompts[i] (at least num_samples of
    them); their count and sha1 go into the manifest, the prompts themselves into OUT/prompts.txt.
    shard_size: None = the existing set's, else `default_shard_size(num_samples)`. A set is extended by a
    rerun with a larger num_samples; a smaller one is refused.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    formats = tuple(formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats {list(formats)} not valid; choose from {FORMATS}")
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("shard_size", shard_size),
                        ("steps", steps)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    pipe = with_scheduler(pipeline, scheduler, timestep_spacing)
    check_prompts(pipe, prompts, guidance)
    if prompts is not None:
        if len(prompts) < num_samples:
            raise ValueError(f"{num_samples} samples need as many prompts (one each, in order); got {len(prompts)}")
        prompts = [str(p) for p in prompts[:num_samples]]
    classes = resolve_classes(classes, pipe.num_real_classes)
    pipe.check_inputs(1, None if classes is None else 0, guidance)
    _check_image_channels(pipe)
    state = accelerator or _SingleProcess()
    rank, world = state.process_index, state.num_processes
    old = _read_manifest(out_dir)  # every rank reads it before anyone writes
    if shard_size is None:
        shard_size = old["shard_size"] if old and isinstance(old.get("shard_size"), int) \
            else default_shard_size(num_samples)

    manifest = {
        "model": model_fingerprint(pipe),
        "seed": seed,
        "scheduler": _json_ready({"class": type(pipe.scheduler).__name__,
                                  **{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}}),
        "steps": steps,
        "guidance": float(guidance),
        "classes": classes,
        "shard_size": shard_size,
        "image_shape": list(pipe.image_shape),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "num_samples": num_samples,
        "source": str(pipeline.config.get("_name_or_path", "")),
        "formats": list(formats),
        "prompts": None if prompts is None else {
            "count": len(prompts), "sha1": hashlib.sha1("\n".join(prompts).encode()).hexdigest(), "file": "prompts.txt"},
    }
    _check_manifest(out_dir, manifest, old)  # every rank raises the same error, before anyone writes
    if old is not None and num_samples < old["num_samples"]:  # _check_manifest found it held by complete shards
        verified = _npz_verified(out_dir, old.get(NPZ_RECORD), num_samples)
        if state.is_main_process and not verified:
            _assemble(out_dir, shard_ranges(old["num_samples"], shard_size), old, count=num_samples)
        state.wait_for_everyone()
        return out_dir / SAMPLES_NPZ
    record = (old or {}).get(NPZ_RECORD)
    if record is not None:
        manifest[NPZ_RECORD] = record  # describes the samples.npz on disk until a new one replaces it
    state.wait_for_everyone()
    if state.is_main_process:
        (out_dir / "shards").mkdir(parents=True, exist_ok=True)
        if "png" in formats:
            (out_dir / "png").mkdir(exist_ok=True)
        for stale in [*out_dir.glob(".*.tmp-*"), *out_dir.glob("*/.*.tmp-*")]:  # left by an interrupted run
            stale.unlink(missing_ok=True)
        _write_manifest(out_dir, manifest)
        if prompts is not None:
            atomic_write(out_dir / "prompts.txt", lambda f: f.write("".join(p + "\n" for p in prompts).encode()))
    state.wait_for_everyone()

    result = out_dir / (SAMPLES_NPZ if "npz" in formats else "png")
    verified = "npz" in formats and _npz_verified(out_dir, record, num_samples)
    if formats == ("npz",) and verified:
        return result  # finished before (its shards/ may even have been deleted)
    if "npz" in formats and not verified and record is not None and record.get("count") == num_samples \
            and state.is_main_process:
        print(f"warning: {out_dir / SAMPLES_NPZ} does not match its record in {SET_MANIFEST} (truncated or changed): "
              "rebuilt from the shards (missing shards are drawn again)", file=sys.stderr)

    shards = shard_ranges(num_samples, shard_size)
    todo = [k for k, r in enumerate(shards) if not _shard_complete(_shard_path(out_dir, k), r)]
    if "png" in formats:  # a set first made as npz only gets its PNGs from the shards
        _write_missing_pngs(out_dir, shards, todo, rank, world)
    state.wait_for_everyone()  # all have looked before anyone writes
    done = num_samples - sum(len(shards[k]) for k in todo)
    bar = tqdm(total=num_samples, initial=done, unit="img", desc="sampling", dynamic_ncols=True,
               disable=not (progress and state.is_main_process))
    for k in todo[rank::world]:
        indices = shards[k]
        labels = labels_for(indices, classes, pipe.num_real_classes, seed)
        images = []
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            batch_labels = None if labels is None else labels[start : start + batch_size]
            batch_prompts = None if prompts is None else [prompts[i] for i in batch]
            images.append(to_uint8(draw(pipe, batch, batch_labels, seed=seed, steps=steps, guidance=guidance,
                                        prompts=batch_prompts)))
            bar.update(min(len(batch) * world, bar.total - bar.n))  # other ranks advance alike
        arrays = {"arr_0": np.concatenate(images), "indices": np.arange(indices.start, indices.stop)}
        if labels is not None:
            arrays["labels"] = labels
        if "png" in formats:
            _write_pngs(out_dir, arrays["arr_0"], indices)
        atomic_write(_shard_path(out_dir, k), lambda f: np.savez(f, **arrays))  # the shard is complete now
    bar.close()
    state.wait_for_everyone()

    if "npz" in formats and state.is_main_process and not verified:
        _assemble(out_dir, shards, manifest)
    state.wait_for_everyone()
    return result


def _write_manifest(out_dir: Path, manifest: dict):
    text = json.dumps(manifest, indent=2, allow_nan=False)  # strict JSON: non-finite values are None already
    atomic_write(out_dir / SET_MANIFEST, lambda f: f.write(text.encode()))


def _write_pngs(out_dir: Path, images: np.ndarray, indices: Sequence[int]):
    from PIL import Image

    for image, i in zip(images, indices):
        atomic_write(out_dir / "png" / f"{i:06d}.png", lambda f: Image.fromarray(image).save(f, format="PNG"))


def _write_missing_pngs(out_dir: Path, shards: List[range], todo: List[int], rank: int, world: int):
    """PNGs of complete shards that lack them (the set was first written without "png")."""
    complete = [k for k in range(len(shards)) if k not in set(todo)]
    for k in complete[rank::world]:
        if not all((out_dir / "png" / f"{i:06d}.png").is_file() for i in shards[k]):
            with np.load(_shard_path(out_dir, k)) as shard:
                _write_pngs(out_dir, shard["arr_0"], shards[k])


def _assemble(out_dir: Path, shards: List[range], manifest: dict, count: Optional[int] = None):
    """samples.npz from the shards, then its record (count, shape, bytes, sha256) in the manifest. count: only
    samples 0..count-1 (a smaller set served from a larger one's shards; the manifest keeps its num_samples)."""
    num_samples = manifest["num_samples"] if count is None else count
    shards = [r for r in shards if r.start < num_samples]
    with np.load(_shard_path(out_dir, 0)) as first:
        arr = np.empty((num_samples, *first["arr_0"].shape[1:]), dtype=np.uint8)  # (N, H, W, 3)
        labels = np.empty(num_samples, dtype=np.int64) if "labels" in first.files else None
    for k, indices in enumerate(shards):
        with np.load(_shard_path(out_dir, k)) as shard:
            stop = min(indices.stop, num_samples)
            arr[indices.start : stop] = shard["arr_0"][: stop - indices.start]
            if labels is not None:
                labels[indices.start : stop] = shard["labels"][: stop - indices.start]
    arrays = {"arr_0": arr} if labels is None else {"arr_0": arr, "labels": labels}
    path = out_dir / SAMPLES_NPZ
    atomic_write(path, lambda f: np.savez(f, **arrays))
    manifest[NPZ_RECORD] = {"count": num_samples, "shape": list(arr.shape), "bytes": path.stat().st_size,
                            "sha256": file_sha256(path)}
    _write_manifest(out_dir, manifest)


# ---------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sample a grid or a large sample set (e.g. 50K for FID) from a U-ViT / U-ViC.",
        epilog=(
            "examples:\n"
            "  python sample.py runs/digits_uvic/final --grid 8\n"
            "  python sample.py runs/cifar10_uvic_s2 --checkpoint latest --num-samples 50000 --out samples/c10\n"
            "  accelerate launch sample.py runs/in256_uvit_l2/final --num-samples 50000 --guidance 1.4 --out s/in256\n"
            "  torchrun --nproc_per_node 2 sample.py MODEL --num-samples 1000 --out s/x --device cpu   (CPU ranks)\n"
            "guidance: eps = uncond + w (cond - uncond); w = 1 is off, U-ViT's 'scale 0.4' is w = 1.4."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("model", metavar="MODEL", help=f"what to sample from: {MODEL_KINDS}")
    add("--checkpoint", help="run directory: 'latest' or a step number instead of final/")
    add("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights of a checkpoint (default on)")
    add("--reference-config", help=f"a published U-ViT .pth: its {REFERENCE_CONFIGS}*.yaml (architecture, schedule, "
        "VAE, and the paper's sampler, steps and guidance as defaults); picked by the file name for "
        f"{', '.join(PUBLISHED_CHECKPOINTS)}")
    add("--vae", help="AutoencoderKL folder (or latents extraction folder) that decodes a latent model")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--grid", type=int, metavar="N", help="one PNG grid, N per row: a row per class (conditional)")
    what.add_argument("--num-samples", type=int, metavar="N", help="a set of N samples in --out (resumable)")
    add("--out", help="grid: a .png file or a folder; set: the folder (required)")
    add("--format", nargs="+", default=["npz"], choices=FORMATS, help="set: npz (arr_0 NHWC uint8 + labels) and/or png")
    add("--shard-size", type=int, help="set: samples per shard, the unit of resume (default: the existing "
        "set's, else min(1000, ceil(N/10)))")
    add("--scheduler", help=f"sampler: {', '.join(SCHEDULERS)}, or 'saved' (the pipeline's own); default dpm++2m, "
        "or the reference config's (paper samplers: uvic.diffusion.PAPER_SAMPLERS)")
    add("--steps", type=int, help="number of sampling steps (default 50, or the reference config's)")
    add("--timestep-spacing", choices=TIMESTEP_SPACINGS, help="override the sampler's timestep spacing")
    add("--guidance", type=float, help="classifier-free guidance w (1 = off; U-ViT's 0.4 is 1.4); default 1, "
        "or the reference config's")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--class-labels", type=int, nargs="+", metavar="Y", help="labels taken in turn (grid: the rows)")
    labels.add_argument("--classes", choices=CLASS_MODES, help="set: uniform (i.i.d., default) or balanced (index mod K)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", action="append", metavar="TEXT", help="text-to-image: a prompt (repeat for more; "
                      "grid: a row each)")
    text.add_argument("--prompts", metavar="FILE", help="text-to-image: prompts, one per line (.jsonl: \"caption\"); "
                      "grid: a row each; set: sample i from prompt i, in order")
    add("--text-encoder", metavar="DIR", help="text-to-image: CLIP tokenizer + text model folder for a pipeline "
        "saved without them")
    add("--seed", type=int, default=0, help="sample i is drawn from a generator seeded from (seed, i)")
    add("--batch-size", type=int, default=64, help="samples per forward pass (per process)")
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available; accelerate launch: one per process)")
    add("--dtype", choices=DTYPES, default="fp32", help="model weights and activations")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars (diffusers' loading too)")
    add_debug_option(parser)
    return parser


def _grid_path(args) -> Path:
    """--out (a .png, or a folder), else MODEL's run directory samples/ folder, else the working directory."""
    name = f"grid_{args.scheduler}_{args.steps}steps_w{args.guidance:g}_seed{args.seed}.png"
    if args.out:
        return Path(args.out) if args.out.lower().endswith(".png") else Path(args.out) / name
    run = RunDir.find(args.model) if Path(args.model).is_dir() else None
    if run is not None:
        return run.path / "samples" / name
    return Path(name)


def run(args) -> Path:
    """sample.py with parsed arguments; returns the grid, samples.npz or png folder."""
    # Everything that can be checked without the model is checked first.
    if args.reference_config is None and Path(args.model).is_file():
        args.reference_config = str(published_reference_config(args.model))
        print(f"sample.py: {Path(args.model).name} is a published U-ViT checkpoint: reference config "
              f"{args.reference_config}", file=sys.stderr)
    paper = reference_sample_settings(args.reference_config) if args.reference_config else {}
    if args.scheduler is None:  # the paper's sampler is the reference pipeline's own
        args.scheduler = "saved" if paper.get("scheduler") else "dpm++2m"
    if args.steps is None:
        args.steps = int(paper.get("steps", 50))
    if args.guidance is None:
        args.guidance = float(paper.get("guidance", 1.0))
    if args.scheduler != "saved" and args.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {args.scheduler!r}; valid: {', '.join(SCHEDULERS)}, saved")
    if args.num_samples is not None and not args.out:
        raise ValueError("--num-samples needs --out FOLDER")
    if args.grid is not None and args.classes is not None:
        raise ValueError("--classes applies to sample sets; a grid takes --class-labels (its rows)")
    for name in ("grid", "num_samples", "steps", "batch_size", "shard_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.seed < 0:
        raise ValueError(f"--seed must be non-negative, got {args.seed}")
    prompts = read_prompts(args.prompts) if args.prompts else args.prompt
    if prompts is not None and (args.class_labels is not None or args.classes is not None):
        raise ValueError("--prompt/--prompts and --class-labels/--classes are mutually exclusive")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    state = _process_state(device)
    if state.num_processes > 1:
        device = state.device
    pipe = load_pipeline(args.model, checkpoint=args.checkpoint, ema=args.ema, reference_config=args.reference_config,
                         vae=args.vae)
    steps_problem = sampler_steps_problem(args.scheduler if args.scheduler != "saved" else type(pipe.scheduler).__name__,
                                          args.steps, pipe.scheduler.config.num_train_timesteps)
    if steps_problem:
        raise ValueError(f"--steps {args.steps}: {steps_problem}")
    if args.vae and not args.reference_config:
        attach_vae(pipe, args.vae)
    if args.text_encoder:
        pipe.attach_text_encoder(args.text_encoder)
    check_prompts(pipe, prompts, args.guidance)
    scheduler = None if args.scheduler == "saved" else args.scheduler
    classes = args.class_labels if args.class_labels is not None else (args.classes or "uniform")
    # labels and guidance against the model, before the weights move or anything is drawn
    resolved = resolve_classes(classes, pipe.num_real_classes)
    pipe.check_inputs(1, None if resolved is None else 0, args.guidance)
    pipe.to(device)
    for module in (pipe.transformer, pipe.vae):
        if module is not None and module.dtype != DTYPES[args.dtype]:
            torch.nn.Module.to(module, DTYPES[args.dtype])  # ModelMixin.to warns about an empty fp32-module list
    if args.compile:
        pipe.transformer.compile()

    common = dict(seed=args.seed, scheduler=scheduler, steps=args.steps, guidance=args.guidance,
                  batch_size=args.batch_size, timestep_spacing=args.timestep_spacing, progress=args.progress)
    if args.grid is not None:
        path = _grid_path(args)
        if state.is_main_process:
            sample_grid(pipe, path, per_row=args.grid, class_labels=args.class_labels, prompts=prompts, **common)
        state.wait_for_everyone()
    else:
        path = generate_samples(pipe, args.out, num_samples=args.num_samples, classes=classes, formats=args.format,
                                accelerator=state, shard_size=args.shard_size, prompts=prompts, **common)
    if state.is_main_process:
        print(path)
    return path


def _process_state(device: str):
    """accelerate's PartialState under `accelerate launch` / torchrun (several processes), else one process."""
    launched = any(int(os.environ.get(k, "1")) > 1 for k in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not launched:
        return _SingleProcess()
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu")


@command("sample.py")
def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Entry point of sample.py and `uvic-sample`. Bad input ends with one message and exit status 2 (uvic.cli)."""
    args = build_parser().parse_args(argv)
    with progress_bars(args.progress):
        return run(args)
