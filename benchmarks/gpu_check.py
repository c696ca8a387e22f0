"""The Python stages of ``benchmarks/gpu_check.sh`` (one prepared GPU run) and the merge of their figures.

    python benchmarks/gpu_check.py env           --out WORK
    python benchmarks/gpu_check.py memory        --out WORK --data DATA [--smoke]
    python benchmarks/gpu_check.py train         --out WORK --data DATA [--smoke]
    python benchmarks/gpu_check.py nccl          --out WORK
    python benchmarks/gpu_check.py predict       --out WORK --data DATA [--weights MANIFEST] [--images 20] [--smoke]
    python benchmarks/gpu_check.py r50_inference --out WORK --data DATA [--images 6] [--smoke]
    python benchmarks/gpu_check.py merge         --out WORK --json OUT/gpu_check.json --summary SUMMARY --deadline 540

Each stage rewrites ``WORK/<stage>.json`` after every figure it adds, so a stage killed at its time
limit still leaves what it measured; ``merge`` (run by the shell script after every stage) folds them
into ``gpu_check.json``, with every key of :data:`CONTRACT` present (null until a stage answers it).

* ``memory``: does training fit a 16 GB T4? The process is capped at 15 GiB
  (``torch.cuda.set_per_process_memory_fraction``) and runs one step of the shipped R50 recipe
  (``configs/maskrcnn_r50_fpn.yaml``: AMP on, batch 2) on the two densest images of DATA with the
  scale jitter at its worst case (1.25): ``step_ran``, ``max_reserved_bytes`` and ``t4_fit``.
* ``train``: whether a frozen BN's output keeps autocast's half dtype (``frozen_bn_keeps_half``: fp16
  on a GPU, bf16 on the CPU), then training steps of the shipped R50 recipe at batch 2 through the real
  ``train_one_epoch``, AMP on and off: s/step and img/s, peak ``torch.cuda.max_memory_allocated``.
* ``nccl``: one process, the training collectives (``cellseg.training.distributed``) through a real
  NCCL group on the GPU (a world of 1 posing as 2 so that they do not short-cut), plus NCCL refusing a
  CPU tensor; on the CPU a gloo group.
* ``predict``: ``predict_folder`` on DATA's test images with 1 and with 4 TTA views (s/image, forward
  vs the rest); the shipped manifest's own views under a time budget too short for them (its
  decisions recorded); and one forced CUDA out-of-memory error on the first forward, which the
  runner retries, compared row for row with the same run without it.
* ``r50_inference``: a random R50-FPN at the shipped scale, 4 views, 1000 detections per view (its
  class logits biased so that every candidate survives), through ``predict_folder``: s/image,
  projected to 240 images x 5 models, and the speed options (``cudnn.benchmark``, channels_last)
  compared on the forward.

``--smoke``: tiny models on the CPU; the figures only a GPU can give are null there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(1, str(ROOT / "tests"))  # --smoke: the tests' toy model and manifest builders

if TYPE_CHECKING:  # torch is imported by the stages only: ``merge`` runs after every stage and stays light
    import torch

    from cellseg.config.experiment import ExperimentConfig
    from cellseg.config.manifest import View
    from cellseg.data.truth import ImageAnnotation
    from cellseg.inference.forward import LoadedModel

#: the keys ``gpu_check.json`` always holds (dotted = nested), null until a stage answers them
CONTRACT = (
    "deadline_s",
    "memory.t4_fit",
    "memory.max_reserved_bytes",
    "train.frozen_bn_keeps_half",
    "predict.shipped.time_budget_decisions",
    "predict.oom_retry.same_result",
    "r50_inference.seconds_per_image",
    "r50_inference.projected_seconds_240_images_5_models",
)
#: the process cap of the memory stage: what a 16 GB T4 offers
T4_BYTES = 15 * 2**30
R50_CONFIG = ROOT / "configs" / "maskrcnn_r50_fpn.yaml"
FOUR_VIEWS: list[View] = ["identity", "hflip", "vflip", "hvflip"]


class Record(dict):
    """A stage's figures: ``WORK/<stage>.json`` is rewritten (atomically) whenever a key is set."""

    def __init__(self, out: Path, stage: str):
        super().__init__()
        self.path = out / f"{stage}.json"
        out.mkdir(parents=True, exist_ok=True)
        self.flush()

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.flush()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)


