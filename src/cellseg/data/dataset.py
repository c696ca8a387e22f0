"""The torch Dataset of training / hold-out images: train.csv, pseudo-label csv files and COCO json.

Entry points::

    build_train_dataset(cfg: ExperimentConfig, data_dir, train_ids) -> CellDataset   # what training uses
    build_datasets(cfg: ExperimentConfig, data_dir, fold=None) -> (train_ds, val_ds or None)
    collate_fn(batch) -> (images tuple, targets tuple)

``CellDataset[i]`` is ``(image, target)``::

    image   (3, H, W) float32 in [0, 1] (grey repeated)
    target  {"boxes": (N, 4) float32 x0, y0, x1, y1 (exclusive max corner, tight on the masks),
             "labels": (N,) int64 (shsy5y=1, astro=2, cort=3), "masks": (N, H, W) uint8,
             "image_id": str}

N may be 0 (e.g. every cell cropped away). Augmentation (``augment``; hold-out items never are)
runs copy-paste (:func:`cellseg.data.copy_paste.copy_paste`, sources from this dataset's own images of
the same cell type) and then :func:`cellseg.data.transforms.build_transform`. Randomness is drawn from
torch's generator, so DataLoader worker seeding covers the numpy side too.

Sources:

* ``train.csv`` of the data dir (hole filling on by default), split by fold via
  :func:`cellseg.data.folds.holdout_split` (the split training uses too): train = the other folds,
  val = the fold.
* ``extra_csv``: train.csv-format files (pseudo-labels; an optional ``source`` column is allowed);
  images looked up in ``<data>/train_semi_supervised/``, then ``<data>/train/``, then the csv's
  folder. Ids that belong to the hold-out fold are left out (no leakage). With ``extra_ratio`` each
  epoch draws ``round(extra_ratio * n_train)`` extra items (call :meth:`CellDataset.set_epoch` each
  epoch to redraw); without it every extra image is used once per epoch.
* ``coco_json``: COCO instance files: polygons, RLE or compressed RLE, held as flat arrays
  (:mod:`cellseg.data.coco`) and rasterised per item; ``file_name`` relative to the json's folder or
  to ``coco_images_dir`` (or found by bare name in its sub-folders). Class: ``coco_class_map``, else
  the category name if it is a cell type, else a file-name prefix (``SHSY5Y_...``), else
  ``coco_cell_type``. Pooled with ``extra_csv`` for ``extra_ratio``.
* ``livecell`` (``data.livecell`` + ``livecell_splits``): LIVECell splits read the same way
  (:mod:`cellseg.data.livecell`); with ``use_train: false`` they are all that trains (pretraining).

Cost: masks are kept as crops (:class:`cellseg.data.masks.CropMask`) and the (N, H, W) stack is built per
item; see benchmarks/README.md ("dataset item") for the per-item time at 704 x 520 with ~340 cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from cellseg import CELL_TYPES, CLASS_IDS
from cellseg.config.experiment import AugmentConfig, DataConfig, ExperimentConfig
from cellseg.data import livecell
from cellseg.data.coco import CocoRef, CocoStore, load_coco
from cellseg.data.copy_paste import copy_paste_indexed
from cellseg.data.folds import holdout_split
from cellseg.data.masks import CropMask, stack
from cellseg.data.masks import boxes as crop_boxes
from cellseg.data.transforms import build_transform
from cellseg.data.truth import TrainSet, read_train_csv
from cellseg.errors import CellsegError
from cellseg.io import read_gray
from cellseg.paths import CompetitionPaths


@dataclass
class Record:
    """One image of a dataset.

    ``instances`` (train.csv-format sources) holds the annotations as crops; ``coco`` points at the
    image in a :class:`cellseg.data.coco.CocoStore`, rasterised when the item is read.
    """

    image_id: str
    path: Path
    cell_type: str
    height: int
    width: int
    instances: list[CropMask] | None = None
    coco: CocoRef | None = None
    source: str = "train"

    def __len__(self) -> int:
        return len(self.instances if self.instances is not None else self.coco or [])


def _labels_of(cell_type: str, n: int) -> np.ndarray:
    return np.full(n, CLASS_IDS[cell_type], dtype=np.int64)


def load_record(rec: Record) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read one record: image (H, W) uint8, masks (N, H, W) bool, labels (N,) int64, boxes (N, 4) float32."""
    image = read_gray(rec.path)
    if image.shape != (rec.height, rec.width):
        raise CellsegError(
            f"{rec.path}: image is {image.shape[0]}x{image.shape[1]} but its annotations say {rec.height}x{rec.width}"
        )
    if rec.coco is not None:
        crops, labels = rec.coco.crops()
    else:
        crops = rec.instances or []
        labels = _labels_of(rec.cell_type, len(crops))
    return image, stack(crops, rec.height, rec.width), labels, crop_boxes(crops)


