"""BatchNorm statistics from unlabelled images (``cellseg export --adapt-bn``).

A model trained on one kind of image (``cellseg synth`` output, another microscope) normalises its
features with the means and variances of that kind. :func:`adapt_batchnorm` recomputes them on
unlabelled images of the kind it will predict (the competition's ``train_semi_supervised/`` or
``test/``): the backbone and FPN run over the images with their BatchNorm layers measuring (no label,
no gradient step), and every other weight stays as trained. Measured on real phase contrast
(docs/TRAINING.md, "Cell mix, density, training scale, BatchNorm statistics"): a model trained on
synthetic images only goes from 50 % to 54 % of the real-trained model's score, a model trained on the
real images themselves does not move (0.2071 -> 0.2069), and recomputing the heads' statistics as well
loses, so only the layers under ``backbone.`` (the ResNet body and the FPN) are adapted::

    images = pick_images("data/train_semi_supervised", 200)
    n_layers = adapt_batchnorm(model, (read_gray(p) for p in images))

``nn.BatchNorm2d`` and ``FrozenBatchNorm2d`` (``model.norm: frozen_bn``) layers are adapted alike;
a GroupNorm model has nothing to adapt and is refused.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from cellseg.errors import CellsegError
from cellseg.io import list_pngs, sha256_file
from cellseg.model.build import image_tensor

#: the modules whose statistics are recomputed: the ResNet body and the FPN, not the heads
ADAPT_PREFIX = "backbone."
#: images per forward pass (as in the measurement above)
ADAPT_BATCH = 2


def norm_layers(model: nn.Module, prefix: str = ADAPT_PREFIX) -> list[tuple[str, nn.Module]]:
    """The BatchNorm-like layers (``nn.BatchNorm2d``, ``FrozenBatchNorm2d``) named under ``prefix``,
    in module order, as ``(name, module)``."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if name.startswith(prefix) and isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))
    ]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _measuring_copy(layer: nn.Module) -> nn.BatchNorm2d:
    """A BatchNorm2d with ``layer``'s scale and shift that averages the statistics of every batch it
    sees (``momentum=None``), from zero."""
    weight: Any = layer.weight
    bn = nn.BatchNorm2d(weight.shape[0], eps=float(getattr(layer, "eps", 1e-5)), momentum=None)
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(layer.bias)  # type: ignore[arg-type]
    return bn.train()


def adapt_batchnorm(
    model: nn.Module,
    images: Iterable[np.ndarray],
    batch_size: int = ADAPT_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Replace the running mean and variance of the backbone's and FPN's BatchNorm layers (in place)
    by their averages over ``images``.

    Each batch goes through the model's own transform (its input scale and normalisation) and the
    backbone only; during the pass every adapted layer normalises with its batch's statistics, as in
    training, and accumulates them with equal weight per batch. The heads, all learned weights and the
    model's mode (eval) are unchanged.

    Args:
        model: a torchvision MaskRCNN built by cellseg (eval mode, on the CPU or a GPU).
        images: (H, W) uint8 grey images; sizes may differ.
        batch_size: images per forward pass.
        on_batch: called with the number of images of each batch done (a progress bar's ``update``).

    Returns:
        The number of layers adapted. Raises CellsegError when the backbone has no BatchNorm layer
        (``model.norm: gn``) or ``images`` is empty.
    """
    layers = norm_layers(model)
    if not layers:
        raise CellsegError(
            "the model's backbone has no BatchNorm layer (model.norm gn?): --adapt-bn applies to bn and frozen_bn models"
        )
    m: Any = model
    device = next(model.parameters()).device
    measuring = {name: _measuring_copy(layer).to(device) for name, layer in layers}
    for name, bn in measuring.items():
        _set_module(model, name, bn)
    seen = 0
    stream = iter(images)  # read as it goes: a generator of images is never held whole
    try:
        with torch.no_grad():
            while batch := list(itertools.islice(stream, batch_size)):
                tensors, _ = m.transform([image_tensor(a, device) for a in batch])
                m.backbone(tensors.tensors)
                seen += len(batch)
                if on_batch is not None:
                    on_batch(len(batch))
    finally:
        for name, layer in layers:
            _set_module(model, name, layer)  # the original modules (types, eps, momentum) always come back
    if seen == 0:
        raise CellsegError("--adapt-bn: no image to compute the BatchNorm statistics from")
    with torch.no_grad():
        for name, layer in layers:
            measured: Any = measuring[name]
            dest: Any = layer  # BatchNorm2d or FrozenBatchNorm2d: both hold running_mean / running_var buffers
            dest.running_mean.copy_(measured.running_mean)
            dest.running_var.copy_(measured.running_var)
            if getattr(dest, "num_batches_tracked", None) is not None:
                dest.num_batches_tracked.fill_(int(measured.num_batches_tracked))
    return len(layers)


def pick_images(folder: str | Path, limit: int) -> list[Path]:
    """Up to ``limit`` PNG images of ``folder``, evenly spaced over its sorted file names (all of them
    when it holds no more). Raises CellsegError when ``folder`` is not a folder or holds no PNG."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CellsegError(f"--adapt-bn: {folder} is not a folder of images")
    if limit < 1:
        raise CellsegError(f"--adapt-images: {limit} is out of range (allowed: >= 1)")
    files = list(list_pngs(folder).values())
    if not files:
        raise CellsegError(f"--adapt-bn: {folder} holds no PNG image")
    if len(files) <= limit:
        return files
    idx = np.linspace(0, len(files) - 1, limit).round().astype(int)
    return [files[i] for i in idx]


def adaptation_record(folder: str | Path, images: list[Path]) -> dict:
    """What a checkpoint's provenance keeps of an adaptation (``bn_adapted``, less its per-model
    ``layers``): the folder, how many images, one sha256 over their names and contents."""
    h = hashlib.sha256()
    for p in images:
        h.update(p.name.encode("utf-8") + b"\0" + sha256_file(p).encode() + b"\n")
    return {"path": str(Path(folder).resolve()), "images": len(images), "sha256": h.hexdigest()}
