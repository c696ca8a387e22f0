"""Every filesystem path the package uses is resolved here, and nowhere else.

Layout of a checkout::

    <repo>/configs/*.yaml        model/training configs
    <repo>/weights/<name>/       a shipped ensemble: checkpoints + manifest.yaml
    <repo>/kernel/submit.py      the Kaggle entry point

Competition-layout folder (real or synthetic)::

    <data>/train.csv  <data>/train/*.png  <data>/test/*.png
    <data>/train_semi_supervised/*.png  <data>/sample_submission.csv
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cellseg.errors import CellsegError

PACKAGE_DIR = Path(__file__).resolve().parent


def repo_root() -> Path | None:
    """The checkout this package runs from (``src/cellseg`` -> repo), or None when installed as a wheel."""
    root = PACKAGE_DIR.parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def git_commit(cwd: str | Path | None = None) -> str | None:
    """The HEAD commit (40 hex digits) of the git checkout at ``cwd`` (default: this package's), with
    ``-dirty`` appended when tracked files are modified; None outside git or without git.

    Recorded in checkpoints' provenance and in the Kaggle bundle's marker.
    """
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40", "--exclude=*"],  # no tag names: the hash
            cwd=Path(cwd) if cwd else PACKAGE_DIR,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _in_repo(*parts: str) -> Path:
    root = repo_root()
    if root is None:
        raise CellsegError(
            f"{'/'.join(parts)} lives in the source checkout, but cellseg is installed as a wheel; pass an explicit path"
        )
    return root.joinpath(*parts)


def configs_dir() -> Path:
    return _in_repo("configs")


def weights_dir() -> Path:
    return _in_repo("weights")


def demo_manifest() -> Path:
    """The committed demo model's manifest (``weights/demo/manifest.yaml``)."""
    return weights_dir() / "demo" / "manifest.yaml"


def kernel_entry() -> Path:
    return _in_repo("kernel", "submit.py")


@dataclass(frozen=True)
class CompetitionPaths:
    """The files of a competition-layout folder. Nothing is checked until a file is used."""

    root: Path

    @property
    def train_csv(self) -> Path:
        return self.root / "train.csv"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def semi_dir(self) -> Path:
        return self.root / "train_semi_supervised"

    @property
    def sample_submission(self) -> Path:
        return self.root / "sample_submission.csv"

    def image(self, split: str, image_id: str) -> Path:
        """PNG of ``image_id`` in ``split`` ('train', 'test' or 'train_semi_supervised'); ``.PNG`` in any
        letter case is found too."""
        from cellseg.io import find_png  # io imports PIL and numpy; paths stays light

        return find_png(self.root / split, image_id)

    def require(self, *names: str) -> CompetitionPaths:
        """Raise CellsegError naming the first missing entry among properties ``names``."""
        for name in names:
            path = getattr(self, name)
            if not path.exists():
                raise CellsegError(f"{path} not found (is {self.root} a competition-layout folder?)")
        return self


def kaggle_root() -> Path:
    """``/kaggle``, or what ``CELLSEG_KAGGLE_ROOT`` says (lets the kernel run locally)."""
    return Path(os.environ.get("CELLSEG_KAGGLE_ROOT", "/kaggle"))
