"""The ``cellseg`` command line: command registry, config overrides anywhere on the line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellseg.cli import main
from cellseg.io import write_gray
from cellseg.model.checkpoint import read_checkpoint_info
from helpers import train_rows, write_train_csv

REPO = Path(__file__).resolve().parents[1]


def test_overrides_after_options_reach_the_config(tmp_path, capsys):
    """Overrides on both sides of ``--out`` are all applied: the unknown key placed after ``--out``
    is the one the config loader rejects (so it was parsed as an override, not dropped)."""
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs/demo.yaml"),
            "--data",
            str(tmp_path),
            "train.epochs=1",
            "--out",
            str(tmp_path / "run"),
            "model.no_such_key=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "model.no_such_key" in err


def test_stray_arguments_are_usage_errors(tmp_path):
    """Anything left over that is not KEY=VALUE stays an argparse error (exit 2, 'unrecognized
    arguments'), wherever it sits."""
    base = [
        sys.executable,
        "-m",
        "cellseg",
        "train",
        "--config",
        str(REPO / "configs/demo.yaml"),
        "--data",
        str(tmp_path),
    ]
    for tail, stray in (
        (["train.epochs=1", "--out", "r", "stray"], "stray"),
        (["--no-such-option"], "--no-such-option"),
    ):
        proc = subprocess.run(base + tail, capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert f"unrecognized arguments: {stray}" in proc.stderr
        assert not (tmp_path / "r").exists()


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "commands" in capsys.readouterr().out


# ------------------------------------------------------------------ train: never overwrite a run


def fake_run_folder(folder: Path) -> dict[str, bytes]:
    """A folder holding (stand-ins for) a finished run's files; returns their bytes."""
    folder.mkdir(parents=True)
    files = {"last.pth": b"first run, last", "best.pth": b"first run, best", "metrics.csv": b"epoch\n1\n"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files


def test_a_folds_csv_made_for_other_data_is_refused(tmp_path, capsys):
    data = make_tiny_data(tmp_path / "data")
    (tmp_path / "folds.csv").write_text("id,sample_id,cell_type,fold\nother,s,cort,0\n")
    args = ["train", "--config", str(REPO / "configs/demo.yaml"), "--data", str(data), "--out", str(tmp_path / "r")]
    assert main([*args, f"data.folds_csv={tmp_path}/folds.csv"]) == 2
    err = capsys.readouterr().err
    assert "made for other data (9 train image(s) in no fold" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_train_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    out = tmp_path / "runs" / "fold0"
    files = fake_run_folder(out)
    args = ["train", "--config", str(REPO / "configs/demo.yaml"), "--data", str(tmp_path), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(out) in err and "--resume" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # untouched
    # --resume and --force together make no sense
    proc = subprocess.run(
        [sys.executable, "-m", "cellseg", *args, "--resume", "--force"], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr


def make_tiny_data(root: Path) -> Path:
    """9 images of 64 x 80 (3 per cell type, each its own sample) with three bright disks each."""
    (root / "train").mkdir(parents=True)
    yy, xx = np.mgrid[:64, :80]
    rows = []
    for i, cell_type in enumerate(["shsy5y", "astro", "cort"] * 3):
        image = np.full((64, 80), 90, np.uint8)
        masks = [(yy - 15 - 15 * k) ** 2 + (xx - 15 - 20 * k - i) ** 2 <= 25 for k in range(3)]
        for m in masks:
            image[m] = 200
        write_gray(root / "train" / f"{i:012x}.png", image)
        rows += train_rows(f"{i:012x}", cell_type, masks, sample_id=f"{cell_type}[x]_s{i}")
    write_train_csv(root / "train.csv", rows)
    return root


@pytest.fixture(scope="module")
def forced_run(tmp_path_factory):
    """`cellseg train --force` into a folder holding another run's files, with stderr a pipe (as when
    logging to a file), a folds CSV whose fold 0 holds one image (8 train images / batch 2 = 4 steps per
    epoch) and train.max_steps=2: (run folder, completed process)."""
    from train_helpers import TINY_OVERRIDES

    root = tmp_path_factory.mktemp("forced")
    data = make_tiny_data(root / "data")
    folds = pd.read_csv(data / "train.csv", dtype=str).drop_duplicates("id")[["id", "sample_id", "cell_type"]]
    folds["fold"] = [0] + [1 + i % 2 for i in range(len(folds) - 1)]
    folds.to_csv(root / "folds.csv", index=False)
    out = root / "run"
    fake_run_folder(out)
    (out / "curves.png").write_bytes(b"stale")
    args = ["train", "--config", str(REPO / "configs/demo.yaml"), "--data", str(data), "--fold", "0"]
    args += ["--out", str(out), "--force", *TINY_OVERRIDES, "train.max_steps=2", f"data.folds_csv={root}/folds.csv"]
    proc = subprocess.run([sys.executable, "-m", "cellseg", *args], capture_output=True, text=True, timeout=300)
    return out, proc


@pytest.mark.slow
def test_train_force_replaces_the_run(forced_run):
    out, proc = forced_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_checkpoint_info(out / "best.pth").provenance["step"] == 2  # a real checkpoint of this run
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == [2]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_train_holds_out_the_fold_of_the_folds_csv(forced_run):
    _, proc = forced_run
    assert "8 train / 1 hold-out images" in proc.stdout + proc.stderr  # data.folds=3 alone would hold out 3


def test_train_progress_counts_the_steps_it_takes_and_prints_lines_into_a_log(forced_run):
    """4 steps per epoch, but train.max_steps=2: the total is 2. tqdm draws nothing when stderr is
    not a terminal; plain lines are printed instead."""
    _, proc = forced_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("epoch 1/3: ")]
    assert lines and lines[-1].startswith("epoch 1/3: 2/2 step (100%)"), proc.stderr[-2000:]
    assert not [line for line in proc.stderr.splitlines() if "/4 step" in line]
    assert "Warning" not in proc.stderr  # nothing a user cannot act on


def test_score_by_threshold_shows_where_a_loose_mask_loses(tmp_path, capsys):
    """``cellseg score --by-threshold``: a cell drawn 2 columns off (IoU 0.667) is a TP up to 0.65 and an
    FP + FN above; ``--json`` carries the same rows."""
    from cellseg.data import rle

    cell = np.zeros((20, 30), bool)
    cell[2:12, 2:12] = True
    truth = write_train_csv(tmp_path / "train.csv", train_rows("a", "cort", [cell]))
    sub = tmp_path / "sub.csv"
    sub.write_text(f"id,predicted\na,{rle.encode(np.roll(cell, 2, axis=1))}\n")
    assert main(["score", "--truth", str(truth), "--submission", str(sub), "--by-threshold"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln[:2] in ("0.", "me")]
    assert [r[0] for r in rows] == [f"{t:.2f}" for t in np.arange(0.5, 1.0, 0.05)] + ["mean"]
    assert [r[1:] for r in rows[3:5]] == [["1", "0", "0", "1.0000"], ["0", "1", "1", "0.0000"]]
    assert rows[-1] == ["mean", "0.4000"]
    assert main(["score", "--truth", str(truth), "--submission", str(sub)]) == 0
    assert "IoU >" not in capsys.readouterr().out  # the table is asked for
    assert main(["score", "--truth", str(truth), "--submission", str(sub), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["tp"] for r in out["per_threshold"]] == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
