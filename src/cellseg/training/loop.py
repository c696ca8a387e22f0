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
* Time limit (``train.time_limit``, e.g. ``11h30m`` for a 12 h Kaggle session): checked at epoch
  boundaries only. Before each epoch, when the longest epoch so far (training + validation + saving;
  carried over in the resume state) would end past the limit, the run stops with the epoch just done
  saved: a clean, resumable stop, and stop + ``resume=True`` ends with the same weights as one
  uninterrupted run. Stopping mid-epoch was not chosen: resuming there exactly would need the
  sampler's and the loader workers' positions in the resume state. The first epoch of a run has
  nothing to project from and always starts; a resumed run whose recorded epoch does not fit the
  limit at all is an error rather than a session that makes no progress.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
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
from cellseg.config.experiment import ExperimentConfig
from cellseg.config.loader import dump_yaml, parse_duration, to_dict
from cellseg.data import livecell
from cellseg.data.dataset import build_train_dataset, collate_fn
from cellseg.data.folds import holdout_split
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
from cellseg.training.engine import evaluate, evaluate_livecell, train_one_epoch
from cellseg.training.optim import build_optimizer, lr_factor
from cellseg.training.rng import seed_everything, set_rng_state


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


def next_epoch_fits(
    limit: float | None, elapsed: float, epoch_seconds: float | None, first_of_run: bool, info: Any
) -> bool:
    """Whether another epoch fits ``train.time_limit``; rank 0 decides for every rank.

    Args:
        limit: the limit in seconds (None: no limit).
        elapsed: seconds since this ``train()`` call started.
        epoch_seconds: the longest epoch so far (training + validation + saving), None before the first.
        first_of_run: no epoch was done yet in this call: a resumed run that cannot fit one is an error.
        info: the process-group info (:func:`cellseg.training.distributed.init_distributed`).
    Returns:
        True to run the next epoch, False to stop cleanly.
    """
    fits = not limit or epoch_seconds is None or elapsed + epoch_seconds <= limit
    if info.distributed:  # clocks differ per rank: all follow rank 0
        flag = [fits]
        dist.broadcast_object_list(flag, src=0)
        fits = flag[0]
    if not fits and first_of_run:
        raise CellsegError(
            f"train.time_limit {limit:g} s is shorter than one epoch of this run ({epoch_seconds or 0:.0f} s, "
            "recorded in last.pth): raise it"
        )
    return fits


