"""The training run: data, model, optimiser, resume, then per epoch :func:`~cellseg.training.engine.train_one_epoch`
and :func:`~cellseg.training.engine.evaluate`, with the run folder written atomically. Single process or
torch DDP (launched by ``torchrun``).

    train(cfg, data_dir, fold=0, init="coco.pth", out="runs/r50/fold0")

* Data: the fold's training images (``cellseg.data.dataset``), the fold's hold-out (``cellseg.data.folds``,
  ``cfg.data.folds`` / ``fold_seed``) for validation with the exact competition metric.
* Optimisation (``cellseg.training.optim``): SGD or AdamW, linear warm-up then cosine or step decay (per
  step), gradient clipping, AMP (autocast + GradScaler) on GPU, deterministic seeding.
* Distributed (``cellseg.training.distributed``): ``init_process_group`` from the torchrun environment,
  ``DistributedSampler``, ``DistributedDataParallel``; only rank 0 validates and writes.
* Run folder: ``last.pth`` (every epoch, with the full resume state), ``best.pth`` (best validation
  score), ``metrics.csv``, ``curves.png``, ``config.yaml``. All writes are atomic, so a run killed at
  any moment resumes (``resume=True``) from its last epoch with identical optimiser, scheduler, RNG
  (python, numpy, torch, sampler epoch) and epoch state.
* Learning rate: ``train.lr`` is set for ``train.reference_batch`` images per step and scaled linearly to
  the actual global batch (processes x ``batch_size``), the warm-up steps inversely
  (:func:`cellseg.training.optim.scale_to_global_batch`); the result is logged once at the start.
* A run saved with N processes (or GPUs) resumes with another number: the data order and generator
  states then differ (a warning says so) and the schedule continues from the epoch reached.
* Ctrl-C stops the run with KeyboardInterrupt wherever it lands (:mod:`cellseg.training.interrupt`);
  the run folder keeps the last completed epoch. The folder itself is made with the first checkpoint:
  a run that trains nothing leaves none behind.
* Time limit (``train.time_limit``, e.g. ``11h30m`` for a 12 h Kaggle session): checked at epoch
  boundaries only. Before each epoch, when the longest epoch so far (training + validation + saving;
  carried over in the resume state) would end past the limit, the run stops with the epoch just done
  saved: a clean, resumable stop, and stop + ``resume=True`` ends with the same weights as one
  uninterrupted run. Stopping mid-epoch was not chosen: resuming there exactly would need the
  sampler's and the loader workers' positions in the resume state. The first epoch of a run has
  nothing to project from and always starts; a resumed run whose recorded epoch does not fit the
  limit at all is an error rather than a session that makes no progress. The clock is injected
  (:class:`EpochClock`, ``train(clock=...)``; default ``time.monotonic``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from cellseg import CELL_TYPES, plot
from cellseg.config.experiment import ExperimentConfig, TrainConfig
from cellseg.config.loader import dump_yaml, to_dict
from cellseg.data import livecell
from cellseg.data.dataset import build_train_dataset, collate_fn
from cellseg.data.folds import holdout_split
from cellseg.data.livecell import LivecellValidation
from cellseg.data.truth import read_train_csv
from cellseg.errors import CellsegError
from cellseg.io import atomic_path
from cellseg.model.build import build_model, count_parameters, unwrap
from cellseg.model.checkpoint import load_init, read_checkpoint, save_checkpoint
from cellseg.model.provenance import init_record, run_provenance, training_sources
from cellseg.paths import CompetitionPaths, git_commit
from cellseg.training.distributed import (
    DistInfo,
    broadcast_buffers,
    fail_fast,
    gather_rng,
    main_done,
    main_section,
    process_group,
    reduce_mean,
)
from cellseg.training.engine import LOSS_NAMES, EpochStats, evaluate, evaluate_livecell, train_one_epoch
from cellseg.training.interrupt import deferred_interrupts, interrupt_guard, raise_if_interrupted
from cellseg.training.optim import build_optimizer, lr_factor, scale_to_global_batch
from cellseg.training.rng import seed_everything, set_rng_state

Log = Callable[[str], None]


def balanced_subset(truth: Mapping[str, Any], n: int) -> list[str]:
    """``n`` ids taken round-robin over cell types (each type in its original order)."""
    by_type: dict[str, list[str]] = {}
    for image_id, ann in truth.items():
        by_type.setdefault(ann.cell_type, []).append(image_id)
    queues = [list(v) for _, v in sorted(by_type.items())]
    out: list[str] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


@dataclass
class TrainResult:
    out: Path
    best_score: float | None
    best_epoch: int | None
    epochs_done: int
    steps_done: int
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None
    #: the run stopped before its last epoch because of ``train.time_limit`` (resume to continue).
    timed_out: bool = False


def check_train_config(tc: TrainConfig) -> None:
    """Refuse a ``train`` section that cannot train anything, before any file or folder is made.

    Raises:
        CellsegError: one line naming the key and its allowed range.
    """
    if tc.epochs < 1:
        raise CellsegError(f"train.epochs must be >= 1, got {tc.epochs}")
    if tc.reference_batch < 1:
        raise CellsegError(f"train.reference_batch must be >= 1, got {tc.reference_batch}")
    unknown = sorted(set(tc.loss_weights) - set(LOSS_NAMES))
    if unknown:
        raise CellsegError(f"train.loss_weights: unknown loss {unknown[0]!r}; expected one of {', '.join(LOSS_NAMES)}")
    if tc.time_limit is not None and not tc.time_limit >= 0:
        raise CellsegError(f"train.time_limit must be >= 0 seconds, got {tc.time_limit}")


# ------------------------------------------------------------------------- the epoch clock


class EpochClock:
    """``train.time_limit`` at epoch boundaries, on an injected clock.

    Args:
        limit: the limit in seconds (None or 0: no limit).
        longest: the longest epoch of the run so far (from the resume state), None before the first.
        clock: seconds from an arbitrary origin (default ``time.monotonic``); tests pass a fake one.
    """

    def __init__(
        self, limit: float | None, longest: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit or None
        self.longest = longest
        self.clock = clock
        self.started = clock()
        self._epoch_start = self.started

    def next_fits(self, first_of_run: bool, info: DistInfo) -> bool:
        """Whether another epoch fits the limit; rank 0 decides for every rank.

        Args:
            first_of_run: no epoch was done yet in this call: a resumed run that cannot fit one is an error.
            info: the process-group info.
        Returns:
            True to run the next epoch, False to stop cleanly.
        """
        elapsed = self.clock() - self.started
        fits = self.limit is None or self.longest is None or elapsed + self.longest <= self.limit
        if info.distributed:  # clocks differ per rank: all follow rank 0
            flag = [fits]
            dist.broadcast_object_list(flag, src=0)
            fits = flag[0]
        if not fits and first_of_run:
            raise CellsegError(
                f"train.time_limit {self.limit:g} s is shorter than one epoch of this run ({self.longest or 0:.0f} s, "
                "recorded in last.pth): raise it"
            )
        return fits

    def start_epoch(self) -> None:
        self._epoch_start = self.clock()

    def end_epoch(self) -> float:
        """Record the epoch that started at :meth:`start_epoch`; returns the longest epoch so far."""
        self.longest = max(self.longest or 0.0, self.clock() - self._epoch_start)
        return self.longest


# ------------------------------------------------------------------------- run state: save / load


@dataclass
class RunState:
    """Where the run stands: what ``last.pth`` carries besides the weights and the optimiser.

    Attributes:
        epoch, step: epochs and optimiser steps done.
        history: one metrics row per epoch (``metrics.csv``).
        best_score, best_epoch: best validation score so far and its epoch.
        epoch_seconds: the longest epoch so far, for ``train.time_limit``.
    """

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int | None = None
    epoch_seconds: float | None = None


def read_resume_point(last_path: Path, cfg: ExperimentConfig, model: nn.Module) -> tuple[dict, dict]:
    """Load ``last.pth``'s weights into ``model`` (float32) and return its (resume state, provenance).

    Raises:
        CellsegError: the checkpoint's model config differs from ``cfg.model``, or it holds no resume state.
    """
    ckpt = read_checkpoint(last_path)
    if ckpt.get("model_config") != to_dict(cfg.model):
        raise CellsegError(
            f"{last_path}: its model config differs from --config; leave --config out to resume with the run's own config.yaml"
        )
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
    state = ckpt.get("train_state")
    if state is None:
        raise CellsegError(f"{last_path}: no resume state in this checkpoint")
    return state, ckpt.get("provenance") or {}


def save_state(run: RunState, optimizer: Any, scheduler: Any, scaler: Any, rngs: list[dict]) -> dict:
    """The resume state stored in ``last.pth`` (``rngs``: every rank's generator states, rank order)."""
    return {
        "epoch": run.epoch,
        "step": run.step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rngs,
        "history": run.history,
        "best_score": run.best_score,
        "best_epoch": run.best_epoch,
        "epoch_seconds": run.epoch_seconds,
    }


def restore_state(
    state: dict,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    info: DistInfo,
    steps_per_epoch: int,
    lr: float,
    seed: int,
    log: Log,
) -> RunState:
    """Put a saved resume state back: optimiser, scheduler, scaler, generators; returns the :class:`RunState`.

    With as many processes as when it was saved the continuation is exact. With another number the
    schedule continues from the epoch reached at this run's steps per epoch, from this run's scaled lr,
    and each rank takes the saved generator state of its rank if there is one, else is seeded from
    ``seed``, its rank and the epoch (one warning line).
    """
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    run = RunState(
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        history=list(state["history"]),
        best_score=state["best_score"],
        best_epoch=state["best_epoch"],
        epoch_seconds=state.get("epoch_seconds"),
    )
    rngs = state["rng"]
    if len(rngs) != info.world_size:
        log(
            f"warning: saved by {len(rngs)} process(es), resumed with {info.world_size}: the data order and "
            "random draws differ from an uninterrupted run; the schedule continues from the epoch reached"
        )
        run.step = run.epoch * steps_per_epoch
        _restart_schedule(optimizer, scheduler, run.step, lr)
    if info.rank < len(rngs):
        warning = set_rng_state(rngs[info.rank])
        if warning:
            log(f"warning: {warning}")
    else:  # a rank the saved run did not have: a stream of its own
        seed_everything(seed + info.rank + run.epoch)
    return run


def _restart_schedule(optimizer: Any, scheduler: Any, step: int, lr: float) -> None:
    """Continue ``scheduler`` at ``step`` from base lr ``lr`` (this run's scaled ``train.lr``)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    scheduler.last_epoch = step
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(step)


# ------------------------------------------------------------------------- data


@dataclass
class Validation:
    """What validation scores on: the fold's hold-out, or a LIVECell split (``data.livecell_val``)."""

    truth: Mapping[str, Any]
    images_dir: Path
    livecell: LivecellValidation | None
    #: the per-group score columns: the cell types, or LIVECell's cell lines
    groups: list[str] | tuple[str, ...]


def validation_set(cfg: ExperimentConfig, data_dir: Path, truth: Any, hold_ids: list[str]) -> Validation:
    """The hold-out images (at most ``train.val_max_images``, balanced over cell types), unless
    ``data.livecell_val`` replaces them with a LIVECell split scored per cell line."""
    val_truth: Mapping[str, Any] = {i: truth.images[i] for i in hold_ids}
    n = cfg.train.val_max_images
    if n and len(val_truth) > n:
        val_truth = {i: val_truth[i] for i in balanced_subset(val_truth, n)}
    images_dir = CompetitionPaths(data_dir).train_dir
    lc_val = livecell.validation_set(cfg, data_dir)
    if lc_val is not None:
        return Validation(lc_val.truth, images_dir, lc_val, lc_val.groups)
    return Validation(val_truth, images_dir, None, CELL_TYPES)


def loader_workers(requested: int, cores: int, local_world_size: int) -> int:
    """DataLoader worker processes for one rank: ``requested``, capped at this rank's share of the cores.

    Args:
        requested: ``train.num_workers`` (0: load in the training process).
        cores: cores this process may run on.
        local_world_size: training processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``).
    Returns:
        0 when 0 was requested, else between 1 and ``requested``.
    """
    if requested <= 0:
        return 0
    return max(1, min(requested, cores // max(local_world_size, 1)))


def build_loader(dataset: Any, tc: TrainConfig, info: DistInfo, log: Log) -> tuple[DataLoader, DistributedSampler]:
    """The training loader: a DistributedSampler (one shard per rank; shuffled), workers capped per rank
    (more loader processes than cores only slow loading down, and each dense item holds ~0.5 GB of masks)."""
    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=tc.seed
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    workers = loader_workers(tc.num_workers, cores, local_world)
    if workers < tc.num_workers:
        log(
            f"train.num_workers={tc.num_workers} but {cores} core(s) for {local_world} process(es) here: "
            f"using {workers} loader worker(s) per process"
        )
    loader = DataLoader(
        dataset,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=info.device.type == "cuda",
        drop_last=False,
    )
    return loader, sampler


# ------------------------------------------------------------------------- the run


@dataclass
class _Run:
    """Everything one ``train()`` call works with (built by :func:`_prepare`)."""

    info: DistInfo
    cfg: ExperimentConfig  # as configured: what config.yaml and the checkpoints store
    tc: TrainConfig  # the train section with lr and warm-up scaled to the global batch
    out: Path
    model: nn.Module
    dataset: Any
    loader: DataLoader
    sampler: DistributedSampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    validation: Validation
    provenance: dict
    total_steps: int
    log: Log
    progress: bool
    state: RunState = field(default_factory=RunState)
    folder_made: bool = False

    @property
    def use_amp(self) -> bool:
        return self.cfg.train.amp and self.info.device.type == "cuda"

    @property
    def has_val(self) -> bool:
        return bool(self.validation.truth) and self.cfg.train.val_every > 0


def _model_and_resume(
    cfg: ExperimentConfig, out: Path, init: str | Path | None, resume: bool, log: Log
) -> tuple[nn.Module, dict | None, dict | None]:
    """The model with its starting weights: ``out/last.pth`` when resuming one, else ``init``.

    Returns:
        (model, resume state or None, the resumed checkpoint's provenance or None).
    """
    model = build_model(cfg.model)
    last_path = out / "last.pth"
    if resume and last_path.is_file():
        state, provenance = read_resume_point(last_path, cfg, model)
        log(f"resuming {out} after epoch {state['epoch']} (step {state['step']})")
        return model, state, provenance
    if resume:
        log(f"nothing to resume in {out}; starting from the beginning")
    if init:
        log(load_init(model, init, cfg.model.class_names))
    return model, None, None


def _provenance_base(
    cfg: ExperimentConfig,
    data_dir: Path,
    dataset: Any,
    init: str | Path | None,
    resumed: dict | None,
    info: DistInfo,
    config_name: str | None,
    fold: int | None,
) -> dict:
    """What every checkpoint of the run records (:mod:`cellseg.model.provenance`). The run's init is
    the one it started from: on resume, the one last.pth records (the init file need not be at hand
    any more), never this call's ``init``."""
    init_name = resumed.get("init") if resumed is not None else (str(init) if init else None)
    base = {
        "fold": fold,
        "git_commit": git_commit(),
        "config": config_name if config_name is not None or resumed is None else resumed.get("config"),
        "data": str(data_dir),
        "init": init_name,
        "world_size": info.world_size,
    }
    if info.main:  # what the weights are trained on (data_sources, init_sha256)
        sources = training_sources(cfg, CompetitionPaths(data_dir).train_csv, dataset.records, dataset.extra)
        if resumed is not None:  # the weights descend from last.pth: its sources, init and import
            init_sha256, inherited = resumed.get("init_sha256"), resumed
        else:
            init_sha256, inherited = init_record(init)
        base.update(run_provenance(sources, init_sha256, inherited))
    return base


def _wrap(model: nn.Module, tc: TrainConfig, info: DistInfo) -> nn.Module:
    """The model on the training device; SyncBatchNorm and DDP under torchrun."""
    model.to(info.device)
    if tc.sync_bn and info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def _prepare(
    info: DistInfo,
    cfg: ExperimentConfig,
    data_dir: Path,
    fold: int | None,
    init: str | Path | None,
    out: Path,
    resume: bool,
    progress: bool,
    config_name: str | None,
) -> _Run:
    """Data, model (resumed or initialised), loader, optimiser and schedule; nothing is written."""
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    log: Log = (lambda msg: tqdm.write(msg)) if info.main else (lambda msg: None)
    if init and not (resume and (out / "last.pth").is_file()) and not Path(init).is_file():
        raise CellsegError(f"--init {init}: checkpoint not found")
    seed_everything(tc.seed)
    truth = read_train_csv(CompetitionPaths(data_dir).require("train_csv").train_csv, fill_holes=False)
    train_ids, hold_ids = holdout_split(truth, fold, cfg.data.folds, cfg.data.fold_seed, cfg.data.folds_csv or None)
    dataset = build_train_dataset(cfg, data_dir, train_ids)
    if len(dataset) == 0:
        raise CellsegError(f"fold {fold}: no training images")
    validation = validation_set(cfg, data_dir, truth, hold_ids)
    model, resume_state, resumed = _model_and_resume(cfg, out, init, resume, log)
    model = _wrap(model, tc, info)
    scaled, lr_line = scale_to_global_batch(tc, info.world_size)
    loader, sampler = build_loader(dataset, tc, info, log)
    total_steps = len(loader) * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    optimizer = build_optimizer(model, scaled)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, scaled))
    run = _Run(
        info=info,
        cfg=cfg,
        tc=scaled,
        out=out,
        model=model,
        dataset=dataset,
        loader=loader,
        sampler=sampler,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=tc.amp and info.device.type == "cuda"),
        validation=validation,
        provenance=_provenance_base(cfg, data_dir, dataset, init, resumed, info, config_name, fold),
        total_steps=total_steps,
        log=log,
        progress=progress,
    )
    if resume_state is not None:
        run.state = restore_state(
            resume_state, optimizer, scheduler, run.scaler, info, len(loader), scaled.lr, tc.seed, log
        )
    else:
        seed_everything(tc.seed + info.rank)
    n_all, n_train = count_parameters(unwrap(model))
    log(
        f"train {config_name or cfg.model.name}: {len(dataset)} train / {len(validation.truth)} hold-out images, "
        f"{info.world_size} process(es) on {info.device}, {len(loader)} steps/epoch, "
        f"{n_train / 1e6:.1f}M of {n_all / 1e6:.1f}M parameters trained, amp={'on' if run.use_amp else 'off'}"
    )
    log(lr_line)
    return run


