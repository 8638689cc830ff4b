"""FID, IS, KID and precision/recall through torch-fidelity: inputs, feature extractors and the metrics.
The Fréchet distance and statistics files are uvic.fid.

The FID convention is torch-fidelity's: its "inception-v3-compat" network reproduces the TensorFlow
Inception graph of the original FID code (TTUR) and of the ADM evaluator, image resize included;
FID uses its 2048-d pool features, IS its logits, and KID and precision/recall (k = 3 neighbours,
as in the ADM evaluator) the same 2048-d features, so one network serves every metric. Offline, the
digits demo is scored in the 64-d feature space of a small digits classifier instead
(uvic.digits_classifier, registered with torch-fidelity as "uvic-digits-cnn").

Inputs (samples or reference) may be
    a torch-fidelity registered input     "cifar10-train", "cifar10-val", ..., and "digits"
    a folder of images                    any of uvic.data.IMAGE_EXTENSIONS, all of one size
    an .npz of images                     arr_0 (N, H, W, C) uint8, C = 1 or 3 (ADM / DiT layout)
    a statistics file                     .npz with mu (D,) and sigma (D, D): FID only
    a torch Dataset of uint8 (3, H, W) tensors or a uint8 NHWC array (from Python)
An .npz with both arr_0 and mu/sigma (the ADM reference batches) gives its statistics to FID and its
images to KID and precision/recall.

Statistics files written here carry the extractor, its feature layer and its weights (sha256
prefix); a file made with other features is refused. Files without these tags (pytorch-fid's,
U-ViT's, ADM's) are taken as Inception pool features, with a note.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import tempfile
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from . import digits_classifier
from .cli import UserError
from .files import IMAGE_EXTENSIONS
from .feature_cache import FeatureCache
from .fid import FIDStatistics, bootstrap_fid, frechet_distance, kid_with_se
from .sampling import generate_samples

logger = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
# torch-fidelity's URL_INCEPTION_V3 (not public API, so written out here): the TF FID Inception weights
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
EXTRACTOR_ALIASES = {"inception": INCEPTION, "digits": digits_classifier.EXTRACTOR_NAME}
KID_SUBSET_SIZE = 1000  # torch-fidelity's default
PRC_NEIGHBORHOOD = 3
ISC_SPLITS = 10
RESOLUTION_FREE = (digits_classifier.EXTRACTOR_NAME,)  # built to score any size (8x8 digits, 16 px samples)
PARALLEL_DECODE_MIN = 1000  # image files from which DataLoader workers pay for their start-up


TORCH_FIDELITY_SUPPORTED = "torch-fidelity >= 0.3, < 0.5 (tested with 0.4.0)"


# ---------------------------------------------------------------------- torch-fidelity internals
def fidelity(module: str, name: str):
    """torch_fidelity.<module>.<name>: a name outside torch-fidelity's public API (its registries, feature
    extraction over a Dataset, the IS / KID / precision-recall of features). A version without it fails here
    with one message naming the supported range, not with an AttributeError deep in a metric."""
    try:
        return getattr(importlib.import_module(f"torch_fidelity.{module}"), name)
    except (ImportError, AttributeError):
        try:
            from torch_fidelity import __version__ as version
        except ImportError:
            version = "(not importable)"
        raise UserError(
            f"torch-fidelity {version} has no torch_fidelity.{module}.{name}, which uvic's metrics use; uvic "
            f"supports {TORCH_FIDELITY_SUPPORTED}: pip install 'torch-fidelity>=0.3,<0.5'"
        ) from None


# ---------------------------------------------------------------------- feature extractors
@dataclass(frozen=True)
class Extractor:
    """A torch-fidelity feature extractor with its weights file; `tag` identifies the weights."""

    name: str
    weights_path: Optional[str]  # None: the extractor finds its own (the digits CNN trains on first use)
    tag: str

    def layer(self, metric: str) -> str:
        return fidelity("registry", "FEATURE_EXTRACTORS_REGISTRY")[self.name].get_default_feature_layer_for_metric(metric)

    def check(self, stats: FIDStatistics, source: str) -> None:
        """Refuse statistics of other features; accept untagged Inception-sized ones with a note."""
        layer = self.layer("fid")
        if stats.tagged:
            if (stats.extractor, stats.layer, stats.weights) != (self.name, layer, self.tag):
                raise ValueError(
                    f"{source} holds statistics of {stats.describe()}, but these features are {self.name} "
                    f"layer {layer} (weights {self.tag}): FIDs of two feature spaces do not compare. "
                    f"Recompute the statistics with --save-stats, or choose the matching --feature-extractor."
                )
            return
        if self.name != INCEPTION or layer != "2048" or stats.mu.shape[0] != 2048:
            raise ValueError(
                f"{source} holds untagged {stats.mu.shape[0]}-d statistics; untagged files are taken as "
                f"Inception pool features (2048-d), but these features are {self.name} layer {layer}"
            )
        logger.warning(
            "%s carries no extractor tag: taken as Inception-v3 pool features (2048-d). TensorFlow-made "
            "statistics (TTUR, the ADM reference batches) follow torch-fidelity's convention; pytorch-fid's "
            "(e.g. U-ViT's fid_stats_*.npz) resize and scale images differently, so FIDs against them "
            "differ slightly from FIDs against statistics written by --save-stats.",
            source,
        )


def _file_tag(path) -> str:
    p = Path(path)
    st = p.stat()
    return _sha256_prefix(str(p.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _sha256_prefix(path: str, size: int, mtime_ns: int) -> str:  # size, mtime: re-hash when the file changes
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()[:8]


def inception_weights(path=None, download: bool = True) -> Path:
    """The FID Inception weights file: `path`, else torch.hub's cached copy, else downloaded there.

    Missing and not downloadable: FileNotFoundError saying which file to put where.
    """
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--inception-weights {path} does not exist")
        return path
    if hub_file.is_file():
        return hub_file
    if download:
        try:
            hub_file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_WEIGHTS_URL, str(hub_file), progress=False)
            return hub_file
        except Exception as err:  # offline, proxy, disk: all end in the same advice
            reason = f" (download failed: {type(err).__name__}: {err})"
    else:
        reason = " (downloads are off)"
    raise FileNotFoundError(
        f"the FID Inception weights are missing{reason}. Put {INCEPTION_WEIGHTS_FILE} ({INCEPTION_WEIGHTS_URL}) "
        f"at {hub_file}, or pass its path with --inception-weights PATH (Python: inception_weights=PATH). "
        "Offline digits demo: --ref digits scores with a small digits classifier instead."
    )


def _safe_state_dict_check(path: Path) -> None:
    """torch-fidelity unpickles the weights file with weights_only=False; refuse anything but tensors first."""
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a plain state dict of tensors ({type(err).__name__}: {err})") from None


def make_extractor(name: Optional[str] = None, *, inception_weights_path=None, download: bool = True) -> Extractor:
    """An Extractor by name ("inception", "digits" or any registered torch-fidelity name; default inception)."""
    FEATURE_EXTRACTORS_REGISTRY = fidelity("registry", "FEATURE_EXTRACTORS_REGISTRY")
    digits_classifier.register()
    name = EXTRACTOR_ALIASES.get(name or "inception", name)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        valid = ", ".join([*EXTRACTOR_ALIASES, *FEATURE_EXTRACTORS_REGISTRY])
        raise ValueError(f"feature extractor {name!r} is not known; valid: {valid}")
    if name == INCEPTION:
        path = inception_weights(inception_weights_path, download=download)
        _safe_state_dict_check(path)
        return Extractor(name, str(path), _file_tag(path))
    if name == digits_classifier.EXTRACTOR_NAME:
        _, meta = digits_classifier.load_digits_cnn()  # trains on first use
        return Extractor(name, meta["path"], meta["sha256"][:8])
    return Extractor(name, None, name)  # other torch-fidelity extractors: their own download logic


# ---------------------------------------------------------------------- inputs
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


def read_manifest(path: Path) -> dict:
    """Sampling metadata: manifest.json beside an .npz / inside a folder (or one level up, for png/)."""
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "manifest.json", folder.parent / "manifest.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except ValueError:
                logger.warning("%s is not valid JSON; sampling metadata ignored", candidate)
                return {}
    return {}


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _folder_input(folder: Path, cache_name: Optional[str]) -> MetricInput:
    """Images in the folder; else its one .npz (a sample.py set: samples.npz); else images in subfolders."""
    from PIL import Image

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
                       manifest=read_manifest(folder), parallel_decode=len(files) >= PARALLEL_DECODE_MIN)


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
                       manifest=read_manifest(path))


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


# ---------------------------------------------------------------------- features and metrics
def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class _Fidelity:
    """torch-fidelity keyword arguments for one extractor on one device, and the calls that use them.

    torch-fidelity never caches here (its cache unpickles .pt files): reference features and statistics go
    through uvic.feature_cache, under cache_root (None: $UVIC_CACHE_DIR/fidelity_cache; False: off)."""

    def __init__(self, extractor: Extractor, layers: Sequence[str], *, batch_size: int, device, cache_root,
                 verbose: bool, **metric_kwargs):
        create_feature_extractor = fidelity("utils", "create_feature_extractor")
        self.device = _device(device)
        self.extractor = extractor
        self.kwargs = dict(
            batch_size=batch_size,
            cuda=self.device.type == "cuda",
            verbose=verbose,
            feature_extractor=extractor.name,
            feature_extractor_weights_path=extractor.weights_path,
            cache=False,
            **metric_kwargs,
        )
        if cache_root is None:
            cache_root = digits_classifier.cache_dir() / "fidelity_cache"
        self.cache = FeatureCache(None if cache_root is False else cache_root)
        with self._on_device():
            try:
                self.fe = create_feature_extractor(extractor.name, list(layers), **self.kwargs)
            except RuntimeError as err:  # load_state_dict: missing keys, wrong shapes
                raise ValueError(f"{extractor.weights_path} does not hold {extractor.name} weights: {err}") from None

    def _on_device(self):
        """torch-fidelity moves to the current CUDA device: make it ours (cuda:1 ...)."""
        if self.device.type == "cuda" and self.device.index is not None:
            return torch.cuda.device(self.device.index)
        return contextlib.nullcontext()

    def _entry(self, inp: MetricInput) -> Optional[str]:
        # cache entries name the extractor and its weights too: features of other weights never mix
        return None if inp.cache_name is None else f"{inp.cache_name}-w{self.extractor.tag}-{self.extractor.name}"

    def features(self, inp: MetricInput) -> Dict[str, torch.Tensor]:
        """{layer: (N, D) features} of the input's images (reference inputs: cached)."""
        entry, layers = self._entry(inp), list(self.fe.get_requested_features_list())
        found = self.cache.features(entry, layers, len(inp.images)) if entry else None
        if found is not None:
            return found
        extract = fidelity("utils", "get_featuresdict_from_dataset")
        with self._on_device():
            out = extract(inp.images, self.fe, self.kwargs["batch_size"], self.kwargs["cuda"],
                          not inp.parallel_decode, self.kwargs["verbose"])
        if entry:
            self.cache.save_features(entry, out)
        return out

    def statistics(self, inp: MetricInput, features: Optional[dict] = None) -> FIDStatistics:
        """FID statistics of images: from `features` if given, else from the cache or the images' features."""
        layer, entry = self.extractor.layer("fid"), self._entry(inp)
        tags = dict(extractor=self.extractor.name, layer=layer, weights=self.extractor.tag)
        found = self.cache.statistics(entry, layer, tags, len(inp.images)) if entry else None
        if found is not None:
            return found
        features = self.features(inp) if features is None else features
        stats = FIDStatistics.from_features(features[layer].numpy(), **tags)
        if entry:
            self.cache.save_statistics(entry, layer, stats)
        return stats


