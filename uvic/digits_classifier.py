"""A small digits classifier whose feature space gives the offline digits demo a Fréchet distance.

The FID Inception weights are a download; sklearn's 8x8 digits are not. So the digits demo is
scored in the feature space of a small CNN trained on a fixed split of those 1,797 digits (a few
seconds on a CPU). Its weights ship with uvic (uvic/assets/digits_cnn_v3.safetensors, pinned by
WEIGHTS_SHA256; a mismatch is refused): the training is seeded but not bit-reproducible (oneDNN's
convolution kernels differ between machines and even between two calls in one process), and
scores are only comparable under one set of weights. `python -m uvic.digits_classifier OUT`
retrains with the recipe below, for whoever bumps the version. It plugs into
torch-fidelity as the registered feature extractor "uvic-digits-cnn", which takes uint8 images at
any resolution (averaged to grey and resized to 16x16 inside, bilinear with antialiasing: the way
uvic.data upsamples the digits for the demo, so 16x16 training data and the 8x8 originals give
the same features), and "digits" is registered as a torch-fidelity input: the whole dataset as
uint8 RGB 8x8 images; "digits-train" and "digits-heldout" are the two sides of the fixed split
(SPLITS). Features are divided by a fixed scale (their RMS over the training digits), so distances
read alike whatever the network's raw activation scale.

The held-out split (360 digits, stratified) is the reference a reviewer accepts: the classifier never
trained on it, and diffusion runs with data.split=train never see it, so a model that copies its
training digits is not rewarded. The feature layer is the penultimate linear layer *before* its ReLU:
after it, 37 of 64 units were zero on every digit (v2); before it every unit varies (feature_dimensions
reports the live count and the participation-ratio dimension).

The distance it gives is a Fréchet distance in a 64-d digits feature space: comparable between
models scored the same way, not with Inception FIDs. benchmarks/digits_sanity.py measures what its
values mean (real vs real floor; classes dropped, shifts, blur, noise): docs/results/digits_sanity.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset

from .files import atomic_save_file, file_sha256

EXTRACTOR_NAME = "uvic-digits-cnn"
DATASET_NAME = "digits"
SPLITS = {"all": "digits", "train": "digits-train", "heldout": "digits-heldout"}  # data.split -> registered input
FEATURES = "features"  # (B, 64) penultimate layer before its ReLU: FID, KID, precision/recall
LOGITS = "logits"  # (B, 10): Inception-Score analogue
IMAGE_SIZE = 16  # the extractor's working resolution
WEIGHTS_FILE = "digits_cnn_v3.safetensors"  # bump the version when the recipe below changes
WEIGHTS_PATH = Path(__file__).parent / "assets" / WEIGHTS_FILE  # shipped as package data
WEIGHTS_SHA256 = "2605b8ce73c285181c662ee35255db1bf99721dac479b0ceca3390d278e97c21"  # of WEIGHTS_PATH
SEED = 0
EPOCHS = 25
TEST_FRACTION = 0.2


def cache_dir() -> Path:
    """Where uvic caches what it builds on first use: $UVIC_CACHE_DIR, else ~/.cache/uvic."""
    return Path(os.environ.get("UVIC_CACHE_DIR") or Path.home() / ".cache" / "uvic")


def digits_images() -> Tuple[np.ndarray, np.ndarray]:
    """sklearn's digits (bundled with sklearn, no download): uint8 (1797, 8, 8) in 0..255, labels (1797,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    return images, digits.target.astype(np.int64)


def split_indices(n: int, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The fixed stratified train / held-out split the classifier is trained and tested on."""
    from sklearn.model_selection import train_test_split

    return train_test_split(np.arange(n), test_size=TEST_FRACTION, random_state=SEED, stratify=labels)


def split_index(split: str) -> np.ndarray:
    """Indices (sorted) into the 1,797 digits of a split: "all", "train" (1,437) or "heldout" (360)."""
    if split not in SPLITS:
        raise ValueError(f"data.split={split!r} is not valid; choose one of: {', '.join(SPLITS)}")
    images, labels = digits_images()
    if split == "all":
        return np.arange(len(images))
    train, heldout = split_indices(len(images), labels)
    return np.sort(train if split == "train" else heldout)


class DigitsCNN(nn.Module):
    """(B, 1, 16, 16) grey in [0, 1] -> features (B, 64) (the fc layer before its ReLU, scaled to unit RMS on the
    training digits), logits (B, 10) (the head on the ReLU of those)."""

    def __init__(self, width: int = 16, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 4 * 4, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.register_buffer("feature_scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, w, 8, 8)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 2w, 4, 4)
        x = F.relu(self.conv3(x))  # (B, 2w, 4, 4)
        features = self.fc(x.flatten(1))  # (B, 64): before the ReLU, where no unit is constant
        return features / self.feature_scale, self.head(F.relu(features))


def resize(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, 16, 16), bilinear with antialiasing (uvic.data's digits upsampling)."""
    if x.shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE):
        return x
    return F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True).clamp(0, 1)