def write_metrics(out: Path, history: list[dict]) -> None:
    """``metrics.csv`` (one row per epoch) and ``curves.png`` (losses, validation scores; :mod:`cellseg.plot`)."""
    df = pd.DataFrame(history)
    with atomic_path(out / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    plot.training_curves(df, out / "curves.png")


def train(
    cfg: ExperimentConfig,
    data_dir: str | Path,
    fold: int | None = 0,
    init: str | Path | None = None,
    out: str | Path = "runs/train",
    resume: bool = False,
    progress: bool = True,
    config_name: str | None = None,
) -> TrainResult:
    """Train ``cfg`` on ``data_dir`` (competition layout) and write the run folder ``out``.

    Args:
        fold: hold-out fold for validation, or None to train on every image (no validation; best.pth
            is then the last epoch).
        init: starting weights (see :func:`cellseg.model.checkpoint.load_init`); ignored when resuming.
        resume: continue from ``out/last.pth`` when it exists (identical continuation on CPU).

    Returns a :class:`TrainResult` on every rank (``model`` is the trained, unwrapped model).

    Under torchrun the process group is created here and destroyed before returning (one made by the
    caller beforehand is left to the caller).
    """
    with process_group() as info:
        return _train(info, cfg, Path(data_dir), fold, init, Path(out), resume, progress, config_name)


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
) -> TrainResult:
    """:func:`train`'s body, inside the process group (``info``)."""
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = info.device
    use_amp = tc.amp and device.type == "cuda"
    log = (lambda msg: tqdm.write(msg)) if info.main else (lambda msg: None)

    t_start = time.monotonic()
    time_limit = parse_duration(tc.time_limit) or None
    if time_limit is not None and time_limit < 0:
        raise CellsegError(f"train.time_limit must not be negative, got {tc.time_limit!r}")
    if init and not (resume and (Path(out) / "last.pth").is_file()) and not Path(init).is_file():
        raise CellsegError(f"--init {init}: checkpoint not found")
    seed_everything(tc.seed)
    truth = read_train_csv(CompetitionPaths(data_dir).require("train_csv").train_csv, fill_holes=False)
    train_ids, hold_ids = holdout_split(truth, fold, cfg.data.folds, cfg.data.fold_seed, cfg.data.folds_csv or None)
    dataset = build_train_dataset(cfg, data_dir, train_ids)
    if len(dataset) == 0:
        raise CellsegError(f"fold {fold}: no training images")
    val_truth: Mapping[str, Any] = {i: truth.images[i] for i in hold_ids}
    if tc.val_max_images and len(val_truth) > tc.val_max_images:
        val_truth = {i: val_truth[i] for i in balanced_subset(val_truth, tc.val_max_images)}
    lc_val = livecell.validation_set(cfg, data_dir)  # data.livecell_val: LIVECell replaces the hold-out
    val_truth = lc_val.truth if lc_val is not None else val_truth
    val_groups = lc_val.groups if lc_val is not None else CELL_TYPES  # per cell line / per cell type

    model = build_model(cfg.model)
    last_path, best_path = out / "last.pth", out / "best.pth"
    resume_state, resumed_provenance = None, None
    if resume and last_path.is_file():
        ckpt = read_checkpoint(last_path)
        if ckpt.get("model_config") != to_dict(cfg.model):
            raise CellsegError(
                f"{last_path}: its model config differs from --config; resume with the run's own config.yaml"
            )
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
        resume_state = ckpt.get("train_state")
        resumed_provenance = ckpt.get("provenance") or {}
        if resume_state is None:
            raise CellsegError(f"{last_path}: no resume state in this checkpoint")
        log(f"resuming {out} after epoch {resume_state['epoch']} (step {resume_state['step']})")
    else:
        if resume:
            log(f"nothing to resume in {out}; starting from the beginning")
        if init:
            log(load_init(model, init, cfg.model.class_names))
    model.to(device)
    if tc.sync_bn and info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler: DistributedSampler[int] = DistributedSampler(
        dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=tc.seed
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if tc.num_workers > cores:  # more loader processes than cores only slow loading down (and torch warns)
        log(f"train.num_workers={tc.num_workers} but {cores} core(s) here: using {cores} loader worker(s)")
    loader = DataLoader(
        dataset,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=min(tc.num_workers, cores),
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        drop_last=False,
    )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * tc.epochs
    if tc.max_steps:
        total_steps = min(total_steps, tc.max_steps)
    optimizer = build_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, tc))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, step, history = 0, 0, []
    best_score, best_epoch = None, None
    epoch_seconds: float | None = None  # the longest epoch so far, for train.time_limit
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        start_epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
        history = list(resume_state["history"])
        best_score, best_epoch = resume_state["best_score"], resume_state["best_epoch"]
        epoch_seconds = resume_state.get("epoch_seconds")
        rngs = resume_state["rng"]
        if len(rngs) != info.world_size:
            raise CellsegError(f"{last_path}: saved by {len(rngs)} process(es), resumed with {info.world_size}")
        set_rng_state(rngs[info.rank])
    else:
        seed_everything(tc.seed + info.rank)

    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out / "config.yaml")
        n_all, n_train = count_parameters(unwrap(model))
        log(
            f"train {config_name or cfg.model.name}: {len(dataset)} train / {len(val_truth)} hold-out images, "
            f"{info.world_size} process(es) on {device}, {steps_per_epoch} steps/epoch, "
            f"{n_train / 1e6:.1f}M of {n_all / 1e6:.1f}M parameters trained, amp={'on' if use_amp else 'off'}"
        )
    # The run's init is the one it started from: on resume, the one last.pth records (--init is ignored
    # there, and the init file need not be at hand any more), never this call's --init.
    init_name = resumed_provenance.get("init") if resumed_provenance is not None else (str(init) if init else None)
    provenance_base = {
        "fold": fold,
        "git_commit": git_commit(),
        "config": config_name,
        "data": str(data_dir),
        "init": init_name,
        "world_size": info.world_size,
    }
    if info.main:  # what the weights are trained on (data_sources, init_sha256): cellseg.model.provenance
        sources = training_sources(cfg, CompetitionPaths(data_dir).train_csv, dataset.records, dataset.extra)
        if resumed_provenance is not None:  # the weights descend from last.pth: its sources, init and import
            init_sha256, inherited = resumed_provenance.get("init_sha256"), resumed_provenance
        else:
            init_sha256, inherited = init_record(init)
        provenance_base.update(run_provenance(sources, init_sha256, inherited))

    has_val = bool(val_truth) and tc.val_every > 0
    epoch = start_epoch
    stop = bool(tc.max_steps) and step >= tc.max_steps
    timed_out = False
    while epoch < tc.epochs and not stop:
        if not next_epoch_fits(time_limit, time.monotonic() - t_start, epoch_seconds, epoch == start_epoch, info):
            timed_out = True
            log(
                f"stopping after epoch {epoch} of {tc.epochs}: another epoch (~{epoch_seconds or 0:.0f} s) would pass "
                f"train.time_limit ({time_limit:g} s); continue with --resume"
            )
            break
        t_epoch = time.monotonic()
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        stats = train_one_epoch(
            model,
            loader,
            optimizer,
            scheduler,
            scaler,
            device,
            tc,
            epoch=epoch,
            step=step,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            use_amp=use_amp,
            log=log,
            progress=progress and info.main,
        )
        step, stop = stats.step, stats.stopped
        epoch += 1
        elapsed = stats.seconds
        means = reduce_mean(stats.means, info)
        broadcast_buffers(unwrap(model), info)  # BatchNorm running stats drift apart per rank: keep rank 0's
        rngs = gather_rng(info)  # the state the next epoch starts from (validation must not change it)
        row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
        row.update(
            {("loss" if k == "loss" else f"loss_{k.removeprefix('loss_')}"): v for k, v in sorted(means.items())}
        )
        row.update({"seconds": round(elapsed, 2), "data_wait": round(stats.data_wait, 4)})
        last_epoch = epoch >= tc.epochs or stop
        validate = has_val and (epoch % tc.val_every == 0 or last_epoch)
        improved = False
        main_section(info)  # rank 0 validates and writes; the others wait in main_done
        if info.main:
            if validate:
                if lc_val is not None:  # LIVECell images, scored per cell line
                    report = evaluate_livecell(unwrap(model), lc_val, device, cfg, progress)
                else:
                    report = evaluate(
                        unwrap(model), val_truth, CompetitionPaths(data_dir).train_dir, device, cfg, progress
                    )
                row["val_score"] = report.score
                row.update({f"val_{ct}": report.per_class.get(ct) for ct in val_groups})
                improved = best_score is None or report.score > best_score
                if improved:
                    best_score, best_epoch = report.score, epoch
                log(
                    f"epoch {epoch}: loss {row.get('loss', float('nan')):.4f}, hold-out score {report.score:.4f} "
                    + " ".join(f"{ct}={s:.4f}" for ct, s in report.per_class.items())
                )
            else:
                log(
                    f"epoch {epoch}: loss {row.get('loss', float('nan')):.4f} ({elapsed:.0f} s, data wait {row['data_wait']:.1%})"
                )
            history.append(row)
            provenance = dict(
                provenance_base,
                epoch=epoch,
                step=step,
                score=row.get("val_score"),
                per_class={ct: row.get(f"val_{ct}") for ct in val_groups},
            )
            if improved or not has_val:
                save_checkpoint(best_path, model, cfg, cfg.model.class_names, provenance, half=tc.half_best)
            epoch_seconds = max(epoch_seconds or 0.0, time.monotonic() - t_epoch)
            state = {
                "epoch": epoch,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rngs,
                "history": history,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "epoch_seconds": epoch_seconds,
            }
            save_checkpoint(last_path, model, cfg, cfg.model.class_names, provenance, train_state=state)
            write_metrics(out, history)
        set_rng_state(rngs[info.rank])
        main_done(info)

    if info.distributed:
        obj: list[Any] = [best_score, best_epoch, history]
        dist.broadcast_object_list(obj, src=0)
        best_score, best_epoch, history = obj
    if info.main and best_score is not None:
        log(f"best hold-out score {best_score:.4f} at epoch {best_epoch}: {best_path}")
    return TrainResult(out, best_score, best_epoch, epoch, step, history, unwrap(model), timed_out)
