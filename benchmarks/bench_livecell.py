"""LIVECell-scale annotation loading: cellseg's flat arrays (``cellseg.data.coco``) against the plain
``json.load`` + Python lists approach, measured in the same run.

Writes a LIVECell-shaped COCO json (default 3,200 images x 300 polygons x 20 vertices, 2-decimal
coordinates, ``annotations`` keyed by id as in LIVECell; ``--scale`` multiplies the image count) and
LIVECell's per-line image folders (hard links to one 704 x 520 TIFF per line). Each approach then runs
in a fresh subprocess, so peaks do not mix:

* load: peak RSS while loading and RSS kept afterwards (both above the process's RSS before the load),
  and seconds; ``baseline`` = ``json.load`` then per-image lists of the annotation dicts (their
  ``segmentation`` lists of floats kept, the top-level dict dropped; what cellseg did before).
* first batch: seconds from before the json is opened to the first batch (2 items) of a DataLoader
  with 4 workers over real items (704 x 520, 300 cells rasterised; ours: ``CellDataset``).
* workers: private memory (Private_Clean + Private_Dirty of ``/proc/PID/smaps_rollup``) each of 4
  persistent DataLoader workers holds after one shuffled pass over every image, reading each image's
  annotations as items do (polygons -> float64 arrays) but not rasterising them, so a pass takes
  seconds; compared with the parent's RSS.

Run: ``PYTHONPATH=src .venv/bin/python benchmarks/bench_livecell.py [--scale 0.25] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

LINES = ("A172", "BT474", "BV2", "Huh7", "MCF7", "SHSY5Y", "SkBr3", "SKOV3")
H, W = 520, 704


# ----------------------------------------------------------------------------- data


def write_dataset(root: Path, n_images: int, n_polys: int, n_vertices: int, seed: int = 0) -> Path:
    """``root/annotations/LIVECell/livecell_coco_train.json`` + ``root/images/livecell_train_val_images/<LINE>/``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img_dir = root / "images" / "livecell_train_val_images"
    src = root / "src"
    src.mkdir(parents=True, exist_ok=True)
    for line in LINES:
        (img_dir / line).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(60, 200, (H, W), dtype=np.uint8)).save(src / f"{line}.tif")
    names = [f"{LINES[i % 8]}_Phase_A{i // 8 % 12}_{i // 96 + 1}_00d04h00m_{i % 4 + 1}.tif" for i in range(n_images)]
    for name in names:
        dst = img_dir / name.split("_")[0] / name
        if not dst.exists():
            os.link(src / f"{name.split('_')[0]}.tif", dst)
    path = root / "annotations" / "LIVECell" / "livecell_coco_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.linspace(0, 2 * np.pi, n_vertices, endpoint=False)
    coord_fmt = ", ".join(["%.2f"] * 2 * n_vertices)
    box_fmt = "%.2f, %.2f, %.2f, %.2f"
    with open(path, "w") as f:
        f.write('{"info": {"description": "LIVECell-shaped benchmark"}, "licenses": [], "images": [')
        f.write(
            ", ".join(json.dumps({"id": i + 1, "file_name": n, "width": W, "height": H}) for i, n in enumerate(names))
        )
        f.write('], "annotations": {')
        k = 0
        for i in range(n_images):
            cx, cy = rng.uniform(15, W - 15, n_polys), rng.uniform(15, H - 15, n_polys)
            r = rng.uniform(5, 12, (n_polys, 1)) * rng.uniform(0.8, 1.2, (n_polys, n_vertices))
            xy = np.stack([cx[:, None] + r * np.cos(t), cy[:, None] + r * np.sin(t)], 2)
            lo, hi = xy.min(1), xy.max(1)
            boxes = np.concatenate([lo, hi - lo], 1)
            area = np.pi * r.mean(1) ** 2
            parts = []
            for j in range(n_polys):  # printf-style formatting: json.dumps per annotation is ~5x slower
                k += 1
                parts.append(
                    f'"{k}": {{"id": {k}, "image_id": {i + 1}, "category_id": 1, "iscrowd": 0, '
                    f'"area": {area[j]:.2f}, "bbox": [{box_fmt % tuple(boxes[j])}], '
                    f'"segmentation": [[{coord_fmt % tuple(xy[j].ravel())}]]}}'
                )
            f.write(("" if i == 0 else ", ") + ", ".join(parts))
        f.write('}, "categories": [{"supercategory": "cell", "id": 1, "name": "cell"}]}')
    return path


# ----------------------------------------------------------------------------- the two approaches


def load_baseline(path: Path, images: Path) -> list[tuple[Path, list[dict]]]:
    """json.load, then per image (path, [{"segmentation": [[floats]], "bbox": [...]}, ...]); dict dropped."""
    with open(path) as f:
        data = json.load(f)
    index = {p.name: p for p in images.rglob("*.tif")}
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"].values():
        if not a.get("iscrowd"):
            anns.setdefault(a["image_id"], []).append({"segmentation": a["segmentation"], "bbox": a["bbox"]})
    out = [(index[im["file_name"]], anns.get(im["id"], [])) for im in data["images"]]
    del data
    return out


class BaselineItems:
    """Real items from the lists: the image + full-frame rasterisation per annotation (cellseg's old path)."""

    def __init__(self, recs) -> None:
        self.recs = recs

    def __len__(self) -> int:
        return len(self.recs)

    def __getitem__(self, i: int):
        import torch
        from pycocotools import mask as mask_utils

        from cellseg.io import read_gray

        path, anns = self.recs[i]
        image = read_gray(path)
        rles = [mask_utils.merge(mask_utils.frPyObjects(a["segmentation"], H, W)) for a in anns]
        masks = np.ascontiguousarray(mask_utils.decode(rles).transpose(2, 0, 1))
        return torch.from_numpy(image.copy()), torch.from_numpy(masks)


