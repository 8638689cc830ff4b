"""The two sides of a metric: samples and reference, from any form users give, as a MetricInput.

    a torch-fidelity registered input     "cifar10-train", "cifar10-val", ..., and "digits"
    a folder of images                    any of uvic.files.IMAGE_EXTENSIONS, all of one size
    an .npz of images                     arr_0 (N, H, W, C) uint8, C = 1 or 3 (ADM / DiT layout)
    a statistics file                     .npz with mu (D,) and sigma (D, D): FID only
    a torch Dataset of uint8 (3, H, W) tensors or a uint8 NHWC array (from Python)

An .npz with both arr_0 and mu/sigma (the ADM reference batches) gives its statistics to FID and its images to KID
and precision/recall. A sample set's manifest (uvic.sample_sets) comes with its images. Which extractor the inputs
call for, and whether their sizes may be compared, is decided here too (choose_extractor, check_resolution).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from . import digits_classifier
from .feature_extractors import EXTRACTOR_ALIASES, INCEPTION, RESOLUTION_FREE, fidelity
from .fid import FIDStatistics
from .files import IMAGE_EXTENSIONS
from .sample_sets import read_set_manifest


PARALLEL_DECODE_MIN = 1000  # image files from which DataLoader workers pay for their start-up


class ArrayImages(Dataset):
    """uint8 (N, H, W, C) array (C = 1 or 3; or an NpzMember) -> uint8 (3, H, W) tensors."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> torch.Tensor:
        x = torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)  # (C, H, W); a copy: NpzMember rows are read-only
        return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


@dataclass
class MetricInput:
    """One side of a comparison: images (a Dataset of uint8 (3, H, W)) and/or FID statistics."""

    source: str  # what the user named, for messages and reports
    images: Optional[Dataset] = None
    stats: Optional[FIDStatistics] = None
    cache_name: Optional[str] = None  # torch-fidelity cache entry (reference inputs only)
    image_size: Optional[tuple] = None  # (H, W)
    manifest: dict = field(default_factory=dict)  # sampling metadata (uvic.sampling's manifest.json)
    parallel_decode: bool = False  # many PNG/JPEG files: let torch-fidelity decode them in DataLoader workers

    @property
    def num_images(self) -> Optional[int]:
        return None if self.images is None else len(self.images)

    @property
    def count(self) -> Optional[int]:
        if self.images is not None:
            return len(self.images)
        return self.stats.num_samples if self.stats is not None else None


