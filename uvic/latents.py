"""Autoencoder latents for latent diffusion: extraction to shards, the dataset that samples them, the decoding VAE.

The U-ViT / DiT recipe on ImageNet: center-crop every image like ADM (uvic.images), encode it once with the
Stable Diffusion VAE (uvic.vae), keep the posterior moments (mean, std) and draw a
fresh latent z = scale_factor · (mean + std · ε) at every training step.

    python -m uvic.latents extract --data IMAGENET/train --out data/imagenet256_latents \\
        --resolution 256 [--vae stabilityai/sd-vae-ft-ema | LOCAL_FOLDER] [--flip]
    accelerate launch -m uvic.latents extract ...     (several GPUs: ranks take disjoint shards)
    python -m uvic.latents crops --data IMAGENET/val --out ref/val256 --resolution 256   (FID reference images)

(the command line is uvic.latents_cli; image-caption data goes to uvic.caption_latents.)

Layout of an extraction folder:

    meta.json                  vae, scale_factor, resolution, latent_shape, flip, classes, num_classes
                               (real classes, no null label), num_images, shard_size, num_shards, ...
    vae/                       AutoencoderKL.save_pretrained copy (decoding never needs the hub)
    shard_00000.safetensors    mean, std (N, V, C, h, w) float16; labels, index (N,) int64
                               V = 2 with --flip (view 1 = horizontally flipped image), else 1;
                               metadata start, count (rows N), process ("rank/processes" that wrote it),
                               skipped (JSON list of the file numbers that could not be read)

A shard is written to a temporary name and renamed when complete, so an interrupted run leaves
only complete shards and a rerun of the same command encodes just the missing ones. The rows of the
shard in progress are saved as .shard_XXXXX.safetensors.partial when the run stops on an error or
Ctrl-C, and the rerun continues after them. Unreadable images are skipped and counted (one warning at
the end; their file numbers are in the shard metadata), as in training; fail_on_corrupt stops at the
first one, naming it (the shard so far is kept: fix the file and rerun).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from functools import partial
from itertools import islice
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .files import atomic_path, atomic_save_file, atomic_write
from .images import CenterCropImages, find_images
from .vae import DEFAULT_VAE, SCALE_FACTOR, VAE_DIR, downsample_factor, load_vae

META = "meta.json"
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def shard_name(shard: int) -> str:
    return f"shard_{shard:05d}.safetensors"


def shards_for_process(num_shards: int, process_index: int, num_processes: int) -> List[int]:
    """Rank r encodes shards r, r + P, r + 2P, ...: disjoint, and together all of them."""
    return list(range(process_index, num_shards, num_processes))


def read_meta(folder: Union[str, Path]) -> dict:
    path = Path(folder) / META
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} not found: not a latent folder (make one with `python -m uvic.latents extract`)")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------- extraction
@torch.no_grad()
def extract_latents(
    data: Union[str, Path],
    out: Union[str, Path],
    *,
    resolution: int = 256,
    vae: Union[str, Path] = DEFAULT_VAE,
    flip: bool = False,
    batch_size: int = 64,
    shard_size: int = 10_000,
    num_workers: int = 4,
    dtype: str = "float16",
    vae_dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    images: Optional[Tuple[List[str], List[int], List[str]]] = None,
    fail_on_corrupt: bool = False,
) -> Path:
    """Encode the ImageNet-layout folder `data` into latent-moment shards under `out` (see the
    module docstring). Process `process_index` of `num_processes` encodes its own shards only
    (`shards_for_process`); process 0 writes meta.json and vae/. Complete shards are skipped, a partial
    one continued. Unreadable images are skipped (one warning), or raise ValueError with fail_on_corrupt.
    images: (files relative to data, labels, class names) instead of `find_images(data)` (captioned data)."""
    _check_arguments(resolution, batch_size, shard_size, dtype, process_index, num_processes)
    files, labels, classes = find_images(data) if images is None else images
    out = Path(out)
    autoencoder = load_vae(vae, dtype=vae_dtype)
    meta = _extraction_meta(data, files, classes, vae, autoencoder, resolution=resolution, flip=flip, dtype=dtype,
                           shard_size=shard_size)
    _begin_folder(out, meta, autoencoder, process_index)
    todo = _shards_to_encode(out, meta["num_shards"], process_index, num_processes)
    if not todo:
        return out

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encode = partial(_moments, autoencoder.to(device), flip=flip, device=device, vae_dtype=vae_dtype,
                     store=STORAGE_DTYPES[dtype])
    shards = [_ShardRows(out, s, meta, process=f"{process_index}/{num_processes}") for s in todo]  # partial files read
    batches = [list(range(i, min(i + batch_size, rows.end))) for rows in shards
               for i in range(rows.next_index, rows.end, batch_size)]
    loader = DataLoader(CenterCropImages(data, files, labels, resolution), batch_sampler=batches,
                        num_workers=num_workers, pin_memory=device.type == "cuda")
    bar = tqdm(total=sum(rows.end - rows.start for rows in shards),
               initial=sum(rows.next_index - rows.start for rows in shards),
               desc=f"encode {len(todo)} shards", unit="img", disable=not progress or process_index != 0)
    skipped: List[int] = []
    try:
        batch_iter = iter(loader)  # the batch sampler never crosses a shard boundary
        for rows in shards:
            count = len(range(rows.next_index, rows.end, batch_size))
            skipped += _encode_shard(rows, islice(batch_iter, count), encode, bar, fail_on_corrupt=fail_on_corrupt,
                                     data=Path(data), files=files)
    finally:
        bar.close()
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {len(files)} in {data}, e.g. "
                      f"{Path(data) / files[skipped[0]]} (listed in the shards' metadata; "
                      "--fail-on-corrupt stops at the first)", stacklevel=2)
    return out


def _check_arguments(resolution: int, batch_size: int, shard_size: int, dtype: str, process_index: int,
                     num_processes: int) -> None:
    for name, value in (("resolution", resolution), ("batch_size", batch_size), ("shard_size", shard_size)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} must lie in 0..{num_processes - 1}")


def _extraction_meta(data, files: List[str], classes: List[str], vae, autoencoder, *, resolution: int, flip: bool,
                    dtype: str, shard_size: int) -> dict:
    """meta.json of an extraction of `files` (relative to `data`) with `autoencoder` (loaded from `vae`)."""
    factor = downsample_factor(autoencoder)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")
    return {
        "format": "uvic-latents/1",
        "vae": str(Path(vae).expanduser().resolve()) if Path(vae).expanduser().is_dir() else str(vae),
        "vae_path": VAE_DIR,
        "scale_factor": float(autoencoder.config.scaling_factor),
        "resolution": resolution,
        "latent_shape": [autoencoder.config.latent_channels, resolution // factor, resolution // factor],
        "flip": bool(flip),
        "moments": "mean_std",
        "dtype": dtype,
        "num_images": len(files),
        "shard_size": shard_size,
        "num_shards": -(-len(files) // shard_size),
        "num_classes": len(classes),
        "classes": classes,
        "files_sha1": hashlib.sha1("\n".join(files).encode()).hexdigest(),
        "data": str(Path(data).resolve()),
    }


def _begin_folder(out: Path, meta: dict, autoencoder, process_index: int) -> None:
    """A new extraction folder gets meta.json and vae/ (process 0); an existing one must hold the same
    extraction (any setting that differs is refused, naming it)."""
    if (out / META).exists():  # resuming: the same command, or a clear refusal
        old = read_meta(out)
        changed = [k for k in meta if k != "data" and old.get(k) != meta[k]]
        if changed:
            k = changed[0]
            raise ValueError(
                f"{str(out)!r} holds latents made with {k}={old.get(k)!r}, this run has {k}={meta[k]!r}; "
                f"use another --out or the same settings to resume"
            )
    elif process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(meta, indent=1)
        atomic_write(out / META, lambda f: f.write(text.encode()))
    if process_index == 0 and not (out / VAE_DIR / "config.json").exists():
        with atomic_path(out / VAE_DIR) as tmp:
            autoencoder.save_pretrained(tmp)
    out.mkdir(parents=True, exist_ok=True)


def _shards_to_encode(out: Path, num_shards: int, process_index: int, num_processes: int) -> List[int]:
    """This process's shards that are not complete yet; the leftovers of an interrupted run are cleaned up."""
    mine = shards_for_process(num_shards, process_index, num_processes)
    todo = [s for s in mine if not (out / shard_name(s)).exists()]
    for s in todo:  # half-written leftovers of an interrupted run: never taken, cleaned up
        for stale in (*out.glob(f".{shard_name(s)}.tmp-*"), *out.glob(f".{_partial_path(out, s).name}.tmp-*")):
            stale.unlink()
    for s in set(mine) - set(todo):  # a partial file whose shard was completed just before a stop
        _partial_path(out, s).unlink(missing_ok=True)
    return todo


