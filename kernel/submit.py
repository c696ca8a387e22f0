"""Kaggle entry point: offline submission for "Sartorius - Cell Instance Segmentation".

Runs as the competition notebook (internet off). Standard library only until ``cellseg`` imports:

1. find our dataset bundle under ``<root>/input`` by its marker file ``cellseg-bundle.json``
   (searched recursively, depth-limited, so every mount layout works: ``input/<slug>/``,
   ``input/datasets/<owner>/<slug>/``, ``input/competitions/<slug>/``);
2. when ``cellseg`` is not importable, ``pip install --no-index --no-deps --find-links
   <bundle>/wheels sartorius-cellseg`` into a scratch folder that is put on ``sys.path``;
3. find the competition folder by its ``sample_submission.csv`` + ``test/``;
4. run cellseg's predict pipeline with the bundle's manifest (the marker's ``"manifest"``) and write
   ``<root>/working/submission.csv`` (validated before exit).

When no test image can be predicted (every PNG unreadable, or ``test/`` empty) the submission is still
written, with an empty row for every ``sample_submission.csv`` id, the reason is logged in a banner
and the exit status is 0: on Kaggle a missing submission.csv is the one outcome that must not happen.

``--kaggle-root DIR`` (or the environment variable ``CELLSEG_KAGGLE_ROOT``) replaces ``/kaggle``, so
the same file runs locally against a fake tree. Expected failures print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "cellseg-bundle.json"
PACKAGE = "sartorius-cellseg"
MAX_DEPTH = 5


class KernelError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def log(msg: str) -> None:
    print(f"[submit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def walk_dirs(top: Path, max_depth: int = MAX_DEPTH):
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


def find_bundle(input_dir: Path) -> Path:
    """The folder holding ``cellseg-bundle.json`` (the shallowest, then alphabetically first)."""
    for d, files, _ in walk_dirs(input_dir):
        if MARKER in files:
            return d
    raise KernelError(f"no {MARKER} under {input_dir} (is the cellseg dataset attached to the notebook?)")


def find_competition(input_dir: Path) -> Path:
    """The folder with ``sample_submission.csv`` and a ``test/`` folder (shallowest first)."""
    for d, files, dirs in walk_dirs(input_dir):
        if "sample_submission.csv" in files and "test" in dirs:
            return d
    raise KernelError(f"no competition folder (sample_submission.csv + test/) under {input_dir}")


def import_cellseg(bundle: Path, scratch: Path):
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Offline Kaggle submission with the bundled cellseg ensemble.")
    p.add_argument(
        "--kaggle-root", type=Path, default=None, help="replaces /kaggle (default: $CELLSEG_KAGGLE_ROOT or /kaggle)"
    )
    p.add_argument("--time-budget", default="8h30m", help="wall-clock budget for predicting (default 8h30m)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--manifest", default=None, help="manifest path relative to the bundle (default: the marker's)")
    p.add_argument("--out", type=Path, default=None, help="default: <root>/working/submission.csv")
    return p.parse_args(argv)


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    root = args.kaggle_root or Path(os.environ.get("CELLSEG_KAGGLE_ROOT", "/kaggle"))
    os.environ["CELLSEG_KAGGLE_ROOT"] = str(root)  # cellseg.paths.kaggle_root() agrees with us
    input_dir = root / "input"
    try:
        if not input_dir.is_dir():
            raise KernelError(f"{input_dir} not found (use --kaggle-root to run outside Kaggle)")
        bundle = find_bundle(input_dir)
        try:
            marker = json.loads((bundle / MARKER).read_text())
        except (OSError, ValueError) as e:
            raise KernelError(f"{bundle / MARKER}: unreadable marker ({e})") from None
        manifest = bundle / (args.manifest or marker.get("manifest") or "")
        if not manifest.is_file():
            raise KernelError(f"manifest {manifest} not found in the bundle")
        log(f"bundle {bundle} (version {marker.get('version', '?')}, commit {str(marker.get('git_commit'))[:12]})")
        comp = find_competition(input_dir)
        log(f"competition data {comp}")
        cellseg = import_cellseg(bundle, root / "temp")
        log(f"cellseg {getattr(cellseg, '__version__', '?')} from {Path(cellseg.__file__).parent}")
        from cellseg.errors import CellsegError
        from cellseg.io import check_writable

        out = args.out or root / "working" / "submission.csv"
        try:
            check_writable(out, "file")  # before torch is imported and the models load
            from cellseg.inference.runner import parse_duration, predict_folder

            budget = parse_duration(args.time_budget)
            spent = time.monotonic() - start
            result = predict_folder(
                comp, manifest, out, time_budget=budget - spent if budget else None, device=args.device
            )
        except CellsegError as e:
            raise KernelError(str(e)) from None
    except KernelError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    predicted = [i for i in result.seconds if i not in result.failed]
    if not predicted and not result.skipped:
        why = (
            f"every one of the {len(result.failed)} test image(s) is unreadable; first: "
            + next(iter(result.failed.values()))
            if result.failed
            else f"{comp / 'test'} holds no PNG image"
        )
        banner = "!" * 72
        for line in (
            banner,
            f"NO TEST IMAGE WAS PREDICTED: {why}",
            f"{out} has an empty row for each of {len(result.rows)} id(s): it is valid and will score 0",
            banner,
        ):
            log(line)
    log(
        f"done: {out} ({len(result.rows)} images, {sum(map(len, result.rows.values()))} instances) "
        f"in {time.monotonic() - start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
