"""Image and file IO: grey PNG reading with odd-input handling, PNG listing, atomic writes with the
user's umask (files, and folders staged beside their target), an up-front check that an output can
be written, and file checksums.

    check_writable(args.out, "file")        # CellsegError in milliseconds, before any model loads
    with atomic_path("submission.csv") as tmp: ...   # replaces the target only when the block succeeds
    read_gray("test/abc.PNG")               # (H, W) uint8 from L, LA, P, RGB(A), 16-bit, 1-bit PNGs
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cellseg.errors import CellsegError

#: ITU-R 601 luma weights (what PIL's convert("L") uses), applied in float with rounding
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: modes PIL gives 16-bit grey PNGs (older Pillow opens them as "I")
MODES_16 = ("I;16", "I;16B", "I;16L", "I;16N")


def default_mode(directory: bool = False) -> int:
    """Permission bits a new file (0o666) or folder (0o777) gets under the current umask."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The result gets the mode ``path`` had, or for a new file what the umask allows (0644 under the
    usual 022), not the 0600 of the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            mode = default_mode()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_writable(path: str | Path, kind: Literal["file", "dir"] = "file") -> Path:
    """Fail fast (CellsegError, one line) when ``path`` cannot be written, before any work is done.

    ``kind="file"``: ``path`` will be created or replaced as a file; ``kind="dir"``: ``path`` is a
    folder that will be created (with its parents) or written into. Detects a folder where a file
    is expected (and the reverse), a parent that is a file, and a folder that refuses writes
    (permissions, read-only filesystem) by creating and removing a temporary file in the folder the
    write will happen in (the nearest existing one): ``os.access`` says yes to root even on a
    read-only mount. Creates nothing that stays. Returns ``path``.
    """
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise CellsegError(f"{path}: is a folder; expected a file path to write")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise CellsegError(f"{path}: is a file; expected a folder to write into")
    probe = path if kind == "dir" else path.parent
    while not probe.exists() and probe != probe.parent:  # nearest existing ancestor
        probe = probe.parent
    if not probe.is_dir():
        raise CellsegError(f"{path}: cannot be created because {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cellseg-write-check-", dir=probe)
    except OSError as e:
        raise CellsegError(f"{path}: cannot write in {probe} ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    os.unlink(tmp)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_text_file(path: str | Path, what: str) -> str:
    """The text of ``path``; CellsegError naming the file and ``what`` was expected when it is
    missing or binary (a checkpoint given where a YAML file belongs, say)."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: not found (expected {what})")
    data = path.read_bytes()
    try:
        if b"\x00" in data[:8192]:
            raise UnicodeDecodeError("utf-8", data[:1], 0, 1, "NUL byte")
        return data.decode("utf-8")
    except UnicodeDecodeError:
        hint = ""
        if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
            hint = ", it looks like a PyTorch checkpoint"
        elif data[:8] == b"\x89PNG\r\n\x1a\n":
            hint = ", it is a PNG image"
        raise CellsegError(
            f"{path}: not a text file ({len(data)} bytes of binary data{hint}); expected {what}"
        ) from None


def is_png_name(name: str) -> bool:
    """True for ``*.png`` in any letter case (``.PNG``, ``.Png``)."""
    return name.lower().endswith(".png")


def list_pngs(folder: str | Path) -> dict[str, Path]:
    """PNG files directly in ``folder``, any letter case of ``.png``: id (file stem) -> path, sorted by
    id. Empty when the folder does not exist. Of ``a.png`` and ``a.PNG`` the first in name order wins."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if is_png_name(p.name) and p.is_file():
            out.setdefault(p.stem, p)
    return dict(sorted(out.items()))


def find_png(folder: str | Path, image_id: str) -> Path:
    """``folder/<image_id>.png``, or the same name with ``.PNG`` in another letter case when only that
    exists (the lower-case path is returned when neither does)."""
    path = Path(folder) / f"{image_id}.png"
    if path.exists():
        return path
    matches = sorted(glob.glob(glob.escape(str(Path(folder) / image_id)) + ".[pP][nN][gG]"))
    return Path(matches[0]) if matches else path


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) uint8 luminance, rounded."""
    grey = rgb[..., :3].astype(np.float32) @ LUMA
    return np.clip(grey + 0.5, 0, 255).astype(np.uint8)


def _to_gray(im: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a loaded PIL image the way a person looking at it would read it."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "LA":  # grey + alpha: drop the alpha
        return np.asarray(im.getchannel("L"))
    if mode in ("RGB", "RGBA", "RGBX"):  # alpha dropped
        return _luma(np.asarray(im))
    if mode in ("P", "PA"):  # palette indices -> their colours -> grey
        return _luma(np.asarray(im.convert("RGB")))
    if mode == "1":
        return np.asarray(im).astype(np.uint8) * 255
    if mode in MODES_16 or (mode == "I" and im.format == "PNG"):
        # 16-bit: a fixed 65535 -> 255 scale (x / 257, rounded), never the image's own range
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return ((wide * 255 + 32767) // 65535).astype(np.uint8)
    if mode in ("I", "F"):  # 32-bit int / float (TIFF): 8-bit values stored wide, else stretched
        a = np.asarray(im).astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if mode == "I" and lo >= 0 and hi <= 255:
            return a.astype(np.uint8)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return ((a - lo) * scale + 0.5).astype(np.uint8)
    return _luma(np.asarray(im.convert("RGB")))  # CMYK, YCbCr, LAB, ...


def read_gray(path: str | Path) -> np.ndarray:
    """Read an image as (H, W) uint8 grey.

    Modes: L as is; LA alpha dropped; P/PA palette resolved to its colours, then grey; RGB/RGBA
    luminance (alpha dropped); 16-bit grey mapped by a fixed 65535 -> 255 scale; 1-bit 0/255.
    Raises CellsegError for a missing, empty or unreadable file.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CellsegError(f"{path}: unreadable image (empty file, 0 bytes)")
        with Image.open(path) as im:
            im.load()
            return _to_gray(im)
    except CellsegError:
        raise
    except FileNotFoundError:
        raise CellsegError(f"{path}: image not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise CellsegError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


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


def check_replaceable(out: Path, marker: str, what: str) -> None:
    """CellsegError unless ``out`` is absent, an empty folder, or a folder holding ``marker`` (an earlier
    folder of the kind :func:`replace_dir` would replace it with). Call it before slow work, so that a
    wrong ``--out`` fails first; :func:`replace_dir` checks again.

    Args:
        out: the folder to create or replace.
        marker: file name that marks an earlier folder of this kind.
        what: that kind in words, for the error (e.g. "a bundle").
    """
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise CellsegError(f"{out} exists and is not {what}: choose an empty or new --out")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to build it in, for :func:`replace_dir` to move into place.

    It gets the umask's mode, not mkdtemp's 0700 (a bundle is shared and uploaded, a fetched output
    is read by others), and is removed when the block fails, so nothing half-made is left.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, default_mode(directory=True))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path, marker: str, what: str) -> None:
    """Move the finished folder ``tmp`` to ``out`` (same filesystem: renames, so ``out`` is never half there).

    An existing ``out`` is replaced only when it is empty or holds ``marker`` (an earlier folder of the
    same kind): nothing here deletes a folder it did not make.

    Args:
        tmp: the complete new folder, beside ``out``.
        out: where it goes.
        marker: file name that marks an earlier folder of this kind (e.g. the bundle's marker).
        what: that kind in words, for the error (e.g. "a bundle").
    """
    if out.exists():
        check_replaceable(out, marker, what)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