def _one_epoch(run: _Run) -> EpochStats:
    """Train one epoch (:func:`cellseg.training.engine.train_one_epoch`) from where ``run.state`` stands."""
    epoch = run.state.epoch
    run.sampler.set_epoch(epoch)
    if hasattr(run.dataset, "set_epoch"):
        run.dataset.set_epoch(epoch)
    return train_one_epoch(
        run.model,
        run.loader,
        run.optimizer,
        run.scheduler,
        run.scaler,
        run.info.device,
        run.tc,
        epoch=epoch,
        step=run.state.step,
        total_steps=run.total_steps,
        steps_per_epoch=len(run.loader),
        use_amp=run.use_amp,
        log=run.log,
        progress=run.progress and run.info.main,
    )


def _metrics_row(run: _Run, means: dict[str, float], stats: EpochStats) -> dict[str, Any]:
    """The epoch's ``metrics.csv`` row before validation: epoch, step, lr, mean losses, time, data wait."""
    row: dict[str, Any] = {"epoch": run.state.epoch, "step": run.state.step, "lr": run.optimizer.param_groups[0]["lr"]}
    row.update({("loss" if k == "loss" else f"loss_{k.removeprefix('loss_')}"): v for k, v in sorted(means.items())})
    row.update({"seconds": round(stats.seconds, 2), "data_wait": round(stats.data_wait, 4)})
    return row


