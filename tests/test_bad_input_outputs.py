"""The one output policy (cellseg.io), in every command that writes: rows of docs/BAD_INPUT.md.

An output never resolves to one of the command's inputs; an existing device, fifo, socket or folder
is never replaced by a file; a symlink is written through (the link stays, its target is replaced);
a folder holding files the command did not make is only written into with --force; a full disk or a
name over 255 bytes is one line, exit 2, and the earlier file is kept."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
from pathlib import Path

import numpy as np
import pytest

from bad_input_helpers import (
    assert_one_line_error,
    cli,
    cli_inproc,
    full_disk_prefix,
    leftovers,
)
from cellseg.io import atomic_write_text, write_gray
from helpers import train_rows, write_train_csv
from inference_helpers import make_competition, make_manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_manifest(tmp_path_factory.mktemp("w") / "tiny", n_models=1, tta=("identity",), detections_per_view=30)


def square(h: int, w: int, y: int, x: int, size: int = 5) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y : y + size, x : x + size] = True
    return m


@pytest.fixture
def data(tmp_path) -> Path:
    """A competition folder: train.csv + train/ (3 images), test/ (2), sample_submission.csv."""
    root = make_competition(tmp_path / "data", n_test=2, height=40, width=48)
    rows = []
    for k, i in enumerate(("t1", "t2", "t3")):
        rows += train_rows(i, "cort", [square(40, 48, 3 + k, 4), square(40, 48, 20, 20)], sample_id=f"s{k}")
        write_gray(root / "train" / f"{i}.png", np.full((40, 48), 120, np.uint8))
    write_train_csv(root / "train.csv", rows)
    return root


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ an output that is an input

INPUT_CLASHES = {
    "pseudo-label --out DATA/train.csv": ("pseudo-label", "--out", "{data}/train.csv"),
    "folds --out DATA/train.csv": ("folds", "--out", "{data}/train.csv"),
    "predict --out DATA/sample_submission.csv": ("predict", "--out", "{data}/sample_submission.csv"),
    "predict --out a test PNG": ("predict", "--out", "{data}/test/0000000000a0.png"),
    "predict --out the manifest": ("predict", "--out", "{w}"),
    "predict --out a model file": ("predict", "--out", "{wdir}/model0.pth"),
    "dry-run --report DATA": ("dry-run", "--report", "{data}"),
    "predict-raw --out DATA": ("predict-raw", "--out", "{data}"),
    "show-aug --out its --config": ("show-aug", "--out", "{w}"),
}
EXTRA = {
    "pseudo-label": ("--data", "{data}", "--weights", "{w}"),
    "folds": ("--data", "{data}"),
    "predict": ("--data", "{data}", "--weights", "{w}"),
    "dry-run": ("--data", "{data}", "--weights", "{w}"),
    "predict-raw": ("--data", "{data}", "--weights", "{w}"),
    "show-aug": ("--data", "{data}", "--config", "{w}"),
}


@pytest.mark.parametrize("case", list(INPUT_CLASHES))
def test_an_output_that_is_an_input_is_refused(case, tiny, data, capsys):
    command, flag, out = INPUT_CLASHES[case]
    fill = {"data": data, "w": tiny, "wdir": tiny.parent}
    target = Path(out.format(**fill))
    before = {p: digest(p) for p in [*data.rglob("*"), *tiny.parent.iterdir()] if p.is_file()}
    args = [a.format(**fill) for a in EXTRA[command]] + [flag, str(target)]
    res = cli_inproc(capsys, command, *args)
    assert_one_line_error(res, str(target), "is (or holds) the input")
    after = {p: digest(p) for p in [*data.rglob("*"), *tiny.parent.iterdir()] if p.is_file()}
    assert after == before  # nothing read was touched, nothing written beside it


def test_a_hard_link_to_an_input_is_refused(data, tmp_path, capsys):
    link = tmp_path / "folds.csv"
    os.link(data / "train.csv", link)
    before = digest(data / "train.csv")
    res = cli_inproc(capsys, "folds", "--data", data, "--out", link)
    assert_one_line_error(res, "folds.csv", "is (or holds) the input", "train.csv")
    assert digest(data / "train.csv") == before


# ------------------------------------------------------------------ non-regular targets


def test_a_device_node_is_never_replaced(data, capsys):
    # as root the old writer replaced /dev/full with a file; the check reads the node's kind only
    res = cli_inproc(capsys, "folds", "--data", data, "--out", "/dev/full")
    assert_one_line_error(res, "/dev/full", "is a character device, not a regular file")
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_a_fifo_is_never_replaced(data, tmp_path, capsys):
    fifo = tmp_path / "out.csv"
    os.mkfifo(fifo)
    res = cli_inproc(capsys, "folds", "--data", data, "--out", fifo)
    assert_one_line_error(res, "out.csv", "is a fifo (named pipe), not a regular file")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_socket_is_never_replaced(data, tmp_path, capsys):
    path = tmp_path / "s.csv"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        res = cli_inproc(capsys, "pseudo-label", "--data", data, "--weights", data, "--out", path)
    assert_one_line_error(res, "s.csv", "is a socket, not a regular file")
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_a_symlink_to_a_device_is_refused(data, tmp_path, capsys):
    link = tmp_path / "null.csv"
    link.symlink_to("/dev/null")
    res = cli_inproc(capsys, "folds", "--data", data, "--out", link)
    assert_one_line_error(res, "null.csv", "is a character device")
    assert link.is_symlink() and stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ------------------------------------------------------------------ the symlink rule: write through


def test_a_symlinked_output_is_written_through(data, tmp_path, capsys):
    target = tmp_path / "real" / "folds.csv"
    target.parent.mkdir()
    target.write_text("stale\n")
    os.chmod(target, 0o640)
    link = tmp_path / "folds.csv"
    link.symlink_to(target)
    res = cli_inproc(capsys, "folds", "--data", data, "--out", link, "-k", "2")
    assert res.code == 0, res.err
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays
    assert target.read_text().startswith("id,sample_id,cell_type,fold\n")  # its target is new
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # and keeps its mode
    assert leftovers(target.parent) == ["folds.csv"]


def test_a_dangling_symlink_creates_its_target(data, tmp_path, capsys):
    target = tmp_path / "real" / "folds.csv"
    target.parent.mkdir()
    link = tmp_path / "folds.csv"
    link.symlink_to(target)
    res = cli_inproc(capsys, "folds", "--data", data, "--out", link, "-k", "2")
    assert res.code == 0, res.err
    assert link.is_symlink() and target.is_file()


# ------------------------------------------------------------------ folders holding other files


def test_dry_run_never_replaces_an_earlier_report_silently(tiny, data, tmp_path, capsys):
    report = tmp_path / "runs" / "dry" / "r1"
    report.mkdir(parents=True)
    (report / "summary.json").write_text('{"score": 0.31}\n')
    res = cli_inproc(capsys, "dry-run", "--data", data, "--weights", tiny, "--report", report, "--images", "1")
    assert_one_line_error(res, "summary.json", "did not make", "--force")
    assert (report / "summary.json").read_text() == '{"score": 0.31}\n'
    assert "loaded" not in res.err


def test_dry_run_force_writes_into_a_used_report_folder(tiny, data, tmp_path, capsys):
    report = tmp_path / "r"
    report.mkdir()
    (report / "summary.json").write_text('{"score": 0.31}\n')
    args = ("--data", data, "--weights", tiny, "--report", report, "--images", "1", "--no-progress", "--force")
    res = cli_inproc(capsys, "dry-run", *args)
    assert res.code == 0, res.err[-3000:]
    assert '"score": 0.31' not in (report / "summary.json").read_text()


FOREIGN = {
    "predict-raw": ("--data", "{data}", "--weights", "{w}", "--out", "{out}", "--images", "1"),
    "convert-detectron2": ("{w}", "--config", "{w}", "--out", "{out}"),
    "demo": ("--out", "{out}"),
    "tune": ("--cache", "{out}", "--truth", "{data}/train.csv", "--weights", "{w}", "--plots", "{out}"),
}


@pytest.mark.parametrize("command", list(FOREIGN))
def test_a_folder_of_other_files_is_not_written_into(command, tiny, data, tmp_path, capsys):
    out = tmp_path / "used"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    fill = {"data": data, "w": tiny, "out": out}
    res = cli_inproc(capsys, command, *[a.format(**fill) for a in FOREIGN[command]])
    assert_one_line_error(res, "notes.txt", "did not make")
    assert leftovers(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine\n"


# ------------------------------------------------------------------ names too long, full disks


def test_an_out_name_over_255_bytes_is_one_line(tiny, data, tmp_path, capsys):
    long = tmp_path / ("x" * 300 + ".csv")
    res = cli_inproc(capsys, "predict", "--data", data, "--weights", tiny, "--out", long)
    assert_one_line_error(res, "file name too long", "304 bytes")
    assert "loaded" not in res.err
    deep = tmp_path / ("d" * 256) / "report"
    res = cli_inproc(capsys, "dry-run", "--data", data, "--weights", tiny, "--report", deep)
    assert_one_line_error(res, "file name too long", "256 bytes")


def test_a_name_near_the_limit_is_written(data, tmp_path, capsys):
    # the temporary file beside it must not be longer than the limit
    out = tmp_path / ("f" * 250 + ".csv")
    res = cli_inproc(capsys, "folds", "--data", data, "--out", out, "-k", "2")
    assert res.code == 0, res.err
    assert leftovers(tmp_path) == sorted(["data", out.name])


def test_a_full_disk_keeps_the_earlier_file(monkeypatch, tmp_path):
    """The writer itself (every command's CSV goes through it): ENOSPC in the middle of a write."""
    import errno

    from cellseg.errors import CellsegError

    out = tmp_path / "sub.csv"
    out.write_text("earlier\n")

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(CellsegError, match=r"sub.csv: cannot write \(disk full\); nothing there was replaced"):
        atomic_write_text(out, "new\n")
    monkeypatch.undo()
    assert out.read_text() == "earlier\n" and leftovers(tmp_path) == ["sub.csv"]


def full_disk_run(tmp_path: Path, keep: Path, *args: object):
    mnt = tmp_path / "full"
    prefix = full_disk_prefix(mnt, keep)
    if prefix is None:
        pytest.skip("no user + mount namespace here to mount a full tmpfs")
    res = cli(*[str(a).replace("{mnt}", str(mnt)) for a in args], cwd=tmp_path, prefix=prefix)
    before, _, after = res.out.partition("--- after\n")
    res.out = before
    return res, after


@pytest.mark.slow
def test_predict_on_a_full_disk_is_one_line_and_keeps_the_earlier_file(tiny, data, tmp_path):
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("id,predicted\n" + "".join(f"{i:0>64},\n" for i in range(300)))
    res, after = full_disk_run(
        tmp_path, earlier, "predict", "--data", data, "--weights", tiny, "--out", "{mnt}/earlier", "--no-progress"
    )
    assert_one_line_error(res, "earlier: cannot write (disk full)")
    assert digest(earlier) in after  # the earlier file, byte for byte
    assert [ln for ln in after.splitlines()[1:]] == [".fill", "earlier"]  # no temporary left


@pytest.mark.slow
def test_export_on_a_full_disk_leaves_no_folder(tiny, tmp_path):
    res, after = full_disk_run(tmp_path, tiny, "export", tiny.parent / "model0.pth", "--out", "{mnt}/w")
    assert_one_line_error(res, "cannot write")
    assert after.splitlines()[1:] == [".fill", "earlier"]  # no w/, no staging folder


def test_export_force_failing_leaves_the_old_folder_as_it_was(tiny, tmp_path, capsys):
    out = tmp_path / "w"
    shutil.copytree(tiny.parent, out)
    before = {p.name: digest(p) for p in out.iterdir()}
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 not a checkpoint")
    res = cli_inproc(capsys, "export", bad, "--out", out, "--force")
    assert res.code == 2 and "Traceback" not in res.text
    assert {p.name: digest(p) for p in out.iterdir()} == before
    assert leftovers(tmp_path) == ["bad.pth", "w"]
