"""Optimiser and learning-rate schedule: SGD (momentum) or AdamW; linear warm-up, then cosine or step decay."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from cellseg.config.experiment import TrainConfig
from cellseg.errors import CellsegError


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over trainable parameters; no weight decay on norms and biases."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise CellsegError(f"train.optimizer: unknown {cfg.optimizer!r} (sgd, adamw)")


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at optimiser step ``step`` of ``total``: warm-up x (cosine | step)."""
    if cfg.schedule == "cosine":
        t = min(step, total) / max(total, 1)
        main = cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    else:
        main = cfg.gamma ** sum(step >= int(f * total) for f in cfg.steps)
    if step < cfg.warmup_iters:
        a = step / cfg.warmup_iters
        main *= cfg.warmup_factor * (1.0 - a) + a
    return main


def scale_to_global_batch(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, str]:
    """The ``train`` section with ``lr`` and ``warmup_iters`` scaled to this run's global batch.

    ``lr`` is set for ``cfg.reference_batch`` images per optimiser step; it is scaled linearly to the
    actual global batch (``world_size`` x ``batch_size``, the linear scaling rule of Goyal et al. 2017),
    and the warm-up, counted in steps, inversely, so that it spans the same number of images.

    Args:
        cfg: the ``train`` section as configured.
        world_size: training processes (1 without torchrun).
    Returns:
        (the scaled copy, one line for the log), e.g. ``lr 0.02 for global batch 4 -> 0.01 for global
        batch 2 (1 process x 2), warmup_iters 500 -> 1000``.
    """
    global_batch = world_size * cfg.batch_size
    ratio = global_batch / cfg.reference_batch
    warmup = round(cfg.warmup_iters / ratio)
    if cfg.warmup_iters > 0:
        warmup = max(warmup, 1)
    scaled = dataclasses.replace(cfg, lr=cfg.lr * ratio, warmup_iters=warmup)
    processes = f"{world_size} process{'es' if world_size != 1 else ''} x {cfg.batch_size}"
    line = (
        f"lr {cfg.lr:g} for global batch {cfg.reference_batch} -> {scaled.lr:g} for global batch {global_batch} "
        f"({processes}), warmup_iters {cfg.warmup_iters} -> {scaled.warmup_iters}"
    )
    return scaled, line
