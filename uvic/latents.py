"""Autoencoder latents for latent diffusion: extraction to shards, a dataset that samples them, VAE hooks.

The U-ViT / DiT recipe on ImageNet: center-crop every image like ADM, encode it once with the
Stable Diffusion VAE (diffusers AutoencoderKL), keep the posterior moments (mean, std) and draw a
fresh latent z = scale_factor · (mean + std · ε) at every training step.

    python -m uvic.latents extract --data IMAGENET/train --out data/imagenet256_latents \\
        --resolution 256 [--vae stabilityai/sd-vae-ft-ema | LOCAL_FOLDER] [--flip]
    accelerate launch -m uvic.latents extract ...     (several GPUs: ranks take disjoint shards)
    python -m uvic.latents crops --data IMAGENET/val --out ref/val256 --resolution 256   (FID reference images)

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

import argparse
import hashlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .cli import add_debug_option, command
from .files import IMAGE_EXTENSIONS, atomic_write

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"  # the VAE of U-ViT (autoencoder_kl_ema) and DiT
SCALE_FACTOR = 0.18215  # Stable Diffusion's latent scale: unit variance for the SD VAE
META = "meta.json"
VAE_DIR = "vae"
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------- images
def center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """ADM / U-ViT preprocessing: resize the shorter side to `resolution`, then crop the center.

    Large images are first halved with a box filter while the shorter side is >= 2 * resolution
    (anti-aliasing), then resized with bicubic, as in ADM's center_crop_arr.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def find_images(root: Union[str, Path]) -> Tuple[List[str], List[int], List[str]]:
    """ImageNet layout (one subfolder per class, sorted names = labels 0..K-1, torchvision's
    ImageFolder convention) -> (relative file paths, labels, class names), in a fixed order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {str(root)!r} is not a folder (expected one subfolder per class)")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"--data {str(root)!r} has no class subfolders (ImageNet layout: DATA/<class>/<image>)")
    files, labels = [], []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(root / name):
            dirnames.sort()
            for f in sorted(filenames):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.relpath(os.path.join(dirpath, f), root))
                    labels.append(label)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {str(root)!r}")
    return files, labels, classes


class CenterCropImages(Dataset):
    """(image (3, R, R) float in [-1, 1], label, index, error) for the files of `find_images`.

    error: "" or, for a file that cannot be read as an image, why (the image is then zeros): the caller
    decides whether to skip or stop, and a DataLoader worker never dies on a bad file.
    """

    def __init__(self, root, files: Sequence[str], labels: Sequence[int], resolution: int):
        self.root, self.files, self.labels, self.resolution = Path(root), files, labels, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int):
        try:
            with Image.open(self.root / self.files[index]) as image:
                image = center_crop(image.convert("RGB"), self.resolution)
        except Exception as error:  # PIL raises many kinds on corrupt files
            return torch.zeros(3, self.resolution, self.resolution), self.labels[index], index, \
                f"{type(error).__name__}: {error}"
        x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1  # (3, R, R)
        return x, self.labels[index], index, ""


# ---------------------------------------------------------------------- VAE
def read_captions(root: Union[str, Path], annotations: Optional[Union[str, Path]] = None
                  ) -> Tuple[List[str], List[List[str]]]:
    """Image files (relative to root, sorted) and all captions of each, for text-to-image extraction.

    annotations: an MS-COCO captions file (annotations/captions_train2014.json: "images" with id and
    file_name, "annotations" with image_id and caption); without it, root/captions.jsonl with one
    {"file_name": ..., "caption": ...} ("file" also accepted) per line (several lines per image allowed). Images without a
    caption are skipped; a caption naming a missing image fails before any work.
    """
    import json

    root = Path(root)
    by_file: dict = {}
    if annotations is not None:
        coco = json.loads(Path(annotations).read_text())
        names = {image["id"]: image["file_name"] for image in coco["images"]}
        for ann in coco["annotations"]:
            by_file.setdefault(names[ann["image_id"]], []).append(ann["caption"].strip())
    else:
        listing = root / "captions.jsonl"
        if not listing.is_file():
            raise FileNotFoundError(f"no captions: expected {listing} (one {{\"file_name\", \"caption\"}} per line) "
                                    "or an MS-COCO captions json (--annotations)")
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                name = row.get("file_name", row.get("file"))
                if name is None or "caption" not in row:
                    raise ValueError(f"{listing}:{number}: needs keys file_name (or file) and caption, got {sorted(row)}")
                by_file.setdefault(name, []).append(str(row["caption"]).strip())
    missing = [name for name in by_file if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} captioned images missing under {root}, e.g. {missing[:3]}")
    files = sorted(by_file)
    return files, [by_file[name] for name in files]


def load_vae(id_or_path: Union[str, Path] = DEFAULT_VAE, *, dtype: torch.dtype = torch.float32,
             local_files_only: Optional[bool] = None):
    """AutoencoderKL from a local folder (save_pretrained layout, or a pipeline folder with vae/)
    or a hub id. Offline, a hub id fails with one message that says to pass a local folder."""
    from diffusers import AutoencoderKL

    path = Path(id_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and (path / VAE_DIR / "config.json").exists():
            path = path / VAE_DIR  # a pipeline folder
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"VAE folder {str(path)!r} has no config.json (expected AutoencoderKL.save_pretrained output)")
        vae = AutoencoderKL.from_pretrained(path, torch_dtype=dtype)
    elif str(id_or_path).startswith((".", "/", "~")) or str(id_or_path).count("/") != 1:
        raise FileNotFoundError(f"VAE {str(id_or_path)!r}: no such folder, and not a hub id of the form 'org/name'")
    else:
        if local_files_only is None:
            local_files_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            vae = AutoencoderKL.from_pretrained(str(id_or_path), torch_dtype=dtype, local_files_only=local_files_only)
        except OSError as err:
            raise OSError(
                f"VAE {str(id_or_path)!r} is no local folder and could not be loaded from the Hugging Face hub "
                f"or its cache ({type(err).__name__}). "
                f"Offline, pass a local folder instead: download it once where there is internet "
                f"(`huggingface-cli download {id_or_path} --local-dir VAE_DIR`) and use --vae VAE_DIR."
            ) from None
    return vae.eval().requires_grad_(False)


def downsample_factor(vae) -> int:
    """Pixels per latent cell: 2 ** (number of encoder stages - 1), 8 for the SD VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


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
    from diffusers import AutoencoderKL

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