def to_classifier_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) at any resolution -> (B, 1, 16, 16) float in [0, 1]: channel mean, resize."""
    return resize(images.float().mean(dim=1, keepdim=True) / 255.0)


def train_digits_cnn(epochs: int = EPOCHS, seed: int = SEED) -> Tuple[DigitsCNN, dict]:
    """Train on the fixed split (random 1-pixel shifts), deterministically.

    Returns (model, metadata: test_accuracy on the held-out split, train_size, test_size), strings.
    """
    images, labels = digits_images()
    train_idx, test_idx = split_indices(len(images), labels)
    x = resize(torch.from_numpy(images).float().unsqueeze(1) / 255.0)  # (N, 1, 16, 16)
    y = torch.from_numpy(labels)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # nn.Module init draws from the global generator
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is fastest and the same on every machine
    try:
        model = _fit(DigitsCNN(), x[train_idx], y[train_idx], epochs, g)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        model.feature_scale.fill_(model(x[train_idx])[0].pow(2).mean().sqrt().item())
        accuracy = (model(x[test_idx])[1].argmax(1) == y[test_idx]).float().mean().item()
    return model, {"test_accuracy": f"{accuracy:.4f}", "train_size": str(len(train_idx)), "test_size": str(len(test_idx))}


def _fit(model: DigitsCNN, xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, g: torch.Generator) -> DigitsCNN:
    """Adam + cosine schedule, batches of 64, each batch shifted by up to 2 pixels (one 8x8 pixel)."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=g)
        for start in range(0, len(xtr), 64):
            idx = perm[start : start + 64]
            xb = F.pad(xtr[idx], (2, 2, 2, 2))  # (B, 1, 20, 20): a random 16x16 window = a shift of <= 2 px
            dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()
            xb = xb[..., dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
            loss = F.cross_entropy(model(xb)[1], ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def load_digits_cnn(path: Optional[Path] = None) -> Tuple[DigitsCNN, dict]:
    """The shipped classifier (or the weights file at `path`); returns (model in eval mode, metadata).

    The shipped file must have sha256 WEIGHTS_SHA256: scores made with other weights are not comparable, so a
    changed or damaged file is refused rather than used. metadata: test_accuracy, test_size, train_size, path,
    sha256 (of the weights file).
    """
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"the digits classifier weights {path} are missing: reinstall uvic")
    sha256 = file_sha256(path)
    if path == WEIGHTS_PATH and sha256 != WEIGHTS_SHA256:
        raise ValueError(f"the digits classifier weights {path} have sha256 {sha256[:12]}, not the pinned "
                         f"{WEIGHTS_SHA256[:12]}: the file was changed or damaged; reinstall uvic (git checkout {path.name})")
    model = DigitsCNN()
    model.load_state_dict(load_file(str(path)))
    model.eval().requires_grad_(False)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta["path"] = str(path)
    meta["sha256"] = sha256
    return model, meta


def retrain(out: Path) -> dict:
    """Train with the recipe above and write the weights to `out` (safetensors); returns the metadata + sha256.

    For a new version of the shipped file (the result may differ bit for bit across machines), copy it to
    uvic/assets, bump WEIGHTS_FILE, set WEIGHTS_SHA256 and rescore whatever was scored with the old weights."""
    model, meta = train_digits_cnn()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_file(out, model.state_dict(), meta)
    return {**meta, "sha256": file_sha256(out)}


def feature_dimensions(features) -> Tuple[int, float]:
    """(live units: those whose spread over `features` (N, D) is above 1e-6 of the largest, participation-ratio
    dimension (Σλ)² / Σλ² of the covariance eigenvalues λ: how many directions the spread really uses)."""
    f = np.asarray(features, np.float64)
    sd = f.std(axis=0)
    lam = np.clip(np.linalg.eigvalsh(np.cov(f, rowvar=False)), 0, None)
    return int((sd > 1e-6 * sd.max()).sum()), float(lam.sum() ** 2 / (lam ** 2).sum())


class DigitsImages(Dataset):
    """The sklearn digits of a split (default all 1,797) as torch-fidelity expects inputs: uint8 (3, 8, 8)."""

    def __init__(self, split: str = "all"):
        self.images = torch.from_numpy(digits_images()[0][split_index(split)])  # (N, 8, 8)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].unsqueeze(0).expand(3, -1, -1).contiguous()


def _base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    return FeatureExtractorBase


def make_extractor_class():
    """The torch-fidelity feature extractor class (built lazily: torch-fidelity is imported on use)."""

    class FeatureExtractorDigitsCNN(_base()):
        """uint8 (B, 3, H, W) at any resolution -> ("features" (B, 64), "logits" (B, 10)).

        feature_extractor_weights_path: a digits CNN safetensors file (default: the shipped one).
        """

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.net, self.meta = load_digits_cnn(feature_extractor_weights_path)

        def forward(self, x: torch.Tensor):
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"expected uint8 (B, C, H, W) images, got {x.dtype} {tuple(x.shape)}")
            features, logits = self.net(to_classifier_input(x))
            out = {FEATURES: features, LOGITS: logits}
            return tuple(out[name] for name in self.features_list)

        @staticmethod
        def get_provided_features_list():
            return FEATURES, LOGITS

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": LOGITS, "fid": FEATURES, "kid": FEATURES, "prc": FEATURES}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)

    return FeatureExtractorDigitsCNN


def register() -> None:
    """Register the "uvic-digits-cnn" extractor and the "digits", "digits-train" and "digits-heldout" inputs with
    torch-fidelity (idempotent)."""
    from torch_fidelity.registry import (
        DATASETS_REGISTRY,
        FEATURE_EXTRACTORS_REGISTRY,
        register_dataset,
        register_feature_extractor,
    )

    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, make_extractor_class())
    for split, name in SPLITS.items():
        if name not in DATASETS_REGISTRY:
            register_dataset(name, lambda root, download, split=split: DigitsImages(split))


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m uvic.digits_classifier",
                                     description="Retrain the digits classifier with uvic's recipe (not bit-reproducible).")
    parser.add_argument("out", type=Path, help="where to write the safetensors file")
    meta = retrain(parser.parse_args(argv).out)
    print(" ".join(f"{k}={v}" for k, v in meta.items()))


if __name__ == "__main__":
    main()
