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

The last line of defence: once the competition folder is found and ``--out`` is known to be writable,
*anything* that raises (importing cellseg, loading the manifest or the models, the time calibration,
an image, fusion, RLE encoding, writing or validating the file) ends in :func:`fallback`: a
standard-library writer puts an empty row for every ``sample_submission.csv`` id and every test PNG
into ``submission.csv``, a ``!!!`` banner names the function that failed, and the exit status is 0.

``--kaggle-root DIR`` (or the environment variable ``CELLSEG_KAGGLE_ROOT``) replaces ``/kaggle``, so
the same file runs locally against a fake tree. Expected failures print one line and exit 2.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

# >>> kaggle_env: push.py inlines kernel/kaggle_env.py here (Kaggle runs one file); from a checkout it is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kaggle_env import KernelError, find_bundle, find_data_dir, import_cellseg, kaggle_root, make_log  # noqa: E402

# <<< kaggle_env

log = make_log("submit")


def find_competition(input_dir: Path) -> Path:
    """The folder with ``sample_submission.csv`` and a ``test/`` folder (shallowest first)."""
    return find_data_dir(input_dir, "sample_submission.csv", "test")


def device_choice(text: str) -> str:
    """cellseg's ``--device`` choices (``cellseg.commands.common.DEVICE_CHOICES``; cellseg is not
    importable yet when the arguments are parsed, so the same pattern is spelled here)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r} (choose from auto, cpu, cuda, cuda:N)")
    return text


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Offline Kaggle submission with the bundled cellseg ensemble.")
    p.add_argument(
        "--kaggle-root", type=Path, default=None, help="replaces /kaggle (default: $CELLSEG_KAGGLE_ROOT or /kaggle)"
    )
    p.add_argument("--time-budget", default="8h30m", help="wall-clock budget for predicting (default 8h30m)")
    p.add_argument(
        "--device",
        default="auto",
        type=device_choice,
        metavar="{auto,cpu,cuda,cuda:N}",
        help="auto, cpu, cuda or cuda:N (cellseg's --device choices)",
    )
    p.add_argument("--manifest", default=None, help="manifest path relative to the bundle (default: the marker's)")
    p.add_argument("--out", type=Path, default=None, help="default: <root>/working/submission.csv")
    return p.parse_args(argv)


def banner(*lines: str) -> None:
    rule = "!" * 72
    for line in (rule, *lines, rule):
        log(line)


def fallback_ids(comp: Path) -> list[str]:
    """Every id the scorer may expect, standard library only: ``sample_submission.csv``'s ids, then
    the test PNGs' (``.png`` in any letter case; a name that is not valid UTF-8 cannot be an id and is
    skipped), white space stripped as cellseg's writer does."""
    ids: list[str] = []
    try:
        with open(comp / "sample_submission.csv", newline="", encoding="utf-8") as f:
            ids += [row.get("id") or "" for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        log(f"warning: sample_submission.csv not readable ({type(e).__name__}: {e})")
    try:
        ids += sorted(p.name[:-4] for p in (comp / "test").iterdir() if p.name.lower().endswith(".png"))
    except OSError as e:
        log(f"warning: test/ not listable ({type(e).__name__}: {e})")
    out = []
    for i in ids:
        try:
            i.encode("utf-8")
        except UnicodeEncodeError:
            log(f"warning: skipping {ascii(i)}: not valid UTF-8, it cannot be a submission id")
            continue
        if i.strip() and "\n" not in i and "\r" not in i:
            out.append(i.strip())
    return list(dict.fromkeys(out))


def failed_where(error: BaseException) -> str:
    """The deepest frame of cellseg or this kernel in ``error``'s traceback, with its source line:
    ``predict_folder (runner.py:245: loaded_all = load_ensemble(manifest, dev))`` names the stage."""
    here = Path(__file__).resolve().parent
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    ours = [f for f in frames if "cellseg" in Path(f.filename).parts or Path(f.filename).resolve().parent == here]
    if not (ours or frames):
        return "?"
    f = (ours or frames)[-1]
    return f"{f.name} ({Path(f.filename).name}:{f.lineno}: {(f.line or '').strip()})"


def fallback(comp: Path, out: Path, error: BaseException) -> int:
    """Write an empty row for every id (:func:`fallback_ids`) into ``out`` atomically, name what failed
    in a banner and return 0; 2 only when even this file cannot be written."""
    what = failed_where(error)
    first = (str(error).splitlines() or [""])[0]
    try:
        ids = fallback_ids(comp)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".submission.", suffix=".tmp", dir=out.parent)
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(("id", "predicted"))
            w.writerows((i, "") for i in ids)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except Exception as e:
        print(
            f"submit: error: prediction failed in {what} ({type(error).__name__}: {first}) and {out} "
            f"could not be written either ({type(e).__name__}: {e})",
            file=sys.stderr,
        )
        return 2
    banner(
        f"PREDICTION FAILED in {what}: {type(error).__name__}: {first}",
        f"{out} has an empty row for each of {len(ids)} id(s): it is valid and will score 0",
    )
    return 0


