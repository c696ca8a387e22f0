"""One training epoch and one validation pass: the two functions the training loop calls each epoch
(the shape of torchvision's references/detection ``engine.py``)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellseg import CELL_TYPES
from cellseg.config.experiment import ExperimentConfig, TrainConfig
from cellseg.config.manifest import FusionConfig, Manifest, PostprocessConfig
from cellseg.data.livecell import LivecellValidation
from cellseg.data.truth import ImageAnnotation
from cellseg.errors import CellsegError
from cellseg.evaluation.metric import ScoreReport, score_images
from cellseg.inference.ensemble import Ensemble
from cellseg.io import read_gray
from cellseg.progress import progress as progress_bar
from cellseg.training.interrupt import raise_if_interrupted


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
        raise_if_interrupted()  # a Ctrl-C that a loader worker's shutdown swallowed
        with torch.autocast(device_type=device.type, enabled=use_amp):
            loss_dict = model(*to_device(images, targets, device))
        loss = weighted_loss(loss_dict, tc.loss_weights)
        values = loss_values(loss_dict, loss, step, epoch)
        optimizer_step(loss, model, optimizer, scheduler, scaler, tc.grad_clip)
        step += 1
        n_steps += 1
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


def to_device(
    images: list[torch.Tensor], targets: list[dict], device: torch.device
) -> tuple[list[torch.Tensor], list[dict]]:
    """A batch on ``device``: (3, H, W) images and the tensors of each target dict (other values as they are)."""
    on_device = [im.to(device, non_blocking=True) for im in images]
    moved = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
    return on_device, moved


#: the loss terms of torchvision's Mask R-CNN in training mode, and ``loss_mask_dice`` of
#: ``model.mask_loss: bce+dice`` (``train.loss_weights`` keys).
LOSS_NAMES = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg", "loss_mask_dice")


def weighted_loss(loss_dict: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """The loss the optimiser minimises: the sum of the terms, each times its weight (missing: 1).

    Args:
        loss_dict: loss name -> scalar tensor, as the model returns it in training mode.
        weights: ``train.loss_weights`` (loss name -> factor >= 0).

    Returns:
        A scalar tensor.
    """
    return sum(
        (v * weights.get(k, 1.0) for k, v in loss_dict.items()),
        torch.zeros((), device=next(iter(loss_dict.values())).device),
    )


def loss_values(loss_dict: Mapping[str, torch.Tensor], loss: Any, step: int, epoch: int) -> dict[str, float]:
    """The loss terms and their sum ``loss`` as floats, in one device-to-host copy (a float() per term
    would each wait for the GPU); the finiteness check, the progress bar and the logs read it.

    Raises:
        CellsegError: the summed loss is not finite (naming each term, at ``step`` of 0-based ``epoch``).
    """
    names = list(loss_dict)
    terms = torch.stack([loss_dict[k].detach().float() for k in names] + [loss.detach().float()]).tolist()
    values = dict(zip(names, terms[:-1]))
    values["loss"] = terms[-1]
    if not math.isfinite(values["loss"]):
        raise CellsegError(
            f"loss is {values['loss']} at step {step} (epoch {epoch + 1}): "
            + ", ".join(f"{k}={values[k]:.3g}" for k in names)
            + "; lower train.lr or raise warmup_iters"
        )
    return values


def optimizer_step(
    loss: torch.Tensor,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    grad_clip: float,
) -> None:
    """Backward through the (scaled) loss, clip the gradients' global L2 norm at ``grad_clip`` (0: no
    clipping), step the optimiser and the per-step schedule."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def validation_manifest(cfg: ExperimentConfig) -> Manifest:
    """The thresholds validation predicts with, as a manifest without models.

    ``train.val_thresholds`` for every cell type, the identity view, the manifest defaults for
    fusion (:class:`~cellseg.config.manifest.FusionConfig`) except ``detections_per_view`` = the model's
    own ``box_detections_per_img`` (LIVECell models keep up to 2000), and the default post-processing
    (:class:`~cellseg.config.manifest.PostprocessConfig`). Add the checkpoint as its one model and
    ``cellseg dry-run`` scores that checkpoint exactly as validation did.
    """
    th = cfg.train.val_thresholds
    return Manifest(
        name="validation",
        models=[],
        tta=["identity"],
        fusion=FusionConfig(detections_per_view=cfg.model.box_detections_per_img),
        classes={ct: dataclasses.replace(th) for ct in CELL_TYPES},
        postprocess=PostprocessConfig(),
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    truth: Mapping[str, ImageAnnotation],
    images_dir: Path,
    device: torch.device,
    cfg: ExperimentConfig,
    progress: bool,
) -> ScoreReport:
    """Score ``model`` on the hold-out images ``truth`` (``images_dir/<id>.png``) with the competition metric.

    Args:
        model: the unwrapped model being trained (left as it is: the pipeline runs a copy).
        truth: the hold-out's ground truth, keyed by image id.
        images_dir: where ``<id>.png`` lives (the competition's ``train/``).
        device: where the model is.
        cfg: the experiment config: ``model.class_names`` and ``model.roi_aligned`` (labels, mask
            paste shift) and ``train.val_thresholds``.
        progress: show progress (a tqdm bar on a terminal, else plain lines).

    Returns:
        :class:`cellseg.evaluation.metric.ScoreReport` (overall and per cell type).
    """
    paths = {i: Path(images_dir) / f"{i}.png" for i in truth}
    return score_with_pipeline(model, truth, paths, device, cfg, progress)


def evaluate_livecell(
    model: nn.Module, val: LivecellValidation, device: torch.device, cfg: ExperimentConfig, progress: bool = True
) -> ScoreReport:
    """Score ``model`` on a LIVECell validation split (``data.livecell_val``) as :func:`evaluate` does,
    but class-agnostic (LIVECell's lines are not the competition's classes: every instance counts).

    Returns:
        :class:`cellseg.evaluation.metric.ScoreReport` whose ``per_class`` holds one score per cell line.
    """
    return score_with_pipeline(model, val.truth, val.paths, device, cfg, progress, class_agnostic=True)


@torch.no_grad()
def score_with_pipeline(
    model: nn.Module,
    truth: Mapping[str, ImageAnnotation],
    paths: Mapping[str, Path],
    device: torch.device,
    cfg: ExperimentConfig,
    progress: bool,
    class_agnostic: bool = False,
) -> ScoreReport:
    """Predict every image of ``truth`` (its file in ``paths``) with the inference pipeline and score it.

    Predictions come from :meth:`cellseg.inference.ensemble.Ensemble.predict` (the path of ``cellseg
    predict`` and ``dry-run``) with :func:`validation_manifest`'s thresholds, on a copy of ``model``
    (:meth:`cellseg.inference.ensemble.Ensemble.in_memory`; ``class_agnostic`` for models whose classes
    are not the competition's). ``per_class`` of the report groups by ``truth[id].cell_type``.
    """
    manifest = validation_manifest(cfg)
    ensemble = Ensemble.in_memory(model, cfg.model, manifest, device, class_agnostic=class_agnostic)
    preds = {}
    bar = progress_bar(total=len(truth), desc="validate", unit="img", enabled=progress, leave=False)
    for image_id in list(truth):
        image = read_gray(paths[image_id])
        preds[image_id] = ensemble.predict(image).crops
        bar.update()
    bar.close()
    return score_images(truth, preds)
