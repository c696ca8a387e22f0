"""Training step time of the R50-FPN config vs torchvision's default Mask R-CNN, same batches.

    .venv/bin/python benchmarks/bench_train.py [--config configs/maskrcnn_r50_fpn.yaml] [--steps 2]
        [--mode baseline|ours|targets|matching|profile] [--set model.input_scale=1 ...] [--amp config|on|off]

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
each step and the mean, min and max of the ratio. ``--mode matching``: the two training targets alone,
on the densest image of ``cellseg synth --seed 11 --train-images 40`` (529 cells; ``--data`` to use
another folder) at the augmentation's scale fixed at ``--jitter`` (1.25: 650 x 880) and
``model.input_scale=1`` unless ``--set`` says otherwise: RPN anchor matching (torchvision's
``assign_targets_to_anchors``, ``box_iou`` + ``Matcher`` over all anchors, vs ours, same anchors) and the mask
targets of ``--proposals`` proposals (torchvision's ``project_masks_on_boxes`` on the full-frame mask stack vs
ours on the source masks), ``--steps`` rounds alternating which runs first; asserts identical labels and
matched boxes and mask targets within 1e-3, prints min and median times and old / new.
``--mode profile``: cProfile of one step of ours,
the functions with the most own time and the target-preparation calls. Device: CUDA when available (AMP as configured),
else CPU with ``--threads`` threads. A few steps only: on 2 CPU cores an R50 step at 1408 x 1040
takes tens of seconds.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cellseg.config.experiment import load_experiment  # noqa: E402
from cellseg.data.dataset import build_train_dataset, collate_fn  # noqa: E402
from cellseg.model.build import build_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train_memory import old_path  # noqa: E402  (torchvision's training targets, for --mode targets)
from machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


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


def jittered_proposals(boxes: torch.Tensor, n: int, size: tuple[int, int], seed: int = 0):
    """``n`` proposals around randomly chosen ground-truth boxes (shifted and rescaled as matched RoIs
    look), clipped to ``size`` (H, W); returns (proposals (n, 4), matched ground-truth index (n,))."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(boxes.shape[0], (n,), generator=g)
    b = boxes[idx]
    wh = (b[:, 2:] - b[:, :2]).clamp(min=1)
    centre = (b[:, :2] + b[:, 2:]) / 2 + (torch.rand(n, 2, generator=g) - 0.5) * 0.4 * wh
    wh = wh * (0.7 + 0.6 * torch.rand(n, 2, generator=g))
    out = torch.cat([centre - wh / 2, centre + wh / 2], 1)
    out[:, 0::2] = out[:, 0::2].clamp(0, size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, size[0])
    return out, idx


def compare_matching(cfg, data: Path, device, rounds: int, n_proposals: int) -> None:
    """Per image: torchvision's RPN anchor matching and mask targets vs ours (cellseg.model.targets),
    same inputs, alternating order; asserts the same targets."""
    import torch.nn.functional as F
    from torchvision.models.detection.roi_heads import project_masks_on_boxes
    from torchvision.models.detection.rpn import RegionProposalNetwork

    from cellseg.data.truth import read_train_csv
    from cellseg.model import targets as lean

    ts = read_train_csv(data / "train.csv", cfg.data.fill_holes)
    densest = max(ts.images, key=lambda i: len(ts.images[i].instances))
    torch.manual_seed(0)
    image, target = build_train_dataset(cfg, data, [densest], train_set=ts)[0]
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).eval()
    tgt = {k: v.to(device) for k, v in target.items() if torch.is_tensor(v)}
    with torch.no_grad():
        batched, tgts = model.transform([image.to(device)], [tgt])
        features = list(model.backbone(batched.tensors).values())
        anchors = model.rpn.anchor_generator(batched, features)
    size = tuple(batched.image_sizes[0])
    masks = tgts[0]["masks"]  # ours: the source masks, uint8 at the data pipeline's resolution
    full = (
        masks if tuple(masks.shape[-2:]) == size else F.interpolate(masks[:, None].float(), size, mode="nearest")[:, 0]
    )
    proposals, matched = jittered_proposals(tgts[0]["boxes"].cpu(), n_proposals, size)
    proposals, matched = proposals.to(device), matched.to(device)
    print(
        f"image {densest}: {len(tgts[0]['boxes'])} cells after augmentation, input {size[0]} x {size[1]} "
        f"(masks {masks.shape[-2]} x {masks.shape[-1]}), {anchors[0].shape[0]} anchors, {n_proposals} proposals"
    )

    def sync(x):
        if device.type == "cuda":
            torch.cuda.synchronize()
        return x

    runs = {
        "matching": {
            "old": lambda: sync(RegionProposalNetwork.assign_targets_to_anchors(model.rpn, anchors, tgts)),
            "new": lambda: sync(model.rpn.assign_targets_to_anchors(anchors, tgts)),
        },
        "masks": {
            "old": lambda: sync(project_masks_on_boxes(full, proposals, matched, 28)),
            "new": lambda: sync(lean.project_masks(masks, proposals, matched, size, 28)),
        },
    }
    assert type(model.rpn) is not RegionProposalNetwork  # ours is installed on the built model
    times: dict[str, dict[str, list[float]]] = {what: {k: [] for k in fns} for what, fns in runs.items()}
    results = {}
    for r in range(rounds):
        for what, fns in runs.items():
            for k in ["new", "old"] if r % 2 == 0 else ["old", "new"]:
                t0 = time.perf_counter()
                results[what, k] = fns[k]()
                times[what][k].append(time.perf_counter() - t0)
        print(
            f"  round {r + 1}: "
            + "; ".join(f"{w} old {t['old'][-1]:.3f} s new {t['new'][-1]:.3f} s" for w, t in times.items()),
            flush=True,
        )
    (old_labels, old_boxes), (new_labels, new_boxes) = results["matching", "old"], results["matching", "new"]
    assert torch.equal(old_labels[0], new_labels[0]) and torch.equal(old_boxes[0], new_boxes[0]), "matching differs"
    mask_diff = float((results["masks", "new"] - results["masks", "old"]).abs().max())
    assert mask_diff < 1e-3, f"mask targets differ by {mask_diff}"
    labels = old_labels[0]
    print(
        f"anchor labels identical ({int((labels == 1).sum())} positive, {int((labels == -1).sum())} ignored); "
        f"mask targets max abs diff {mask_diff:.1e}"
    )
    for what, t in times.items():
        old, new = min(t["old"]), min(t["new"])
        mo, mn = statistics.median(t["old"]), statistics.median(t["new"])
        print(
            f"{what}: old {old:.3f} s, new {new:.3f} s (min of {rounds}) -> {old / new:.1f}x; "
            f"medians {mo:.3f} s vs {mn:.3f} s -> {mo / mn:.1f}x"
        )


