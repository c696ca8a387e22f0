"""Inference cost per image: time in the models' forward passes vs everything else.

Setup (defaults): 3 models x 4 TTA views (identity, hflip, vflip, hvflip) on one 520 x 704 synthetic
shsy5y image. Forward = the real Mask R-CNN (default ModelConfig: R50-FPN, input upscaled to 1040,
random weights) with the inference settings of :mod:`cellseg.inference.forward` (masks kept 28 x 28). The rest =
PNG decode + cell-type vote + pasting soft masks on crops + fusion (sparse mask-IoU NMS with mask
averaging) + post-processing + RLE, run on ~800 realistic detections per view: the image's true
cells (boxes jittered by ~1 px, masks = the 28 x 28 targets torchvision trains on) plus false
positives, because random weights do not produce cell-like detections. Target: rest <= 50 % of
forward on CPU.

Baselines measured in the same run:
* torchvision's own post-processing (``paste_masks_in_image`` of 800 masks onto the full frame per
  view) vs our crop paste of the same detections;
* a dense mask IoU (N x H*W float matrix product) vs our sparse one, on one view's detections.

    .venv/bin/python benchmarks/bench_inference.py [--models 3] [--views 4] [--dets 800] [--min-size 1040]

``--fold-bn``: the committed demo model (weights/demo) with its BatchNorms as trained vs folded into the
convolutions (:func:`cellseg.inference.fold.fold_batchnorm`, which ``prepare_model`` applies by default),
on a deep copy of the same prepared model. Times the backbone + FPN only (the part folding changes) on
one batch of ``--batch`` synthetic train images after the model's own transform (the demo model
upscales 520 x 704 by 1.5 to 780 x 1056), ``--repeat`` rounds alternating which runs first; prints
the median and min of each, unfolded / folded (also per round, which shares the machine's load), and the
max abs difference of the FPN outputs.

    .venv/bin/python benchmarks/bench_inference.py --fold-bn [--batch 2] [--repeat 4]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from machine import cpu_model  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from torchvision.models.detection.roi_heads import paste_masks_in_image, project_masks_on_boxes

from cellseg import CLASS_IDS
from cellseg.config.experiment import ModelConfig
from cellseg.config.manifest import FusionConfig, Manifest, ModelEntry, View, default_classes
from cellseg.data.masks import stack
from cellseg.data.rle import encode_crop
from cellseg.data.synth import generate
from cellseg.data.truth import read_train_csv
from cellseg.inference.ensemble import Ensemble, relabel
from cellseg.inference.forward import (
    LoadedModel,
    RawView,
    label_map_for,
    prepare_model,
    raw_to_detections,
)
from cellseg.inference.fusion import fuse, mask_iou_sparse
from cellseg.inference.postprocess import postprocess
from cellseg.io import read_gray
from cellseg.model.build import build_model

VIEWS: list[View] = ["identity", "hflip", "vflip", "hvflip"]


def synthetic_views(ann, n_views: int, n_models: int, dets: int, seed: int = 0) -> list[RawView]:
    """Realistic raw detections: true cells with jittered boxes + shifted copies as false positives."""
    rng = np.random.default_rng(seed)
    H, W = ann.height, ann.width
    full = torch.from_numpy(stack(ann.instances, H, W))
    boxes0 = torch.tensor([c.box for c in ann.instances], dtype=torch.float32)
    out = []
    for m in range(n_models):
        for v in VIEWS[:n_views]:
            n_true = min(len(ann.instances), dets)
            idx = rng.choice(len(ann.instances), size=dets, replace=dets > len(ann.instances))
            idx[:n_true] = rng.permutation(len(ann.instances))[:n_true]
            b = boxes0[idx] + torch.from_numpy(rng.normal(0, 0.8, (dets, 4))).float()
            fp = np.arange(dets) >= n_true
            shift = torch.from_numpy(rng.uniform(-15, 15, (int(fp.sum()), 2))).float()
            b[fp] += torch.cat([shift, shift], 1)
            b[:, 0::2] = b[:, 0::2].clamp(0, W)
            b[:, 1::2] = b[:, 1::2].clamp(0, H)
            b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 2)
            masks = project_masks_on_boxes(full, b, torch.from_numpy(idx), 28).clamp(0, 1)
            scores = np.where(fp, rng.uniform(0.05, 0.5, dets), rng.uniform(0.3, 1.0, dets)).astype(np.float32)
            labels = np.where(rng.random(dets) < 0.9, CLASS_IDS["shsy5y"], CLASS_IDS["cort"])
            out.append(RawView(b, torch.from_numpy(scores), torch.from_numpy(labels), masks, m, v))
    return out


def rest_of_pipeline(png: Path, raw: list[RawView], loaded, manifest: Manifest) -> tuple[int, dict]:
    """Everything but the forward passes, stage by stage as :meth:`cellseg.inference.ensemble.Ensemble.finish` runs them."""
    t = {}
    t0 = time.perf_counter()
    image = read_gray(png)
    H, W = image.shape
    t["decode png"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cell_type = Ensemble(manifest, loaded, torch.device("cpu")).vote(raw)
    th, fu = manifest.thresholds(cell_type), manifest.fusion
    raw = relabel(raw, CLASS_IDS[cell_type])
    t["vote"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    dets = raw_to_detections(raw, loaded, H, W, min_score=th.score)
    t["paste crops"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused = fuse(dets, th, fu, H, W, total_weight=float(len(raw)))
    t["fusion"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    crops, _ = postprocess(fused, th, manifest.postprocess, H, W)
    t["post-process"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    [encode_crop(c, H, W) for c in crops]
    t["rle"] = time.perf_counter() - t0
    t["_dets"] = len(dets)
    return len(crops), t


def fold_bn_bench(batch: int, repeat: int, device: torch.device) -> None:
    """Backbone + FPN of the demo model, BatchNorm unfolded vs folded: same weights, same input."""
    from cellseg.config.manifest import load_manifest
    from cellseg.inference.fold import fold_batchnorm
    from cellseg.inference.forward import image_tensor
    from cellseg.model.checkpoint import load_model
    from cellseg.paths import demo_manifest

    manifest = load_manifest(demo_manifest())
    path = manifest.checkpoint_path(manifest.models[0])
    # a MaskRCNN, typed nn.Module: its parts (transform, backbone) are dynamic attributes
    unfolded: Any = prepare_model(load_model(path)[0], manifest.fusion, device, fp16=False, fold_bn=False)
    folded = copy.deepcopy(unfolded)
    n_folded = fold_batchnorm(folded)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d"
        generate(data, train_images=batch, test_images=0, semi_images=0, seed=11, progress=False, workers=1)
        images = [image_tensor(read_gray(png), device) for png in sorted((data / "train").glob("*.png"))]
    with torch.inference_mode():
        batched = unfolded.transform(images)[0]
        x = batched.tensors  # the padded batch the backbone sees
        print(
            f"{cpu_model() if device.type == 'cpu' else torch.cuda.get_device_name(device)}, "
            f"{torch.get_num_threads()} torch threads, device {device}, torch {torch.__version__}"
        )
        print(
            f"demo model ({path.name}): {n_folded} BatchNorms folded; backbone + FPN on a batch of "
            f"{tuple(x.shape)} (float32; images {sorted(set(batched.image_sizes))} padded)"
        )
        models = {"unfolded": unfolded, "folded": folded}
        outs = {k: m.backbone(x) for k, m in models.items()}  # warm-up, and the outputs compared
        times: dict[str, list[float]] = {k: [] for k in models}
        for r in range(repeat):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for k in order:
                t0 = time.perf_counter()
                models[k].backbone(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f} s" for k in order), flush=True)
    diff = max(float((outs["folded"][k] - outs["unfolded"][k]).abs().max()) for k in outs["unfolded"])
    scale = max(float(v.abs().max()) for v in outs["unfolded"].values())
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k}: median {med[k]:.3f} s, min {min(v):.3f} s ({len(v)} rounds)")
    ratios = [u / f for u, f in zip(times["unfolded"], times["folded"])]  # per round: same machine load
    print(
        f"unfolded / folded: {med['unfolded'] / med['folded']:.2f}x (medians), "
        f"{min(times['unfolded']) / min(times['folded']):.2f}x (mins), per round median {np.median(ratios):.2f}x "
        f"({min(ratios):.2f}-{max(ratios):.2f}); "
        f"FPN outputs max abs diff {diff:.2e} (largest output magnitude {scale:.1f})"
    )
    if diff > 1e-3 * max(scale, 1.0):
        raise SystemExit(f"folded outputs differ from unfolded by {diff:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--dets", type=int, default=800, help="detections per model x view")
    ap.add_argument("--min-size", type=int, default=1040, help="model input short side (1040 = 2x upscale)")
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--fold-bn", action="store_true", help="demo model backbone, BatchNorm unfolded vs folded")
    ap.add_argument("--batch", type=int, default=2, help="--fold-bn: images per batch")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.fold_bn:
        fold_bn_bench(args.batch, args.repeat, dev)
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d"
        generate(data, train_images=12, test_images=0, semi_images=0, progress=False)
        train = read_train_csv(data / "train.csv")
        ann = max(train.images.values(), key=lambda a: len(a.instances) if a.cell_type == "shsy5y" else 0)
        png = data / "train" / f"{ann.id}.png"
        image = read_gray(png)

        manifest = Manifest(
            name="bench",
            models=[ModelEntry("x", weight=1.0)] * args.models,
            tta=VIEWS[: args.views],
            fusion=FusionConfig(detections_per_view=args.dets, model_score_thresh=0.0),
            classes=default_classes(),
        )
        cfg = ModelConfig(backbone=args.backbone, min_size=args.min_size, max_size=int(args.min_size * 704 / 520) + 1)
        loaded = []
        for i in range(args.models):
            torch.manual_seed(i)
            model = build_model(cfg)
            loaded.append(LoadedModel(prepare_model(model, manifest.fusion, dev), 1.0, label_map_for(None, 4)))

        raw = synthetic_views(ann, args.views, args.models, args.dets)
        print(f"{cpu_model()}, {torch.get_num_threads()} torch threads, device {dev}, torch {torch.__version__}")
        print(
            f"image {ann.id} ({ann.cell_type}, {len(ann.instances)} cells); {args.models} models x {args.views} views; "
            f"{args.backbone} FPN at short side {args.min_size}; {args.dets} detections per view"
        )

        from cellseg.inference.forward import predict_views

        fwd, rest, parts = [], [], []
        for r in range(args.repeat):
            t0 = time.perf_counter()
            out = predict_views(loaded, image, VIEWS[: args.views], dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            fwd.append(time.perf_counter() - t0)
            n_model = int(np.mean([len(o.scores) for o in out]))
            t0 = time.perf_counter()
            kept, t = rest_of_pipeline(png, raw, loaded, manifest)
            rest.append(time.perf_counter() - t0)
            parts.append(t)
            print(
                f"  run {r}: forward {fwd[-1]:.2f}s (model gave {n_model} dets/view), rest {rest[-1]:.2f}s "
                f"({t['_dets']} detections fused into {kept} cells)"
            )
        f, s = min(fwd), min(rest)
        best = parts[int(np.argmin(rest))]
        print("rest by stage: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in best.items() if not k.startswith("_")))
        print(f"forward {f:.2f} s/image, rest {s:.2f} s/image, rest/forward = {s / f:.2f} (target <= 0.50)")

        # baselines on one view's detections
        one = raw[0]
        t0 = time.perf_counter()
        paste_masks_in_image(one.masks[:, None], one.boxes, (ann.height, ann.width))
        dense_paste = time.perf_counter() - t0
        t0 = time.perf_counter()
        dets = raw_to_detections([one], loaded, ann.height, ann.width, min_score=0.0)
        crop_paste = time.perf_counter() - t0
        print(
            f"paste {len(one.scores)} masks: torchvision full-frame {dense_paste * 1000:.0f} ms "
            f"({len(one.scores) * ann.height * ann.width * 4 / 2**20:.0f} MiB) vs crops {crop_paste * 1000:.0f} ms "
            f"-> {dense_paste / crop_paste:.1f}x"
        )
        t0 = time.perf_counter()
        mask_iou_sparse(dets.masks, 0.5, ann.height, ann.width)
        sparse_iou = time.perf_counter() - t0
        t0 = time.perf_counter()
        full = torch.zeros(len(dets), ann.height * ann.width)
        for i, m in enumerate(dets.masks):
            h, w = m.prob.shape
            full[i].view(ann.height, ann.width)[m.top : m.top + h, m.left : m.left + w] = torch.from_numpy(
                m.prob >= 0.5
            ).float()
        inter = full @ full.T
        area = full.sum(1)
        _ = inter / (area[:, None] + area[None] - inter).clamp(min=1)
        dense_iou = time.perf_counter() - t0
        print(
            f"mask IoU of {len(dets)} masks: dense {dense_iou * 1000:.0f} ms vs sparse {sparse_iou * 1000:.0f} ms "
            f"-> {dense_iou / sparse_iou:.1f}x"
        )


if __name__ == "__main__":
    main()
