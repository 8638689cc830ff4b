"""Image preparation for latent extraction and FID references: ADM's center crop, class folders, captions.

    find_images(DATA)        ImageNet layout (DATA/<class>/<image>) -> files, labels, class names
    read_captions(DATA)      captioned images (DATA/captions.jsonl or an MS-COCO captions json)
    CenterCropImages         the files as center-cropped tensors in [-1, 1] (a DataLoader never dies on a bad file)
    export_crops(DATA, OUT)  the center crops as PNGs OUT/000000.png ... (FID reference images)
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from .files import IMAGE_EXTENSIONS, atomic_path


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


def read_captions(root: Union[str, Path], annotations: Optional[Union[str, Path]] = None
                  ) -> Tuple[List[str], List[List[str]]]:
    """Image files (relative to root, sorted) and all captions of each, for text-to-image extraction.

    annotations: an MS-COCO captions file (annotations/captions_train2014.json: "images" with id and
    file_name, "annotations" with image_id and caption); without it, root/captions.jsonl with one
    {"file_name": ..., "caption": ...} ("file" also accepted) per line (several lines per image allowed). Images without a
    caption are skipped; a caption naming a missing image fails before any work.
    """
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
    loader = DataLoader(Subset(images, todo), batch_size=64, num_workers=num_workers)
    skipped = []
    for x, _, idx, errors in tqdm(loader, desc="center crops", disable=not progress):
        pixels = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, R, R, 3)
        for k, img, error in zip(idx.tolist(), pixels, errors):  # k: position in `order`, the file's number
            if error:
                skipped.append(files[order[k]])
                continue
            with atomic_path(out / f"{k:06d}.png") as tmp:
                Image.fromarray(img).save(tmp, format="PNG")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {data}, e.g. {skipped[0]}", stacklevel=2)
    return out
