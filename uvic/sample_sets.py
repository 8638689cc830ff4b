"""The sample-set format: large sample sets (50K for FID) in shards, with a manifest, resumable, on several processes.

A set of N samples (drawn by uvic.drawing: sample i from (seed, i) alone) is cut into shards of `shard_size`
consecutive indices; each shard is written to a temporary name and renamed when complete, so an interrupted run
resumes from the complete shards and never takes a half-written one; the default shard size, min(1000, ceil(N /
10)), keeps most of the work of an interrupted job of any size. The set's manifest (SET_MANIFEST, strict JSON)
records what the set is (model fingerprint, seed, scheduler, steps, guidance, classes, ...) and its size; a rerun
that would add other samples to it, or shrink it, is refused (growing it is allowed: the complete shards are kept).
It also records samples.npz (count, shape, bytes, sha256): a rerun calls the set complete only when the file
matches, and otherwise rebuilds it from the shards (drawing missing ones again).

    OUT/manifest.json
    OUT/shards/shard_000000.npz   arr_0 (n, H, W, 3) uint8, indices (n,) int64, labels (n,) int64 if conditional
    OUT/samples.npz               arr_0 (N, H, W, 3) uint8 (+ labels): the ADM evaluator / DiT sample_ddp layout
    OUT/png/000000.png ...        with "png" in formats
    OUT/prompts.txt               text-to-image: prompt i of sample i
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
import zipfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .diffusion import SCHEDULE_KEY
from .drawing import check_image_channels, check_prompts, draw, labels_for, resolve_classes, to_uint8, with_scheduler
from .files import atomic_write, file_sha256
from .pipeline import UViCPipeline

logger = logging.getLogger(__name__)


FORMATS = ("npz", "png")
SET_MANIFEST = "manifest.json"  # the sample set's record (a checkpoint's is uvic.runs.MANIFEST)
SAMPLES_NPZ = "samples.npz"
PROMPTS_TXT = "prompts.txt"  # text-to-image sets: prompt i of sample i, one a line
NPZ_RECORD = "samples_npz"  # manifest key: {count, shape, bytes, sha256} of samples.npz, written after it
MAX_SHARD_SIZE = 1000
# Manifest keys that define the set: a rerun into the same folder must agree on all of them.
IDENTITY_KEYS = ("model", "seed", "scheduler", "steps", "guidance", "classes", "shard_size", "image_shape", "dtype",
                 "prompts")


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


class SingleProcess:
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


# ---------------------------------------------------------------------- shards and manifest
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


def read_set_manifest(path: Path) -> dict:
    """The sampling metadata of the set that holds `path` (its samples.npz, its folder or its png/): its manifest, or
    {} for images of no set. Lenient, for reports; a rerun of the set reads it strictly (_read_manifest)."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / SET_MANIFEST, folder.parent / SET_MANIFEST):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError:
                logger.warning("%s is not valid JSON; sampling metadata ignored", candidate)
                return {}
    return {}


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


def _write_manifest(out_dir: Path, manifest: dict):
    text = json.dumps(manifest, indent=2, allow_nan=False)  # strict JSON: non-finite values are None already
    atomic_write(out_dir / SET_MANIFEST, lambda f: f.write(text.encode()))


# ---------------------------------------------------------------------- writing a set
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
    out_dir, formats = Path(out_dir), tuple(formats)
    _check_options(formats, num_samples=num_samples, batch_size=batch_size, shard_size=shard_size, steps=steps,
                   seed=seed)
    pipe = with_scheduler(pipeline, scheduler, timestep_spacing)
    check_prompts(pipe, prompts, guidance)
    if prompts is not None:
        if len(prompts) < num_samples:
            raise ValueError(f"{num_samples} samples need as many prompts (one each, in order); got {len(prompts)}")
        prompts = [str(p) for p in prompts[:num_samples]]
    classes = resolve_classes(classes, pipe.num_real_classes)
    pipe.check_inputs(1, None if classes is None else 0, guidance)
    check_image_channels(pipe)
    state = accelerator or SingleProcess()
    old = _read_manifest(out_dir)  # every rank reads it before anyone writes
    if shard_size is None:
        shard_size = old["shard_size"] if old and isinstance(old.get("shard_size"), int) \
            else default_shard_size(num_samples)
    manifest = set_manifest(pipe, seed=seed, steps=steps, guidance=guidance, classes=classes, shard_size=shard_size,
                            num_samples=num_samples, formats=formats, prompts=prompts,
                            source=str(pipeline.config.get("_name_or_path", "")))
    _check_manifest(out_dir, manifest, old)  # every rank raises the same error, before anyone writes
    if old is not None and num_samples < old["num_samples"]:  # _check_manifest found it held by complete shards
        return _serve_prefix(out_dir, old, num_samples, state)
    record = (old or {}).get(NPZ_RECORD)
    if record is not None:
        manifest[NPZ_RECORD] = record  # describes the samples.npz on disk until a new one replaces it
    _start(out_dir, manifest, prompts, state)

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
        _write_missing_pngs(out_dir, shards, todo, state.process_index, state.num_processes)
    state.wait_for_everyone()  # all have looked before anyone writes
    _draw_shards(pipe, out_dir, shards, todo, state, classes=classes, seed=seed, steps=steps, guidance=guidance,
                 batch_size=batch_size, prompts=prompts, png="png" in formats, progress=progress)
    if "npz" in formats and state.is_main_process and not verified:
        _assemble(out_dir, shards, manifest)
    state.wait_for_everyone()
    return result