class CellDataset(Dataset):
    """Map-style dataset over :class:`Record` objects (see the module docstring for the item layout).

    Args:
        records: the base images (train.csv images of the training folds, or the hold-out fold).
        augment: augmentation policy; None = no augmentation (hold-out / inference-like items).
        extra: extra records (pseudo-labels, COCO), drawn per epoch according to ``extra_ratio``.
        extra_ratio: extra items per epoch as a fraction of ``len(records)`` (None = all extras once;
            ignored when ``records`` is empty).
        seed: seed of the per-epoch extra draw.
    """

    def __init__(
        self,
        records: Sequence[Record],
        augment: AugmentConfig | None = None,
        extra: Sequence[Record] = (),
        extra_ratio: float | None = None,
        seed: int = 0,
    ) -> None:
        self.records = list(records)
        self.extra = list(extra)
        self.augment = augment
        self.extra_ratio = extra_ratio
        self.seed = seed
        self.transform = build_transform(augment) if augment is not None else None
        self._to_float = build_transform(AugmentConfig(enabled=False, min_area=1))
        pool = [r for r in self.records + self.extra if r.instances]
        self._paste_pool: dict[str | None, list[Record]] = {None: pool}
        for t in CELL_TYPES:
            self._paste_pool[t] = [r for r in pool if r.cell_type == t]
        self.set_epoch(0)

    # ---------------------------------------------------------------- epoch / indexing

    def set_epoch(self, epoch: int) -> None:
        """Redraw which extra records this epoch uses (only matters with ``extra_ratio``)."""
        self.epoch = epoch
        n = len(self.extra)
        if self.extra_ratio is None or not self.records or n == 0:
            self._extra_index = np.arange(n)
            return
        want = int(round(self.extra_ratio * len(self.records)))
        rng = np.random.default_rng([self.seed, epoch])
        self._extra_index = rng.choice(n, size=want, replace=want > n) if want else np.zeros(0, dtype=int)

    def __len__(self) -> int:
        return len(self.records) + len(self._extra_index)

    def record(self, index: int) -> Record:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index < len(self.records):
            return self.records[index]
        return self.extra[int(self._extra_index[index - len(self.records)])]

    @property
    def cell_types(self) -> list[str]:
        """Cell type of every item in index order (e.g. for a class-balanced sampler)."""
        return [self.record(i).cell_type for i in range(len(self))]

    # ---------------------------------------------------------------- items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        rec = self.record(index)
        image, masks, labels, boxes = load_record(rec)
        cfg = self.augment
        if cfg is not None and cfg.enabled and cfg.copy_paste_p > 0 and rec.instances is not None:
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
            if rng.random() < cfg.copy_paste_p:
                pasted = self._copy_paste(cfg, rec, image, masks, labels, boxes, rng)
                if pasted is not None:
                    image, masks, labels, boxes = pasted
        return self._finish(rec.image_id, image, masks, labels, boxes)

    def _copy_paste(
        self,
        cfg: AugmentConfig,
        rec: Record,
        image: np.ndarray,
        masks: np.ndarray,
        labels: np.ndarray,
        boxes: np.ndarray,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        """Copy-paste cells of another record of the pool (same cell type when ``cfg`` says so) onto
        ``rec``'s sample: image (H, W) uint8, masks (N, H, W) bool, labels (N,) int64, boxes (N, 4)
        float32 xyxy. Returns the new four arrays (N' instances), or None when no other record has cells."""
        pool = self._paste_pool[rec.cell_type] if cfg.copy_paste_same_type else self._paste_pool[None]
        pool = [r for r in pool if r is not rec] or [r for r in self._paste_pool[None] if r is not rec]
        if not pool:
            return None
        src = pool[int(rng.integers(len(pool)))]
        crops = src.instances or []  # the pool holds records with instances only
        pick = np.sort(rng.choice(len(crops), size=min(len(crops), cfg.copy_paste_max_cells), replace=False))
        src_crops = [crops[i] for i in pick]
        src_image = read_gray(src.path)
        src_masks = stack(src_crops, src.height, src.width)
        image, masks, labels, kept, pasted = copy_paste_indexed(
            image,
            masks,
            labels,
            src_image,
            src_masks,
            _labels_of(src.cell_type, len(src_crops)),
            rng,
            cfg.copy_paste_max_cells,
            min_area=cfg.min_area,
        )
        # covered cells only shrink, so their old boxes still hold them: hints for TightBoxes
        boxes = np.concatenate([boxes[kept], crop_boxes(src_crops)[pasted]]).astype(np.float32)
        return image, masks, labels, boxes

    def _finish(self, image_id, image, masks, labels, boxes) -> tuple[torch.Tensor, dict[str, Any]]:
        h, w = image.shape
        masks = np.ascontiguousarray(masks)
        t_masks = torch.from_numpy(masks.view(np.uint8) if masks.dtype == bool else masks.astype(np.uint8))
        if not image.flags.writeable:  # PIL-backed arrays are read-only
            image = image.copy()
        sample = (
            tv_tensors.Image(torch.from_numpy(image)[None]),
            {
                "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(h, w)),
                "labels": torch.from_numpy(labels),
                "masks": tv_tensors.Mask(t_masks),
                "image_id": image_id,
            },
        )
        img, target = (self.transform or self._to_float)(*sample)
        img = img.as_subclass(torch.Tensor).expand(3, -1, -1).contiguous()
        return img, {
            "boxes": target["boxes"].as_subclass(torch.Tensor).to(torch.float32),
            "labels": target["labels"].to(torch.int64),
            "masks": target["masks"].as_subclass(torch.Tensor),
            "image_id": image_id,
        }


def collate_fn(batch: Sequence[tuple[torch.Tensor, dict]]) -> tuple[tuple[torch.Tensor, ...], tuple[dict, ...]]:
    """Batch for torchvision detection models: (tuple of images, tuple of targets)."""
    return tuple(zip(*batch))


# -------------------------------------------------------------------- building records


def train_records(train_set, images_dir: Path, ids: Iterable[str] | None = None, source: str = "train") -> list[Record]:
    """Records of a :class:`cellseg.data.truth.TrainSet`'s images (``ids`` order; default all)."""
    ids = list(train_set.images) if ids is None else list(ids)
    out = []
    for i in ids:
        if i not in train_set.images:
            raise CellsegError(f"image id {i!r} is not in {train_set.path}")
        a = train_set.images[i]
        out.append(
            Record(i, Path(images_dir) / f"{i}.png", a.cell_type, a.height, a.width, list(a.instances), source=source)
        )
    return out


def repeat_by_type(records: Sequence[Record], factors: dict[str, float]) -> list[Record]:
    """Oversample (or thin) records per cell type: a type with ``n`` records and factor ``f`` gets
    ``round(f * n)`` items, its records taken in order and cycled (f = 2: each twice; f = 1.5: each
    once, the first half twice). Types not in ``factors`` keep factor 1. Deterministic, so it works
    with ``DistributedSampler`` and resumes; the image-level analogue of Detectron2's
    ``RepeatFactorTrainingSampler`` (e.g. ``{shsy5y: 2, astro: 2}`` against a cort-heavy train set).
    """
    unknown = sorted(set(factors) - set(CELL_TYPES))
    if unknown:
        raise CellsegError(
            f"data.type_repeat: unknown cell type {unknown[0]!r}; expected one of {', '.join(CELL_TYPES)}"
        )
    bad = {t: f for t, f in factors.items() if not f > 0}
    if bad:
        t = next(iter(bad))
        raise CellsegError(f"data.type_repeat.{t}: expected a factor > 0, got {bad[t]!r}")
    by_type: dict[str, list[Record]] = {}
    for r in records:
        by_type.setdefault(r.cell_type, []).append(r)
    out: list[Record] = []
    for t, recs in by_type.items():
        want = max(1, int(round(float(factors.get(t, 1.0)) * len(recs))))
        out += [recs[i % len(recs)] for i in range(want)]
    return out


def _find_image(image_id: str, folders: Sequence[Path], what: str) -> Path:
    for folder in folders:
        p = folder / f"{image_id}.png"
        if p.is_file():
            return p
    raise CellsegError(f"{what}: image {image_id}.png not found in {', '.join(str(f) for f in folders)}")


def extra_csv_records(
    path: str | Path, data_dir: str | Path, fill_holes: bool = True, exclude: Iterable[str] = ()
) -> list[Record]:
    """Records of a train.csv-format file (pseudo-labels), leaving out ``exclude`` ids."""
    path, paths = Path(path), CompetitionPaths(Path(data_dir))
    ts = read_train_csv(path, fill_holes=fill_holes)
    skip = set(exclude)
    folders = [paths.semi_dir, paths.train_dir, path.parent]
    out = []
    for i, a in ts.images.items():
        if i in skip:
            continue
        out.append(
            Record(
                i,
                _find_image(i, folders, str(path)),
                a.cell_type,
                a.height,
                a.width,
                list(a.instances),
                source=f"csv:{path.name}",
            )
        )
    return out


def store_records(store: CocoStore, exclude: Iterable[str] = ()) -> list[Record]:
    """One record per image of a :class:`CocoStore` (images with ``exclude`` ids left out)."""
    skip = set(exclude)
    out = []
    for i in range(len(store)):
        image_id = store.image_id(i)
        if image_id in skip:
            continue
        out.append(
            Record(
                image_id,
                store.path(i),
                store.image_class(i),
                int(store.height[i]),
                int(store.width[i]),
                coco=CocoRef(store, i),
                source=f"coco:{store.source.name}",
            )
        )
    return out


def coco_sources(
    data: DataConfig, data_dir: str | Path, class_names: Sequence[str], exclude: Iterable[str] = ()
) -> list[Record]:
    """Records of ``data.coco_json`` and of the LIVECell splits ``data.livecell_splits`` (a DataConfig)."""
    out: list[Record] = []
    for p in data.coco_json:
        store = load_coco(p, data.coco_images_dir or None, data.coco_class_map, class_names, data.coco_cell_type)
        out += store_records(store, exclude)
    if data.livecell:
        for split in data.livecell_splits:
            out += store_records(livecell.load_split(data, data_dir, split, class_names), exclude)
    return out


# -------------------------------------------------------------------- constructors


def build_train_dataset(
    cfg: ExperimentConfig,
    data_dir: str | Path,
    train_ids: Sequence[str],
    *,
    train_set: TrainSet | None = None,
    progress: bool = False,
) -> CellDataset:
    """The augmented training dataset (what :func:`cellseg.training.loop.train` trains on).

    Args:
        cfg: ``data`` (hole filling, ``use_train``, ``extra_csv`` / ``extra_ratio``, ``coco_json`` and
            LIVECell sources with their class map, ``type_repeat``), ``model.class_names`` (labels of
            COCO / LIVECell sources), ``augment``, ``train.seed``.
        data_dir: competition-layout folder with train.csv and train/.
        train_ids: the train.csv images that train (see :func:`cellseg.data.folds.holdout_split`); the
            other train.csv ids are the hold-out and are left out of the extra sources too (no leakage).
        train_set: train.csv already read with ``cfg.data.fill_holes`` (saves reading it again).

    Returns:
        :class:`CellDataset` of the train.csv images (none with ``data.use_train: false``; oversampled
        per cell type by ``data.type_repeat``, :func:`repeat_by_type`) plus the extra sources.
    """
    data = cfg.data
    check_competition_labels(cfg.model.class_names, data.use_train, data.extra_csv)
    paths = CompetitionPaths(Path(data_dir)).require("train_csv", "train_dir")
    ts = train_set if train_set is not None else read_train_csv(paths.train_csv, data.fill_holes, progress=progress)
    hold = set(ts.images) - set(train_ids)
    extra: list[Record] = []
    for p in data.extra_csv:
        extra += extra_csv_records(p, data_dir, fill_holes=data.fill_holes, exclude=hold)
    extra += coco_sources(data, data_dir, cfg.model.class_names, exclude=hold)
    base = train_records(ts, paths.train_dir, train_ids) if data.use_train else []
    if data.type_repeat:
        base = repeat_by_type(base, data.type_repeat)
    return CellDataset(base, cfg.augment, extra, data.extra_ratio, seed=cfg.train.seed)


def check_competition_labels(class_names: Sequence[str], use_train: bool, extra_csv: Sequence[str]) -> None:
    """train.csv-format rows (the competition's, ``--pseudo`` / ``data.extra_csv``) are labelled by
    ``CLASS_IDS`` (shsy5y 1, astro 2, cort 3): a model whose ``class_names`` do not start with those three
    cannot learn them (its head has no such class, or another class at that index).

    Raises:
        CellsegError: one line naming ``model.class_names`` and the way out.
    """
    if (use_train or extra_csv) and list(class_names[: len(CELL_TYPES)]) != list(CELL_TYPES):
        raise CellsegError(
            f"model.class_names {list(class_names)} cannot label train.csv rows ({', '.join(CELL_TYPES)}): "
            "train on them with the competition's classes, or set data.use_train: false and no extra_csv"
        )


def build_datasets(
    cfg: ExperimentConfig,
    data_dir: str | Path,
    fold: int | None = None,
    *,
    progress: bool = False,
) -> tuple[CellDataset, CellDataset | None]:
    """Train and hold-out datasets of a competition-layout folder: the split training makes
    (:func:`cellseg.data.folds.holdout_split` with ``data.folds_csv``, else ``data.folds`` /
    ``data.fold_seed``), then :func:`build_train_dataset`.

    Args:
        cfg: the experiment config (``data``, ``augment``, ``model.class_names``, ``train.seed``).
        fold: hold-out fold, or None = every train.csv image trains and the hold-out is None.

    Returns:
        (augmented training dataset, un-augmented hold-out dataset or None).
    """
    paths = CompetitionPaths(Path(data_dir)).require("train_csv", "train_dir")
    ts = read_train_csv(paths.train_csv, fill_holes=cfg.data.fill_holes, progress=progress)
    data = cfg.data
    train_ids, hold_ids = holdout_split(ts, fold, data.folds, data.fold_seed, data.folds_csv or None)
    train_ds = build_train_dataset(cfg, data_dir, train_ids, train_set=ts)
    val_ds = CellDataset(train_records(ts, paths.train_dir, hold_ids)) if fold is not None else None
    return train_ds, val_ds