class NpzMember:
    """An uncompressed (np.savez) .npy member of an .npz, read one row at a time through zipfile's stream:
    50K ImageNet samples need not fit in memory. Array-like: shape, dtype, ndim, len, [i], np.asarray."""

    def __init__(self, path, key: str = "arr_0"):
        self.path, self.key = str(path), key
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            self.shape, self.fortran, self.dtype = read_header(f)
            self.offset = f.tell()  # of the data, in the member
        if self.dtype.hasobject:
            raise ValueError(f"{path}: {key} holds Python objects, not images")
        self.ndim = len(self.shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._stream = None  # opened on first read, per process (see __getstate__)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        if self._stream is None:
            self._zip = zipfile.ZipFile(self.path)
            self._stream = self._zip.open(f"{self.key}.npy")
        self._stream.seek(self.offset + int(i) * self.row_bytes)  # in order (as a DataLoader reads): no skip
        return np.frombuffer(self._stream.read(self.row_bytes), self.dtype).reshape(self.shape[1:])

    def __array__(self, dtype=None, copy=None):
        with np.load(self.path, allow_pickle=False) as f:
            return f[self.key] if dtype is None else f[self.key].astype(dtype)

    def __getstate__(self):  # DataLoader workers open their own stream
        return {k: v for k, v in self.__dict__.items() if k not in ("_zip", "_stream")} | {"_stream": None}


def npz_array(path, key: str = "arr_0"):
    """Member `key` of an .npz: read row by row when stored uncompressed (np.savez, NpzMember), whole when
    compressed or in Fortran order."""
    with zipfile.ZipFile(path) as zf:
        stored = zf.getinfo(f"{key}.npy").compress_type == zipfile.ZIP_STORED
    member = NpzMember(path, key) if stored else None
    if member is None or member.fortran:
        with np.load(path, allow_pickle=False) as f:
            return f[key]
    return member


def check_image_array(array: np.ndarray, source: str) -> np.ndarray:
    """Images must be uint8 (N, H, W, C) with C = 1 or 3."""
    if array.ndim != 4:
        raise ValueError(f"{source}: images must be (N, H, W, C) uint8, got shape {tuple(array.shape)}")
    if array.shape[-1] not in (1, 3):
        hint = " (this looks like NCHW; transpose to NHWC)" if array.shape[1] in (1, 3) else ""
        raise ValueError(f"{source}: images must be (N, H, W, C) with C = 1 or 3, got shape {tuple(array.shape)}{hint}")
    if array.dtype != np.uint8:
        raise ValueError(
            f"{source}: images must be uint8 in 0..255, got {array.dtype} "
            "(from floats in [0, 1]: (x * 255).round().clip(0, 255).astype(np.uint8))"
        )
    return array


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _folder_input(folder: Path, cache_name: Optional[str]) -> MetricInput:
    """Images in the folder; else its one .npz (a sample.py set: samples.npz); else images in subfolders."""
    ImagesPathDataset = fidelity("datasets", "ImagesPathDataset")

    files = sorted(p for p in folder.iterdir() if _is_image(p))
    npz = sorted(folder.glob("*.npz"))
    if not files and len(npz) == 1:
        return _npz_input(npz[0], cache_name)
    files = files or sorted(p for p in folder.rglob("*") if _is_image(p))
    if not files:
        raise FileNotFoundError(
            f"{folder} holds no {'/'.join(e[1:].upper() for e in IMAGE_EXTENSIONS)} images "
            f"(nor a single .npz of samples); expected a folder of images of one size"
        )
    sizes: Dict[tuple, Path] = {}
    for p in files:  # PIL reads only the header here
        with Image.open(p) as im:
            sizes.setdefault(im.size, p)
        if len(sizes) > 1:
            (s1, p1), (s2, p2) = sizes.items()
            raise ValueError(
                f"{folder}: images of different sizes ({p1.name} is {s1[0]}x{s1[1]}, {p2.name} is {s2[0]}x{s2[1]}); "
                "resize them to one size first"
            )
    (w, h), = sizes
    files = [str(p) for p in files]
    return MetricInput(str(folder), images=ImagesPathDataset(files), cache_name=cache_name, image_size=(h, w),
                       manifest=read_set_manifest(folder), parallel_decode=len(files) >= PARALLEL_DECODE_MIN)


def _npz_input(path: Path, cache_name: Optional[str]) -> MetricInput:
    try:
        with zipfile.ZipFile(path) as zf:
            keys = {Path(n).stem for n in zf.namelist()}
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not a valid .npz file") from None
    stats = FIDStatistics.load(path) if {"mu", "sigma"} <= keys else None
    images = None
    image_size = None
    if "arr_0" in keys:
        array = check_image_array(npz_array(path), str(path))
        images, image_size = ArrayImages(array), tuple(array.shape[1:3])
    if stats is None and images is None:
        raise ValueError(f"{path} has neither images (arr_0) nor statistics (mu, sigma); it has {sorted(keys)}")
    return MetricInput(str(path), images=images, stats=stats, cache_name=cache_name, image_size=image_size,
                       manifest=read_set_manifest(path))


def _registered_input(name: str, data_root=None, download: bool = True) -> MetricInput:
    DATASETS_REGISTRY = fidelity("registry", "DATASETS_REGISTRY")
    root = Path(data_root).expanduser() if data_root else Path(torch.hub.get_dir()).parent / "fidelity_datasets"
    download = download and data_root is None  # --data-root: the files are there, never download
    try:
        dataset = DATASETS_REGISTRY[name](str(root), download)
    except Exception as err:
        raise FileNotFoundError(
            f"reference {name!r} could not be loaded from {root} ({type(err).__name__}: {err}). Put the "
            f"torchvision files there (CIFAR-10: cifar-10-python.tar.gz extracted as {root / 'cifar-10-batches-py'}) "
            "and pass --data-root PATH"
        ) from None
    first = dataset[0]
    return MetricInput(name, images=dataset, cache_name=name, image_size=tuple(first.shape[-2:]))


def _path_cache_name(path: Path) -> str:
    """Cache entry of a reference file / folder: its name plus a digest of where it is and when it changed."""
    st = path.stat()
    digest = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return f"{path.stem}-{digest}"


def load_input(source, *, data_root=None, download: bool = True, cache: bool = False) -> MetricInput:
    """A MetricInput from any accepted form (see the module docstring). `cache`: give it a torch-fidelity
    cache entry (reference inputs: their features are computed once)."""
    DATASETS_REGISTRY = fidelity("registry", "DATASETS_REGISTRY")
    digits_classifier.register()
    if isinstance(source, MetricInput):
        return source
    if isinstance(source, FIDStatistics):
        return MetricInput("statistics", stats=source.validate("the statistics given"))  # files: validated on load
    if isinstance(source, np.ndarray):
        array = check_image_array(source, "array")
        return MetricInput(f"array {tuple(array.shape)}", images=ArrayImages(array), image_size=array.shape[1:3])
    if isinstance(source, Dataset):
        return MetricInput(type(source).__name__, images=source, image_size=tuple(source[0].shape[-2:]))
    if isinstance(source, str) and source in DATASETS_REGISTRY:
        return _registered_input(source, data_root, download)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{source} does not exist; expected a registered input ({', '.join(DATASETS_REGISTRY)}), a folder of "
            "images, an .npz of images (arr_0 NHWC uint8) or an .npz of statistics (mu, sigma)"
        )
    cache_name = _path_cache_name(path) if cache else None
    if path.is_dir():
        return _folder_input(path, cache_name)
    if path.suffix == ".npz":
        return _npz_input(path, cache_name)
    raise ValueError(f"{path}: expected a folder of images or an .npz file")


