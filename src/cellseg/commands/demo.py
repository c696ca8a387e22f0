"""``cellseg demo``: the main job on the embedded default, end to end on synthetic data."""

from __future__ import annotations

import argparse
from pathlib import Path

from cellseg.commands.common import add_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Synthetic competition data -> the Kaggle kernel (kernel/submit.py) run against a fake /kaggle "
        "tree holding a wheel built from this checkout and the demo weights -> a validated "
        "submission.csv -> the dry-run competition score on train images. A few minutes on 2 CPU cores."
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: demo-out)")
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="manifest of the ensemble to use (default: the committed weights/demo/manifest.yaml)",
    )
    p.add_argument("--train-images", type=int, default=24, help="synthetic train images (default 24)")
    p.add_argument("--test-images", type=int, default=3, help="synthetic test images (default 3)")
    p.add_argument("--dry-run-images", type=int, default=6, help="train images scored by the dry run (default 6)")
    p.add_argument("--seed", type=int, default=0)
    add_device(p)
    p.add_argument("--kernel-budget", default="4m", help="time budget of the kernel run (default 4m)")
    p.add_argument("--dry-run-budget", default="3m", help="time budget of the dry run (default 3m)")


#: what ``run_demo`` writes into --out (a rerun replaces these; other files make it refuse)
DEMO_ENTRIES = ("data", "kaggle", "dry-run", "submission.csv", ".*")


def run(args: argparse.Namespace) -> int:
    # lazy imports: `cellseg <command> --help` imports this module and must stay instant (no torch)
    from cellseg.io import check_fresh_dir, check_writable
    from cellseg.kaggle.demo import run_demo

    check_writable(args.out, "dir", inputs=[args.weights])
    check_fresh_dir(args.out, False, own=DEMO_ENTRIES, flag="a new --out")  # a rerun replaces its own outputs only
    res = run_demo(
        args.out,
        args.weights,
        args.train_images,
        args.test_images,
        args.dry_run_images,
        args.seed,
        args.device,
        args.kernel_budget,
        args.dry_run_budget,
    )
    print(res.table)
    print(f"demo done in {res.seconds:.0f}s: submission {res.submission}, dry-run score {res.score:.4f}")
    return 0