def _moments(autoencoder, x: torch.Tensor, *, flip: bool, device, vae_dtype, store) -> Tuple[torch.Tensor, ...]:
    """VAE posterior (mean, std) of images x (B, 3, R, R), each (B, V, C, h, w) on the CPU in `store`."""
    x = x.to(device, vae_dtype)  # (B, 3, R, R)
    views = torch.stack([x, x.flip(-1)], 1) if flip else x[:, None]  # (B, V, 3, R, R)
    posterior = autoencoder.encode(views.flatten(0, 1)).latent_dist
    shape = (x.shape[0], views.shape[1], *posterior.mean.shape[1:])  # (B, V, C, h, w)
    return posterior.mean.reshape(shape).to("cpu", store), posterior.std.reshape(shape).to("cpu", store)


def _encode_shard(rows: _ShardRows, batches, encode, bar, *, fail_on_corrupt: bool, data: Path,
                  files: List[str]) -> List[int]:
    """Encode `batches` (CenterCropImages items) into `rows` and write the complete shard; on an error or Ctrl-C,
    write the rows so far as its partial file instead. Returns the file numbers skipped as unreadable."""
    skipped = []
    try:
        for x, y, idx, errors in batches:
            bad = [k for k, e in enumerate(errors) if e]
            if bad and fail_on_corrupt:
                keep = list(range(bad[0]))  # the rows before it are kept; the rerun starts at the bad file
                rows.add(encode, x[keep], y[keep], idx[keep])
                rows.next_index = int(idx[bad[0]])
                raise ValueError(f"unreadable image {data / files[rows.next_index]}: {errors[bad[0]]} "
                                 "(--fail-on-corrupt; fix or remove the file and rerun: the extraction resumes)")
            if bad:
                rows.skipped += [int(idx[k]) for k in bad]
                skipped += [int(idx[k]) for k in bad]
                good = [k for k in range(len(errors)) if not errors[k]]
                rows.add(encode, x[good], y[good], idx[good])
            else:
                rows.add(encode, x, y, idx)
            rows.next_index = int(idx[-1]) + 1
            bar.update(len(errors))
        rows.save()
    except BaseException:  # an error, Ctrl-C: keep the rows of the shard in progress for the rerun
        if rows.next_index > rows.start:
            rows.save(partial=True)
        raise
    return skipped


