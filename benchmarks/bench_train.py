"""Training step time of the R50-FPN config vs torchvision's default Mask R-CNN, same batches.

    .venv/bin/python benchmarks/bench_train.py [--config configs/maskrcnn_r50_fpn.yaml] [--steps 2]
        [--mode baseline|ours|targets|profile] [--set model.input_scale=1 ...] [--amp config|on|off]

Both models train on the same real DataLoader batches (``cellseg.data.dataset`` over a synthetic
competition folder, augmentation of the config, batch 2 of 704 x 520 images):

* ours: the config as shipped (2x upscaled input: 1408 x 1040, small anchors, 2000 RPN proposals,
  up to 1000 detections);
* baseline: ``torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, num_classes=4)`` with
  its defaults (short side 800, 1000 RPN proposals in training... 2000 pre-NMS, 100 detections).

Prints seconds per step, images per second, the share of step time spent waiting for the
DataLoader (target < 10 %), and ours / baseline.

``--mode targets``: ours as built (``cellseg.model.targets``) against ours with torchvision's training
targets (the path before it: masks upsampled in float32, ``project_masks_on_boxes`` over the whole
stack, the full anchor IoU matrix), same weights and batch, alternating which runs first; prints
each step and the mean, min and max of the ratio. ``--mode profile``: cProfile of one step of ours,
the functions with the most own time and the target-preparation calls. Device: CUDA when available (AMP as configured),
else CPU with ``--threads`` threads. A few steps only: on 2 CPU cores an R50 step at 1408 x 1040
takes tens of seconds.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_memory import old_path  # noqa: E402  (torchvision's training targets, for --mode targets)


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


def next_batch(loader, it: list):
    """Next batch of ``loader``, restarting it when exhausted (``it`` holds the live iterator)."""
    try:
        return next(it[0])
    except StopIteration:
        it[0] = iter(loader)
        return next(it[0])


def one_step(model, opt, images, targets, device, amp: bool) -> float:
    """Forward, backward and SGD step of ``model`` on one batch; seconds (synchronised on CUDA)."""
    t0 = time.perf_counter()
    tgts = [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)} for t in targets]
    with torch.autocast(device_type=device.type, enabled=amp):
        loss = sum(model([im.to(device) for im in images], tgts).values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def compare_targets(cfg, loader, device, steps: int, warmup: int, amp: bool) -> None:
    """Ours vs ours with torchvision's training targets: same weights, same batches, alternating order."""
    torch.manual_seed(0)
    new = build_model(cfg.model).to(device).train()
    old = copy.deepcopy(new)
    old_path(old)
    models = {"new": new, "old": old}
    opts = {k: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {"new": [], "old": []}
    it = [iter(loader)]
    for i in range(warmup + steps):
        images, targets = next_batch(loader, it)
        cells = sum(len(t["labels"]) for t in targets)
        order = ["new", "old"] if i % 2 == 0 else ["old", "new"]
        got = {k: one_step(models[k], opts[k], images, targets, device, amp) for k in order}
        tag = "warm-up" if i < warmup else "step"
        print(
            f"  {tag} {i + 1} ({cells} cells): new {got['new']:.2f} s, old {got['old']:.2f} s, "
            f"new/old {got['new'] / got['old']:.3f}",
            flush=True,
        )
        if i >= warmup:
            for k in got:
                times[k].append(got[k])
    ratios = [n / o for n, o in zip(times["new"], times["old"])]
    for k, v in times.items():
        print(f"{k}: {sum(v) / len(v):.2f} s/step (min {min(v):.2f}, max {max(v):.2f}, {len(v)} steps)")
    print(f"new / old step time: mean {sum(ratios) / len(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


def profile_step(cfg, loader, device, warmup: int, amp: bool, top: int = 20) -> None:
    """cProfile one training step of ours (after ``warmup`` steps): own time per function and the
    cumulative time of the target-preparation calls."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    it = [iter(loader)]
    for _ in range(warmup):
        one_step(model, opt, *next_batch(loader, it), device, amp)
    images, targets = next_batch(loader, it)
    prof = cProfile.Profile()
    prof.enable()
    total = one_step(model, opt, images, targets, device, amp)
    prof.disable()
    stats = pstats.Stats(prof)
    print(f"one step: {total:.2f} s ({sum(len(t['labels']) for t in targets)} cells); own time per function:")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    for (file, line, func), (_, ncalls, tottime, cumtime, _) in rows:
        where = f"{Path(file).name}:{line}" if file != "~" else "built-in"
        print(f"  {tottime:8.2f} s own {cumtime:8.2f} s cum {ncalls:>7} calls  {func} ({where})")
    print("target preparation and losses (cumulative):")
    wanted = {
        "resize",
        "assign_targets_to_anchors",
        "select_training_samples",
        "project_masks",
        "mask_rcnn_loss",
        "maskrcnn_loss",
        "match_anchors",
        "fastrcnn_loss",
        "compute_loss",
    }
    for (file, line, func), (_, ncalls, _, cumtime, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3]):
        if func in wanted and ("cellseg" in file or "torchvision" in file):
            print(f"  {cumtime:8.2f} s ({cumtime / total:5.1%}) {ncalls:>4} calls  {func} ({Path(file).name}:{line})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "maskrcnn_r50_fpn.yaml"))
    ap.add_argument("--data", default=None, help="competition-layout folder (default: a fresh 8-image synthetic one)")
    ap.add_argument("--mode", default="baseline", choices=["baseline", "ours", "targets", "profile"])
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. model.input_scale=1"
    )
    ap.add_argument("--amp", default="config", choices=["config", "on", "off"], help="CUDA autocast (CPU: always off)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_experiment(args.config, ["train.batch_size=2", *args.set])
    amp = device.type == "cuda" and (cfg.train.amp if args.amp == "config" else args.amp == "on")
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
    print(
        f"device: {name}; batch 2 of 704x520 images, input_scale {cfg.model.input_scale}, AMP {amp}; "
        f"{args.steps} timed steps after {args.warmup} warm-up"
    )
    if args.mode == "targets":
        compare_targets(cfg, loader, device, args.steps, args.warmup, amp)
        return 0
    if args.mode == "profile":
        profile_step(cfg, loader, device, args.warmup, amp)
        return 0
    results = {}
    if args.mode == "baseline":
        torch.manual_seed(0)
        baseline = torchvision.models.detection.maskrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, num_classes=4
        )
        print("baseline: torchvision maskrcnn_resnet50_fpn defaults", flush=True)
        results["baseline: torchvision defaults (800 px)"] = time_steps(
            baseline, loader, device, args.steps, args.warmup, amp
        )
        del baseline
    torch.manual_seed(0)
    ours = build_model(cfg.model)
    print(f"ours: {args.config}", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results[f"ours: {Path(args.config).name} (scale {cfg.model.input_scale})"] = time_steps(
        ours, loader, device, args.steps, args.warmup, amp
    )
    if device.type == "cuda":
        print(f"ours: peak torch.cuda.max_memory_allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"{'model':<48} {'s/step':>8} {'img/s':>7} {'data wait':>10}")
    for k, r in results.items():
        print(f"{k:<48} {r['s_per_step']:>8.2f} {r['img_per_s']:>7.3f} {r['data_wait']:>9.1%}")
    if args.mode == "ours":
        return 0
    b, o = list(results.values())

    def scale(m) -> float:  # input scale of a 520 x 704 image
        return m.input_scale if m.input_scale > 0 else min(m.min_size / 520, m.max_size / 704)

    px = scale(cfg.model) ** 2 / min(800 / 520, 1333 / 704) ** 2
    print(f"ours / baseline step time: {o['s_per_step'] / b['s_per_step']:.2f}x (input pixels {px:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