def error_text(e: BaseException) -> str:
    """``ErrorType: first line`` of ``e``."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_mb(dev: torch.device) -> float:
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; the process's peak


def test_ids(data: Path, n: int) -> list[str]:
    return sorted(p.stem for p in (data / "test").glob("*.png"))[:n]


# ----------------------------------------------------------------------------- env


def stage_env(args: argparse.Namespace, rec: Record) -> None:
    import torch
    import torchvision

    dev = device()
    rec.update(
        python=platform.python_version(),
        torch=torch.__version__,
        torchvision=torchvision.__version__,
        cuda=torch.version.cuda,
        cpus=os.cpu_count(),
        gpus=torch.cuda.device_count(),
        device=str(dev),
    )
    if dev.type == "cuda":
        from cellseg.inference.device import probe_cuda, resolve_device

        props = torch.cuda.get_device_properties(0)
        rec.update(
            gpu=torch.cuda.get_device_name(),
            capability=".".join(map(str, torch.cuda.get_device_capability())),
            cudnn=torch.backends.cudnn.version(),
            memory_gb=round(props.total_memory / 2**30, 1),
        )
        rec["probe_error"] = probe_cuda("cuda")[1]
        rec["resolve_device_auto"] = str(resolve_device("auto"))


# ----------------------------------------------------------------------------- training


def densest_first(images: Mapping[str, ImageAnnotation]) -> tuple[list[str], list[int]]:
    """The ids of ``images`` (``read_train_csv(...).images``), the two with most cells first; also their cell counts."""
    order = sorted(images, key=lambda i: -len(images[i].instances))
    return order[:2] + sorted(order[2:]), [len(images[i].instances) for i in order[:2]]


def r50_training_config(smoke: bool, extra: list[str]) -> ExperimentConfig:
    """The shipped R50 recipe at batch 2 (``--smoke``: the tests' toy model at half scale, 128 px crops)."""
    from cellseg.config.experiment import load_experiment

    overrides = ["train.batch_size=2", "train.log_every=0", "train.max_steps=0", *extra]
    if smoke:  # the tests' toy model (its *_test / detections_per_img sizes unused: training only)
        from helpers import TOY_MODEL_OVERRIDES

        overrides += [
            *TOY_MODEL_OVERRIDES,
            "model.input_scale=0.5",
            "train.num_workers=0",
            "augment.crop_size=[128, 128]",
        ]
        return load_experiment(ROOT / "configs" / "demo.yaml", overrides)
    return load_experiment(R50_CONFIG, overrides)


def epoch_runner(cfg: ExperimentConfig, ds: Any, workers: int, dev: torch.device, amp: bool) -> Callable:
    """A fresh model, optimiser, schedule and scaler; returns ``run(batches, step)``: one
    ``train_one_epoch`` over the index ``batches`` (lists of 2 dataset indices), waited for."""
    import torch

    from cellseg.data.dataset import collate_fn
    from cellseg.model.build import build_model
    from cellseg.training.engine import train_one_epoch
    from cellseg.training.optim import build_optimizer, lr_factor

    torch.manual_seed(0)
    model = build_model(cfg.model).to(dev)
    opt = build_optimizer(model, cfg.train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 1000, cfg.train))  # as in training
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def run(batches: list[list[int]], step: int) -> Any:
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
            total_steps=1000,
            steps_per_epoch=len(batches),
            use_amp=amp,
            log=lambda s: None,
            progress=False,
        )
        sync(dev)
        return stats

    return run