class _ShardRows:
    """The rows of one shard: those of its partial file (an aborted run's), then each encoded batch's; saved as
    the complete shard or, on a stop, as the partial file the rerun continues after."""

    KEYS = ("mean", "std", "labels", "index")

    def __init__(self, out: Path, shard: int, meta: dict, process: str):
        self.out, self.shard, self.process = out, shard, process  # process: "rank/processes"
        self.start = shard * meta["shard_size"]
        self.end = min((shard + 1) * meta["shard_size"], meta["num_images"])  # file numbers start..end-1
        self.empty_shape = (0, 2 if meta["flip"] else 1, *meta["latent_shape"])  # (0, V, C, h, w)
        self.store = STORAGE_DTYPES[meta["dtype"]]
        self.pending = {k: [] for k in self.KEYS}
        self.skipped: List[int] = []  # file numbers of unreadable images
        self.next_index = self.start  # the next file to encode
        begun = _read_partial(out, shard)
        if begun:
            tensors, metadata = begun
            for k in self.KEYS:
                self.pending[k].append(tensors[k])
            self.skipped = json.loads(metadata.get("skipped", "[]"))
            self.next_index = int(metadata["next"])

    def add(self, encode, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> None:
        """Append the moments encode(x) of images x (B, 3, R, R), their labels y and file numbers idx (B,)."""
        if len(x) == 0:
            return
        mean, std = encode(x)  # (B, V, C, h, w) each
        self.pending["mean"].append(mean)
        self.pending["std"].append(std)
        self.pending["labels"].append(y.long())
        self.pending["index"].append(idx.long())

    def tensors(self) -> dict:
        """The rows so far; shapes (N, V, C, h, w) and (N,) even for N = 0."""
        empty = {"mean": (self.empty_shape, self.store), "std": (self.empty_shape, self.store),
                 "labels": ((0,), torch.int64), "index": ((0,), torch.int64)}
        return {k: torch.cat(v) if v else torch.zeros(empty[k][0], dtype=empty[k][1]) for k, v in self.pending.items()}

    def save(self, partial: bool = False) -> None:
        rows = sum(len(t) for t in self.pending["index"])
        metadata = {"start": str(self.start), "count": str(rows), "next": str(self.next_index),
                    "process": self.process, "skipped": json.dumps(self.skipped)}
        if partial:
            atomic_save_file(_partial_path(self.out, self.shard), self.tensors(), metadata)
        else:
            atomic_save_file(self.out / shard_name(self.shard), self.tensors(), metadata)
            _partial_path(self.out, self.shard).unlink(missing_ok=True)


def _partial_path(out: Path, shard: int) -> Path:
    return out / f".{shard_name(shard)}.partial"


def _read_partial(out: Path, shard: int):
    """(tensors, metadata) of a shard an aborted run had begun, or None (none, or unreadable: redone)."""
    path = _partial_path(out, shard)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except Exception:  # a damaged partial file only costs its rows
        warnings.warn(f"{path} is unreadable; its shard is encoded again", stacklevel=2)
        return None


# ---------------------------------------------------------------------- dataset
class LatentDataset(Dataset):
    """Latents of an extraction folder: item i = (z (C, h, w) float32, label int) with
    z = scale_factor · (mean + std · ε), ε ~ N(0, I) drawn anew at every access (torch's RNG),
    and, for --flip extractions, the image or its mirror picked at random.

    scale_factor None = the extraction VAE's own (meta.json; 0.18215 for the SD VAE).
    Shards are read lazily (memory-mapped safetensors), so DataLoader workers stay small.
    Exposes classes (names), num_classes (real classes; the model's label table needs one more,
    the null label), latent_shape, scale_factor, vae (the id/path the latents came from).
    """

    def __init__(self, path: Union[str, Path], scale_factor: Optional[float] = SCALE_FACTOR):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.scale_factor = float(self.meta["scale_factor"] if scale_factor is None else scale_factor)
        self.classes: List[str] = list(self.meta["classes"])
        self.num_classes = len(self.classes)
        self.latent_shape = tuple(self.meta["latent_shape"])
        self.resolution = self.meta["resolution"]
        self.vae = self.meta["vae"]
        self.shard_size = self.meta["shard_size"]
        missing = [shard_name(s) for s in range(self.meta["num_shards"]) if not (self.path / shard_name(s)).exists()]
        if missing:
            raise FileNotFoundError(
                f"{str(self.path)!r} is incomplete: {len(missing)} of {self.meta['num_shards']} shards missing "
                f"(first: {missing[0]}); rerun the same `python -m uvic.latents extract` command to finish it"
            )
        self._files = {}
        rows = [self._rows(s) for s in range(self.meta["num_shards"])]  # fewer than shard_size: skipped images
        self._offsets = np.cumsum([0] + rows)  # (num_shards + 1,) first row of each shard
        self.num_images = int(self._offsets[-1])
        self.skipped = self.meta["num_images"] - self.num_images  # unreadable images left out

    def _rows(self, shard: int) -> int:
        with safe_open(str(self.path / shard_name(shard)), framework="pt") as f:
            return f.get_slice("labels").get_shape()[0]

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self):  # open file handles stay in their process
        return {**self.__dict__, "_files": {}}

    def _shard(self, shard: int):
        if shard not in self._files:
            self._files[shard] = safe_open(str(self.path / shard_name(shard)), framework="pt")
        return self._files[shard]

    def moments(self, index: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Stored (mean, std) of image `index`, each (V, C, h, w) float32 and unscaled, and its label."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} latents")
        shard = int(np.searchsorted(self._offsets, index, side="right")) - 1
        f = self._shard(shard)
        row = index - int(self._offsets[shard])
        mean = f.get_slice("mean")[row : row + 1][0].float()
        std = f.get_slice("std")[row : row + 1][0].float()
        label = int(f.get_slice("labels")[row : row + 1][0])
        return mean, std, label

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        mean, std, label = self.moments(index)
        view = int(torch.randint(mean.shape[0], ())) if mean.shape[0] > 1 else 0
        z = mean[view] + std[view] * torch.randn_like(mean[view])  # (C, h, w)
        return z * self.scale_factor, label


