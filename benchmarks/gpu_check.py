"""The Python stages of ``benchmarks/gpu_check.sh`` (one prepared GPU run); each writes ``OUT/<stage>.json``.

    python benchmarks/gpu_check.py env     --out OUT
    python benchmarks/gpu_check.py train   --out OUT --data DATA [--smoke]
    python benchmarks/gpu_check.py nccl    --out OUT
    python benchmarks/gpu_check.py predict --out OUT --data DATA [--weights MANIFEST] [--images 20] [--smoke]

* ``train``: training steps of ``configs/maskrcnn_r50_fpn.yaml`` (as shipped: 2x input, scale jitter) at
  batch 2 through the real ``train_one_epoch``, AMP on and off: s/step and img/s over the timed steps,
  peak ``torch.cuda.max_memory_allocated`` over every step; the first (warm-up) batch is the two
  densest images of DATA (``--smoke``: a tiny model on the CPU, peak RSS instead).
* ``nccl``: one process, the training collectives (``cellseg.training.distributed``) through a real
  NCCL group on the GPU (a world of 1 posing as 2 so that they do not short-cut), plus NCCL refusing a
  CPU tensor (the bug they had); on the CPU a gloo group.
* ``predict``: ``predict_folder`` on DATA's test images with 1 and with 4 TTA views: s/image, forward
  vs the rest (vote, paste, fusion, post-processing, RLE), rest / forward (goal <= 25 % with 4 views).
  Default weights: the committed demo model (``--smoke``: a random tiny model, written to OUT/tiny/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(1, str(ROOT / "tests"))  # --smoke: the tests' toy model and manifest builders

if TYPE_CHECKING:
    from cellseg.data.truth import ImageAnnotation


def write(out: Path, stage: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stage}.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({stage: result}, default=str), flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; the process's peak


# ----------------------------------------------------------------------------- stages


def stage_env(args) -> dict:
    import torchvision

    dev = device()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cpus": os.cpu_count(),
        "gpus": torch.cuda.device_count(),
        "device": str(dev),
    }
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["cudnn"] = torch.backends.cudnn.version()
        info["memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        from cellseg.inference.device import resolve_device

        info["resolve_device_auto"] = str(resolve_device("auto"))
    return info


def densest_first(images: Mapping[str, ImageAnnotation]) -> tuple[list[str], list[int]]:
    """The ids of ``images`` (``read_train_csv(...).images``), the two with most cells first; also their cell counts."""
    order = sorted(images, key=lambda i: -len(images[i].instances))
    return order[:2] + sorted(order[2:]), [len(images[i].instances) for i in order[:2]]


def train_steps(cfg, ds, pairs: list[list[int]], warmup: int, workers: int, dev: torch.device, amp: bool) -> dict:
    """A fresh model trained through ``train_one_epoch`` on the index ``pairs`` (the first ``warmup``
    untimed, the densest pair first): timing of the rest, and peak memory."""
    from cellseg.data.dataset import collate_fn
    from cellseg.model.build import build_model
    from cellseg.training.engine import train_one_epoch
    from cellseg.training.optim import build_optimizer, lr_factor

    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    opt = build_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 1000, cfg.train))  # as in training
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run(batches: list[list[int]], step: int):
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers, collate_fn=collate_fn)
        stats = train_one_epoch(
            model,
            loader,
            opt,
            sched,
            scaler,
            dev,
            cfg.train,
            epoch=0,
            step=step,
            total_steps=len(pairs),
            steps_per_epoch=len(batches),
            use_amp=amp,
            log=lambda s: None,
            progress=False,
        )
        sync(dev)
        return stats

    run(pairs[:1], 0)  # the densest pair, cold
    dense_peak = peak_mb(dev)
    if warmup > 1:
        run(pairs[1:warmup], 1)
    t0 = time.perf_counter()
    stats = run(pairs[warmup:], warmup)
    s = (time.perf_counter() - t0) / len(pairs[warmup:])
    return {
        "s_per_step": round(s, 4),
        "img_per_s": round(2 / s, 3),
        "data_wait": round(stats.data_wait, 3),
        "peak_mb_densest_pair": round(dense_peak, 1),
        "peak_mb_all_steps": round(peak_mb(dev), 1),
        "loss": round(stats.means.get("loss", float("nan")), 4),
    }


def stage_train(args) -> dict:
    from cellseg.config.experiment import load_experiment
    from cellseg.data.dataset import build_train_dataset
    from cellseg.data.truth import read_train_csv

    dev = device()
    config = ROOT / "configs" / ("demo.yaml" if args.smoke else "maskrcnn_r50_fpn.yaml")
    overrides = ["train.batch_size=2", "train.log_every=0", "train.max_steps=0"]
    if args.smoke:  # the tests' toy model (its *_test / detections_per_img sizes unused: training only) at half scale
        from helpers import TOY_MODEL_OVERRIDES

        overrides += [
            *TOY_MODEL_OVERRIDES,
            "model.input_scale=0.5",
            "train.num_workers=0",
            "augment.crop_size=[128, 128]",
        ]
    cfg = load_experiment(config, overrides)
    data = Path(args.data)
    ids, dense = densest_first(read_train_csv(data / "train.csv").images)
    ds = build_train_dataset(cfg, data, ids)
    warmup, steps = (1, 1) if args.smoke else (args.warmup, args.steps)
    pairs = [[0, 1]] + [[(2 * k + 2) % len(ds), (2 * k + 3) % len(ds)] for k in range(warmup + steps - 1)]
    workers = 0 if args.smoke else min(8, os.cpu_count() or 1)
    out = {"config": config.name, "device": str(dev), "densest_pair_cells": dense, "warmup": warmup, "steps": steps}
    for amp in (True, False):
        key = f"amp_{'on' if amp else 'off'}"
        try:
            out[key] = train_steps(cfg, ds, pairs, warmup, workers, dev, amp and dev.type == "cuda")
        except Exception as e:  # noqa: BLE001 - record it and still measure the other AMP setting
            out[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "s_per_step" in out.get("amp_on", {}) and "s_per_step" in out.get("amp_off", {}):
        out["amp_speedup"] = round(out["amp_off"]["s_per_step"] / out["amp_on"]["s_per_step"], 3)
    return out


def stage_nccl(args) -> dict:
    import torch.distributed as dist

    from cellseg.training import distributed as D

    dev = device()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend=backend, init_method="env://")
    control = dist.new_group(backend="gloo") if backend == "nccl" else None
    info = D.DistInfo(rank=0, world_size=2, local_rank=0, device=dev, control=control)  # a world of 1 posing as 2
    out: dict = {"backend": backend, "device": str(dev)}
    t0 = time.perf_counter()
    out["reduce_mean"] = D.reduce_mean({"loss": 3.0, "loss_mask": 1.0}, info)  # the sum over 1 rank, halved
    model = torch.nn.BatchNorm2d(8).to(dev)
    D.broadcast_buffers(model, info)
    D.main_section(info)
    D.main_done(info)
    sync(dev)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["ok"] = out["reduce_mean"] == {"loss": 1.5, "loss_mask": 0.5}
    if backend == "nccl":  # the bug these helpers had: NCCL has no CPU tensors
        try:
            dist.all_reduce(torch.ones(1, dtype=torch.float64))
            torch.cuda.synchronize()
            out["nccl_rejects_cpu_tensor"] = False
        except Exception as e:  # noqa: BLE001
            out["nccl_rejects_cpu_tensor"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    dist.destroy_process_group()
    return out


def stage_tiny_manifest(args) -> dict:
    """A random tiny Mask R-CNN + manifest (for --cpu-smoke: the demo model is slow on 2 CPU cores), built by
    the inference tests' ``make_manifest`` at this check's sizes (frozen BN, 128-176 px input, one view)."""
    from inference_helpers import make_manifest

    cfg = dict(norm="frozen_bn", trainable_backbone_layers=3, min_size=128, max_size=176)  # 3: ModelConfig's default
    return {"manifest": str(make_manifest(Path(args.out), n_models=1, tta=("identity",), model_cfg=cfg))}


def stage_predict(args) -> dict:
    import dataclasses

    from cellseg.config.manifest import load_manifest, write_manifest
    from cellseg.inference.runner import predict_folder

    if args.smoke:  # the demo model takes ~20 s an image on 2 CPU cores: a tiny random one instead
        args.weights = Path(stage_tiny_manifest(argparse.Namespace(out=Path(args.out) / "tiny"))["manifest"])
    src = load_manifest(args.weights)
    data, out_dir = Path(args.data), Path(args.out)
    ids = sorted(p.stem for p in (data / "test").glob("*.png"))[: args.images]
    out: dict = {"weights": str(args.weights), "images": len(ids)}
    for views in (["identity"], ["identity", "hflip", "vflip", "hvflip"]):
        key = f"views_{len(views)}"
        folder = out_dir / f"manifest_{key}"
        folder.mkdir(parents=True, exist_ok=True)
        models = [dataclasses.replace(e, checkpoint=str(src.checkpoint_path(e).resolve())) for e in src.models]
        path = write_manifest(dataclasses.replace(src, models=models, tta=views), folder / "manifest.yaml")
        try:
            t0 = time.perf_counter()
            res = predict_folder(
                data, path, out_dir / f"submission_{key}.csv", progress=False, log=lambda s: None, image_ids=ids
            )
            wall = time.perf_counter() - t0
            n = max(len(res.seconds), 1)
            out[key] = {
                "device": res.device,
                "s_per_image": round(sum(res.seconds.values()) / n, 4),
                "forward_s_per_image": round(res.forward_s / n, 4),
                "rest_s_per_image": round(res.rest_s / n, 4),
                "rest_over_forward": round(res.rest_s / max(res.forward_s, 1e-9), 3),
                "load_s": round(res.load_s, 2),
                "wall_s": round(wall, 2),
                "instances": sum(len(r) for r in res.rows.values()),
                "failed": len(res.failed),
            }
        except Exception as e:  # noqa: BLE001 - record it and still run the other view count
            out[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["env", "train", "nccl", "predict"])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo" / "manifest.yaml")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    args = ap.parse_args()
    fn = {
        "env": stage_env,
        "train": stage_train,
        "nccl": stage_nccl,
        "predict": stage_predict,
    }[args.stage]
    result = fn(args)
    write(args.out, args.stage, result)
    failed = any(isinstance(v, dict) and "error" in v for v in result.values()) or result.get("ok") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