def _check_options(formats: tuple, *, seed: int, **sizes):
    """Formats known, sizes at least 1 (None: unset), seed non-negative."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats {list(formats)} not valid; choose from {FORMATS}")
    for name, value in sizes.items():
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def set_manifest(pipe: UViCPipeline, *, seed: int, steps: int, guidance: float, classes, shard_size: int,
                 num_samples: int, formats: tuple, prompts: Optional[List[str]], source: str) -> dict:
    """What a set is (IDENTITY_KEYS: a rerun into its folder must agree on them) and its size, as strict JSON."""
    scheduler = {"class": type(pipe.scheduler).__name__,
                 **{k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}}
    return {
        "model": model_fingerprint(pipe),
        "seed": seed,
        "scheduler": _json_ready(scheduler),
        "steps": steps,
        "guidance": float(guidance),
        "classes": classes,
        "shard_size": shard_size,
        "image_shape": list(pipe.image_shape),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "num_samples": num_samples,
        "source": source,
        "formats": list(formats),
        "prompts": None if prompts is None else {
            "count": len(prompts), "sha1": hashlib.sha1("\n".join(prompts).encode()).hexdigest(), "file": PROMPTS_TXT},
    }


def _serve_prefix(out_dir: Path, old: dict, num_samples: int, state) -> Path:
    """samples.npz of samples 0..num_samples-1 of a larger, unfinished set whose complete shards hold them."""
    verified = _npz_verified(out_dir, old.get(NPZ_RECORD), num_samples)
    if state.is_main_process and not verified:
        _assemble(out_dir, shard_ranges(old["num_samples"], old["shard_size"]), old, count=num_samples)
    state.wait_for_everyone()
    return out_dir / SAMPLES_NPZ


def _start(out_dir: Path, manifest: dict, prompts: Optional[List[str]], state):
    """The folders, the manifest and prompts.txt, written by the main process once every rank has checked."""
    state.wait_for_everyone()
    if state.is_main_process:
        (out_dir / "shards").mkdir(parents=True, exist_ok=True)
        if "png" in manifest["formats"]:
            (out_dir / "png").mkdir(exist_ok=True)
        for stale in [*out_dir.glob(".*.tmp-*"), *out_dir.glob("*/.*.tmp-*")]:  # left by an interrupted run
            stale.unlink(missing_ok=True)
        _write_manifest(out_dir, manifest)
        if prompts is not None:
            atomic_write(out_dir / PROMPTS_TXT, lambda f: f.write("".join(p + "\n" for p in prompts).encode()))
    state.wait_for_everyone()


def _draw_shards(pipe: UViCPipeline, out_dir: Path, shards: List[range], todo: List[int], state, *, classes,
                 seed: int, steps: int, guidance: float, batch_size: int, prompts: Optional[List[str]], png: bool,
                 progress: bool):
    """Draw the shards `todo` (this rank's share: every num_processes-th) and write each when it is complete."""
    rank, world = state.process_index, state.num_processes
    num_samples = shards[-1].stop
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
                                        prompts=batch_prompts)))  # (B, H, W, 3) uint8
            bar.update(min(len(batch) * world, bar.total - bar.n))  # other ranks advance alike
        arrays = {"arr_0": np.concatenate(images), "indices": np.arange(indices.start, indices.stop)}
        if labels is not None:
            arrays["labels"] = labels
        if png:
            _write_pngs(out_dir, arrays["arr_0"], indices)
        atomic_write(_shard_path(out_dir, k), lambda f: np.savez(f, **arrays))  # the shard is complete now
    bar.close()
    state.wait_for_everyone()


def _write_pngs(out_dir: Path, images: np.ndarray, indices: Sequence[int]):
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