def _validate(run: _Run, row: dict[str, Any]) -> bool:
    """Score the model on the validation set, add the scores to ``row`` and log them.

    Returns:
        whether the score is the best so far (``run.state`` then records it).
    """
    val, st = run.validation, run.state
    model, device = unwrap(run.model), run.info.device
    if val.livecell is not None:  # LIVECell images, scored per cell line
        report = evaluate_livecell(model, val.livecell, device, run.cfg, run.progress)
    else:
        report = evaluate(model, val.truth, val.images_dir, device, run.cfg, run.progress)
    row["val_score"] = report.score
    row.update({f"val_{g}": report.per_class.get(g) for g in val.groups})
    run.log(
        f"epoch {st.epoch}: loss {row.get('loss', float('nan')):.4f}, hold-out score {report.score:.4f} "
        + " ".join(f"{g}={s:.4f}" for g, s in report.per_class.items())
    )
    if st.best_score is not None and report.score <= st.best_score:
        return False
    st.best_score, st.best_epoch = report.score, st.epoch
    return True


def _make_folder(run: _Run) -> None:
    """The run folder and its ``config.yaml``, made with the run's first checkpoint (as configured:
    lr unscaled, so that a resume on another number of processes scales it again)."""
    if not run.folder_made:
        run.out.mkdir(parents=True, exist_ok=True)
        dump_yaml(run.cfg, run.out / "config.yaml")
        run.folder_made = True


