"""Image and file IO: 8-bit grey PNG reading with odd-input handling, atomic writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from cellseg.errors import CellsegError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_gray(path: str | Path) -> np.ndarray:
    """Read an image as (H, W) uint8 grey.

    RGB/RGBA are converted to luminance, 16-bit is rescaled to 8 bits by its range. Raises
    CellsegError for a missing or unreadable file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except FileNotFoundError:
        raise CellsegError(f"{path}: image not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise CellsegError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if arr.ndim == 3:
        rgb = arr[..., :3].astype(np.float32)
        arr = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(arr + 0.5, 0, 255).astype(np.uint8)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if arr.dtype.kind in "iu" and lo >= 0 and hi <= 255:  # 8-bit values stored wide
        return arr.astype(np.uint8)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return ((a - lo) * scale + 0.5).astype(np.uint8)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header only."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise CellsegError(f"{path}: image not found") from None
    except Exception as e:
        raise CellsegError(f"{path}: unreadable image ({type(e).__name__})") from None
    return h, w


def write_gray(path: str | Path, image: np.ndarray) -> None:
    """Write a (H, W) uint8 array as an 8-bit grey PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(tmp, format="PNG")
