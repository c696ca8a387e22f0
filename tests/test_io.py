"""cellseg.io: PNG modes read as a person would see them, ``.PNG`` in any case, the up-front
writability check, and atomic writes that respect the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bad_input_helpers import grey_picture, save_as
from cellseg.errors import CellsegError
from cellseg.io import (
    atomic_write_text,
    check_replaceable,
    check_writable,
    default_mode,
    find_png,
    list_pngs,
    read_gray,
    read_text_file,
    replace_dir,
    staging,
)
from cellseg.paths import CompetitionPaths


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGB", "RGBA", "I;16"])
def test_every_png_mode_reads_as_the_grey_picture(tmp_path, mode):
    grey = grey_picture()
    path = save_as(grey, mode, tmp_path / f"x_{mode.replace(';', '')}.png")
    with Image.open(path) as im:
        assert im.mode == mode or (mode == "I;16" and im.mode in ("I", "I;16"))  # really saved that way
    out = read_gray(path)
    assert out.dtype == np.uint8 and out.shape == grey.shape
    assert np.array_equal(out, grey)


def test_16_bit_uses_a_fixed_scale_not_the_image_range(tmp_path):
    """A dim 16-bit picture stays dim: min-max stretching would map its brightest pixel to 255."""
    wide = np.full((8, 8), 1000, np.uint16)
    wide[0, 0] = 2000
    Image.fromarray(wide).save(tmp_path / "dim.png")
    out = read_gray(tmp_path / "dim.png")
    assert out[0, 0] == round(2000 / 257) and out[1, 1] == round(1000 / 257)


def test_unreadable_images_are_one_line_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CellsegError, match=r"empty\.png: unreadable image \(empty file, 0 bytes\)"):
        read_gray(tmp_path / "empty.png")
    with pytest.raises(CellsegError, match=r"junk\.png: unreadable image"):
        read_gray(tmp_path / "junk.png")
    with pytest.raises(CellsegError, match="image not found"):
        read_gray(tmp_path / "nope.png")


def test_png_suffix_in_any_letter_case(tmp_path):
    for name in ("a.png", "b.PNG", "c.Png", "d.jpg", "e.png.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "f.png").mkdir()  # a folder named like a PNG is not one
    assert list(list_pngs(tmp_path)) == ["a", "b", "c"]
    assert find_png(tmp_path, "b") == tmp_path / "b.PNG"
    assert find_png(tmp_path, "zz") == tmp_path / "zz.png"  # not there: the usual name
    assert CompetitionPaths(tmp_path.parent).image(tmp_path.name, "c") == tmp_path / "c.Png"
    assert list_pngs(tmp_path / "missing") == {}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_check_writable_accepts_new_and_existing_paths_and_leaves_nothing(tmp_path):
    assert check_writable(tmp_path / "new" / "deeper" / "sub.csv", "file") == tmp_path / "new" / "deeper" / "sub.csv"
    check_writable(tmp_path / "run" / "fold0", "dir")
    (tmp_path / "old.csv").write_text("x")
    check_writable(tmp_path / "old.csv", "file")
    check_writable(tmp_path, "dir")
    assert _leftovers(tmp_path) == ["old.csv"]  # no folder created, no probe file left


def test_check_writable_rejects_each_form(tmp_path):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    with pytest.raises(CellsegError, match="adir: is a folder; expected a file"):
        check_writable(tmp_path / "adir", "file")
    with pytest.raises(CellsegError, match="afile: is a file; expected a folder"):
        check_writable(tmp_path / "afile", "dir")
    with pytest.raises(CellsegError, match=r"cannot be created because .*afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "sub" / "submission.csv", "file")
    with pytest.raises(CellsegError, match="afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "run", "dir")
    assert _leftovers(tmp_path) == ["adir", "afile"]


def unwritable_folder(tmp_path: Path) -> Path:
    """A real folder this process cannot create files in: chmod 0555 for a normal user; for root
    (whom permissions do not stop) a sysfs folder, which refuses new files even to root."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    for candidate in (Path("/sys/kernel"), Path("/sys")):
        if candidate.is_dir():
            try:
                (candidate / ".cellseg-probe").touch()
            except OSError:
                return candidate
            (candidate / ".cellseg-probe").unlink()
    pytest.skip("running as root with no folder that refuses root's writes (no /sys)")


def test_check_writable_rejects_a_folder_that_refuses_writes(tmp_path):
    folder = unwritable_folder(tmp_path)
    with pytest.raises(CellsegError, match=r"cannot write in .*\((Permission denied|Read-only file system)\)"):
        check_writable(folder / "submission.csv", "file")
    with pytest.raises(CellsegError, match="cannot write in"):
        check_writable(folder / "run", "dir")


@pytest.fixture
def umask():
    def set_(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    os.umask(old)
    yield set_
    os.umask(old)


def test_atomic_writes_respect_the_umask_and_keep_an_existing_mode(tmp_path, umask):
    umask(0o022)
    atomic_write_text(tmp_path / "a.txt", "x")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert default_mode(directory=True) == 0o755
    umask(0o027)
    atomic_write_text(tmp_path / "b.txt", "x")
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
    (tmp_path / "a.txt").chmod(0o600)  # someone locked it down: a rewrite keeps that
    atomic_write_text(tmp_path / "a.txt", "y")
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o600
    assert (tmp_path / "a.txt").read_text() == "y"
    assert _leftovers(tmp_path) == ["a.txt", "b.txt"]


def test_a_staged_folder_gets_the_umask_mode_and_a_failure_leaves_nothing(tmp_path, umask):
    umask(0o022)
    out = tmp_path / "sub" / "out"
    with pytest.raises(RuntimeError), staging(out) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert _leftovers(tmp_path / "sub") == []
    with staging(out) as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o755  # not mkdtemp's 0700
        (tmp / "done.txt").write_text("ok")
        replace_dir(tmp, out, "done.txt", "an earlier output")
    assert _leftovers(tmp_path / "sub") == ["out"] and (out / "done.txt").read_text() == "ok"


def test_check_replaceable_accepts_new_empty_or_marked_folders_only(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / "mark.json").write_text("{}")
    (tmp_path / "earlier" / "data.bin").write_bytes(b"x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    (tmp_path / "file").write_text("x")
    for name in ("new", "empty", "earlier"):
        check_replaceable(tmp_path / name, "mark.json", "an earlier output")
    for name in ("mine", "file"):
        with pytest.raises(CellsegError, match=f"{name} exists and is not an earlier output: choose an empty or new"):
            check_replaceable(tmp_path / name, "mark.json", "an earlier output")


def test_read_text_file_names_binary_input(tmp_path):
    import torch

    torch.save({"w": torch.zeros(2)}, tmp_path / "best.pth")
    with pytest.raises(CellsegError, match=r"best\.pth: not a text file .*PyTorch checkpoint\); expected a config"):
        read_text_file(tmp_path / "best.pth", "a config")
    (tmp_path / "ok.yaml").write_text("a: 1\n")
    assert read_text_file(tmp_path / "ok.yaml", "a config") == "a: 1\n"
