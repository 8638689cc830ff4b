"""Small file helpers every writer uses: the atomic write (of bytes, a safetensors file or a folder), a file's
sha256, free space and the disk-full message, the image extensions uvic reads."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DiskFullError(ValueError):
    """No space left where a run writes (an expected error: the message says where and what to do)."""


def file_sha256(path) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


NEARLY_FULL = 64 << 20  # bytes: a write error with less free space than this is taken for a full disk


def free_space(path) -> int:
    """Free bytes on the file system of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    return shutil.disk_usage(existing).free


def _write_errors() -> tuple:
    """What a full disk raises: OSError, RuntimeError (torch.save), SafetensorError (safetensors' save_file)."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


@contextmanager
def disk_full_message(where, writing=None) -> Iterator[None]:
    """Turn a full disk met by any write inside into a DiskFullError that says disk full and what was written:
    ENOSPC / EDQUOT (also in a SafetensorError's text), or another write error while `where` has under 64 MB
    free. writing: the file or folder being written, named when the error names none."""
    try:
        yield
    except _write_errors() as e:
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "code: 28," in str(e)
        if not full:
            try:
                full = free_space(where) < NEARLY_FULL
            except OSError:
                full = False
        if not full:
            raise
        target = getattr(e, "filename", None) or writing or where
        raise DiskFullError(
            f"disk full: no space left writing {target} (run folder {where}; {type(e).__name__}: {str(e)[:200]}); "
            f"free space there (or pass another --output-dir) and rerun the same command: it continues from the "
            f"latest intact checkpoint"
        ) from e


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """A temporary name beside `path` (.NAME.tmp-PID) to write a file or a folder under; renamed to `path` when the
    block ends, removed when it raises: readers see all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path, write: Callable) -> Path:
    """write(binary file) to a temporary name beside `path`, then rename: readers see all of it or nothing."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_save_file(path, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """safetensors' save_file of `tensors` (made contiguous) and their string `metadata`, written atomically."""
    from safetensors.torch import save_file  # safetensors imports torch: only writers of tensors pay for it

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)
