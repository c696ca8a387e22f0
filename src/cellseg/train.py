"""Training loop: single process or torch DDP (launched by ``torchrun``), kill-safe resume.

    train(cfg, data_dir, fold=0, init="coco.pth", out="runs/r50/fold0")

* Data: the fold's training images (``cellseg.data.dataset``), the fold's hold-out (``cellseg.data.folds``,
  ``cfg.data.folds`` / ``fold_seed``) for validation with the exact competition metric.
* Optimisation: SGD or AdamW, linear warm-up then cosine or step decay (per step), gradient clipping,
  AMP (autocast + GradScaler) on GPU, deterministic seeding.
* Distributed: ``init_process_group`` from the torchrun environment (nccl on GPU, gloo on CPU),
  ``DistributedSampler``, ``DistributedDataParallel``; only rank 0 validates and writes.
* Run folder: ``last.pth`` (every epoch, with the full resume state), ``best.pth`` (best validation
  score), ``metrics.csv``, ``curves.png``, ``config.yaml``. All writes are atomic, so a run killed at
  any moment resumes (``resume=True``) from its last epoch with identical optimiser, scheduler, RNG
  (python, numpy, torch, sampler epoch) and epoch state.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from cellseg import CELL_TYPES
from cellseg.config import dump_yaml, to_dict
from cellseg.errors import CellsegError
from cellseg.io import atomic_path
from cellseg.model.build import build_model, count_parameters, unwrap
from cellseg.model.checkpoint import git_commit, load_init, read_checkpoint, save_checkpoint
from cellseg.model.experiment import ExperimentConfig, TrainConfig
from cellseg.paths import CompetitionPaths

# ----------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK...)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank, world, local)


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------- RNG state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy and torch (CPU, CUDA) generator states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over trainable parameters; no weight decay on norms and biases."""
    decay, no_decay = [], []
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


# ----------------------------------------------------------------------------- data


def split_ids(cfg: ExperimentConfig, data_dir: Path, fold: int | None):
    """(TrainSet without hole filling = validation truth, train ids, hold-out ids)."""
    from cellseg.data.folds import make_folds, split
    from cellseg.data.truth import read_train_csv

    if fold is not None and not 0 <= fold < cfg.data.folds:
        raise CellsegError(f"--fold {fold} out of range 0..{cfg.data.folds - 1} (data.folds={cfg.data.folds})")
    truth = read_train_csv(CompetitionPaths(data_dir).require("train_csv").train_csv, fill_holes=False)
    if fold is None:
        return truth, list(truth.images), []
    folds = make_folds(truth, k=cfg.data.folds, seed=cfg.data.fold_seed)
    train_ids, hold_ids = split(folds, fold)
    return truth, train_ids, hold_ids


def balanced_subset(truth: dict, n: int) -> list[str]:
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


def build_train_dataset(cfg: ExperimentConfig, data_dir: Path, train_ids: list[str]):
    """The augmented training dataset of ``train_ids`` (+ extra csv / COCO sources) and its collate_fn."""
    from cellseg.data import dataset

    ds = dataset.build_train_dataset(cfg, data_dir, train_ids)
    return ds, getattr(dataset, "collate_fn", None) or _collate


def _collate(batch):
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    out: Path
    best_score: float | None
    best_epoch: int | None
    epochs_done: int
    steps_done: int
    history: list[dict] = field(default_factory=list)
    model: nn.Module | None = None


