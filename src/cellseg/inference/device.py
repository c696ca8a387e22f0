"""The inference device for ``--device``: a GPU is used only after a tiny kernel has run on it.

A torch build can see a GPU it has no kernels for (e.g. an image whose torch lacks the card's
architecture: "no kernel image is available for execution"). ``--device auto`` then falls back to the
CPU loudly, so a Kaggle submission is still written; an explicit ``--device cuda`` is an error.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cellseg.errors import CellsegError


def _tiny_kernel(device: torch.device) -> None:
    """An element-wise op and a small convolution (cuDNN) on ``device``, waited for."""
    x = torch.arange(64, dtype=torch.float32, device=device).reshape(1, 1, 8, 8)
    y = F.conv2d(x * 0.5 + 1.0, torch.ones(2, 1, 3, 3, device=device), padding=1)
    torch.cuda.synchronize(device)
    if not torch.isfinite(y).all().item():
        raise RuntimeError("a 3 x 3 convolution of small numbers gave non-finite values")


def cuda_kernel_error(device: torch.device) -> str | None:
    """None when ``device`` runs :func:`_tiny_kernel`, else the error's first line (e.g. a torch build
    without kernels for this card's architecture: "no kernel image is available for execution")."""
    try:
        _tiny_kernel(device)
    except Exception as e:  # any failure means: do not run the models here
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"
    return None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_device(device: str = "auto", log: Callable[[str], None] | None = None) -> torch.device:
    """The inference device for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` -> CUDA when available and a tiny kernel runs on it, else CPU. A GPU that torch sees but
    cannot run kernels on (e.g. an image whose torch lacks the card's architecture) falls back to the
    CPU with a loud ``log`` line (default: stderr), so the submission is still written. An explicit
    ``cuda`` without a GPU, or on one that cannot run kernels, is a CellsegError.
    """
    log = log or _stderr
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev = torch.device("cuda", torch.cuda.current_device())
        error = cuda_kernel_error(dev)
        if error is None:
            return dev
        log(
            f"WARNING: CUDA is available but cannot run a kernel on {dev} ({error}); "
            "FALLING BACK TO THE CPU: inference will be much slower"
        )
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CellsegError("--device cuda asked for, but no CUDA GPU is available")
        dev = torch.device(device)
        error = cuda_kernel_error(dev)
        if error is not None:
            raise CellsegError(f"--device {device}: the GPU cannot run a kernel ({error}); use --device auto or cpu")
        return dev
    return torch.device(device)