# ---------------------------------------------------------------------- decoding
def attach_vae(pipeline, source, *, scale_factor: Optional[float] = None):
    """Give a UViCPipeline the VAE its latents came from, so it decodes to images and
    save_pretrained writes vae/ beside transformer/ and scheduler/.

    source: a LatentDataset, an extraction folder (meta.json; its vae/ copy is used), a VAE folder
    or hub id, or an AutoencoderKL. The latent scale is the model's (pipeline.config.latent_scale)
    when it has one: a VAE's own config.scaling_factor describes the VAE, not the model (SD v1's
    folder says 0.18215, MS-COCO U-ViT was trained with 0.23010). scale_factor (or a dataset's /
    extraction's meta.json scale) states the model's scale: one that disagrees with the pipeline's is
    refused. Without either, the VAE's own is used. The scale is written into vae.config.scaling_factor
    (which the pipeline divides by before decoding) and into pipeline.config.latent_scale.
    """
    from diffusers import AutoencoderKL  # diffusers takes seconds to import: only a VAE's user pays for it

    if isinstance(source, LatentDataset):
        scale_factor = source.scale_factor if scale_factor is None else scale_factor
        source = source.path
    if isinstance(source, AutoencoderKL):
        vae = source.eval().requires_grad_(False)
    else:
        folder = Path(source)
        if (folder / META).exists():
            meta = read_meta(folder)
            scale_factor = meta["scale_factor"] if scale_factor is None else scale_factor
            vae = load_vae(folder / VAE_DIR if (folder / VAE_DIR).is_dir() else meta["vae"])
        else:
            vae = load_vae(source)
    model_scale = pipeline.config.get("latent_scale")
    if model_scale is not None and scale_factor is not None and not math.isclose(model_scale, scale_factor, rel_tol=1e-6):
        raise ValueError(f"latent scale {float(scale_factor):g} of {source} differs from the model's {model_scale:g} "
                         "(pipeline latent_scale, the factor its training latents were scaled by)")
    scale = model_scale if model_scale is not None else scale_factor
    scale = float(vae.config.scaling_factor if scale is None else scale)
    vae.register_to_config(scaling_factor=scale)
    vae.to(pipeline.transformer.device)
    pipeline.register_modules(vae=vae)
    pipeline.register_to_config(latent_scale=scale)
    return pipeline


if __name__ == "__main__":  # `python -m uvic.latents`: the command line sits above caption latents, which import this
    from .latents_cli import main

    main()
