"""Fixtures shared by the kernel tests: a bare venv (torch importable, cellseg not) and a wheel of
the checkout."""

from __future__ import annotations

import subprocess
import sysconfig
from pathlib import Path

import pytest

from cellseg.kaggle.bundle import build_wheel
from cellseg.paths import repo_root


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory) -> Path:
    """A fresh venv that sees this venv's site-packages through a plain .pth line (torch imports),
    but not the editable install of cellseg (its own .pth is not processed from there)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run(["python3.11", "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "parent_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    build_wheel(repo_root(), out)
    return out
