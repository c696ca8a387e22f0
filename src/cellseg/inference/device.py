"""The inference device for ``--device``: a GPU is used only after a probe of every kind of op the
models run has passed on it.

A torch build can see a GPU it cannot use: its context cannot be created (a driver too old for the
build), or its torch or torchvision lacks kernels for the card's architecture ("no kernel image is
available for execution"). torchvision's ``nms`` and ``roi_align`` are compiled separately from torch,
so a working convolution says nothing about them; without them every image fails and the submission
is all empty rows. The probe therefore runs, in order: context creation, an element-wise op and a
convolution, ``nms``, ``roi_align`` (each against a known answer). ``--device auto`` falls back to
the CPU with one loud line when any step fails, so a Kaggle submission is still written; an explicit
``--device cuda`` is then an error.

Speed options (:func:`apply_speed_options`): ``torch.backends.cudnn.benchmark`` and channels_last
weights. Both are off unless asked for (``CELLSEG_CUDNN_BENCHMARK=1``, ``CELLSEG_CHANNELS_LAST=1``):
neither has yet been measured faster on a GPU (``benchmarks/gpu_check.sh`` compares them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from cellseg.errors import CellsegError

#: the probe's steps, in the order they run
PROBE_STEPS = ("context", "kernel", "nms", "roi_align")
#: roi_align (aligned, 2 x 2 bins, 2 x 2 samples) of the box (0, 0)-(4, 4) on the 8 x 8 image ``8 y + x``:
#: bilinear sampling is exact on a linear image, so each bin is the image at its samples' mean point
ROI_ALIGN_ANSWER = ((4.5, 6.5), (20.5, 22.5))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _open_context(device: str) -> torch.device:
    """``device`` (``auto``: the current CUDA device) with its CUDA context created and a tensor on it."""
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "auto" else torch.device(device)
    torch.zeros(1, device=dev)
    _sync(dev)
    return dev


def _tiny_kernel(device: torch.device) -> None:
    """An element-wise op and a small convolution (cuDNN) on ``device``, waited for."""
    x = torch.arange(64, dtype=torch.float32, device=device).reshape(1, 1, 8, 8)
    y = F.conv2d(x * 0.5 + 1.0, torch.ones(2, 1, 3, 3, device=device), padding=1)
    _sync(device)
    if not torch.isfinite(y).all().item():
        raise RuntimeError("a 3 x 3 convolution of small numbers gave non-finite values")


def _nms_probe(device: torch.device) -> None:
    """torchvision's ``nms`` on three boxes, the second overlapping the first (IoU 0.68 > 0.5)."""
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=torch.float32, device=device)
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7], device=device), 0.5)
    _sync(device)
    if keep.cpu().tolist() != [0, 2]:
        raise RuntimeError(f"nms kept boxes {keep.cpu().tolist()} instead of [0, 2]")


def _roi_align_probe(device: torch.device) -> None:
    """torchvision's ``roi_align`` on a linear image, against :data:`ROI_ALIGN_ANSWER`."""
    image = torch.arange(64, dtype=torch.float32, device=device).reshape(1, 1, 8, 8)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]], device=device)
    out = torchvision.ops.roi_align(image, rois, output_size=2, spatial_scale=1.0, sampling_ratio=2, aligned=True)
    _sync(device)
    if not torch.allclose(out.cpu().reshape(2, 2), torch.tensor(ROI_ALIGN_ANSWER), atol=1e-4):
        raise RuntimeError(f"roi_align gave {out.cpu().reshape(2, 2).tolist()} instead of {list(ROI_ALIGN_ANSWER)}")


