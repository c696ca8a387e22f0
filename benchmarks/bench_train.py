"""Training step time of the R50-FPN config vs torchvision's default Mask R-CNN, same batches.

    .venv/bin/python benchmarks/bench_train.py [--config configs/maskrcnn_r50_fpn.yaml] [--steps 2]

Both models train on the same real DataLoader batches (``cellseg.data.dataset`` over a synthetic
competition folder, augmentation of the config, batch 2 of 704 x 520 images):

* ours: the config as shipped (2x upscaled input: 1408 x 1040, small anchors, 2000 RPN proposals,
  up to 1000 detections);
* baseline: ``torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, num_classes=4)`` with
  its defaults (short side 800, 1000 RPN proposals in training... 2000 pre-NMS, 100 detections).

Prints seconds per step, images per second, the share of step time spent waiting for the
DataLoader (target < 10 %), and ours / baseline. Device: CUDA when available (AMP as configured),
else CPU with ``--threads`` threads. A few steps only: on 2 CPU cores an R50 step at 1408 x 1040
takes tens of seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cellseg.data.dataset import build_train_dataset, collate_fn  # noqa: E402
from cellseg.model.build import build_model  # noqa: E402
from cellseg.model.experiment import load_experiment  # noqa: E402


def time_steps(model, loader, device, steps: int, warmup: int, amp: bool) -> dict:
    """Train ``warmup + steps`` steps; per timed step: total seconds and seconds waiting for data."""
    model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    totals, waits = [], []
    it = iter(loader)
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        try:
            images, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, targets = next(it)
        t1 = time.perf_counter()
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)} for t in targets]
        with torch.autocast(device_type=device.type, enabled=amp):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"  {'warm-up' if i < warmup else 'step'} {i + 1}: {t2 - t0:.2f} s (data {t1 - t0:.2f} s)", flush=True)
        if i >= warmup:
            totals.append(t2 - t0)
            waits.append(t1 - t0)
    n_img = loader.batch_size
    s = sum(totals) / len(totals)
    return {"s_per_step": s, "img_per_s": n_img / s, "data_wait": sum(waits) / sum(totals)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "maskrcnn_r50_fpn.yaml"))
    ap.add_argument("--data", default=None, help="competition-layout folder (default: a fresh 8-image synthetic one)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_experiment(args.config, ["train.batch_size=2"])
    amp = cfg.train.amp and device.type == "cuda"
    data = Path(args.data) if args.data else None
    if data is None:
        from cellseg.data.synth import generate

        data = Path(tempfile.mkdtemp(prefix="bench-train-")) / "data"
        generate(data, train_images=8, test_images=0, semi_images=0, seed=5, progress=False)
    from cellseg.data.truth import read_train_csv

    ids = list(read_train_csv(data / "train.csv").images)
    ds = build_train_dataset(cfg, data, ids)
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=2,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate_fn,
        persistent_workers=args.workers > 0,
    )

    import torchvision

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu}, {args.threads} threads"
    print(f"device: {name}; batch 2 of 704x520 images; {args.steps} timed steps after {args.warmup} warm-up")
    results = {}
    torch.manual_seed(0)
    baseline = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4)
    print("baseline: torchvision maskrcnn_resnet50_fpn defaults", flush=True)
    results["baseline: torchvision defaults (800 px)"] = time_steps(
        baseline, loader, device, args.steps, args.warmup, amp
    )
    del baseline
    torch.manual_seed(0)
    ours = build_model(cfg.model)
    print(f"ours: {args.config}", flush=True)
    results[f"ours: {Path(args.config).name} (scale {cfg.model.input_scale})"] = time_steps(
        ours, loader, device, args.steps, args.warmup, amp
    )
    print(f"{'model':<48} {'s/step':>8} {'img/s':>7} {'data wait':>10}")
    for k, r in results.items():
        print(f"{k:<48} {r['s_per_step']:>8.2f} {r['img_per_s']:>7.3f} {r['data_wait']:>9.1%}")
    b, o = list(results.values())

    def scale(m) -> float:  # input scale of a 520 x 704 image
        return m.input_scale if m.input_scale > 0 else min(m.min_size / 520, m.max_size / 704)

    px = scale(cfg.model) ** 2 / min(800 / 520, 1333 / 704) ** 2
    print(f"ours / baseline step time: {o['s_per_step'] / b['s_per_step']:.2f}x (input pixels {px:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
