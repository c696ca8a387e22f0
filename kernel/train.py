"""Kaggle entry point: train one fold of a cellseg config on Kaggle's GPU (``tools/push.py train``).

Runs as a Kaggle script kernel (internet off, GPU on). Standard library only until ``cellseg`` imports;
the discovery and offline-install code is ``kernel/kaggle_env.py``, shared with ``kernel/submit.py``
and inlined into this file when ``tools/push.py`` stages the kernel (Kaggle runs one file):

1. find the training bundle under ``<root>/input``: the ``cellseg-bundle.json`` whose ``"kind"`` is
   ``"train"`` (config, overrides, init weights, folds, wheel);
2. install the bundle's wheel offline when ``cellseg`` is not importable;
3. find the competition data by its ``train.csv`` + ``train/``;
4. resume: when the output of an earlier session of this fold is attached (a folder with
   ``cellseg-train-output.json``, i.e. ``push.py train --resume-from OWNER/SLUG``), check every file
   against that marker (size, sha256) and copy its ``run/`` into ``<root>/working/run/``;
5. run ``cellseg train --config <bundle>/<config> --data <competition> --fold F --init <bundle>/<init>
   --out <root>/working/run --resume <overrides>`` in a subprocess (``torchrun`` over every GPU
   ``torch.cuda.device_count()`` sees when there are several, e.g. the 2 x T4 of the NvidiaTeslaT4
   accelerator push.py asks for); ``train.time_limit`` (push.py sets 11h30m) stops it
   cleanly at an epoch boundary before the 12 h session ends;
6. write ``<root>/working/cellseg-train-output.json`` last: the fold, the status (``complete``,
   ``stopped`` by the time limit, ``failed``), the epochs and every ``run/`` file with its size and
   sha256, which ``push.py fetch`` and the next session verify.

The fold and the bundle id come from ``STAGED`` (filled in by push.py, since Kaggle passes no
arguments) or from ``--fold``. ``--kaggle-root DIR`` (or ``CELLSEG_KAGGLE_ROOT``) replaces ``/kaggle``,
so the same file runs locally against a fake tree, on CPU. Expected failures print one line and exit 2;
a failed training exits 1 after writing the output marker.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# >>> kaggle_env: push.py inlines kernel/kaggle_env.py here (Kaggle runs one file); from a checkout it is imported
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kaggle_env import (  # noqa: E402
    KernelError,
    find_bundle,
    find_data_dir,
    find_marker_dirs,
    import_cellseg,
    kaggle_root,
    make_log,
    read_json,
)

# <<< kaggle_env

#: Filled in by ``push.py train`` when it stages this kernel: {"fold": ..., "bundle_id": ...}.
STAGED: dict = {}

OUTPUT_MARKER = "cellseg-train-output.json"
RUN_DIR = "run"
#: The oldest torchvision cellseg trains and predicts with (pyproject.toml; docs/KAGGLE.md, "Versions").
#: The wheel installs with --no-deps, so nothing else checks the image's version.
TRAIN_FLOOR = {"torchvision": (0, 19)}

log = make_log("train")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def run_files(working: Path) -> list[dict]:
    """Every file of ``working/run`` as {path (relative to working), size, sha256}, sorted."""
    out = []
    for p in sorted((working / RUN_DIR).rglob("*")):
        if p.is_file() and not p.name.endswith(".tmp"):
            out.append({"path": p.relative_to(working).as_posix(), "size": p.stat().st_size, "sha256": sha256(p)})
    return out


def previous_output(input_dir: Path, fold: str) -> Path | None:
    """The attached output of an earlier session of ``fold`` (verified), or None when none is attached."""
    found = []
    for d in find_marker_dirs(input_dir, OUTPUT_MARKER):
        out = read_json(d / OUTPUT_MARKER)
        if out.get("kind") == "train-output" and str(out.get("fold")) == fold:
            found.append((d, out))
    if not found:
        return None
    if len(found) > 1:
        raise KernelError(
            f"{len(found)} attached outputs of fold {fold} ({', '.join(str(d) for d, _ in found)}): keep one"
        )
    d, out = found[0]
    for f in out.get("files", []):
        p = d / f["path"]
        if not p.is_file() or p.stat().st_size != f["size"] or sha256(p) != f["sha256"]:
            raise KernelError(f"attached output {d}: {f['path']} is missing or differs from its marker")
    if not (d / RUN_DIR / "last.pth").is_file():
        raise KernelError(f"attached output {d} has no {RUN_DIR}/last.pth to resume from")
    log(f"resuming from {d} ({out.get('status')} after epoch {out.get('epochs_done')}, step {out.get('step')})")
    return d


def gpu_count() -> int:
    """CUDA devices this process may use, as torch counts them (``CUDA_VISIBLE_DEVICES`` applied);
    0 without CUDA. Called once cellseg (hence torch) imports: the Kaggle image ships torch."""
    import torch

    return int(torch.cuda.device_count())


def check_training_floor() -> None:
    """Refuse, in one line, an image whose torchvision is older than cellseg supports (training would
    fail inside the subprocess, with a traceback, after the install)."""
    import torchvision

    have = tuple(int(p) for p in torchvision.__version__.split("+")[0].split(".")[:2])
    if have < TRAIN_FLOOR["torchvision"]:
        want = ".".join(map(str, TRAIN_FLOOR["torchvision"]))
        raise KernelError(
            f"torchvision {torchvision.__version__} is older than {want}, the oldest that trains cellseg: "
            "pick a newer Kaggle image (Settings -> Environment: latest)"
        )


def train_command(
    args: argparse.Namespace, bundle: Path, marker: dict, data: Path, run_dir: Path, fold: str
) -> list[str]:
    """The ``cellseg train`` command line (under torchrun when ``--nproc`` > 1)."""
    gpus = gpu_count()
    nproc = gpus if args.nproc == "auto" else int(args.nproc)
    log(f"{gpus} CUDA device(s) visible to torch; {max(nproc, 1)} training process(es)")
    cmd = [sys.executable, "-m"]
    if nproc > 1:
        cmd += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    cmd += ["cellseg", "train", "--config", str(bundle / marker["config"]), "--data", str(data)]
    cmd += ["--fold", "all" if fold == "full" else fold, "--out", str(run_dir), "--resume", "--quiet"]
    if marker.get("init"):
        cmd += ["--init", str(bundle / marker["init"])]
    return cmd + [*marker.get("overrides", []), *args.overrides]


def run_state(run_dir: Path) -> dict:
    """Epochs, step and best score of the run folder (from metrics.csv and config.yaml)."""
    from cellseg.config.experiment import load_experiment

    state: dict = {"epochs_done": 0, "step": 0, "best_score": None, "best_epoch": None}
    if (run_dir / "config.yaml").is_file():
        tc = load_experiment(run_dir / "config.yaml").train
        state.update(epochs=tc.epochs, max_steps=tc.max_steps)
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        if rows:
            state.update(epochs_done=int(rows[-1]["epoch"]), step=int(rows[-1]["step"]))
            scored = [(float(r["val_score"]), int(r["epoch"])) for r in rows if r.get("val_score")]
            if scored:
                best = max(scored, key=lambda t: (t[0], -t[1]))
                state.update(best_score=best[0], best_epoch=best[1])
    return state


def write_output_marker(working: Path, fold: str, marker: dict, returncode: int, resumed_from: Path | None) -> dict:
    """Write ``cellseg-train-output.json`` (atomically, after everything else) and return it."""
    run_dir = working / RUN_DIR
    state = run_state(run_dir)
    done = state["epochs_done"] >= state.get("epochs", 1) or (
        state.get("max_steps") and state["step"] >= state["max_steps"]
    )
    status = "failed" if returncode != 0 else ("complete" if done else "stopped")
    out = {
        "format": 1,
        "kind": "train-output",
        "fold": fold,
        "status": status,
        **state,
        "config_name": marker.get("config_name"),
        "overrides": marker.get("overrides", []),
        "bundle_id": marker.get("bundle_id"),
        "version": marker.get("version"),
        "git_commit": marker.get("git_commit"),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "files": run_files(working),
    }
    tmp = working / (OUTPUT_MARKER + ".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    os.replace(tmp, working / OUTPUT_MARKER)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train one fold of the bundled cellseg config (Kaggle kernel).")
    p.add_argument(
        "--kaggle-root", type=Path, default=None, help="replaces /kaggle (default: $CELLSEG_KAGGLE_ROOT or /kaggle)"
    )
    p.add_argument("--fold", default=None, help="fold to train: 0..K-1 or full (default: the one push.py staged)")
    p.add_argument("--nproc", default="auto", help="processes (GPUs) for torchrun; auto = every visible GPU, 1 on CPU")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides after the bundle's own")
    return p.parse_args(argv)


def main(argv=None) -> int:
    start = time.monotonic()
    args = parse_args(argv)
    root = kaggle_root(args.kaggle_root)
    input_dir, working = root / "input", root / "working"
    try:
        if not input_dir.is_dir():
            raise KernelError(f"{input_dir} not found (use --kaggle-root to run outside Kaggle)")
        bundle, marker = find_bundle(input_dir, "train")
        want = STAGED.get("bundle_id")
        if want and marker.get("bundle_id") != want:
            raise KernelError(
                f"the attached training bundle is {marker.get('bundle_id')}, but this kernel was pushed for {want}: "
                "a later push.py train replaced the dataset version; push this fold again"
            )
        folds = [str(f) for f in marker.get("folds", [])]
        fold = args.fold or STAGED.get("fold") or (folds[0] if len(folds) == 1 else None)
        if fold is None:
            raise KernelError(f"the bundle holds folds {folds}: pass --fold")
        if fold not in folds:
            raise KernelError(f"fold {fold} is not one the bundle was staged for ({folds})")
        log(f"bundle {bundle}: {marker.get('config')} fold {fold}, version {marker.get('version')}")
        data = find_data_dir(input_dir, "train.csv", "train")
        log(f"competition data {data}")
        cellseg = import_cellseg(bundle, root / "temp", log)
        pkg_root = Path(cellseg.__file__).resolve().parent.parent
        log(f"cellseg {getattr(cellseg, '__version__', '?')} from {pkg_root / 'cellseg'}")
        check_training_floor()
        run_dir = working / RUN_DIR
        previous = previous_output(input_dir, fold)
        if previous is not None:
            if run_dir.exists() and any(run_dir.iterdir()):
                raise KernelError(f"{run_dir} is not empty: cannot resume from {previous} into it")
            shutil.copytree(previous / RUN_DIR, run_dir, dirs_exist_ok=True)
        working.mkdir(parents=True, exist_ok=True)
        (working / OUTPUT_MARKER).unlink(missing_ok=True)
        cmd = train_command(args, bundle, marker, data, run_dir, fold)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pkg_root), os.environ.get("PYTHONPATH")])))
        log("running: " + " ".join(cmd[1:]))
        returncode = subprocess.run(cmd, cwd=working, env=env).returncode
        if not (run_dir / "last.pth").is_file():
            raise KernelError(f"cellseg train exited {returncode} before finishing one epoch (see above)")
        out = write_output_marker(working, fold, marker, returncode, previous)
    except KernelError as e:
        print(f"train: error: {e}", file=sys.stderr)
        return 2
    log(
        f"{out['status']}: fold {fold}, epoch {out['epochs_done']} of {out.get('epochs')}, step {out['step']}, "
        f"best hold-out score {out['best_score']} in {time.monotonic() - start:.0f}s; "
        f"{len(out['files'])} files in {run_dir}"
    )
    return 0 if returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
