"""Image and file IO: grey PNG reading with odd-input handling, PNG listing, atomic writes with the
user's umask (files, and folders staged beside their target), an up-front check that an output can
be written, and file checksums.

    check_writable(args.out, "file")        # CellsegError in milliseconds, before any model loads
    with atomic_path("submission.csv") as tmp: ...   # replaces the target only when the block succeeds
    read_gray("test/abc.PNG")               # (H, W) uint8 from L, LA, P, RGB(A), 16-bit, 1-bit PNGs
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import hashlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
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


#: errno values that mean "this output cannot be written there": one line, exit 2, the earlier file kept
WRITE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
)
_WHY = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.ENAMETOOLONG: "file name too long"}


@contextmanager
def write_errors(path: str | Path) -> Iterator[None]:
    """Turn an :data:`WRITE_ERRNOS` OSError raised in the block (a full disk, a name over 255 bytes, a
    read-only or forbidden folder) into one CellsegError line naming ``path``; other errors pass."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        why = _WHY.get(e.errno or 0) or e.strerror or type(e).__name__
        raise CellsegError(f"{path}: cannot write ({why}); nothing there was replaced") from None


def output_target(path: str | Path) -> Path:
    """Where writing ``path`` lands. The symlink rule: a link is written *through* (it stays a link and
    its target is replaced atomically), so the target is the path the rename must happen at."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _kind_of(st: os.stat_result) -> str:
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a fifo (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(st.st_mode):
            return name
    return "not a regular file"


def check_regular(path: str | Path) -> Path:
    """CellsegError unless the write target of ``path`` (:func:`output_target`) is absent or a regular
    file: a device node (``/dev/full``), fifo, socket or folder is never replaced by a file."""
    target = output_target(path)
    try:
        st = target.stat()
    except (FileNotFoundError, NotADirectoryError):  # absent, or under a file: check_writable says which
        return target
    except OSError as e:
        raise CellsegError(f"{path}: cannot write ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        what = _kind_of(st)
        if what == "a folder":
            raise CellsegError(f"{path}: is a folder; expected a file path to write")
        raise CellsegError(f"{path}: is {what}, not a regular file; refusing to replace it")
    return target


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    The result gets the mode ``path`` had, or for a new file what the umask allows (0644 under the
    usual 022), not the 0600 of the temporary file. A symlink is written through (the link stays,
    its target is replaced); a non-regular target (device, fifo, socket, folder) is refused; a full
    disk or a name too long becomes one CellsegError line and the earlier file stays as it was.
    """
    target = check_regular(path)
    with write_errors(path):
        target.parent.mkdir(parents=True, exist_ok=True)
        # the temporary name stays short: a target name near the 255-byte limit must not make it too long
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:64]}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            yield tmp_path
            try:
                mode = stat.S_IMODE(target.stat().st_mode)
            except OSError:
                mode = default_mode()
            os.chmod(tmp_path, mode)
            os.replace(tmp_path, target)
        finally:
            if tmp_path.exists():
                tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _same_or_inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies under folder ``b`` (both already resolved)."""
    return a == b or b in a.parents


def check_not_input(path: str | Path, inputs: Iterable[str | Path | None], kind: Literal["file", "dir"]) -> None:
    """CellsegError when output ``path`` resolves to one of the command's ``inputs`` (files or folders).

    A file output may not be an input file (a hard link to it included) nor an existing file inside an
    input folder; a folder output may not be, or hold, an input. None entries are ignored."""
    out = Path(os.path.realpath(path))
    for given in inputs:
        if given is None:
            continue
        src = Path(os.path.realpath(given))
        if kind == "file":
            clash = out == src or (src.is_dir() and src in out.parents and out.exists())
            if not clash and out.exists() and src.exists():
                clash = os.path.samefile(out, src)
        else:
            clash = _same_or_inside(src, out)
        if clash:
            raise CellsegError(f"{path}: is (or holds) the input {given}; write the output somewhere else")


#: the longest file or folder name (bytes) on the filesystems cellseg runs on (ext4, xfs, tmpfs, overlay)
NAME_MAX = 255


def _check_name_lengths(path: Path) -> None:
    """CellsegError for a part of ``path`` longer than :data:`NAME_MAX` bytes (checked on the text:
    the system calls that would tell fail with ENAMETOOLONG themselves)."""
    for part in path.parts:
        n = len(os.fsencode(part))
        if n > NAME_MAX:
            raise CellsegError(f"{path}: cannot write (file name too long: {n} bytes, the limit is {NAME_MAX})")


def check_writable(
    path: str | Path, kind: Literal["file", "dir"] = "file", inputs: Iterable[str | Path | None] = ()
) -> Path:
    """Fail fast (CellsegError, one line) when ``path`` cannot be written, before any work is done.

    ``kind="file"``: ``path`` will be created or replaced as a file; ``kind="dir"``: ``path`` is a
    folder that will be created (with its parents) or written into. Detects a folder where a file
    is expected (and the reverse), a device, fifo or socket at ``path``, an output that is one of the
    command's ``inputs`` (:func:`check_not_input`), a name too long, a parent that is a file, and a
    folder that refuses writes (permissions, read-only filesystem) by creating and removing a
    temporary file in the folder the write will happen in (the nearest existing one): ``os.access``
    says yes to root even on a read-only mount. Symlinks are followed (written through). Creates
    nothing that stays. Returns ``path``.
    """
    path = Path(path)
    _check_name_lengths(path)
    check_not_input(path, inputs, kind)
    if kind == "file":
        target = check_regular(path)
    else:
        target = output_target(path)
        if target.exists() and not target.is_dir():
            raise CellsegError(f"{path}: is a file; expected a folder to write into")
    probe = target if kind == "dir" else target.parent
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


def check_fresh_dir(path: str | Path, force: bool, own: Iterable[str] = (), flag: str = "--force") -> Path:
    """CellsegError when folder ``path`` exists and holds an entry this command did not make, unless ``force``.

    ``own`` are glob patterns of names the command itself writes and may replace (a cache's entries,
    regenerated plots); anything else (an earlier report's summary.json, say) is only replaced with
    ``force``, so a reused folder never loses an earlier result silently. Returns ``path``."""
    path = Path(path)
    if force or not path.is_dir():
        return path
    patterns = list(own)
    foreign = sorted(p.name for p in path.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in patterns))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise CellsegError(
            f"{path}: folder already holds {foreign[0]}{more}, which this command did not make; "
            f"choose a new or empty folder, or add {flag} to replace its files"
        )
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


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def list_pngs(folder: str | Path, warn: Callable[[str], None] | None = None) -> dict[str, Path]:
    """PNG files directly in ``folder``, any letter case of ``.png``: id (file stem) -> path, sorted by
    id. Empty when the folder does not exist. Of ``a.png`` and ``a.PNG`` the first in name order wins.

    A file whose name is not valid UTF-8 cannot be a submission id: it is skipped with one ``warn``
    line (default: stderr), so every id listed can be written and scored."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if is_png_name(p.name) and p.is_file():
            try:
                p.stem.encode("utf-8")
            except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
                name = ascii(os.fsencode(p.name))[1:]  # the bytes, as b'...' without the b
                (warn or _warn)(f"warning: {folder}: skipping {name}: the file name is not valid UTF-8")
                continue
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
    with open_image(path) as im:
        return _to_gray(im)


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """A loaded PIL image; a missing, empty or unreadable file (or any failure in the block) is one
    CellsegError line naming ``path``. CellsegErrors raised in the block pass unchanged."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise CellsegError(f"{path}: unreadable image (empty file, 0 bytes)")
        with Image.open(path) as im:
            im.load()
            yield im
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


def check_replaceable(out: Path, marker: str, what: str, force: bool | None = None) -> None:
    """CellsegError unless ``out`` is absent, an empty folder, or a folder holding ``marker`` (an earlier
    folder of the kind :func:`replace_dir` would replace it with). Call it before slow work, so that a
    wrong ``--out`` fails first; :func:`replace_dir` checks again.

    Args:
        out: the folder to create or replace.
        marker: file name that marks an earlier folder of this kind.
        what: that kind in words, for the error (e.g. "a bundle").
        force: the user's ``--force`` (True: a folder of other files is replaced too; a file never);
            None when the command has no such option (the error then does not offer it).
    """
    if out.exists() and not out.is_dir():
        raise CellsegError(f"{out} exists and is not {what}: choose an empty or new --out")
    if out.exists() and any(out.iterdir()) and not (out / marker).is_file() and not force:
        how = ", or pass --force" if force is not None else ""
        raise CellsegError(f"{out} exists and is not {what}: choose an empty or new --out{how}")


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A fresh folder beside ``out`` to build it in, for :func:`replace_dir` to move into place.

    It gets the umask's mode, not mkdtemp's 0700 (a bundle is shared and uploaded, a fetched output
    is read by others), and is removed when the block fails, so nothing half-made is left; a full disk
    in the block is one CellsegError line. A symlinked ``out`` is written through (its target is built
    beside and replaced; the link stays).
    """
    out = output_target(out)
    with write_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name[:64]}.tmp-", dir=out.parent))
        os.chmod(tmp, default_mode(directory=True))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def replace_dir(tmp: Path, out: Path, marker: str, what: str, force: bool | None = None) -> None:
    """Move the finished folder ``tmp`` to ``out`` (same filesystem: renames, so ``out`` is never half there).

    An existing ``out`` is replaced only when it is empty or holds ``marker`` (an earlier folder of the
    same kind): nothing here deletes a folder it did not make.

    Args:
        tmp: the complete new folder, beside ``out``.
        out: where it goes.
        marker: file name that marks an earlier folder of this kind (e.g. the bundle's marker).
        what: that kind in words, for the error (e.g. "a bundle").
        force: as in :func:`check_replaceable`.
    """
    out = output_target(out)
    if out.exists():
        check_replaceable(out, marker, what, force)
        old = out.with_name(f".{out.name[:64]}.old-{os.getpid()}")
        with write_errors(out):
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the earlier folder goes back: never neither
                raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        with write_errors(out):
            os.replace(tmp, out)
