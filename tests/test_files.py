"""uvic.files' atomic writers: a file, a safetensors file or a folder appears whole under its name or not at all."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from uvic.files import atomic_path, atomic_save_file


def test_a_folder_written_under_atomic_path_appears_whole_and_a_failed_one_not_at_all(tmp_path):
    with atomic_path(tmp_path / "vae") as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
        assert not (tmp_path / "vae").exists()  # readers never see the folder being written
    assert (tmp_path / "vae" / "config.json").read_text() == "{}"

    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(tmp_path / "other") as tmp:
            tmp.mkdir()
            (tmp / "half.bin").write_bytes(b"half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]  # no leftover temporary folder


def test_atomic_save_file_is_read_back_by_safetensors_with_its_metadata(tmp_path):
    x = torch.arange(12.0).reshape(3, 4)
    path = atomic_save_file(tmp_path / "a.safetensors", {"x": x.t(), "n": torch.tensor([1, 2])}, {"start": "3"})
    loaded = load_file(str(path))
    assert torch.equal(loaded["x"], x.t()) and torch.equal(loaded["n"], torch.tensor([1, 2]))  # .t(): not contiguous
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"start": "3"}


def test_a_failed_atomic_save_file_keeps_the_old_file(tmp_path):
    path = atomic_save_file(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    with pytest.raises(Exception):  # safetensors refuses metadata that is not str -> str
        atomic_save_file(path, {"x": torch.zeros(2)}, {"start": 3})
    assert torch.equal(load_file(str(path))["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
