"""Fixtures shared by the test files: an isolated uvic cache, no torch.hub downloads, one thread."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def uvic_cache(tmp_path_factory):
    """One cache (digits classifier, reference features) for the whole session, never the user's."""
    path = tmp_path_factory.getbasetemp() / "uvic_cache"
    old = os.environ.get("UVIC_CACHE_DIR")
    os.environ["UVIC_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("UVIC_CACHE_DIR")
    else:
        os.environ["UVIC_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def no_hub(tmp_path, monkeypatch):
    """torch.hub looks in an empty folder: the Inception weights are never found, nothing downloads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