def validate_and_checkpoint(
    run: _Run, row: dict[str, Any], validate: bool, rngs: list[dict], clock: EpochClock
) -> None:
    """Rank 0 after each epoch: validate (when due), then ``best.pth`` (a better score, or every epoch
    without validation), ``last.pth`` with the resume state, ``metrics.csv`` and ``curves.png``.

    Args:
        run: the run (``run.state`` is updated: history, best score, longest epoch).
        row: the epoch's metrics row (:func:`_metrics_row`); the validation scores are added.
        validate: validation is due this epoch.
        rngs: every rank's generator states after the epoch (what the next epoch starts from).
        clock: the epoch clock; the epoch ends here, before last.pth records the longest epoch.
    """
    st, has_val = run.state, run.has_val
    improved = _validate(run, row) if validate else False
    if not validate:
        run.log(
            f"epoch {st.epoch}: loss {row.get('loss', float('nan')):.4f} "
            f"({row['seconds']:.0f} s, data wait {row['data_wait']:.1%})"
        )
    raise_if_interrupted()  # Ctrl-C while validating: stop before writing anything of this epoch
    st.history.append(row)
    groups = run.validation.groups
    provenance = dict(
        run.provenance,
        epoch=st.epoch,
        step=st.step,
        score=row.get("val_score"),
        per_class={g: row.get(f"val_{g}") for g in groups},
    )
    names = run.cfg.model.class_names
    with deferred_interrupts():  # Ctrl-C here lands after the epoch's files, which then agree
        _make_folder(run)
        if improved or not has_val:
            save_checkpoint(run.out / "best.pth", run.model, run.cfg, names, provenance, half=run.cfg.train.half_best)
        st.epoch_seconds = clock.end_epoch()
        state = save_state(st, run.optimizer, run.scheduler, run.scaler, rngs)
        save_checkpoint(run.out / "last.pth", run.model, run.cfg, names, provenance, train_state=state)
        write_metrics(run.out, st.history)


