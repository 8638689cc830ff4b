"""Training data: every data set yields (image (C, H, W) float in [-1, 1], label int).

    digits       scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, no download)
    cifar10      torchvision CIFAR-10 under data.path (download only when data.download=true)
    imagefolder  any folder of images; class subfolders make it labelled
    latents      uvic.latents.LatentDataset (pre-extracted autoencoder latents)

Each data set carries `num_classes` (0 = unlabelled; its labels are then -1). Random flips are
not applied here: the trainer flips whole batches with its own RNG, so a resumed run sees the
same flips as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .caption_latents import CaptionLatentDataset, is_caption_latents
from .digits_classifier import split_index
from .files import IMAGE_EXTENSIONS
from .latents import LatentDataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


def build_dataset(data_cfg, sample_size: int, train: bool = True) -> Dataset:
    """The data set of a `data` config section at `sample_size` pixels (latents: as stored)."""
    name = data_cfg.name
    split = data_cfg.get("split") or "all"
    if split != "all" and name != "digits":
        raise ValueError(f"data.split={split!r} applies to data.name=digits only (got data.name={name!r})")
    if name == "digits":
        dataset = DigitsDataset(sample_size, split=split)
    elif name == "cifar10":
        dataset = cifar10(data_cfg.path or "data", sample_size, train=train, download=data_cfg.download)
    elif name == "imagefolder":
        dataset = ImageFolderDataset(
            _existing_path(data_cfg.path, "data.path (image folder)"),
            sample_size,
            check_images=data_cfg.get("check_images", True),
            fail_on_corrupt=data_cfg.get("fail_on_corrupt", False),
        )
    elif name == "latents":
        path = _existing_path(data_cfg.path, "data.path (latents)")
        latents = CaptionLatentDataset if is_caption_latents(path) else LatentDataset  # image-caption data: text too
        dataset = latents(path=str(path), scale_factor=data_cfg.scale_factor)
        if not hasattr(dataset, "num_classes"):
            dataset.num_classes = 0
    else:
        raise ValueError(f"data.name={name!r} is not valid; choose one of: digits, cifar10, imagefolder, latents")
    limit = data_cfg.get("limit")
    if limit is not None and limit < len(dataset):
        num_classes = dataset.num_classes
        dataset = Subset(dataset, range(limit))
        dataset.num_classes = num_classes
    return dataset


def resolve_data_config(cfg):
    """(cfg with the data-derived values filled in, training data set): checks the data against the
    model (channels, size, labels) and sets model.num_classes = classes + 1 (the null label last) for
    class-conditional runs. `cfg` itself is left unchanged."""
    cfg = cfg.copy()
    m, d = cfg.model, cfg.data
    dataset = build_dataset(d, m.sample_size, train=True)
    shape = dataset_shape(dataset)  # (C, H, W)
    if shape[0] != m.in_channels:
        raise ValueError(f"data {d.name!r} has {shape[0]} channels but model.in_channels={m.in_channels}")
    if tuple(shape[1:]) != (m.sample_size, m.sample_size):
        raise ValueError(f"data {d.name!r} gives {shape[1]}x{shape[2]} samples but model.sample_size={m.sample_size}")
    classes = int(getattr(dataset, "num_classes", 0) or 0)
    if d.conditional:
        if classes < 1:
            where = f" at {d.path!r}" if d.path else ""
            raise ValueError(
                f"data.conditional=true needs labelled data, but data {d.name!r}{where} has no class labels "
                f"(image folders are labelled by class subfolders); set data.conditional=false"
            )
        if m.num_classes not in (-1, 0, classes + 1):
            raise ValueError(
                f"model.num_classes={m.num_classes} but the data has {classes} classes: it must be "
                f"{classes + 1} (classes + the null label) or left unset"
            )
        m.num_classes = classes + 1
    elif m.num_classes > 0:
        raise ValueError(f"model.num_classes={m.num_classes} needs data.conditional=true")
    _check_text_data(m, d, dataset)
    return cfg, dataset


def _check_text_data(m, d, dataset) -> None:
    """A text-to-image model (model.context_dim > 0) needs caption latents of its token shape, and back."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    tokens = getattr(base, "empty_context", None)
    context_dim = int(m.get("context_dim") or 0)
    if context_dim > 0 and tokens is None:
        raise ValueError(f"model.context_dim={context_dim} (text-to-image) needs caption latents (data.name=latents "
                         "of image-caption data: `python -m uvic.latents extract --annotations ...`)")
    if tokens is not None:
        if context_dim == 0:
            raise ValueError(f"data.path {d.path!r} holds captions: set model.context_dim={tokens.shape[1]} and "
                             f"model.num_context_tokens={tokens.shape[0]} (or a text-to-image preset)")
        if tuple(tokens.shape) != (m.num_context_tokens, context_dim):
            raise ValueError(f"the captions of {d.path!r} have {tokens.shape[0]} x {tokens.shape[1]} text tokens but "
                             f"model.num_context_tokens x model.context_dim = {m.num_context_tokens} x {context_dim}")