# ---------------------------------------------------------------------- extraction
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
    for name, value in (("resolution", resolution), ("batch_size", batch_size), ("shard_size", shard_size)):
        if int(value) <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} must lie in 0..{num_processes - 1}")
    files, labels, classes = find_images(data) if images is None else images
    out = Path(out)
    autoencoder = load_vae(vae, dtype=vae_dtype)
    factor = downsample_factor(autoencoder)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the VAE's downsampling factor {factor}")

    num_shards = -(-len(files) // shard_size)
    meta = {
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
        "num_shards": num_shards,
        "num_classes": len(classes),
        "classes": classes,
        "files_sha1": hashlib.sha1("\n".join(files).encode()).hexdigest(),
        "data": str(Path(data).resolve()),
    }
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
        tmp = out / f".{VAE_DIR}.tmp-{os.getpid()}"
        autoencoder.save_pretrained(tmp)
        os.replace(tmp, out / VAE_DIR)
    out.mkdir(parents=True, exist_ok=True)

    mine = shards_for_process(num_shards, process_index, num_processes)
    todo = [s for s in mine if not (out / shard_name(s)).exists()]
    for s in todo:  # half-written leftovers of an interrupted run: never taken, cleaned up
        for stale in out.glob(f".{shard_name(s)}.tmp-*"):
            stale.unlink()
    for s in set(mine) - set(todo):  # a partial file whose shard was completed just before a stop
        _partial_path(out, s).unlink(missing_ok=True)
    if not todo:
        return out

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autoencoder.to(device)
    store = STORAGE_DTYPES[dtype]
    images = CenterCropImages(data, files, labels, resolution)
    bounds = {s: (s * shard_size, min((s + 1) * shard_size, len(files))) for s in todo}
    partial = {s: _read_partial(out, s) for s in todo}  # rows of a shard an aborted run had begun
    begin = {s: int(partial[s][1]["next"]) if partial[s] else bounds[s][0] for s in todo}
    batches = [list(range(i, min(i + batch_size, hi))) for s, (lo, hi) in bounds.items()
               for i in range(begin[s], hi, batch_size)]
    loader = DataLoader(images, batch_sampler=batches, num_workers=num_workers, pin_memory=device.type == "cuda")

    from tqdm.auto import tqdm

    bar = tqdm(total=sum(hi - lo for lo, hi in bounds.values()), initial=sum(begin[s] - bounds[s][0] for s in todo),
               desc=f"encode {len(todo)} shards", unit="img", disable=not progress or process_index != 0)
    state = {"shard": None}
    skipped_here: List[int] = []

    def start(shard):  # the rows of `shard` so far: none, or its partial file's
        state.update(shard=shard, pending={k: [] for k in ("mean", "std", "labels", "index")}, skipped=[])
        if shard is not None and partial[shard]:
            tensors, metadata = partial[shard]
            for k in state["pending"]:
                state["pending"][k].append(tensors[k])
            state["skipped"] = json.loads(metadata.get("skipped", "[]"))

    empty = {"mean": (0, 2 if flip else 1, *meta["latent_shape"]), "labels": (0,), "index": (0,)}

    def tensors() -> dict:  # the rows so far; shapes (N, V, C, h, w) and (N,) even for N = 0
        pending = state["pending"]
        return {k: torch.cat(v) if v else torch.zeros(empty.get(k, empty["mean"]),
                                                       dtype=store if k in ("mean", "std") else torch.int64)
                for k, v in pending.items()}

    def metadata(next_index: int) -> dict:
        rows = sum(len(t) for t in state["pending"]["index"])
        return {"start": str(bounds[state["shard"]][0]), "count": str(rows), "next": str(next_index),
                "process": f"{process_index}/{num_processes}", "skipped": json.dumps(state["skipped"])}

    shard_iter = iter(todo)
    start(next(shard_iter))
    next_index = begin[state["shard"]]
    try:
        for x, y, idx, errors in loader:
            bad = [k for k, e in enumerate(errors) if e]
            if bad and fail_on_corrupt:
                keep = list(range(bad[0]))  # the rows before it are kept; the rerun starts at the bad file
                _encode_into(state["pending"], autoencoder, x[keep], y[keep], idx[keep], flip, device, vae_dtype, store)
                next_index = int(idx[bad[0]])
                raise ValueError(f"unreadable image {Path(data) / files[next_index]}: {errors[bad[0]]} "
                                 "(--fail-on-corrupt; fix or remove the file and rerun: the extraction resumes)")
            if bad:
                state["skipped"] += [int(idx[k]) for k in bad]
                skipped_here += [int(idx[k]) for k in bad]
                good = [k for k in range(len(errors)) if not errors[k]]
                x, y, idx_kept = x[good], y[good], idx[good]
            else:
                idx_kept = idx
            _encode_into(state["pending"], autoencoder, x, y, idx_kept, flip, device, vae_dtype, store)
            next_index = int(idx[-1]) + 1
            bar.update(len(errors))
            if next_index == bounds[state["shard"]][1]:  # the batch sampler never crosses a shard boundary
                _write_shard(out, state["shard"], tensors(), metadata(next_index))
                _partial_path(out, state["shard"]).unlink(missing_ok=True)
                start(next(shard_iter, None))
                if state["shard"] is not None:
                    next_index = begin[state["shard"]]
    except BaseException:  # an error, Ctrl-C: keep the rows of the shard in progress for the rerun
        if state["shard"] is not None and next_index > bounds[state["shard"]][0]:
            _write_shard(out, state["shard"], tensors(), metadata(next_index), path=_partial_path(out, state["shard"]))
        raise
    finally:
        bar.close()
    if skipped_here:
        warnings.warn(f"skipped {len(skipped_here)} unreadable image(s) of {len(files)} in {data}, e.g. "
                      f"{Path(data) / files[skipped_here[0]]} (listed in the shards' metadata; "
                      "--fail-on-corrupt stops at the first)", stacklevel=2)
    return out


def _encode_into(pending: dict, autoencoder, x, y, idx, flip: bool, device, vae_dtype, store):
    """Append the VAE posterior moments of images x (B, 3, R, R) to pending (lists of tensors)."""
    if len(x) == 0:
        return
    x = x.to(device, vae_dtype)  # (B, 3, R, R)
    views = torch.stack([x, x.flip(-1)], 1) if flip else x[:, None]  # (B, V, 3, R, R)
    posterior = autoencoder.encode(views.flatten(0, 1)).latent_dist
    shape = (x.shape[0], views.shape[1], *posterior.mean.shape[1:])  # (B, V, C, h, w)
    pending["mean"].append(posterior.mean.reshape(shape).to("cpu", store))
    pending["std"].append(posterior.std.reshape(shape).to("cpu", store))
    pending["labels"].append(y.long())
    pending["index"].append(idx.long())


def _partial_path(out: Path, shard: int) -> Path:
    return out / f".{shard_name(shard)}.partial"


def _read_partial(out: Path, shard: int):
    """(tensors, metadata) of a shard an aborted run had begun, or None (none, or unreadable: redone)."""
    path = _partial_path(out, shard)
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    except Exception:  # a damaged partial file only costs its rows
        warnings.warn(f"{path} is unreadable; its shard is encoded again", stacklevel=2)
        return None


def _write_shard(out: Path, shard: int, tensors: dict, metadata: dict, path: Optional[Path] = None):
    """Write under a temporary name, then rename: a shard file that exists is complete."""
    from safetensors.torch import save_file

    tmp = out / f".{shard_name(shard)}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path or out / shard_name(shard))


def export_crops(data, out, *, resolution: int = 256, limit: Optional[int] = None, seed: int = 0,
                 num_workers: int = 4, progress: bool = True) -> Path:
    """Center crops of an ImageNet-layout folder as PNGs OUT/000000.png ... (for FID reference
    statistics: `eval_fid.py OUT --save-stats stats.npz`). limit: a random subset of that many
    images (fixed by `seed`). Existing files are kept, so an interrupted export resumes."""
    files, labels, _ = find_images(data)
    if resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution}")
    order = np.arange(len(files))
    if limit is not None:
        if not 0 < limit <= len(files):
            raise ValueError(f"limit must lie in 1..{len(files)} (the images in {str(data)!r}), got {limit}")
        order = np.sort(np.random.default_rng(seed).permutation(len(files))[:limit])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [k for k in range(len(order)) if not (out / f"{k:06d}.png").exists()]
    images = CenterCropImages(data, [files[i] for i in order], [labels[i] for i in order], resolution)
    loader = DataLoader(torch.utils.data.Subset(images, todo), batch_size=64, num_workers=num_workers)
    from tqdm.auto import tqdm

    skipped = []
    for x, _, idx, errors in tqdm(loader, desc="center crops", disable=not progress):
        pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, R, R, 3)
        for k, img, error in zip(idx.tolist(), pixels, errors):  # k: position in `order`, the file's number
            if error:
                skipped.append(files[order[k]])
                continue
            tmp = out / f".{k:06d}.png.tmp"
            Image.fromarray(img).save(tmp, format="PNG")
            os.replace(tmp, out / f"{k:06d}.png")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {data}, e.g. {skipped[0]}", stacklevel=2)
    return out


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
        from safetensors import safe_open

        with safe_open(str(self.path / shard_name(shard)), framework="pt") as f:
            return f.get_slice("labels").get_shape()[0]

    def __len__(self) -> int:
        return self.num_images

    def __getstate__(self):  # open file handles stay in their process
        return {**self.__dict__, "_files": {}}

    def _shard(self, shard: int):
        if shard not in self._files:
            from safetensors import safe_open

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


