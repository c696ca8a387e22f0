"""Command-line options shared by every ``cellseg`` command, defined once.

``--device`` takes one list of choices everywhere (``predict``, ``dry-run``, ``predict-raw``,
``pseudo-label``, ``demo``, the kernel): ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; anything else is
argparse's one-line usage error (exit 2) before any work starts.
"""

from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

#: what ``--device`` accepts, for help texts and errors
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DEVICE_HELP = "auto (a CUDA GPU in fp16 when one runs, else the CPU), cpu, cuda or cuda:N (default auto)"
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_choice(text: str) -> str:
    """``text`` when it is one of :data:`DEVICE_CHOICES` (``cuda:N`` with a GPU index N), else an
    argparse error naming the choices."""
    if not _DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid device {text!r} (choose from {', '.join(DEVICE_CHOICES)})")
    return text


def add_device(p: argparse.ArgumentParser) -> None:
    """Add the one ``--device`` option."""
    p.add_argument("--device", default="auto", type=device_choice, metavar="{auto,cpu,cuda,cuda:N}", help=DEVICE_HELP)


def finite_float(text: str) -> float:
    """A float that is neither NaN nor infinite (argparse type)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _int_at_least(text: str, low: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
    return v


def positive_int(text: str) -> int:
    """An int >= 1 (argparse type)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An int >= 0 (argparse type)."""
    return _int_at_least(text, 0)


def command_inputs(data: Path | None = None, weights: Path | None = None, *more: Path | None) -> list[Path]:
    """What a command reads, for :func:`cellseg.io.check_writable`'s ``inputs``: the competition
    folder's files and image folders, the ensemble's manifest and model files, and ``more``."""
    out: list[Path] = []
    if data is not None:
        out += [data / n for n in ("train.csv", "sample_submission.csv", "train", "test", "train_semi_supervised")]
    if weights is not None:
        manifest = weights / "manifest.yaml" if weights.is_dir() else weights
        out += [manifest, *sorted(manifest.parent.glob("*.pth"))]
    return out + [m for m in more if m is not None]
