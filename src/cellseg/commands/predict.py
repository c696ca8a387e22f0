"""``cellseg predict``: an ensemble on a competition folder's test/ -> submission.csv (the kernel's job)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, type=Path, help="competition-layout folder (test/*.png, sample_submission.csv)"
    )
    p.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="the ensemble's manifest.yaml (or its folder); checksums are verified first",
    )
    p.add_argument("--out", type=Path, default=Path("submission.csv"), help="default: ./submission.csv")
    p.add_argument(
        "--time-budget",
        default=None,
        metavar="DURATION",
        help="e.g. 8h30m, 45m, 90s: drop TTA views, then models, to finish in time (default: none)",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto = CUDA (fp16) when available, else CPU"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from cellseg.inference.runner import predict_folder

    res = predict_folder(
        args.data,
        args.weights,
        args.out,
        time_budget=args.time_budget,
        device=args.device,
        progress=not args.no_progress,
    )
    n = sum(len(r) for r in res.rows.values())
    print(
        f"{res.out}: {len(res.rows)} image(s), {n} instance(s), {len(res.failed)} unreadable, "
        f"{len(res.skipped)} skipped for time; valid"
    )
    return 0
