"""Peak memory of one training step, dense vs sparse images, old (torchvision) vs new mask targets.

    .venv/bin/python benchmarks/bench_train_memory.py [--scale 2] [--old-scale 2] [--device cpu|cuda]
    .venv/bin/python benchmarks/bench_train_memory.py --tiny        # CPU smoke run, tiny sizes, < 30 s

One training step (forward, backward, SGD step) of ``--config`` (default the shipped R50-FPN) at
batch 2, ``model.input_scale=--scale`` and the augmentation's scale jitter fixed at ``--jitter``
(default 1.25: a 520 x 704 image becomes 1300 x 1760 at scale 2), on

* the two densest images of ``cellseg synth --seed 11 --train-images 40`` (529 + 408 = 937 cells),
* the two sparsest (10 + 13 = 23 cells),

each in its own subprocess (clean peak RSS from ``getrusage``; on CUDA also
``torch.cuda.max_memory_allocated``), for two paths in the same run:

* new: the model as built (``cellseg.model.targets``: masks kept uint8 at the data's resolution,
  mask targets from per-proposal windows, RPN matching in anchor blocks);
* old: torchvision's training targets as on main at 6d67266 (masks upsampled in float32 by the
  transform, ``project_masks_on_boxes`` over the whole stack, the full (G, A) anchor IoU matrix).

Prints each peak, dense / sparse per path (goal <= 1.3x) and old / new per pair. The old path at
scale 2 needs ~23 GB of RAM on CPU: on a small machine measure it at ``--old-scale 1`` (the new path
is then measured at both scales). Not a test.

``--mode saved`` measures instead what one training forward of the dense pair saves for backward
(``torch.autograd.graph.saved_tensors_hooks``: bytes of every distinct saved tensor that is not a
parameter, by dtype), for three runs: float32 without autocast; autocast (fp16 on CUDA, bf16 on the
CPU) with torchvision's ``FrozenBatchNorm2d``, whose float32 scale turns half inputs into float32
("before"); autocast with the model's own frozen BN, which computes in its input's dtype ("after")::

    .venv/bin/python benchmarks/bench_train_memory.py --mode saved --scale 1 --jitter 1   # CPU proxy
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from cellseg.data.truth import read_train_csv  # noqa: E402

# torch, torchvision and the model stack are imported in the measuring children only: the parent
# stays light (~4 s less per run on 2 cores, which matters for the --tiny smoke run).


def old_path(model) -> None:
    """Give a built model torchvision's training targets again (the path before cellseg.model.targets),
    from tests/reference_targets.py, the same reference the equivalence tests use."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reference_targets import old_path as reference

    reference(model)


def torchvision_frozen_bn(model) -> int:
    """Replace every frozen BN of ``model`` by torchvision's own ``FrozenBatchNorm2d`` (same state), in
    place: the "before" of ``--mode saved``. Returns how many were replaced."""
    import torchvision

    from cellseg.model.build import FrozenBatchNorm2d

    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()]
    count = 0
    for parent, name, bn in swaps:
        if isinstance(bn, FrozenBatchNorm2d):
            plain = torchvision.ops.FrozenBatchNorm2d(bn.weight.numel(), eps=bn.eps)
            plain.load_state_dict(bn.state_dict())
            setattr(parent, name, plain.to(bn.weight.device))
            count += 1
    return count