def profile_step(cfg, loader, device, warmup: int, amp: bool, top: int = 20) -> None:
    """cProfile one training step of ours (after ``warmup`` steps): own time per function and the
    cumulative time of the target-preparation calls."""
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    it = [iter(loader)]
    for _ in range(warmup):
        images, targets = next_batch(loader, it)
        one_step(model, opt, images, targets, device, amp)
    images, targets = next_batch(loader, it)
    prof = cProfile.Profile()
    prof.enable()
    total = one_step(model, opt, images, targets, device, amp)
    prof.disable()
    stats = pstats.Stats(prof)
    print(f"one step: {total:.2f} s ({sum(len(t['labels']) for t in targets)} cells); own time per function:")
    table = stats.stats  # type: ignore[attr-defined]  # pstats.Stats keeps its table here (untyped)
    rows = sorted(table.items(), key=lambda kv: -kv[1][2])[:top]
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
    for (file, line, func), (_, ncalls, _, cumtime, _) in sorted(table.items(), key=lambda kv: -kv[1][3]):
        if func in wanted and ("cellseg" in file or "torchvision" in file):
            print(f"  {cumtime:8.2f} s ({cumtime / total:5.1%}) {ncalls:>4} calls  {func} ({Path(file).name}:{line})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "maskrcnn_r50_fpn.yaml"))
    ap.add_argument("--data", default=None, help="competition-layout folder (default: a fresh 8-image synthetic one)")
    ap.add_argument("--mode", default="baseline", choices=["baseline", "ours", "targets", "matching", "profile"])
    ap.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. model.input_scale=1"
    )
    ap.add_argument("--amp", default="config", choices=["config", "on", "off"], help="CUDA autocast (CPU: always off)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jitter", type=float, default=1.25, help="--mode matching: augmentation scale, fixed")
    ap.add_argument("--proposals", type=int, default=128, help="--mode matching: proposals with mask targets")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode == "matching":
        fixed = ["model.input_scale=1", f"augment.scale_range=[{args.jitter},{args.jitter}]"]
        cfg = load_experiment(args.config, [*fixed, *args.set])
        data = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="bench-matching-")) / "data"
        if not args.data:
            from cellseg.data.synth import generate

            generate(data, train_images=40, test_images=0, semi_images=0, seed=11, progress=False, workers=1)
        cpu = cpu_model()
        name = (
            torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} torch threads"
        )
        print(f"device: {name}; {Path(args.config).name}, input_scale {cfg.model.input_scale}, jitter {args.jitter}")
        compare_matching(cfg, data, device, args.steps, args.proposals)
        return 0
    cfg = load_experiment(args.config, ["train.batch_size=2", *args.set])
    amp = device.type == "cuda" and (cfg.train.amp if args.amp == "config" else args.amp == "on")
    if args.data:
        data = Path(args.data)
    else:
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

    cpu = cpu_model()
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
