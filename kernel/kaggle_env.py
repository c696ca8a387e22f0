"""What both Kaggle entry points (``kernel/submit.py``, ``kernel/train.py``) do before ``cellseg`` imports.

Standard library only. Kaggle runs a kernel as ONE code file, so ``tools/push.py`` inlines this
module into the entry file when it stages the kernel (``cellseg.kaggle.kernel_code``): the block
between ``# >>> kaggle_env`` and ``# <<< kaggle_env`` in the entry file is replaced by this file's
text. Run from a checkout, the entry files import it from beside themselves.

* :func:`kaggle_root`: ``/kaggle``, or ``--kaggle-root`` / ``$CELLSEG_KAGGLE_ROOT`` to run locally
  against a fake tree.
* :func:`find_marker_dirs` / :func:`find_bundle` / :func:`find_data_dir`: discovery under
  ``/kaggle/input`` by marker files, never by mount point (``input/<slug>/``,
  ``input/datasets/<owner>/<slug>/``, ``input/competitions/<slug>/`` all work).
* :func:`import_cellseg`: ``pip install --no-index --no-deps --find-links <bundle>/wheels
  sartorius-cellseg`` into a scratch folder put on ``sys.path``, when cellseg is not importable.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

MARKER = "cellseg-bundle.json"
PACKAGE = "sartorius-cellseg"
MAX_DEPTH = 5


class KernelError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def make_log(name: str) -> Callable[[str], None]:
    """A logger writing ``[name HH:MM:SS] msg`` lines to stderr (the kernel's log on Kaggle)."""

    def log(msg: str) -> None:
        print(f"[{name} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log


def kaggle_root(arg: Path | None) -> Path:
    """``arg``, else ``$CELLSEG_KAGGLE_ROOT``, else ``/kaggle``; exported as ``CELLSEG_KAGGLE_ROOT`` so
    ``cellseg.paths.kaggle_root()`` (and any subprocess) agrees."""
    root = arg or Path(os.environ.get("CELLSEG_KAGGLE_ROOT", "/kaggle"))
    os.environ["CELLSEG_KAGGLE_ROOT"] = str(root)
    return root


def walk_dirs(top: Path, max_depth: int = MAX_DEPTH) -> Iterator[tuple[Path, set[str], list[str]]]:
    """Yield (dir, file names, dir names) breadth-first down to ``max_depth`` levels below ``top``."""
    level = [top]
    for _ in range(max_depth + 1):
        nxt = []
        for d in level:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            files = {e.name for e in entries if e.is_file()}
            dirs = sorted(e.name for e in entries if e.is_dir())
            yield d, files, dirs
            nxt += [d / n for n in dirs if not n.startswith(".")]
        level = nxt


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; KernelError when unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise KernelError(f"{path}: unreadable ({e})") from None
    if not isinstance(data, dict):
        raise KernelError(f"{path}: expected a JSON object")
    return data


def find_marker_dirs(input_dir: Path, name: str) -> list[Path]:
    """Every folder under ``input_dir`` holding a file ``name``, shallowest first, then alphabetically."""
    return [d for d, files, _ in walk_dirs(input_dir) if name in files]


def find_bundle(input_dir: Path, kind: str = "predict") -> tuple[Path, dict]:
    """(folder, marker) of the shallowest bundle of ``kind``: "predict" (markers without a ``kind``,
    the inference bundle) or "train" (the training bundle of ``push.py train``)."""
    for d in find_marker_dirs(input_dir, MARKER):
        marker = read_json(d / MARKER)
        if marker.get("kind", "predict") == kind:
            return d, marker
    what = MARKER if kind == "predict" else f'{MARKER} of kind "{kind}"'
    raise KernelError(f"no {what} under {input_dir} (is the cellseg dataset attached to the notebook?)")


def find_data_dir(input_dir: Path, file: str, folder: str) -> Path:
    """The shallowest folder with file ``file`` and sub-folder ``folder`` (e.g. the competition data:
    ``sample_submission.csv`` + ``test/`` to predict, ``train.csv`` + ``train/`` to train)."""
    for d, files, dirs in walk_dirs(input_dir):
        if file in files and folder in dirs:
            return d
    raise KernelError(f"no competition folder ({file} + {folder}/) under {input_dir}")


def import_cellseg(bundle: Path, scratch: Path, log: Callable[[str], None]):
    """Import cellseg, installing the bundle's wheel offline first when it is not importable."""
    try:
        return importlib.import_module("cellseg")
    except ImportError:
        pass
    wheels = bundle / "wheels"
    if not any(wheels.glob("*.whl")):
        raise KernelError(f"cellseg is not installed and {wheels} holds no wheel")
    target = Path(tempfile.mkdtemp(prefix="cellseg-pkg-", dir=scratch if scratch.is_dir() else None))
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--find-links",
        str(wheels),
        "--target",
        str(target),
        PACKAGE,
    ]
    log("installing " + PACKAGE + " from " + str(wheels))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise KernelError(f"offline pip install of {PACKAGE} failed: {last[0]}")
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        return importlib.import_module("cellseg")
    except ImportError as e:
        raise KernelError(f"cellseg still not importable after installing it into {target}: {e}") from None
