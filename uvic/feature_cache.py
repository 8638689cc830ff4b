"""uvic's cache of reference features and FID statistics: safetensors and .npz, never a pickle.

torch-fidelity's own cache stores `.pt` files and reads them back with torch.load(weights_only=False): a file
planted in a shared cache folder would run its code. uvic therefore never lets torch-fidelity cache, and keeps
its own entries in the same folder ($UVIC_CACHE_DIR/fidelity_cache, or --cache-root):

    uvic-<entry>-<extractor>-features.safetensors   one (N, D) float32 tensor per feature layer
    uvic-<entry>-<extractor>-stat-fid-<layer>.npz   mu, sigma and their tags (uvic.fid.FIDStatistics)

An entry is taken only when it is what was asked for: the layers requested, N rows (the reference's image
count), statistics of the expected extractor, layer and weights, finite, symmetric and positive semi-definite.
Anything else (a truncated file, a pickle under our name, other shapes) is a cache miss named in a warning,
and the entry is computed again and rewritten. A cache that cannot be written (a full disk, a read-only
folder) is named in a warning too; the metric is still computed.
"""

from __future__ import annotations

import errno
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .fid import FIDStatistics
from .files import atomic_write


class FeatureCache:
    """Entries under `root` (None: no cache); every read is verified, every write atomic."""

    def __init__(self, root=None):
        self.root = None if root is None else Path(root)

    def _path(self, entry: str, suffix: str) -> Optional[Path]:
        return None if self.root is None else self.root / f"uvic-{entry}{suffix}"

    def _miss(self, path: Path, why: str) -> None:
        warnings.warn(f"feature cache entry {path} is not usable ({why}); treated as a cache miss, recomputed and "
                      f"rewritten", stacklevel=3)

    def features(self, entry: str, layers: Sequence[str], count: int) -> Optional[Dict[str, torch.Tensor]]:
        """The cached (count, D) features of each layer, or None (a miss)."""
        from safetensors import safe_open

        path = self._path(entry, "-features.safetensors")
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if not set(layers) <= set(f.keys()):  # written for other metrics: a plain miss, rewritten
                    return None
                out = {layer: f.get_tensor(layer) for layer in layers}
        except Exception as e:  # truncated, not safetensors (a pickle under our name), unreadable
            return self._miss(path, f"{type(e).__name__}: {str(e)[:200]}")
        for layer, value in out.items():
            if value.ndim != 2 or value.shape[0] != count or not torch.isfinite(value).all():
                return self._miss(path, f"layer {layer} holds {tuple(value.shape)} (finite: "
                                        f"{bool(torch.isfinite(value).all())}), expected {count} finite rows")
        return out

    def save_features(self, entry: str, features: Dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save

        path = self._path(entry, "-features.safetensors")
        if path is not None:
            tensors = {k: v.detach().cpu().float().contiguous() for k, v in features.items()}
            self._write(path, lambda f: f.write(save(tensors)))

    def statistics(self, entry: str, layer: str, expect: dict, count: int) -> Optional[FIDStatistics]:
        """Cached statistics with the tags `expect` (extractor, layer, weights) of `count` images, or None."""
        path = self._path(entry, f"-stat-fid-{layer}.npz")
        if path is None or not path.is_file():
            return None
        try:
            stats = FIDStatistics.load(path)  # allow_pickle=False; validated
        except Exception as e:
            return self._miss(path, f"{type(e).__name__}: {str(e)[:200]}")
        got = dict(extractor=stats.extractor, layer=stats.layer, weights=stats.weights)
        if got != expect or stats.num_samples != count:
            return self._miss(path, f"statistics of {got} over {stats.num_samples} images, expected {expect} over "
                                    f"{count}")
        return stats

    def save_statistics(self, entry: str, layer: str, stats: FIDStatistics) -> None:
        path = self._path(entry, f"-stat-fid-{layer}.npz")
        if path is not None:
            tags = {k: np.str_(getattr(stats, k)) for k in ("extractor", "layer", "weights")}
            self._write(path, lambda f: np.savez(f, mu=stats.mu, sigma=stats.sigma,
                                                 num_samples=np.int64(stats.num_samples), **tags))

    def _write(self, path: Path, write) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, write)
        except OSError as e:  # a full disk or a read-only cache: the metric does not need the cache
            full = " (disk full)" if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            warnings.warn(f"could not write the feature cache entry {path}{full}: {e.strerror or e}; the metric is "
                          f"computed without caching it", stacklevel=3)
