"""The ``cellseg`` command line: command registry, config overrides anywhere on the line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cellseg.cli import main

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