def _check_counts(samples: MetricInput, ref: MetricInput, *, fid, kid, isc, prc, kid_subset_size) -> None:
    """Enough images on each side for each metric, before any feature is computed."""
    n = samples.num_images
    need_images = {"IS": isc, "KID": kid, "precision/recall": prc}
    for metric, wanted in need_images.items():
        if wanted and n is None:
            raise ValueError(f"{metric} needs sample images; {samples.source} holds only statistics")
        if wanted and metric != "IS" and ref.num_images is None:
            raise ValueError(f"{metric} needs reference images; {ref.source} holds only mu/sigma statistics")
    if fid:
        for side in (samples, ref):
            if side.stats is None and side.num_images is not None and side.num_images < 2:
                raise ValueError(f"FID needs at least 2 images; {side.source} has {side.num_images}")
    if kid:
        for side in (samples, ref):
            if side.num_images < kid_subset_size:
                raise ValueError(
                    f"KID draws subsets of {kid_subset_size} images, but {side.source} has {side.num_images}; "
                    f"use more samples or a smaller --kid-subset-size (at most {min(n, ref.num_images)})"
                )
    if prc:
        for side in (samples, ref):
            if side.num_images <= PRC_NEIGHBORHOOD:
                raise ValueError(
                    f"precision/recall needs more than {PRC_NEIGHBORHOOD} images; {side.source} has {side.num_images}"
                )
    if isc and n < ISC_SPLITS:
        raise ValueError(f"IS averages {ISC_SPLITS} splits: it needs at least {ISC_SPLITS} samples, got {n}")


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