def _existing_path(path: Optional[str], key: str) -> Path:
    if not path:
        raise ValueError(f"{key} is not set")
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{key} {str(p)!r} does not exist")
    return p


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return images * 2.0 - 1.0


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits, upsampled (bilinear, antialiased) to sample_size, 1 channel.

    split: "all" (1,797), "train" (1,437) or "heldout" (360), the fixed stratified split of
    uvic.digits_classifier: train on "train" and score against the reference "digits-heldout", which
    neither the diffusion model nor the classifier has seen."""

    num_classes = 10

    def __init__(self, sample_size: int = 16, split: str = "all"):
        from sklearn.datasets import load_digits

        keep = split_index(split)  # a bad split: ValueError naming data.split
        digits = load_digits()
        images = torch.from_numpy(digits.images[keep]).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        if sample_size != 8:
            images = F.interpolate(images, size=(sample_size, sample_size), mode="bilinear", antialias=True)
        self.images = to_model_range(images.clamp(0, 1))  # (N, 1, S, S)
        self.labels = torch.from_numpy(digits.target[keep]).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _image_transform(sample_size: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(sample_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
            transforms.CenterCrop(sample_size),
            transforms.ToTensor(),  # (C, H, W) in [0, 1]
            transforms.Lambda(to_model_range),
        ]
    )


def cifar10(root: str, sample_size: int = 32, train: bool = True, download: bool = False) -> Dataset:
    """torchvision CIFAR-10 in [-1, 1]; absent files give one error saying where to put them."""
    from torchvision.datasets import CIFAR10

    root = Path(root).expanduser()
    folder = root / "cifar-10-batches-py"
    hint = (
        f"CIFAR-10 not found: expected the folder {str(folder)!r} (unpack {CIFAR10_URL} into "
        f"{str(root)!r}, or set data.path to the folder holding cifar-10-batches-py/, or data.download=true)"
    )
    if not download and not folder.is_dir():
        raise FileNotFoundError(hint)
    try:
        dataset = CIFAR10(str(root), train=train, download=download, transform=_image_transform(sample_size))
    except (OSError, RuntimeError) as e:  # offline download, corrupt archive
        raise FileNotFoundError(f"{hint}; the download failed: {e}") from None
    dataset.num_classes = 10
    return dataset


class ImageFolderDataset(Dataset):
    """Images under `root`, resized (shorter side) and center-cropped to sample_size, RGB.

    Labelled when the images sit in class subfolders (root/<class>/...): labels follow the
    sorted subfolder names. Images directly under root are unlabelled (label -1, num_classes 0).
    check_images opens every file once at start-up: unreadable ones are counted, skipped and
    reported in one warning, or raise at once with fail_on_corrupt. A file that still fails
    later is replaced by the next readable one, never a crash hours into training.
    """

    def __init__(self, root, sample_size: int, check_images: bool = True, fail_on_corrupt: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.path {str(root)!r} is not a folder of images")
        self.root = root
        self.transform = _image_transform(sample_size)
        self.fail_on_corrupt = fail_on_corrupt
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
        top_level = [p for p in files if len(p.relative_to(root).parts) == 1]
        if classes and top_level:
            warnings.warn(
                f"{len(top_level)} images directly under {root} are ignored: the folder has class subfolders",
                stacklevel=2,
            )
            files = [p for p in files if len(p.relative_to(root).parts) > 1]
        self.classes: List[str] = classes
        self.num_classes = len(classes)
        index = {c: i for i, c in enumerate(classes)}
        self.samples = [(p, index[p.relative_to(root).parts[0]] if classes else -1) for p in files]
        if check_images:
            self.samples, bad = self._readable(self.samples)
            if bad:
                warnings.warn(
                    f"skipped {len(bad)} unreadable image(s) of {len(bad) + len(self.samples)} in {root}, "
                    f"e.g. {bad[0]}",
                    stacklevel=2,
                )
        if not self.samples:
            raise FileNotFoundError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}")

    def _readable(self, samples):
        from PIL import Image

        good, bad = [], []
        for path, label in samples:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # PIL raises many kinds on corrupt files
                if self.fail_on_corrupt:
                    raise ValueError(f"unreadable image {path}: {e} (data.fail_on_corrupt=true)") from None
                bad.append(path)
            else:
                good.append((path, label))
        return good, bad

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.samples[i][0]) as im:
            return self.transform(im.convert("RGB"))

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        if not -len(self.samples) <= i < len(self.samples):
            raise IndexError(f"index {i} out of range for {len(self.samples)} images")
        for k in range(len(self.samples)):
            j = (i + k) % len(self.samples)
            try:
                return self._load(j), self.samples[j][1]
            except Exception as e:
                if self.fail_on_corrupt:
                    raise ValueError(f"unreadable image {self.samples[j][0]}: {e}") from None
                if k == 0:
                    warnings.warn(f"unreadable image {self.samples[j][0]} replaced by the next one: {e}", stacklevel=2)
        raise RuntimeError(f"no image under {self.root} could be read")


def dataset_shape(dataset: Dataset) -> Tuple[int, ...]:
    """(C, H, W) of the first example."""
    image, _ = dataset[0]
    return tuple(np.shape(image))