# ---------------------------------------------------------------------- command line
@command("python -m uvic.latents")
def main(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(prog="python -m uvic.latents", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="encode an ImageNet-layout folder into latent-moment shards")
    ex.add_argument("--data", required=True, help="image folder, one subfolder per class")
    ex.add_argument("--out", required=True, help="output folder (rerun to resume)")
    ex.add_argument("--resolution", type=int, default=256, help="center-crop size in pixels (256 -> 4x32x32 latents)")
    ex.add_argument("--vae", default=DEFAULT_VAE, help="AutoencoderKL hub id or local folder")
    ex.add_argument("--flip", action="store_true", help="also store the moments of the mirrored image")
    ex.add_argument("--batch-size", type=int, default=64, help="images per encoder call, per process")
    ex.add_argument("--shard-size", type=int, default=10_000, help="images per shard (unit of resume)")
    ex.add_argument("--num-workers", type=int, default=4, help="data-loading processes per GPU")
    ex.add_argument("--dtype", default="float16", choices=sorted(STORAGE_DTYPES), help="storage type of the moments")
    ex.add_argument("--vae-dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="encoder precision")
    ex.add_argument("--fail-on-corrupt", action="store_true",
                    help="stop at the first unreadable image (default: skip it, count it, warn once)")
    ex.add_argument("--annotations", help="image-caption data: an MS-COCO captions json (annotations/captions_train2014"
                    ".json); without it, DATA/captions.jsonl makes the data captioned (uvic.caption_latents)")
    ex.add_argument("--text-encoder", default=None, help="captioned data: CLIP text model, a local folder or a cached "
                    "hub name (default openai/clip-vit-large-patch14)")
    cr = sub.add_parser("crops", help="center-cropped PNGs of an image folder (FID reference images)")
    cr.add_argument("--data", required=True, help="image folder, one subfolder per class")
    cr.add_argument("--out", required=True, help="output folder of PNGs (rerun to resume)")
    cr.add_argument("--resolution", type=int, default=256, help="crop size in pixels")
    cr.add_argument("--limit", type=int, help="a random subset of this many images (e.g. 50000)")
    cr.add_argument("--seed", type=int, default=0, help="seed of the --limit subset")
    cr.add_argument("--num-workers", type=int, default=4, help="data-loading processes")
    for p in (ex, cr):
        add_debug_option(p)
    run(parser.parse_args(argv))  # bad input, missing files, VAE not found offline: one message, status 2


def run(args: argparse.Namespace):
    """The command of parsed `python -m uvic.latents` arguments."""
    if args.command == "crops":
        out = export_crops(args.data, args.out, resolution=args.resolution, limit=args.limit, seed=args.seed,
                           num_workers=args.num_workers)
        print(f"{len(list(out.glob('*.png')))} center crops in {out}")
        return

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: several CPU ranks (gloo) under torchrun
    if args.annotations or (Path(args.data) / "captions.jsonl").is_file():  # image-caption data
        from .caption_latents import run_caption_extract

        return run_caption_extract(args, accelerator)
    out = extract_latents(
        args.data, args.out, resolution=args.resolution, vae=args.vae, flip=args.flip,
        batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.num_workers,
        dtype=args.dtype, vae_dtype=getattr(torch, args.vae_dtype), device=accelerator.device,
        process_index=accelerator.process_index, num_processes=accelerator.num_processes,
        fail_on_corrupt=args.fail_on_corrupt,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        dataset = LatentDataset(out)  # checks that every shard is there
        skipped = f" ({dataset.skipped} unreadable images skipped)" if dataset.skipped else ""
        print(f"{len(dataset)} latents {dataset.latent_shape} of {dataset.num_classes} classes in {out}{skipped}")


if __name__ == "__main__":
    main()