def write_metrics(out: Path, history: list[dict]) -> None:
    """``metrics.csv`` (one row per epoch) and ``curves.png`` (losses, validation scores; :mod:`cellseg.plot`)."""
    df = pd.DataFrame(history)
    with atomic_path(out / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    plot.training_curves(df, out / "curves.png")


def _finish_epoch(run: _Run, stats: EpochStats, clock: EpochClock) -> None:
    """After an epoch on every rank: loss means, rank 0's BatchNorm buffers, the generator states the
    next epoch starts from; rank 0 validates and writes while the others wait."""
    info, st, tc = run.info, run.state, run.cfg.train
    st.step = stats.step
    st.epoch += 1
    means = reduce_mean(stats.means, info)
    broadcast_buffers(unwrap(run.model), info)  # BatchNorm running stats drift apart per rank: keep rank 0's
    rngs = gather_rng(info)  # the state the next epoch starts from (validation must not change it)
    row = _metrics_row(run, means, stats)
    last_epoch = st.epoch >= tc.epochs or stats.stopped
    validate = run.has_val and (st.epoch % tc.val_every == 0 or last_epoch)
    main_section(info)  # rank 0 validates and writes; the others wait in main_done
    if info.main:
        validate_and_checkpoint(run, row, validate, rngs, clock)
    set_rng_state(rngs[info.rank])
    main_done(info)


def _train_epochs(run: _Run, clock: EpochClock) -> bool:
    """Epochs until ``train.epochs``, ``train.max_steps`` or the time limit.

    Returns:
        True when ``train.time_limit`` stopped the run before its last epoch.
    """
    tc, st = run.cfg.train, run.state
    first = st.epoch
    stop = bool(tc.max_steps) and st.step >= tc.max_steps
    while st.epoch < tc.epochs and not stop:
        if not clock.next_fits(st.epoch == first, run.info):
            run.log(
                f"stopping after epoch {st.epoch} of {tc.epochs}: another epoch (~{clock.longest or 0:.0f} s) "
                f"would pass train.time_limit ({clock.limit or 0:g} s); continue with --resume"
            )
            return True
        clock.start_epoch()
        stats = _one_epoch(run)
        raise_if_interrupted()  # a Ctrl-C dropped while the loader shut its workers down
        stop = stats.stopped
        _finish_epoch(run, stats, clock)
    return False


def train(
    cfg: ExperimentConfig,
    data_dir: str | Path,
    fold: int | None = 0,
    init: str | Path | None = None,
    out: str | Path = "runs/train",
    resume: bool = False,
    progress: bool = True,
    config_name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> TrainResult:
    """Train ``cfg`` on ``data_dir`` (competition layout) and write the run folder ``out``.

    Args:
        fold: hold-out fold for validation, or None to train on every image (no validation; best.pth
            is then the last epoch).
        init: starting weights (see :func:`cellseg.model.checkpoint.load_init`); ignored when resuming.
        resume: continue from ``out/last.pth`` when it exists (identical continuation on CPU).
        clock: what ``train.time_limit`` is measured with (seconds; tests inject a fake one).

    Returns a :class:`TrainResult` on every rank (``model`` is the trained, unwrapped model).

    Raises:
        CellsegError: bad settings (before anything is written) or data; KeyboardInterrupt on Ctrl-C,
            wherever it landed (:mod:`cellseg.training.interrupt`).

    Under torchrun the process group is created here and destroyed before returning (one made by the
    caller beforehand is left to the caller).
    """
    check_train_config(cfg.train)
    with interrupt_guard(), process_group() as info:
        return _train(info, cfg, Path(data_dir), fold, init, Path(out), resume, progress, config_name, clock)


@fail_fast  # rank 0 failing in its validation stops the other ranks at once (they wait for it)
def _train(
    info: DistInfo,
    cfg: ExperimentConfig,
    data_dir: Path,
    fold: int | None,
    init: str | Path | None,
    out: Path,
    resume: bool,
    progress: bool,
    config_name: str | None,
    clock: Callable[[], float],
) -> TrainResult:
    """:func:`train`'s body, inside the process group (``info``)."""
    epoch_clock = EpochClock(cfg.train.time_limit, clock=clock)
    run = _prepare(info, cfg, data_dir, fold, init, out, resume, progress, config_name)
    epoch_clock.longest = run.state.epoch_seconds
    timed_out = _train_epochs(run, epoch_clock)
    st = run.state
    if info.distributed:
        obj: list[Any] = [st.best_score, st.best_epoch, st.history]
        dist.broadcast_object_list(obj, src=0)
        st.best_score, st.best_epoch, st.history = obj
    if st.best_score is not None:
        run.log(f"best hold-out score {st.best_score:.4f} at epoch {st.best_epoch}: {out / 'best.pth'}")
    return TrainResult(out, st.best_score, st.best_epoch, st.epoch, st.step, st.history, unwrap(run.model), timed_out)
