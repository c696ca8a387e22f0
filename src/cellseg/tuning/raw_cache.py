"""predict-raw's cache: one ensemble's PRE-fusion detections per train image, for threshold tuning.

``cellseg predict-raw`` runs the ensemble once over hold-out train images and caches, per image, the
detections of every model x TTA view (after the cell-type vote) in one compressed ``<id>.npz``: boxes,
scores, labels, sources, model weights and the soft masks quantised to uint8 on their crops
(:func:`save_cached` / :func:`load_cached`). ``cellseg tune`` (:mod:`cellseg.tuning.tune`) reads it.

A cache belongs to one ensemble: :func:`cache_fingerprint` (sha256 over the models' checksums and
weights, the TTA views and the settings applied before fusion, never the class thresholds tuning
changes) is written to ``index.json`` before the first image and into every ``<id>.npz``, so a killed
run is still recognised; :func:`predict_raw` refuses to add another ensemble's images to the folder
and :func:`cellseg.tuning.tune.tune` refuses a cache of another ensemble than the manifest it tunes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg.config.manifest import Manifest, load_manifest
from cellseg.errors import CellsegError
from cellseg.inference.fusion import Detections, SoftCrop
from cellseg.io import atomic_path, atomic_write_text, read_gray
from cellseg.paths import CompetitionPaths
from cellseg.progress import progress as progress_bar

CACHE_VERSION = 2  # 2: every file records its ensemble's fingerprint

#: fusion settings that act before the cache (on each model x view); the others act at tuning time
PRE_FUSION = ("detections_per_view", "model_score_thresh", "model_nms_thresh", "paste_shift", "vote_min_score")


def cache_fingerprint(manifest: Manifest) -> str:
    """Hex sha256 of what shapes an ensemble's cached pre-fusion detections: each model's sha256,
    weight, paste shift and inference input scale (when set), the TTA views and the :data:`PRE_FUSION` settings (not the per-class
    thresholds, which ``cellseg tune`` rewrites)."""
    payload = {
        # the input scale only when set, so fingerprints of manifests without one stay as they were
        "models": [
            [m.sha256, m.weight, m.paste_shift] + ([m.input_scale] if m.input_scale is not None else [])
            for m in manifest.models
        ],
        "tta": list(manifest.tta),
        "fusion": {k: getattr(manifest.fusion, k) for k in PRE_FUSION},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass
class CachedImage:
    """Pre-fusion detections of one image, as cached by :func:`predict_raw`."""

    id: str
    cell_type: str
    height: int
    width: int
    total_weight: float
    dets: Detections
    #: :func:`cache_fingerprint` of the ensemble that predicted it
    fingerprint: str = ""


def save_cached(path: str | Path, img: CachedImage) -> None:
    """Write ``img`` as a compressed npz (soft masks quantised to uint8), atomically."""
    d = img.dets
    shapes = np.array([m.prob.shape for m in d.masks], dtype=np.int32).reshape(-1, 2)
    flat = np.concatenate([m.prob.ravel() for m in d.masks]) if d.masks else np.zeros(0, np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                version=CACHE_VERSION,
                meta=json.dumps(
                    {
                        "id": img.id,
                        "cell_type": img.cell_type,
                        "height": img.height,
                        "width": img.width,
                        "total_weight": img.total_weight,
                        "fingerprint": img.fingerprint,
                    }
                ),
                boxes=d.boxes,
                scores=d.scores,
                labels=d.labels,
                source=d.source,
                weight=d.weight,
                tops=np.array([m.top for m in d.masks], np.int32),
                lefts=np.array([m.left for m in d.masks], np.int32),
                shapes=shapes,
                probs=np.round(np.clip(flat, 0, 1) * 255).astype(np.uint8),
            )


def load_cached(path: str | Path) -> CachedImage:
    """Read one cached image written by :func:`save_cached`."""
    with np.load(path) as z:
        if int(z["version"]) != CACHE_VERSION:
            raise CellsegError(
                f"{path}: cache version {int(z['version'])}, expected {CACHE_VERSION}; re-run predict-raw"
            )
        meta = json.loads(str(z["meta"]))
        shapes, probs = z["shapes"], z["probs"].astype(np.float32) / 255.0
        ends = np.cumsum(shapes[:, 0] * shapes[:, 1])
        starts = ends - shapes[:, 0] * shapes[:, 1]
        masks = [
            SoftCrop(int(t), int(l), probs[s:e].reshape(int(h), int(w)))
            for t, l, s, e, (h, w) in zip(z["tops"], z["lefts"], starts, ends, shapes)
        ]
        dets = Detections(z["boxes"], z["scores"], z["labels"], masks, z["source"], z["weight"])
    return CachedImage(
        meta["id"], meta["cell_type"], meta["height"], meta["width"], meta["total_weight"], dets, meta["fingerprint"]
    )


def read_cache_index(out: Path) -> dict | None:
    """``out/index.json`` of a predict-raw cache, or None when there is none (an empty or new folder).

    Raises:
        CellsegError: the folder holds cached images but no index (not a cache of this version).
    """
    index_path = out / "index.json"
    if index_path.is_file():
        try:
            return json.loads(index_path.read_text())
        except ValueError:
            raise CellsegError(f"{index_path}: not valid JSON; use a new --out folder") from None
    if out.is_dir() and any(out.glob("*.npz")):
        raise CellsegError(f"{out} holds cached images but no index.json (an older or foreign cache); use a new --out")
    return None


def predict_raw(
    data_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    image_ids: Sequence[str],
    split: str = "train",
    device: str = "auto",
    progress: bool = True,
) -> Path:
    """Cache pre-fusion detections of ``image_ids`` (PNGs in ``data_dir/split``) into ``out_dir``.

    Writes ``index.json`` first (the ensemble's :func:`cache_fingerprint`, manifest, views, split,
    ids cached so far; rewritten after every image), then ``<id>.npz`` per image. Images already
    cached are skipped, so a killed run resumes; progress counts only the images still to do.

    Raises:
        CellsegError: ``out_dir`` holds a cache of another ensemble or split, or unindexed files.
    """
    # lazy: only predicting needs the models' code (checkpoints, torchvision's detection models)
    from cellseg.inference.device import resolve_device
    from cellseg.inference.ensemble import Ensemble

    manifest = load_manifest(manifest_path, verify=True)
    if not manifest.models:
        raise CellsegError(f"{manifest_path}: manifest lists no model")
    paths = CompetitionPaths(Path(data_dir))
    out = Path(out_dir)
    fingerprint = cache_fingerprint(manifest)
    old = read_cache_index(out)
    if old is not None and old.get("fingerprint") != fingerprint:
        was = str(old.get("fingerprint") or "none")[:12]
        raise CellsegError(
            f"{out} holds predictions made with another manifest's ensemble (fingerprint {was}..., "
            f"{manifest_path}: {fingerprint[:12]}...): mixing them would tune on two models; use a new --out folder"
        )
    if old is not None and old.get("split") != split:
        raise CellsegError(f"{out} caches {old.get('split')!r} images, not {split!r}; use a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    index = {
        "fingerprint": fingerprint,
        "manifest": str(Path(manifest_path).resolve()),
        "sha256": [m.sha256 for m in manifest.models],
        "views": list(manifest.tta),
        "split": split,
        "created": (old or {}).get("created") or time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    done = [i for i in (old or {}).get("ids", []) if (out / f"{i}.npz").is_file()]

    def write_index() -> None:
        atomic_write_text(out / "index.json", json.dumps({**index, "ids": done}, indent=1))

    write_index()  # before any image: a killed run still says whose predictions these are
    todo = [i for i in dict.fromkeys(image_ids) if not (out / f"{i}.npz").is_file()]
    done += [i for i in dict.fromkeys(image_ids) if i not in todo and i not in done]
    if not todo:
        write_index()
        return out
    ensemble = Ensemble.load(manifest, resolve_device(device))
    bar = progress_bar(total=len(todo), desc="predict-raw", unit="img", enabled=progress, every=10)
    for image_id in todo:
        image = read_gray(paths.image(split, image_id))
        raw = ensemble.forward(image)
        # every detection above the models' own floor: the tuner chooses the score threshold
        dets, cell_type, total = ensemble.detections(image.shape, raw, min_score=manifest.fusion.model_score_thresh)
        h, w = image.shape  # read_gray: always (H, W)
        save_cached(out / f"{image_id}.npz", CachedImage(image_id, cell_type, h, w, total, dets, fingerprint))
        done.append(image_id)
        write_index()
        bar.update()
    bar.close()
    return out
