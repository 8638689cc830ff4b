"""Data sets: digits, image folders (labelled, unlabelled, corrupt files), CIFAR-10 absent, latents path."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from uvic.config import load_config
from uvic.data import DigitsDataset, build_dataset


def data_cfg(**overrides):
    return load_config(None, [f"data.{k}={v}" for k, v in overrides.items()]).data


def test_digits_are_1797_labelled_images_in_model_range():
    ds = DigitsDataset(16)
    assert len(ds) == 1797 and ds.num_classes == 10
    image, label = ds[0]
    assert image.shape == (1, 16, 16) and isinstance(label, int) and label == 0
    assert image.min() >= -1 and image.max() <= 1 and image.max() > 0.5
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    limited = build_dataset(data_cfg(name="digits", limit=10), 8)
    assert len(limited) == 10 and limited.num_classes == 10 and limited[0][0].shape == (1, 8, 8)


def save_images(folder, n, size=(20, 12), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_imagefolder_with_class_subfolders_is_labelled_and_center_cropped(tmp_path):
    save_images(tmp_path / "cat", 2)
    save_images(tmp_path / "dog", 3)
    ds = build_dataset(data_cfg(name="imagefolder", path=str(tmp_path)), 8)
    assert len(ds) == 5 and ds.num_classes == 2 and ds.classes == ["cat", "dog"]
    assert sorted(label for _, label in ds) == [0, 0, 1, 1, 1]
    image = ds[0][0]
    assert image.shape == (3, 8, 8) and image.min() >= -1 and image.max() <= 1


def test_imagefolder_without_subfolders_is_unlabelled(tmp_path):
    save_images(tmp_path, 3)
    ds = build_dataset(data_cfg(name="imagefolder", path=str(tmp_path)), 8)
    assert ds.num_classes == 0 and [label for _, label in ds] == [-1, -1, -1]


def test_corrupt_images_are_counted_and_skipped_with_one_warning(tmp_path):
    save_images(tmp_path, 3)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 unreadable image") as record:
        ds = build_dataset(data_cfg(name="imagefolder", path=str(tmp_path)), 8)
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert len(ds) == 3
    with pytest.raises(ValueError, match="unreadable image .*(broken|empty)"):
        build_dataset(data_cfg(name="imagefolder", path=str(tmp_path), fail_on_corrupt=True), 8)


def test_a_file_that_breaks_after_the_scan_is_replaced_not_fatal(tmp_path):
    save_images(tmp_path, 2)
    ds = build_dataset(data_cfg(name="imagefolder", path=str(tmp_path)), 8)
    (tmp_path / "0.png").write_bytes(b"truncated")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        image, _ = ds[0]
    assert image.shape == (3, 8, 8)


@pytest.mark.parametrize("name", ["imagefolder", "latents"])
def test_missing_dataset_path_fails_naming_it(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset(data_cfg(name=name, path=str(missing)), 8)


def test_absent_cifar10_says_where_to_put_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(data_cfg(name="cifar10", path=str(tmp_path)), 32)
    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "cifar-10-python.tar.gz" in message
    assert "data.download=true" in message



def test_digits_split_keeps_the_heldout_reference_out_of_training():
    from sklearn.datasets import load_digits

    train = build_dataset(data_cfg(name="digits", split="train"), 8)
    heldout = build_dataset(data_cfg(name="digits", split="heldout"), 8)
    assert (len(train), len(heldout)) == (1437, 360)  # sklearn's stratified 80 / 20 split, random_state 0
    raw = torch.from_numpy(load_digits().images).float()[:, None] / 16.0 * 2 - 1  # (1797, 1, 8, 8)
    rows = {tuple(x.flatten().tolist()): i for i, x in enumerate(raw)}
    seen = {rows[tuple(train[i][0].flatten().tolist())] for i in range(len(train))}
    held = {rows[tuple(heldout[i][0].flatten().tolist())] for i in range(len(heldout))}
    assert not seen & held and len(seen | held) == len({tuple(x.flatten().tolist()) for x in raw})
    assert np.bincount(heldout.labels.numpy()).min() >= 35  # stratified: every class held out
    with pytest.raises(ValueError, match="data.split='test' is not valid"):
        build_dataset(data_cfg(name="digits", split="test"), 8)
    with pytest.raises(ValueError, match="data.split='train' applies to data.name=digits only"):
        build_dataset(data_cfg(name="imagefolder", path="/nonexistent", split="train"), 8)


def test_digits_classifier_feature_layer_has_no_dead_units():
    from uvic import digits_classifier as dc

    model, meta = dc.load_digits_cnn()
    images, _ = dc.digits_images()
    with torch.no_grad():
        features, _ = model(dc.resize(torch.from_numpy(images).float().unsqueeze(1) / 255.0))  # (1797, 64)
    live, pr = dc.feature_dimensions(features.numpy())
    assert live == 64 and (features.std(0) > 0).all()  # v2, after the ReLU: 27 live units of 64
    assert 1.0 < pr < 64.0 and float(meta["test_accuracy"]) > 0.9
    assert dc.feature_dimensions(np.c_[np.random.default_rng(0).normal(size=(50, 2)), np.zeros(50)])[0] == 2