def train_steps(cfg: ExperimentConfig, ds: Any, pairs: list[list[int]], warmup: int, workers: int, amp: bool) -> dict:
    """A fresh model trained on the index ``pairs`` (the first ``warmup`` untimed, the densest pair
    first): timing of the rest, and peak memory."""
    import torch

    dev = device()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run = epoch_runner(cfg, ds, workers, dev, amp)
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


def frozen_bn_keeps_half() -> dict:
    """Whether the shipped R50 training model's first frozen BN (the ResNet stem's ``bn1``) gives its
    input's half dtype under autocast (fp16 on a GPU, bf16 on the CPU), fed by the stem convolution as
    in training (a 64 x 64 input: cheap on the CPU too)."""
    import torch

    from cellseg.config.experiment import load_experiment
    from cellseg.model.build import build_model

    dev = device()
    half = torch.float16 if dev.type == "cuda" else torch.bfloat16
    model: Any = build_model(load_experiment(R50_CONFIG, []).model).to(dev).train()
    body = model.backbone.body
    with torch.no_grad(), torch.autocast(dev.type, dtype=half):
        conv = body.conv1(torch.rand(1, 3, 64, 64, device=dev))
        out = body.bn1(conv)
    return {
        "norm": type(body.bn1).__name__,
        "autocast_dtype": str(half),
        "conv_dtype": str(conv.dtype),
        "bn_dtype": str(out.dtype),
        "keeps_half": out.dtype == half,
    }


def train_data(cfg: ExperimentConfig, data: Path) -> tuple[Any, list[int]]:
    """The training dataset of every DATA image, its two densest first; and their cell counts."""
    from cellseg.data.dataset import build_train_dataset
    from cellseg.data.truth import read_train_csv

    ids, dense = densest_first(read_train_csv(data / "train.csv").images)
    return build_train_dataset(cfg, data, ids), dense


def stage_train(args: argparse.Namespace, rec: Record) -> None:
    import torch

    dev = device()
    bn = frozen_bn_keeps_half()
    rec["frozen_bn"] = bn
    rec["frozen_bn_keeps_half"] = bn["keeps_half"]
    cfg = r50_training_config(args.smoke, [])
    ds, dense = train_data(cfg, Path(args.data))
    warmup, steps = (1, 1) if args.smoke else (args.warmup, args.steps)
    pairs = [[0, 1]] + [[(2 * k + 2) % len(ds), (2 * k + 3) % len(ds)] for k in range(warmup + steps - 1)]
    workers = 0 if args.smoke else min(8, os.cpu_count() or 1)
    rec.update(config=cfg.model.name, device=str(dev), densest_pair_cells=dense, warmup=warmup, steps=steps)
    for amp in (True, False):
        key = f"amp_{'on' if amp else 'off'}"
        try:
            rec[key] = train_steps(cfg, ds, pairs, warmup, workers, amp and dev.type == "cuda")
        except Exception as e:  # noqa: BLE001 - record it and still measure the other AMP setting
            rec[key] = {"error": error_text(e)}
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "s_per_step" in rec.get("amp_on", {}) and "s_per_step" in rec.get("amp_off", {}):
        rec["amp_speedup"] = round(rec["amp_off"]["s_per_step"] / rec["amp_on"]["s_per_step"], 3)