def probe_cuda(device: str = "auto") -> tuple[torch.device | None, str | None]:
    """Run the probe (:data:`PROBE_STEPS`) on ``device`` (``auto``: the current CUDA device, or ``cuda:N``).

    Returns:
        (the device, None) when every step passed, else (None, "STEP: ErrorType: first line of the
        message"), e.g. ``"nms: RuntimeError: CUDA error: no kernel image is available ..."``.
    """
    steps: dict[str, Callable[[torch.device], None]] = {
        "kernel": _tiny_kernel,
        "nms": _nms_probe,
        "roi_align": _roi_align_probe,
    }
    step = "context"  # the step running, named in the error
    try:  # any failure, of any type, means: do not run the models here
        dev = _open_context(device)
        for step in steps:
            steps[step](dev)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"{step}: {type(e).__name__}: {first}"
    return dev, None


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_device(device: str = "auto", log: Callable[[str], None] | None = None) -> torch.device:
    """The inference device for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` -> CUDA when available and the probe (:func:`probe_cuda`) passes on it, else CPU. A GPU
    that torch sees but that fails the probe falls back to the CPU with one loud ``log`` line
    (default: stderr), so the submission is still written. An explicit ``cuda`` without a GPU, or on
    one that fails the probe, is a CellsegError.
    """
    log = log or _stderr
    if device == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        dev, error = probe_cuda("auto")
        if dev is not None:
            return dev
        log(
            f"WARNING: CUDA is available but the GPU probe failed ({error}); "
            "FALLING BACK TO THE CPU: inference will be much slower"
        )
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CellsegError("--device cuda asked for, but no CUDA GPU is available")
        dev, error = probe_cuda(device)
        if dev is None:
            raise CellsegError(f"--device {device}: the GPU probe failed ({error}); use --device auto or cpu")
        return dev
    return torch.device(device)


# ----------------------------------------------------------------------------- speed options

#: environment switches of :func:`apply_speed_options` ("1" turns one on)
CUDNN_BENCHMARK_ENV = "CELLSEG_CUDNN_BENCHMARK"
CHANNELS_LAST_ENV = "CELLSEG_CHANNELS_LAST"
#: off: on an H100 (benchmarks/gpu_check.sh, r50_inference.options, 2026-12-05) neither made the R50
#: forward faster (cudnn.benchmark 0.83x, channels_last 0.87x, both 0.86x)
CUDNN_BENCHMARK_DEFAULT = False
CHANNELS_LAST_DEFAULT = False


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    value = env.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return default


def speed_options(env: Mapping[str, str] | None = None) -> dict[str, bool]:
    """The speed options asked for: ``{"cudnn_benchmark": bool, "channels_last": bool}`` from the
    environment switches (:data:`CUDNN_BENCHMARK_ENV`, :data:`CHANNELS_LAST_ENV`), else the defaults."""
    env = os.environ if env is None else env
    return {
        "cudnn_benchmark": _switch(env, CUDNN_BENCHMARK_ENV, CUDNN_BENCHMARK_DEFAULT),
        "channels_last": _switch(env, CHANNELS_LAST_ENV, CHANNELS_LAST_DEFAULT),
    }


def apply_speed_options(
    models: Iterable[nn.Module],
    device: torch.device,
    cudnn_benchmark: bool | None = None,
    channels_last: bool | None = None,
) -> dict[str, bool]:
    """Apply the inference speed options to prepared ``models`` (in place) on ``device``.

    Call it once the models are loaded and prepared (after ``forward.load_ensemble``), before the
    first forward. Test images all have one size, so cuDNN's per-shape algorithm search is paid once;
    channels_last (NHWC) weights make cuDNN run the fp16 convolutions in NHWC, which tensor cores
    prefer. Neither changes what is computed beyond float rounding.

    Args:
        models: torch modules (e.g. ``[lm.model for lm in loaded]``).
        device: where they run; ``cudnn_benchmark`` is set only on CUDA (a process-wide flag).
        cudnn_benchmark, channels_last: None = :func:`speed_options` (environment, else off).

    Returns:
        ``{"cudnn_benchmark": bool, "channels_last": bool}``: what was applied.
    """
    asked = speed_options()
    bench = asked["cudnn_benchmark"] if cudnn_benchmark is None else cudnn_benchmark
    nhwc = asked["channels_last"] if channels_last is None else channels_last
    applied = {"cudnn_benchmark": bool(bench and device.type == "cuda"), "channels_last": bool(nhwc)}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = applied["cudnn_benchmark"]
    if nhwc:
        for model in models:
            model.to(memory_format=torch.channels_last)
    return applied