def _device(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _gather_rng(info: DistInfo) -> list[dict]:
    state = rng_state()
    if not info.distributed:
        return [state]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _reduce_mean(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    if not info.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / info.world_size for k, v in zip(keys, t)}


def write_metrics(out: Path, history: list[dict]) -> None:
    """``metrics.csv`` (one row per epoch) and ``curves.png`` (losses, validation scores)."""
    import pandas as pd

    df = pd.DataFrame(history)
    with atomic_path(out / "metrics.csv") as tmp:
        df.to_csv(tmp, index=False)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for col in [c for c in df.columns if c.startswith("loss")]:
        ax1.plot(df["epoch"], df[col], marker=".", label=col)
    ax1.set_xlabel("epoch"), ax1.set_ylabel("train loss"), ax1.set_yscale("log"), ax1.legend(fontsize=7)
    for col in [c for c in df.columns if c.startswith("val_")]:
        sub = df[["epoch", col]].dropna()
        if len(sub):
            ax2.plot(sub["epoch"], sub[col], marker="o", label=col.removeprefix("val_"))
    ax2.set_xlabel("epoch"), ax2.set_ylabel("competition score (hold-out)"), ax2.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


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
    """
    info = init_distributed()
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = _device(info)
    use_amp = tc.amp and device.type == "cuda"
    data_dir, out = Path(data_dir), Path(out)
    log = (lambda msg: tqdm.write(msg)) if info.main else (lambda msg: None)

    if init and not (resume and (Path(out) / "last.pth").is_file()) and not Path(init).is_file():
        raise CellsegError(f"--init {init}: checkpoint not found")
    seed_everything(tc.seed)
    truth, train_ids, hold_ids = split_ids(cfg, data_dir, fold)
    dataset, collate = build_train_dataset(cfg, data_dir, train_ids)
    if len(dataset) == 0:
        raise CellsegError(f"fold {fold}: no training images")
    val_truth = {i: truth.images[i] for i in hold_ids}
    if tc.val_max_images and len(val_truth) > tc.val_max_images:
        val_truth = {i: val_truth[i] for i in balanced_subset(val_truth, tc.val_max_images)}

    model = build_model(cfg.model)
    last_path, best_path = out / "last.pth", out / "best.pth"
    resume_state = None
    if resume and last_path.is_file():
        ckpt = read_checkpoint(last_path)
        if ckpt.get("model_config") != to_dict(cfg.model):
            raise CellsegError(
                f"{last_path}: its model config differs from --config; resume with the run's own config.yaml"
            )
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()})
        resume_state = ckpt.get("train_state")
        if resume_state is None:
            raise CellsegError(f"{last_path}: no resume state in this checkpoint")
        log(f"resuming {out} after epoch {resume_state['epoch']} (step {resume_state['step']})")
    else:
        if resume:
            log(f"nothing to resume in {out}; starting from the beginning")
        if init:
            log(load_init(model, init))
    model.to(device)
    if tc.sync_bn and info.distributed and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=tc.seed)
    loader = DataLoader(
        dataset,
        batch_size=tc.batch_size,
        sampler=sampler,
        num_workers=tc.num_workers,
        collate_fn=collate,
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
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        start_epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
        history = list(resume_state["history"])
        best_score, best_epoch = resume_state["best_score"], resume_state["best_epoch"]
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
    provenance_base = {
        "fold": fold,
        "git_commit": git_commit(),
        "config": config_name,
        "data": str(data_dir),
        "init": str(init) if init else None,
        "world_size": info.world_size,
    }

    has_val = bool(val_truth) and tc.val_every > 0
    epoch = start_epoch
    stop = bool(tc.max_steps) and step >= tc.max_steps
    while epoch < tc.epochs and not stop:
        model.train()
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sums: dict[str, float] = {}
        n_steps, wait, t_epoch = 0, 0.0, time.perf_counter()
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{tc.epochs}",
            unit="step",
            leave=False,
            disable=None if (progress and info.main) else True,
            dynamic_ncols=True,
        )
        t_wait = time.perf_counter()
        for images, targets in loader:
            wait += time.perf_counter() - t_wait
            images = [im.to(device, non_blocking=True) for im in images]
            targets = [
                {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
                for t in targets
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
                log(
                    f"step {step}/{total_steps} epoch {epoch + 1} "
                    + " ".join(f"{k}={v:.3f}" for k, v in values.items())
                )
            if tc.max_steps and step >= tc.max_steps:
                stop = True
                break
            t_wait = time.perf_counter()
        bar.close()
        epoch += 1
        elapsed = time.perf_counter() - t_epoch
        means = _reduce_mean({k: v / max(n_steps, 1) for k, v in sums.items()}, info)
        if info.distributed:  # BatchNorm running stats drift apart per rank: keep rank 0's everywhere
            for buf in unwrap(model).buffers():
                dist.broadcast(buf, src=0)
        rngs = _gather_rng(info)  # the state the next epoch starts from (validation must not change it)
        row: dict[str, Any] = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"]}
        row.update(
            {("loss" if k == "loss" else f"loss_{k.removeprefix('loss_')}"): v for k, v in sorted(means.items())}
        )
        row.update({"seconds": round(elapsed, 2), "data_wait": round(wait / max(elapsed, 1e-9), 4)})
        last_epoch = epoch >= tc.epochs or stop
        validate = has_val and (epoch % tc.val_every == 0 or last_epoch)
        improved = False
        if info.main:
            if validate:
                from cellseg.engine import evaluate

                report = evaluate(
                    unwrap(model),
                    val_truth,
                    CompetitionPaths(data_dir).train_dir,
                    device,
                    tc.val_score_thresh,
                    tc.val_mask_thresh,
                    tc.val_min_pixels,
                    progress,
                )
                row["val_score"] = report.score
                row.update({f"val_{ct}": report.per_class.get(ct) for ct in CELL_TYPES})
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
                per_class={ct: row.get(f"val_{ct}") for ct in CELL_TYPES},
            )
            if improved or not has_val:
                save_checkpoint(best_path, model, cfg, cfg.model.class_names, provenance, half=tc.half_best)
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
            }
            save_checkpoint(last_path, model, cfg, cfg.model.class_names, provenance, train_state=state)
            write_metrics(out, history)
        set_rng_state(rngs[info.rank])
        _barrier(info)

    if info.distributed:
        obj = [best_score, best_epoch, history]
        dist.broadcast_object_list(obj, src=0)
        best_score, best_epoch, history = obj
    if info.main and best_score is not None:
        log(f"best hold-out score {best_score:.4f} at epoch {best_epoch}: {best_path}")
    return TrainResult(out, best_score, best_epoch, epoch, step, history, unwrap(model))