def stage_memory(args: argparse.Namespace, rec: Record) -> None:
    """One step of the shipped R50 recipe (AMP on, batch 2, densest pair, scale jitter 1.25) under a
    15 GiB cap: ``step_ran``, ``max_reserved_bytes``, ``t4_fit`` (null on the CPU)."""
    import torch

    from cellseg.inference.ensemble import OutOfMemoryError

    dev = device()
    cuda = dev.type == "cuda"
    rec.update(t4_fit=None, max_reserved_bytes=None, cap_bytes=T4_BYTES if cuda else None, step_ran=None)
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total))
        torch.cuda.reset_peak_memory_stats()
    cfg = r50_training_config(args.smoke, ["train.amp=true", "augment.scale_range=[1.25, 1.25]"])
    ds, dense = train_data(cfg, Path(args.data))
    rec.update(config=cfg.model.name, device=str(dev), amp=cuda, scale_jitter=1.25, densest_pair_cells=dense)
    t0 = time.perf_counter()
    try:
        epoch_runner(cfg, ds, 0, dev, amp=cuda)([[0, 1]], 0)
        rec["step_ran"] = True
    except OutOfMemoryError as e:
        rec.update(step_ran=False, error=error_text(e))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    if cuda:
        rec["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        rec["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
        rec["t4_fit"] = bool(rec["step_ran"]) and rec["max_reserved_bytes"] <= T4_BYTES
    else:
        rec["peak_rss_mb"] = round(peak_mb(dev), 1)


# ----------------------------------------------------------------------------- nccl


def stage_nccl(args: argparse.Namespace, rec: Record) -> None:
    import torch
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
    rec.update(backend=backend, device=str(dev))
    t0 = time.perf_counter()
    rec["reduce_mean"] = D.reduce_mean({"loss": 3.0, "loss_mask": 1.0}, info)  # the sum over 1 rank, halved
    model = torch.nn.BatchNorm2d(8).to(dev)
    D.broadcast_buffers(model, info)
    D.main_section(info)
    D.main_done(info)
    sync(dev)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["ok"] = rec["reduce_mean"] == {"loss": 1.5, "loss_mask": 0.5}
    if backend == "nccl":  # NCCL has no CPU tensors: the helpers must never hand it one
        try:
            dist.all_reduce(torch.ones(1, dtype=torch.float64))
            torch.cuda.synchronize()
            rec["nccl_rejects_cpu_tensor"] = False
        except Exception as e:  # noqa: BLE001
            rec["nccl_rejects_cpu_tensor"] = error_text(e)
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- predict


def tiny_manifest(folder: Path, views: list[View]) -> Path:
    """A random tiny Mask R-CNN + manifest (for --smoke: the demo model is slow on 2 CPU cores), built by
    the inference tests' ``make_manifest`` at this check's sizes (frozen BN, 128-176 px input)."""
    from inference_helpers import make_manifest

    cfg = dict(norm="frozen_bn", trainable_backbone_layers=3, min_size=128, max_size=176)  # 3: ModelConfig's default
    return make_manifest(folder, n_models=1, tta=tuple(views), model_cfg=cfg)


def manifest_with_views(src_path: Path, views: list[View], folder: Path) -> Path:
    """A copy of the manifest at ``src_path`` (absolute checkpoint paths) with the TTA ``views``."""
    import dataclasses

    from cellseg.config.manifest import load_manifest, write_manifest

    src = load_manifest(src_path)
    models = [dataclasses.replace(e, checkpoint=str(src.checkpoint_path(e).resolve())) for e in src.models]
    folder.mkdir(parents=True, exist_ok=True)
    return write_manifest(dataclasses.replace(src, models=models, tta=views), folder / "manifest.yaml")


@contextlib.contextmanager
def after_loading(hook: Callable[[list[LoadedModel], torch.device], None]) -> Iterator[None]:
    """``predict_folder`` with ``hook(loaded models, device)`` run once its models are loaded (every
    load goes through :meth:`cellseg.inference.ensemble.Ensemble.load`, which calls this module-level
    ``load_ensemble``)."""
    from cellseg.inference import ensemble

    original = ensemble.load_ensemble

    def load(*a: Any, **kw: Any) -> list[LoadedModel]:
        loaded = original(*a, **kw)
        hook(loaded, a[1] if len(a) > 1 else kw["device"])
        return loaded

    ensemble.load_ensemble = load
    try:
        yield
    finally:
        ensemble.load_ensemble = original


def run_predict(data: Path, manifest: Path, csv: Path, ids: list[str], budget: float | None = None) -> tuple[Any, dict]:
    """``predict_folder`` on ``ids``: the RunResult and its figures."""
    from cellseg.inference.runner import predict_folder

    t0 = time.perf_counter()
    res = predict_folder(data, manifest, csv, time_budget=budget, progress=False, log=lambda s: None, image_ids=ids)
    n = max(len(res.seconds), 1)
    return res, {
        "device": res.device,
        "s_per_image": round(sum(res.seconds.values()) / n, 4),
        "forward_s_per_image": round(res.forward_s / n, 4),
        "rest_s_per_image": round(res.rest_s / n, 4),
        "rest_over_forward": round(res.rest_s / max(res.forward_s, 1e-9), 3),
        "load_s": round(res.load_s, 2),
        "wall_s": round(time.perf_counter() - t0, 2),
        "instances": sum(len(r) for r in res.rows.values()),
        "failed": len(res.failed),
    }


def predict_shipped(data: Path, manifest: Path, out: Path, ids: list[str], views_1: dict | None) -> dict:
    """The manifest's own views under a budget of ~60 % of their projected time (from the 1-view run:
    its loading, with a margin, the calibration's two forwards, and 60 % of the images x views)."""
    from cellseg.config.manifest import load_manifest

    views = list(load_manifest(manifest).tta)
    per_image = (views_1 or {}).get("s_per_image") or 1.0
    load_s = (views_1 or {}).get("load_s") or 0.0
    budget = round(1.5 * load_s + 3 * per_image + 0.6 * len(ids) * per_image * len(views), 2)
    res, fig = run_predict(data, manifest, out / "submission_shipped.csv", ids, budget=budget)
    return {
        "views": views,
        "time_budget_s": budget,
        "time_budget_decisions": list(res.decisions),
        "views_at_end": list(res.views),
        "skipped": len(res.skipped),
        **fig,
    }


def predict_oom_retry(data: Path, manifest: Path, out: Path, ids: list[str]) -> dict:
    """The manifest's run twice: as it is, and with a CUDA out-of-memory error raised by the model's
    first forward (the runner retries it one view per forward); ``same_result``: identical rows."""
    import torch

    base, _ = run_predict(data, manifest, out / "submission_oom_base.csv", ids)
    calls = {"forwards": 0, "raised": 0}

    def inject(loaded: list[LoadedModel], dev: torch.device) -> None:
        model = loaded[0].model
        forward = model.forward

        def first_forward_oom(*a: Any, **kw: Any) -> Any:
            calls["forwards"] += 1
            if calls["raised"] == 0:
                calls["raised"] += 1
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (forced by gpu_check)")
            return forward(*a, **kw)

        model.forward = first_forward_oom

    with after_loading(inject):
        res, fig = run_predict(data, manifest, out / "submission_oom.csv", ids)
    return {
        "oom_raised": calls["raised"],
        "forwards": calls["forwards"],
        "same_result": res.rows == base.rows and not res.failed,
        "failed": len(res.failed),
        "instances": fig["instances"],
    }


def stage_predict(args: argparse.Namespace, rec: Record) -> None:
    data, out = Path(args.data), Path(args.out)
    shipped = Path(args.weights)
    if args.smoke:  # the demo model takes ~20 s an image on 2 CPU cores: a tiny random one, with the shipped views
        from cellseg.config.manifest import load_manifest

        shipped = tiny_manifest(out / "tiny", list(load_manifest(args.weights).tta))
        rec["tiny_manifest"] = str(shipped)
    ids = test_ids(data, args.images)
    rec.update(weights=str(args.weights), images=len(ids))
    view_sets: list[list[View]] = [["identity"], FOUR_VIEWS]
    for views in view_sets:
        key = f"views_{len(views)}"
        try:
            path = manifest_with_views(shipped, views, out / f"manifest_{key}")
            rec[key] = run_predict(data, path, out / f"submission_{key}.csv", ids)[1]
        except Exception as e:  # noqa: BLE001 - record it and still run the others
            rec[key] = {"error": error_text(e)}
    parts: dict[str, Callable[[], dict]] = {
        "shipped": lambda: predict_shipped(data, shipped, out, ids, rec.get("views_1")),
        "oom_retry": lambda: predict_oom_retry(data, shipped, out, ids),
    }
    for key, part in parts.items():
        try:
            rec[key] = part()
        except Exception as e:  # noqa: BLE001
            rec[key] = {"error": error_text(e)}


# ----------------------------------------------------------------------------- R50 inference


def r50_manifest(folder: Path, smoke: bool) -> Path:
    """A random R50-FPN at the shipped scale (``--smoke``: the tiny model) whose three class logits are
    biased to ~0.3 each and mask logits positive, so that every candidate survives the model's own
    filtering: 4 views x 1000 detections each, the worst case the ensemble pays for."""
    import torch

    from cellseg.config.experiment import load_experiment
    from cellseg.config.manifest import ClassThresholds, FusionConfig, Manifest, ModelEntry, write_manifest
    from cellseg.model.build import build_model
    from cellseg.model.checkpoint import save_checkpoint

    if smoke:
        return tiny_manifest(folder, FOUR_VIEWS)
    cfg = load_experiment(R50_CONFIG, [])
    torch.manual_seed(0)
    model: Any = build_model(cfg.model).eval()
    with torch.no_grad():
        cls = model.roi_heads.box_predictor.cls_score
        cls.weight.mul_(0.01)
        cls.bias.copy_(torch.tensor([-2.0, 0.4, 0.2, 0.0]))
        model.roi_heads.mask_predictor.mask_fcn_logits.bias.fill_(1.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_checkpoint(folder / "r50.pth", model, cfg, ["shsy5y", "astro", "cort"], {"origin": "gpu_check, random"})
    loose = ClassThresholds(score=0.05, mask_threshold=0.5, nms_iou=0.5, min_pixels=2)
    m = Manifest(
        name="r50-random",
        models=[ModelEntry(checkpoint="r50.pth")],
        tta=list(FOUR_VIEWS),
        fusion=FusionConfig(detections_per_view=1000, model_score_thresh=0.0),
        classes={"shsy5y": loose, "astro": loose, "cort": loose},
    )
    return write_manifest(m, folder / "manifest.yaml")


def timed_forwards(options: dict[str, bool], times: list[float], detections: list[int]) -> Callable:
    """A load hook: the speed ``options`` applied, and each forward's seconds and detections per view recorded."""
    from cellseg.inference.device import apply_speed_options

    def hook(loaded: list[LoadedModel], dev: torch.device) -> None:
        apply_speed_options([lm.model for lm in loaded], dev, **options)
        model = loaded[0].model
        forward = model.forward

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            out = forward(*a, **kw)
            sync(dev)
            times.append(time.perf_counter() - t0)
            detections.extend(len(p["boxes"]) for p in out)
            return out

        model.forward = timed

    return hook


OPTIONS = {  # each run loads its model afresh; cudnn.benchmark, process-wide, is set by every run
    "default": {"cudnn_benchmark": False, "channels_last": False},
    "cudnn_benchmark": {"cudnn_benchmark": True, "channels_last": False},
    "both": {"cudnn_benchmark": True, "channels_last": True},
    "channels_last": {"cudnn_benchmark": False, "channels_last": True},
}


def stage_r50_inference(args: argparse.Namespace, rec: Record) -> None:
    """s/image of the R50 at 4 views x 1000 detections, projected; the speed options on the forward."""
    data, out = Path(args.data), Path(args.out)
    dev = device()
    gpu = dev.type == "cuda"
    rec.update(seconds_per_image=None, projected_seconds_240_images_5_models=None, device=str(dev))
    manifest = r50_manifest(out / "r50", args.smoke)
    ids = test_ids(data, args.images)
    rec.update(model="maskrcnn_r50_fpn (random)" if not args.smoke else "tiny (smoke)", views=4, images=len(ids))
    options: dict[str, dict] = {}
    for name, opts in OPTIONS.items():
        times: list[float] = []
        detections: list[int] = []
        some = ids if name == "default" else ids[:3]  # the options change the forward only: fewer images
        with after_loading(timed_forwards(opts, times, detections)):
            res, fig = run_predict(data, manifest, out / f"submission_r50_{name}.csv", some)
        warm = sorted(res.seconds.values())[: max(len(res.seconds) - 1, 1)]  # the slowest (cold) image left out
        options[name] = {
            "images": len(some),
            "s_per_image": round(sum(warm) / len(warm), 4),
            "forward_s": round(sum(times[1:] or times) / len(times[1:] or times), 4),  # the cold first forward left out
            "detections_per_view": round(sum(detections) / max(len(detections), 1), 1),
            "rest_s_per_image": fig["rest_s_per_image"],
            "failed": fig["failed"],
        }
        rec["options"] = options
        if name == "default":
            per_image = options[name]["s_per_image"]
            rec["smoke_seconds_per_image" if not gpu else "seconds_per_image"] = per_image
            if gpu:  # one model's forward + the rest, times 5 models: the fusion of 5x the detections is dearer
                rec["projected_seconds_240_images_5_models"] = round(240 * 5 * per_image, 1)
    fwd = options["default"]["forward_s"]
    rec["forward_speedup_vs_default"] = {k: round(fwd / max(v["forward_s"], 1e-9), 3) for k, v in options.items()}


# ----------------------------------------------------------------------------- merge


def nested_get(obj: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def merge(work: Path, deadline_s: float, summary: Path | None, started: float | None) -> dict:
    """Every ``work/<stage>.json`` (and the dry run's summary) in one object, every :data:`CONTRACT` key
    present (null until answered), the summary's stage lines under ``stages``."""
    merged: dict[str, Any] = {"deadline_s": deadline_s}
    for p in sorted(work.glob("*.json")):
        try:
            merged[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            merged[p.stem] = {"error": f"unreadable {p.name}: {error_text(e)}"}
    dry = work / "dry-run" / "summary.json"
    if dry.is_file():
        merged["dry_run"] = json.loads(dry.read_text())
    for dotted in CONTRACT:
        *parents, leaf = dotted.split(".")
        node = merged
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {} if part not in node else {"value": node[part]}
            node = node[part]
        node.setdefault(leaf, None)
    merged["stages"] = summary.read_text().splitlines() if summary and summary.is_file() else []
    if started is not None:
        merged["elapsed_s"] = round(time.time() - started, 1)
    return merged


def write_merged(args: argparse.Namespace) -> None:
    merged = merge(Path(args.out), args.deadline, args.summary, args.started)
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=str))
    tmp.replace(path)  # a kill mid-write leaves the previous stage's JSON whole


STAGES: dict[str, Callable[[argparse.Namespace, Record], None]] = {
    "env": stage_env,
    "memory": stage_memory,
    "train": stage_train,
    "nccl": stage_nccl,
    "predict": stage_predict,
    "r50_inference": stage_r50_inference,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("stage", choices=[*STAGES, "merge"])
    ap.add_argument("--out", required=True, type=Path, help="the work folder: <stage>.json go there")
    ap.add_argument("--data", type=Path)
    ap.add_argument("--weights", type=Path, default=ROOT / "weights" / "demo" / "manifest.yaml")
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    ap.add_argument("--json", type=Path, help="merge: the gpu_check.json to write")
    ap.add_argument("--summary", type=Path, help="merge: the stage lines")
    ap.add_argument("--deadline", type=float, default=540.0, help="merge: the run's deadline in seconds")
    ap.add_argument("--started", type=float, help="merge: the run's start (Unix time)")
    args = ap.parse_args()
    if args.stage == "merge":
        write_merged(args)
        return 0
    rec = Record(Path(args.out), args.stage)
    STAGES[args.stage](args, rec)
    print(json.dumps({args.stage: rec}, default=str), flush=True)
    failed = any(isinstance(v, dict) and "error" in v for v in rec.values()) or rec.get("ok") is False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
