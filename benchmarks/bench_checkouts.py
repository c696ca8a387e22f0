"""Two checkouts on the same work: is a refactor within noise? Ratios new / base, measured in one run.

The base revision is checked out into a temporary git worktree; both run the *same* commands on the
*same* data as real subprocesses (``python -m cellseg`` with ``PYTHONPATH`` set to each checkout's
``src``), interleaved round by round (which one goes first alternates) so the machine's load falls on
both alike:

* ``predict``: the committed demo weights (``weights/demo``, taken from each checkout) on ``--images``
  synthetic test images generated once by the new checkout;
* ``train``: ``configs/demo.yaml`` for ``--steps`` optimiser steps on the same synthetic folder (fold 0,
  validation off), from scratch.

Prints the median and min seconds of each, the ratio new / base of the medians and the per-round
ratios, and whether the two submissions are byte-identical.

    .venv/bin/python benchmarks/bench_checkouts.py --base 55b9bdc [--rounds 3] [--images 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

REPO = Path(__file__).resolve().parents[1]


def cellseg(src: Path, *args: str, cwd: Path) -> float:
    """Seconds ``python -m cellseg ARGS`` took with ``src`` first on the path; raises on a failure."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "cellseg", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{src}: cellseg {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def jobs(root: Path, data: Path, work: Path, steps: int) -> dict[str, list[str]]:
    """The commands each checkout runs (``root``: the checkout, for its weights and config)."""
    return {
        "predict": [
            "predict",
            "--data",
            str(data),
            "--weights",
            str(root / "weights" / "demo" / "manifest.yaml"),
            "--out",
            str(work / "submission.csv"),
            "--device",
            "cpu",
        ],
        "train": [
            "train",
            "--config",
            str(root / "configs" / "demo.yaml"),
            "--data",
            str(data),
            "--fold",
            "0",
            "--out",
            str(work / "run"),
            "--force",
            "--quiet",
            f"train.max_steps={steps}",
            "train.epochs=1",
            "train.val_every=0",
            "train.num_workers=0",
            "train.threads=1",
        ],
    }


def summary(name: str, base: list[float], new: list[float]) -> str:
    per_round = " ".join(f"{n / b:.2f}" for b, n in zip(base, new))
    return (
        f"{name:8s} base median {statistics.median(base):7.2f} s (min {min(base):.2f})   "
        f"new median {statistics.median(new):7.2f} s (min {min(new):.2f})   "
        f"new/base {statistics.median(new) / statistics.median(base):.3f}   per round {per_round}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="git revision to compare against (e.g. 55b9bdc)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--images", type=int, default=6, help="synthetic test images for predict")
    ap.add_argument("--steps", type=int, default=10, help="training steps")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-checkouts-"))
    base_root = tmp / "base"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(base_root), args.base], check=True)
    try:
        data = tmp / "data"
        cellseg(
            REPO / "src",
            *("synth", "--out", str(data), "--seed", "7", "--train-images", "24", "--test-images", str(args.images)),
            cwd=tmp,
        )
        roots = {"base": base_root, "new": REPO}
        times: dict[str, dict[str, list[float]]] = {k: {"predict": [], "train": []} for k in roots}
        for r in range(args.rounds):
            order = ["base", "new"] if r % 2 == 0 else ["new", "base"]
            for who in order:
                work = tmp / f"work-{who}"
                work.mkdir(exist_ok=True)
                for job, cmd in jobs(roots[who], data, work, args.steps).items():
                    if job == "predict":
                        (work / "submission.csv").unlink(missing_ok=True)
                    times[who][job].append(cellseg(roots[who] / "src", *cmd, cwd=work))
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        same = (tmp / "work-base" / "submission.csv").read_bytes() == (tmp / "work-new" / "submission.csv").read_bytes()
        print(f"\n{cpu_model()}, {os.cpu_count()} cores, 1 torch thread per run")
        print(f"base {args.base} vs new {REPO.name} (working tree); {args.rounds} interleaved rounds")
        for job in ("predict", "train"):
            print(summary(job, times["base"][job], times["new"][job]))
        print(f"predict submissions byte-identical: {same}")
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_root)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