def compute_metrics(
    samples,
    ref,
    *,
    fid: bool = True,
    kid: bool = False,
    isc: bool = False,
    prc: bool = False,
    batch_size: int = 64,
    device=None,
    inception_weights=None,
    data_root=None,
    feature_extractor: Optional[str] = None,
    kid_subset_size: int = KID_SUBSET_SIZE,
    download: bool = True,
    cache_root=None,
    verbose: bool = False,
    allow_resize: bool = False,
    bootstrap: int = 0,
    bootstrap_seed: int = 0,
) -> dict:
    """FID (and IS, KID, precision/recall) of `samples` against `ref` (see the module docstring for the
    accepted forms). The extractor is `feature_extractor` ("inception", "digits", a torch-fidelity name),
    else chosen from the inputs (choose_extractor). cache_root: torch-fidelity's feature / statistics cache
    of the reference (default $UVIC_CACHE_DIR/fidelity_cache; False: off). Samples and reference of different
    sizes are refused unless allow_resize (see check_resolution). bootstrap > 0: also a basic bootstrap
    interval of the FID over the samples and the reference images ("fid_low", "fid_high"; that many resamples,
    seeded by bootstrap_seed; "bootstrap_ref" False when the reference is a statistics file, samples only).

    Returns {"fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "kid", "kid_se", "precision", "recall",
    "f_score"} (the metrics asked for) plus "extractor", "num_samples", "num_ref". kid_mean ± kid_std:
    torch-fidelity's mean and spread over subsets; kid ± kid_se: all samples against all reference images
    (each capped at 5,000) with a jackknife standard error (uvic.fid.kid_with_se).
    """
    if not (fid or kid or isc or prc):
        raise ValueError("no metric asked for: set at least one of fid, kid, isc, prc")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    samples_in = load_input(samples, data_root=data_root, download=download)
    ref_in = load_input(ref, data_root=data_root, download=download, cache=True)
    _check_counts(samples_in, ref_in, fid=fid, kid=kid, isc=isc, prc=prc, kid_subset_size=kid_subset_size)
    extractor_name = choose_extractor(feature_extractor, samples_in, ref_in)
    check_resolution(samples_in, ref_in, extractor_name, allow_resize)
    bootstrap = bootstrap if fid and samples_in.images is not None else 0  # resamples images, not statistics
    extractor = make_extractor(extractor_name, inception_weights_path=inception_weights, download=download)
    if fid:  # statistics files against these features, before any image is seen
        if samples_in.images is None:
            extractor.check(samples_in.stats, samples_in.source)
        if ref_in.stats is not None:
            extractor.check(ref_in.stats, ref_in.source)

    layers = {extractor.layer(m) for m, on in (("fid", fid), ("kid", kid), ("isc", isc), ("prc", prc)) if on}
    tf = _Fidelity(extractor, sorted(layers), batch_size=batch_size, device=device, cache_root=cache_root,
                   verbose=verbose, kid_subset_size=kid_subset_size, prc_neighborhood=PRC_NEIGHBORHOOD,
                   isc_splits=ISC_SPLITS)
    need_features = kid or isc or prc or bootstrap
    feats_s = tf.features(samples_in) if samples_in.images is not None and need_features else None
    # the bootstrap resamples the reference too when its images are at hand (a statistics file: samples only)
    feats_r = tf.features(ref_in) if (kid or prc or (bootstrap and ref_in.images is not None)) else None

    out: dict = {}
    if fid:
        stats_s = samples_in.stats if samples_in.images is None else tf.statistics(samples_in, feats_s)
        stats_r = ref_in.stats if ref_in.stats is not None else tf.statistics(ref_in, feats_r)
        out["fid"] = frechet_distance(stats_s.mu, stats_s.sigma, stats_r.mu, stats_r.sigma)
        if bootstrap:
            layer = extractor.layer("fid")
            iv = bootstrap_fid(feats_s[layer].numpy(), stats_r, resamples=bootstrap, seed=bootstrap_seed,
                               ref_features=None if feats_r is None else feats_r[layer].numpy())
            out.update(fid_low=iv.low, fid_high=iv.high, bootstrap_ref=feats_r is not None)
    if isc:
        r = fidelity("metric_isc", "isc_featuresdict_to_metric")(feats_s, extractor.layer("isc"), **tf.kwargs)
        out.update(isc_mean=r["inception_score_mean"], isc_std=r["inception_score_std"])
    if kid:
        r = fidelity("metric_kid", "kid_featuresdict_to_metric")(feats_s, feats_r, extractor.layer("kid"), **tf.kwargs)
        out.update(kid_mean=r["kernel_inception_distance_mean"], kid_std=r["kernel_inception_distance_std"])
        layer = extractor.layer("kid")
        out["kid"], out["kid_se"] = kid_with_se(feats_s[layer].numpy(), feats_r[layer].numpy())
    if prc:
        # save_cpu_ram: distances in blocks, never the full (N, N) matrices (10 GB for 50K vs 50K)
        out.update(fidelity("metric_prc", "prc_featuresdict_to_metric")(feats_s, feats_r, extractor.layer("prc"),
                                              **{**tf.kwargs, "save_cpu_ram": True}))
    out.update(extractor=extractor.name, num_samples=samples_in.count, num_ref=ref_in.count)
    return out