def check_reference(ref, key: str = "--ref") -> None:
    """Fail now, naming `key`, unless `ref` is a usable FID reference: a registered input, a folder with images
    (or an .npz), an .npz of images (arr_0 NHWC uint8: its header is read) or of statistics (read, validated)."""
    digits_classifier.register()
    if str(ref) in fidelity("registry", "DATASETS_REGISTRY"):
        return
    path = Path(str(ref)).expanduser()
    try:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir():
            if not any(_is_image(p) or p.suffix == ".npz" for p in path.rglob("*")):
                raise ValueError(f"{path} holds no images and no .npz")
            return
        if path.suffix != ".npz":
            raise ValueError(f"{path} is neither a folder of images nor an .npz")
        with zipfile.ZipFile(path) as zf:
            keys = {Path(n).stem for n in zf.namelist()}
        if {"mu", "sigma"} <= keys:
            FIDStatistics.load(path)
        elif "arr_0" in keys:
            check_image_array(NpzMember(path), str(path))
        else:
            raise ValueError(f"{path} has neither images (arr_0) nor statistics (mu, sigma); it has {sorted(keys)}")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        kind = FileNotFoundError if isinstance(err, FileNotFoundError) else ValueError
        raise kind(f"{key}={ref} is not a usable FID reference: {err} (expected a registered input such as "
                   f"cifar10-train or digits, a folder of images, an .npz of images or of statistics)") from None


def choose_extractor(name: Optional[str], *inputs: MetricInput) -> Optional[str]:
    """The extractor to use: `name`, else the digits CNN for the "digits" input, else that of tagged
    statistics, else Inception."""
    if name:
        return name
    if any(i.source in digits_classifier.SPLITS.values() for i in inputs):
        return digits_classifier.EXTRACTOR_NAME
    tags = {i.stats.extractor for i in inputs if i.stats is not None and i.stats.tagged}
    if len(tags) == 1:
        return tags.pop()
    return INCEPTION


def check_resolution(samples: MetricInput, ref: MetricInput, extractor: str, allow_resize: bool) -> None:
    """Samples and reference images of one size: the extractor would resize them silently, and a score across
    resolutions measures the resize too. Resolution-free extractors (the digits CNN) and allow_resize pass."""
    a, b = samples.image_size, ref.image_size
    extractor = EXTRACTOR_ALIASES.get(extractor, extractor)
    if a is None or b is None or tuple(a) == tuple(b) or allow_resize or extractor in RESOLUTION_FREE:
        return
    raise ValueError(
        f"samples {samples.source} are {a[1]}x{a[0]} px but reference {ref.source} is {b[1]}x{b[0]} px: the "
        f"feature extractor would resize both silently, so the score would measure the resize too. Sample at "
        f"{b[1]}x{b[0]}, or pass --allow-resize (Python: allow_resize=True) to score them anyway."
    )