def discover(root: Path, args: argparse.Namespace) -> tuple[Path, Path, Path]:
    """(bundle, manifest, competition folder); KernelError when one is missing."""
    input_dir = root / "input"
    if not input_dir.is_dir():
        raise KernelError(f"{input_dir} not found (use --kaggle-root to run outside Kaggle)")
    bundle, marker = find_bundle(input_dir, "predict")
    manifest = bundle / (args.manifest or marker.get("manifest") or "")
    if not manifest.is_file():
        raise KernelError(f"manifest {manifest} not found in the bundle")
    log(f"bundle {bundle} (version {marker.get('version', '?')}, commit {str(marker.get('git_commit'))[:12]})")
    comp = find_competition(input_dir)
    log(f"competition data {comp}")
    return bundle, manifest, comp


def check_out(out: Path) -> None:
    """KernelError when ``out`` cannot be a file: a folder, under a file, or a folder refusing writes
    (standard library: cellseg may be the thing that fails to import)."""
    if out.is_dir():
        raise KernelError(f"{out}: is a folder; expected a file path to write")
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise KernelError(f"{out}: cannot be created because {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cellseg-write-check-", dir=probe)
    except OSError as e:
        raise KernelError(f"{out}: cannot write in {probe} ({e.strerror or type(e).__name__})") from None
    os.close(fd)
    os.unlink(tmp)


def predict(bundle: Path, manifest: Path, comp: Path, out: Path, args: argparse.Namespace, start: float) -> int:
    """cellseg's predict pipeline into ``out``; any exception is the caller's to turn into :func:`fallback`."""
    cellseg = import_cellseg(bundle, Path(args.kaggle_root_dir) / "temp", log)
    log(f"cellseg {getattr(cellseg, '__version__', '?')} from {Path(cellseg.__file__).parent}")
    from cellseg.config.loader import parse_duration
    from cellseg.inference.runner import predict_folder  # imports torch: after the output check

    budget = parse_duration(args.time_budget)
    spent = time.monotonic() - start
    result = predict_folder(comp, manifest, out, time_budget=budget - spent if budget else None, device=args.device)
    why = result.nothing_predicted(comp / "test")
    if why is not None:
        banner(
            f"NO TEST IMAGE WAS PREDICTED: {why}",
            f"{out} has an empty row for each of {len(result.rows)} id(s): it is valid and will score 0",
        )
    log(
        f"done: {out} ({len(result.rows)} images, {sum(map(len, result.rows.values()))} instances) "
        f"in {time.monotonic() - start:.0f}s"
    )
    return 0


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    root = kaggle_root(args.kaggle_root)
    args.kaggle_root_dir = root
    out = args.out or root / "working" / "submission.csv"
    try:
        bundle, manifest, comp = discover(root, args)
        check_out(out)  # before cellseg and torch are imported and the models load
    except KernelError as e:
        print(f"submit: error: {e}", file=sys.stderr)
        return 2
    try:
        return predict(bundle, manifest, comp, out, args, start)
    except Exception as e:  # the last line of defence: on Kaggle a missing submission.csv scores nothing
        return fallback(comp, out, e)


if __name__ == "__main__":
    sys.exit(main())