def compute_statistics(
    source,
    *,
    feature_extractor: Optional[str] = None,
    batch_size: int = 64,
    device=None,
    inception_weights=None,
    data_root=None,
    download: bool = True,
    cache_root=None,
    verbose: bool = False,
) -> FIDStatistics:
    """Tagged FID statistics of any image input (for --save-stats); statistics files pass through."""
    inp = load_input(source, data_root=data_root, download=download, cache=True)
    extractor = make_extractor(choose_extractor(feature_extractor, inp), inception_weights_path=inception_weights,
                               download=download)
    if inp.images is None:
        extractor.check(inp.stats, inp.source)
        return inp.stats
    if inp.num_images < 2:
        raise ValueError(f"statistics need at least 2 images; {inp.source} has {inp.num_images}")
    tf = _Fidelity(extractor, [extractor.layer("fid")], batch_size=batch_size, device=device,
                   cache_root=cache_root, verbose=verbose)
    return tf.statistics(inp)


def pipeline_fid(
    pipeline,
    *,
    num_samples: int,
    ref,
    steps: int = 50,
    scheduler=None,
    guidance: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
) -> float:
    """FID of `num_samples` samples of a UViCPipeline against `ref` (used for FID during training).

    Samples are drawn by uvic.sampling.generate_samples into a temporary folder (class labels, per-sample
    seeds and the sampler exactly as for a sample set); the reference's features are cached.
    """
    ref_in = load_input(ref)  # a bad reference, or one of another size, fails before any sampling
    size = MetricInput("the pipeline's samples", image_size=tuple(pipeline.image_shape[1:]))
    check_resolution(size, ref_in, choose_extractor(None, ref_in), allow_resize=False)
    with tempfile.TemporaryDirectory(prefix="uvic-fid-") as tmp:
        npz = generate_samples(pipeline, tmp, num_samples=num_samples, batch_size=batch_size, seed=seed,
                               scheduler=scheduler, steps=steps, guidance=guidance, progress=False)
        return compute_metrics(str(npz), ref, fid=True, batch_size=batch_size, device=device)["fid"]
