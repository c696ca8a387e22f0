"""Kaggle entry point: offline submission for "Sartorius - Cell Instance Segmentation".

Runs as the competition notebook (internet off). Standard library only until ``cellseg`` imports;
the discovery and offline-install code is ``kernel/kaggle_env.py``, shared with ``kernel/train.py``
and inlined into this file when ``tools/push.py`` stages the kernel (Kaggle runs one file):

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
import sys
import time
from pathlib import Path

# >>> kaggle_env: push.py inlines kernel/kaggle_env.py here (Kaggle runs one file); from a checkout it is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kaggle_env import KernelError, find_bundle, find_data_dir, import_cellseg, kaggle_root, make_log  # noqa: E402

# <<< kaggle_env

log = make_log("submit")


def find_competition(input_dir: Path) -> Path:
    """The folder with ``sample_submission.csv`` and a ``test/`` folder (shallowest first)."""
    return find_data_dir(input_dir, "sample_submission.csv", "test")


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
    root = kaggle_root(args.kaggle_root)
    input_dir = root / "input"
    try:
        if not input_dir.is_dir():
            raise KernelError(f"{input_dir} not found (use --kaggle-root to run outside Kaggle)")
        bundle, marker = find_bundle(input_dir, "predict")
        manifest = bundle / (args.manifest or marker.get("manifest") or "")
        if not manifest.is_file():
            raise KernelError(f"manifest {manifest} not found in the bundle")
        log(f"bundle {bundle} (version {marker.get('version', '?')}, commit {str(marker.get('git_commit'))[:12]})")
        comp = find_competition(input_dir)
        log(f"competition data {comp}")
        cellseg = import_cellseg(bundle, root / "temp", log)
        log(f"cellseg {getattr(cellseg, '__version__', '?')} from {Path(cellseg.__file__).parent}")
        from cellseg.config.loader import parse_duration
        from cellseg.errors import CellsegError
        from cellseg.io import check_writable

        out = args.out or root / "working" / "submission.csv"
        try:
            check_writable(out, "file")  # before torch is imported and the models load
            from cellseg.inference.runner import predict_folder  # imports torch: after the output check

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
    why = result.nothing_predicted(comp / "test")
    if why is not None:
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