def saved_bytes(model, images, tgts, autocast_dtype) -> dict[str, int]:
    """Bytes saved for backward by one training forward, per dtype (distinct storages, parameters
    excluded). ``autocast_dtype`` None: float32 without autocast."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (str(t.dtype).removeprefix("torch."), storage.nbytes())
        return t

    device_type = images[0].device.type
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            losses = model(images, tgts)
    del losses
    out: dict[str, int] = {}
    for dtype, nbytes in seen.values():
        out[dtype] = out.get(dtype, 0) + nbytes
    return out


def saved_mode(args: argparse.Namespace, ids: list[str]) -> None:
    """``--mode saved``: saved-activation bytes, float32 vs autocast before / after (frozen BN)."""
    import torch

    from cellseg.config.experiment import load_experiment
    from cellseg.data.dataset import build_train_dataset
    from cellseg.model.build import build_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    half_name = str(half).removeprefix("torch.")
    overrides = [f"model.input_scale={args.scale}", f"augment.scale_range=[{args.jitter},{args.jitter}]"]
    cfg = load_experiment(args.config, overrides)
    ds = build_train_dataset(cfg, args.data, ids)
    items = [ds[i] for i in range(len(ds))]
    images = [im.to(device) for im, _ in items]
    print(
        f"{Path(args.config).name}, dense pair ({sum(int(t['labels'].numel()) for _, t in items)} cells), "
        f"batch 2, input_scale {args.scale:g}, jitter {args.jitter:g}, device {args.device}: bytes saved for backward"
    )
    rows: dict[str, dict[str, int]] = {}
    for name, dtype, before in (("float32", None, False), ("before", half, True), ("after", half, False)):
        torch.manual_seed(0)
        model = build_model(cfg.model).to(device).train()
        replaced = torchvision_frozen_bn(model) if before else 0
        tgts = [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)} for _, t in items]
        torch.manual_seed(1)
        by_dtype = saved_bytes(model, images, tgts, dtype)
        rows[name] = by_dtype
        total = sum(by_dtype.values())
        parts = ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in sorted(by_dtype.items()))
        label = {
            "float32": "float32, no autocast",
            "before": f"{half_name} autocast, torchvision FrozenBN",
            "after": f"{half_name} autocast, frozen BN in input dtype",
        }[name]
        print(
            f"  {label:<45}: {total / 2**20:8.0f} MB ({parts})" + (f" [{replaced} BN replaced]" if before else ""),
            flush=True,
        )
    totals = {k: sum(v.values()) for k, v in rows.items()}
    print(
        f"summary: before / float32 = {totals['before'] / totals['float32']:.2f}, "
        f"after / float32 = {totals['after'] / totals['float32']:.2f}, after / before = "
        f"{totals['after'] / totals['before']:.2f}; float32 saved under autocast: before "
        f"{rows['before'].get('float32', 0) / 2**20:.0f} MB, after {rows['after'].get('float32', 0) / 2**20:.0f} MB"
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    """One measurement: build, load the pair, one training step; print a JSON line."""
    import torch

    from cellseg.config.experiment import load_experiment
    from cellseg.data.dataset import build_train_dataset
    from cellseg.model.build import build_model

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    overrides = [f"model.input_scale={args.scale}", f"augment.scale_range=[{args.jitter},{args.jitter}]"]
    cfg = load_experiment(args.config, overrides)
    ids = args.ids.split(",")
    ds = build_train_dataset(cfg, args.data, ids)
    items = [ds[i] for i in range(len(ds))]
    model = build_model(cfg.model)
    if args.path == "old":
        old_path(model)
    model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    images = [im.to(device) for im, _ in items]
    tgts = [{k: v.to(device) for k, v in t.items() if torch.is_tensor(v)} for _, t in items]
    amp = cfg.train.amp and device.type == "cuda" and not args.no_amp
    before = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.autocast(device_type=device.type, enabled=amp):
        losses = model(images, tgts)
    loss = sum(losses.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    out = {
        "path": args.path,
        "scale": args.scale,
        "cells": sum(int(t["labels"].numel()) for t in tgts),
        "input": [round(int(n) * args.scale) for n in images[0].shape[-2:]],  # network input (before padding)
        "loss": float(loss.detach()),
        "rss_before_mb": before,
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["cuda_step_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(out), flush=True)


def measure(args: argparse.Namespace, path: str, scale: float, ids: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", "--path", path, "--scale", str(scale), "--ids", ",".join(ids)]
    cmd += ["--data", str(args.data), "--config", args.config, "--jitter", str(args.jitter)]
    cmd += ["--device", args.device, "--threads", str(args.threads)] + (["--no-amp"] if args.no_amp else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"path": path, "scale": scale, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    return json.loads(line.removeprefix("RESULT "))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "maskrcnn_r50_fpn.yaml"))
    ap.add_argument("--data", default=None, help="competition-layout folder (default: synth seed 11, 40 images)")
    ap.add_argument("--scale", type=float, default=2.0, help="model.input_scale of the new path")
    ap.add_argument("--old-scale", type=float, default=None, help="input_scale of the old path (default --scale)")
    ap.add_argument("--jitter", type=float, default=1.25, help="augmentation scale factor, fixed")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--no-amp", action="store_true", help="CUDA: train without autocast (default: the config's amp)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paths", default="old,new", help="which paths to measure (old,new)")
    ap.add_argument("--mode", default="peak", choices=["peak", "saved"], help="peak memory, or saved activations")
    ap.add_argument("--tiny", action="store_true", help="smoke run: configs/demo.yaml, 8 images, scale 1, CPU")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    images = 40
    if args.tiny:
        args.config, args.scale, args.old_scale, args.jitter = str(ROOT / "configs" / "demo.yaml"), 1.0, 1.0, 1.0
        args.device, args.threads, images = "cpu", 1, 8
    if args.data is None:
        from cellseg.data.synth import generate

        args.data = Path(tempfile.mkdtemp(prefix="bench-train-memory-")) / "data"
        generate(args.data, train_images=images, test_images=0, semi_images=0, seed=11, progress=False, workers=1)
    counts = read_train_csv(Path(args.data) / "train.csv").images
    order = sorted(counts, key=lambda i: (len(counts[i].instances), i))
    pairs = {"dense": order[-2:], "sparse": order[:2]}
    if args.mode == "saved":
        saved_mode(args, pairs["dense"])
        return 0
    old_scale = args.scale if args.old_scale is None else args.old_scale
    runs = []
    paths = args.paths.split(",")
    for path, scale in [("old", old_scale), ("new", old_scale), ("new", args.scale)]:
        if path in paths and (path, scale) not in runs:
            runs.append((path, scale))
    key = "cuda_peak_mb" if args.device == "cuda" else "peak_rss_mb"
    what = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS (getrusage)"
    print(f"{Path(args.config).name}, batch 2, jitter {args.jitter}, device {args.device}; {what} per subprocess")
    results: dict[tuple[str, float], dict[str, dict]] = {}
    for path, scale in runs:
        for name, ids in pairs.items():
            r = measure(args, path, scale, ids)
            results.setdefault((path, scale), {})[name] = r
            if "error" in r:
                print(f"  {path:<3} scale {scale:g} {name:<6}: FAILED {r['error']}", flush=True)
                continue
            extra = f", step {r['cuda_step_mb']:.0f} MB" if "cuda_step_mb" in r else ""
            print(
                f"  {path:<3} scale {scale:g} {name:<6} {r['cells']:>4} cells, input {r['input'][0]}x{r['input'][1]}: "
                f"peak {r[key]:8.0f} MB{extra} (RSS before the step {r['rss_before_mb']:.0f} MB), "
                f"{r['seconds']:.1f} s",
                flush=True,
            )
    print("summary:")
    for (path, scale), res in results.items():
        if all(key in res[n] for n in pairs):
            d, s = res["dense"][key], res["sparse"][key]
            line = f"  {path} scale {scale:g}: dense {d:.0f} MB / sparse {s:.0f} MB = {d / s:.2f}x (goal <= 1.3x)"
            if key == "peak_rss_mb":  # what the step itself adds (the data's uint8 masks are held before it)
                ds, ss = (res[n][key] - res[n]["rss_before_mb"] for n in ("dense", "sparse"))
                line += f"; the step adds {ds:.0f} MB / {ss:.0f} MB = {ds / ss:.2f}x"
            print(line)
    for name in pairs:
        old, new = results.get(("old", old_scale), {}).get(name), results.get(("new", old_scale), {}).get(name)
        if old and new and key in old and key in new:
            print(
                f"  {name} pair at scale {old_scale:g}: old {old[key]:.0f} MB / new {new[key]:.0f} MB = "
                f"{old[key] / new[key]:.2f}x"
            )
    failed = any("error" in r for res in results.values() for r in res.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
