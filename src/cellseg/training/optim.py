"""Optimiser and learning-rate schedule: SGD (momentum) or AdamW; linear warm-up, then cosine or step decay."""

from __future__ import annotations

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