class TouchBaseline:
    def __init__(self, recs) -> None:
        self.recs = recs

    def __len__(self) -> int:
        return len(self.recs)

    def __getitem__(self, i: int) -> int:
        return sum(len(np.asarray(p, dtype=np.float64)) for a in self.recs[i][1] for p in a["segmentation"])


class TouchOurs:
    def __init__(self, store) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> int:
        s = self.store
        return sum(len(p) for a in s.order[s.ann_start[i] : s.ann_start[i + 1]].tolist() for p in s.polygons(a))


# ----------------------------------------------------------------------------- measuring (child side)


def _status(pid: int | str = "self") -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def _private(pid: int) -> int:
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean", "Private_Dirty")):
            total += int(line.split()[1]) * 1024
    return total


def child(approach: str, path: Path, images: Path, workers: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from cellseg.data.coco import load_coco
    from cellseg.data.dataset import CellDataset, collate_fn, store_records

    torch.set_num_threads(1)
    gc.collect()
    before = _status()["VmRSS"]
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the load's
    t0 = time.perf_counter()
    items: Any
    touch: Any
    collate: Any
    if approach == "ours":
        store = load_coco(path, images, {"*": "shsy5y"})
        items = CellDataset(store_records(store))
        touch = TouchOurs(store)
        collate = collate_fn
    else:
        recs = load_baseline(path, images)
        items, touch, collate = BaselineItems(recs), TouchBaseline(recs), None
    load_s = time.perf_counter() - t0
    gc.collect()
    st = _status()
    res: dict[str, Any] = {
        "load_s": load_s,
        "peak": st["VmHWM"] - before,
        "kept": st["VmRSS"] - before,
        "rss": st["VmRSS"],
    }
    loader = DataLoader(items, batch_size=2, num_workers=workers, collate_fn=collate or (lambda b: b))
    it = iter(loader)
    next(it)
    res["first_batch_s"] = time.perf_counter() - t0
    del it, loader
    loader = DataLoader(touch, batch_size=16, shuffle=True, num_workers=workers, persistent_workers=True)
    it = iter(loader)
    t1 = time.perf_counter()
    for _ in it:
        pass
    res["pass_s"] = time.perf_counter() - t1
    # the worker processes of this iterator (a private attribute: untyped)
    pids = [w.pid for w in it._workers]  # type: ignore[attr-defined]  # noqa: SLF001
    res["worker_private"] = [_private(p) for p in pids]
    res["worker_rss"] = [_status(p)["VmRSS"] for p in pids]
    res["parent_rss"] = _status()["VmRSS"]
    del it, loader
    return res


# ----------------------------------------------------------------------------- the run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the 3,200 images (polygons per image fixed)")
    ap.add_argument("--polygons", type=int, default=300)
    ap.add_argument("--vertices", type=int, default=20)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_livecell"))
    ap.add_argument("--keep", action="store_true", help="keep the generated dataset")
    ap.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.workdir
    path = root / "annotations" / "LIVECell" / "livecell_coco_train.json"
    images = root / "images" / "livecell_train_val_images"
    if args.child:
        print("RESULT " + json.dumps(child(args.child, path, images, args.workers)))
        return
    n_images = max(8, int(round(3200 * args.scale)))
    t = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)
    write_dataset(root, n_images, args.polygons, args.vertices)
    size = path.stat().st_size
    print(
        f"generated {n_images} images x {args.polygons} polygons x {args.vertices} vertices: "
        f"{size / 1e6:.0f} MB json in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    results = {}
    for approach in ("ours", "baseline"):
        cmd = [sys.executable, __file__, "--child", approach, "--workdir", str(root), "--workers", str(args.workers)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode != 0 or line is None:
            raise SystemExit(f"{approach} failed:\n{out.stderr[-3000:]}")
        results[approach] = json.loads(line[7:])
        print(f"{approach}: done", flush=True)
    mb = 1e6
    print(f"\njson on disk: {size / mb:.0f} MB; {args.workers} workers; figures per approach (MB unless noted)")
    print(f"{'':28} {'ours':>12} {'baseline':>12} {'baseline/ours':>14}")

    def row(label: str, key, fmt: str = "{:.0f}", scale: float = mb) -> None:
        a = key(results["ours"]) / scale
        b = key(results["baseline"]) / scale
        print(f"{label:28} {fmt.format(a):>12} {fmt.format(b):>12} {b / a if a else float('nan'):>13.1f}x")

    row("load: peak RSS", lambda r: r["peak"])
    row("load: kept RSS", lambda r: r["kept"])
    row("load: seconds", lambda r: r["load_s"], "{:.1f}", 1)
    row("first batch: seconds", lambda r: r["first_batch_s"], "{:.1f}", 1)
    row("worker private, mean", lambda r: np.mean(r["worker_private"]))
    row("worker private, max", lambda r: max(r["worker_private"]))
    row("parent RSS", lambda r: r["parent_rss"])
    row("one pass (annotations): s", lambda r: r["pass_s"], "{:.1f}", 1)
    for name, r in results.items():
        share = max(r["worker_private"]) / r["parent_rss"]
        print(
            f"{name}: peak {r['peak'] / size:.2f}x / kept {r['kept'] / size:.2f}x the json size; "
            f"largest worker adds {share:.1%} of the parent's RSS "
            f"(workers: {', '.join(f'{p / mb:.0f}' for p in r['worker_private'])} MB private)"
        )
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
