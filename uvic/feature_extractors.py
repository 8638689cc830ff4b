"""torch-fidelity's feature extractors for uvic's metrics: the FID Inception-v3 (its weights file found, downloaded
or refused), the digits CNN (uvic.digits_classifier), any other registered name; the torch-fidelity names outside its
public API, reached in one place (`fidelity`).

Statistics files carry the extractor, its feature layer and its weights (sha256 prefix); `Extractor.check` refuses
a file made with other features and takes untagged files (pytorch-fid's, U-ViT's, ADM's) as Inception pool
features, with a note.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from . import digits_classifier
from .cli import UserError
from .fid import FIDStatistics


logger = logging.getLogger(__name__)


INCEPTION = "inception-v3-compat"
# torch-fidelity's URL_INCEPTION_V3 (not public API, so written out here): the TF FID Inception weights
INCEPTION_WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                         "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_WEIGHTS_FILE = INCEPTION_WEIGHTS_URL.rsplit("/", 1)[1]
EXTRACTOR_ALIASES = {"inception": INCEPTION, "digits": digits_classifier.EXTRACTOR_NAME}
RESOLUTION_FREE = (digits_classifier.EXTRACTOR_NAME,)  # built to score any size (8x8 digits, 16 px samples)


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
    weights_path: Optional[str]  # None: the extractor finds its own (torch-fidelity downloads; the digits CNN ships)
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
        _, meta = digits_classifier.load_digits_cnn()  # the shipped weights, pinned by sha256
        return Extractor(name, meta["path"], meta["sha256"][:8])
    return Extractor(name, None, name)  # other torch-fidelity extractors: their own download logic
