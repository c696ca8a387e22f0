"""One training epoch and one validation pass: the two functions the training loop calls each epoch
(the shape of torchvision's references/detection ``engine.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cellseg.errors import CellsegError
from cellseg.metric import ScoreReport
from cellseg.model.experiment import TrainConfig
from cellseg.progress import progress as progress_bar


@dataclass
class EpochStats:
    """What one call of :func:`train_one_epoch` did (this rank's figures).

    Attributes:
        means: per-loss mean over the epoch's steps (``loss`` is their sum), e.g. ``{"loss": 1.2, ...}``.
        steps: optimiser steps taken in this epoch.
        step: the global step count after the epoch.
        seconds: wall time of the epoch.
        data_wait: fraction of ``seconds`` spent waiting for the data loader.
        stopped: ``train.max_steps`` was reached inside the epoch.
    """

    means: dict[str, float]
    steps: int
    step: int
    seconds: float
    data_wait: float
    stopped: bool


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    tc: TrainConfig,
    *,
    epoch: int,
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    use_amp: bool,
    log: Callable[[str], None],
    progress: bool,
) -> EpochStats:
    """Run one epoch of optimiser steps (stops early at ``tc.max_steps``).

    Args:
        model: the (possibly DDP-wrapped) Mask R-CNN in train mode.
        loader: yields ``(images, targets)``: lists of (3, H, W) float32 tensors and torchvision target dicts.
        optimizer, scheduler, scaler: stepped once per batch (the scheduler per step, not per epoch).
        device: where images and targets go.
        tc: the ``train`` section (grad_clip, log_every, max_steps).
        epoch: 0-based epoch index (progress bar and log lines only).
        step: global optimiser steps done before this epoch.
        total_steps: steps of the whole run, ``train.max_steps`` applied (log lines, progress total).
        steps_per_epoch: batches per epoch.
        use_amp: autocast + loss scaling (CUDA only).
        log: writes one line (rank 0 only; a no-op elsewhere).
        progress: show progress (a tqdm bar on a terminal, else a plain line every 30 s).

    Returns:
        :class:`EpochStats`. A non-finite loss raises :class:`CellsegError` naming each loss term.
    """
    model.train()
    sums: dict[str, float] = {}
    n_steps, wait, t_epoch = 0, 0.0, time.perf_counter()
    stopped = False
    # the bar counts the steps this epoch will really take: train.max_steps may stop it early
    bar = progress_bar(
        total=max(min(steps_per_epoch, total_steps - step), 0),
        desc=f"epoch {epoch + 1}/{tc.epochs}",
        unit="step",
        enabled=progress,
        leave=False,
    )
    t_wait = time.perf_counter()
    for images, targets in loader:
        wait += time.perf_counter() - t_wait
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [
            {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
        ]
        with torch.autocast(device_type=device.type, enabled=use_amp):
            loss_dict = model(images, targets)
        loss = sum(loss_dict.values())
        if not torch.isfinite(loss):
            raise CellsegError(
                f"loss is {loss.item()} at step {step} (epoch {epoch + 1}): "
                + ", ".join(f"{k}={v.item():.3g}" for k, v in loss_dict.items())
                + "; lower train.lr or raise warmup_iters"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if tc.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], tc.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        n_steps += 1
        values = {k: float(v.detach()) for k, v in loss_dict.items()}
        values["loss"] = float(loss.detach())
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}", refresh=False)
        bar.update()
        if tc.log_every and step % tc.log_every == 0:
            log(f"step {step}/{total_steps} epoch {epoch + 1} " + " ".join(f"{k}={v:.3f}" for k, v in values.items()))
        if tc.max_steps and step >= tc.max_steps:
            stopped = True
            break
        t_wait = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - t_epoch
    return EpochStats(
        means={k: v / max(n_steps, 1) for k, v in sums.items()},
        steps=n_steps,
        step=step,
        seconds=elapsed,
        data_wait=wait / max(elapsed, 1e-9),
        stopped=stopped,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    truth: Mapping,
    images_dir: Path,
    device: torch.device,
    tc: TrainConfig,
    progress: bool,
) -> ScoreReport:
    """Score ``model`` on the hold-out images ``truth`` (id -> ImageAnnotation) with the competition metric.

    Args:
        model: the unwrapped model (put in eval mode here; the caller switches back).
        truth: the hold-out's ground truth, keyed by image id.
        images_dir: where ``<id>.png`` lives (the competition's ``train/``).
        device: where the model is.
        tc: the ``train`` section (``val_*`` thresholds).
        progress: show a tqdm bar.

    Returns:
        :class:`cellseg.metric.ScoreReport` (overall and per cell type).
    """
    from cellseg.engine import evaluate as _evaluate  # the pre-pipeline validation path, being replaced

    return _evaluate(
        model, truth, images_dir, device, tc.val_score_thresh, tc.val_mask_thresh, tc.val_min_pixels, progress
    )
