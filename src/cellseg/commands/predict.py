"""``cellseg predict``: an ensemble on a competition folder's test/ -> submission.csv (the kernel's job).

Exit status: 0 = submission written with predictions; 1 = a valid submission was written but no
image could be predicted (every test PNG unreadable, or test/ holds none: every row is empty), said
on stderr in one line; 2 = error (one line), nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cellseg.commands.common import add_device, command_inputs


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
    add_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog = (
        "exit status: 0 submission written; 1 a valid submission was written but no image could be "
        "predicted (all unreadable, or test/ empty); 2 error, nothing written"
    )


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.io import check_writable

    # in milliseconds: before torch is even imported; never over the data or the ensemble it reads
    check_writable(args.out, "file", inputs=command_inputs(args.data, args.weights))
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
    why = res.nothing_predicted(args.data / "test")
    if why is not None:
        print(
            f"cellseg predict: no image predicted: {why}; wrote a valid {res.out} with an empty row for each "
            f"of {len(res.rows)} id(s)",
            file=sys.stderr,
        )
        return 1
    print(
        f"{res.out}: {len(res.rows)} image(s), {n} instance(s), {len(res.failed)} unreadable, "
        f"{len(res.skipped)} skipped for time; valid"
    )
    return 0
