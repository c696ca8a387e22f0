"""LIVECell, Sartorius' phase-contrast dataset: its folder layout, training splits and a validation
scored with the competition metric per cell line (stage 1 of the two-stage recipe in docs/TRAINING.md).

The competition's data folder ships it as ``LIVECell_dataset_2021/``::

    annotations/LIVECell/livecell_coco_{train,val,test}.json    COCO, bare file names
    images/livecell_train_val_images/<LINE>/<file>.tif           train and val images
    images/livecell_test_images/<LINE>/<file>.tif                test images

8 cell lines (:data:`LINES`); a file name starts with its line (``SHSY5Y_Phase_A10_1_00d04h00m_1.tif``).
``data.livecell`` names the root: relative to ``--data`` first (so ``LIVECell_dataset_2021`` finds it
inside the competition folder), then to the working directory, or absolute. The annotations are read
by :func:`cellseg.data.coco.load_coco` into flat arrays; classes come from ``data.coco_class_map``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cellseg.data.coco import CocoStore, load_coco
from cellseg.data.truth import ImageAnnotation
from cellseg.errors import CellsegError

LIVECELL_DIR = "LIVECell_dataset_2021"
SPLITS = ("train", "val", "test")
#: the 8 cell lines, as their file names and image folders spell them.
LINES = ("A172", "BT474", "BV2", "Huh7", "MCF7", "SHSY5Y", "SkBr3", "SKOV3")


@dataclass(frozen=True)
class LivecellLayout:
    """The files of a ``LIVECell_dataset_2021`` folder."""

    root: Path

    def annotations(self, split: str) -> Path:
        if split not in SPLITS:
            raise CellsegError(f"LIVECell split {split!r}: expected one of {', '.join(SPLITS)}")
        return self.root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json"

    def images(self, split: str) -> Path:
        folder = "livecell_test_images" if split == "test" else "livecell_train_val_images"
        return self.root / "images" / folder


def find_livecell(spec: str | Path, data_dir: str | Path) -> LivecellLayout:
    """The LIVECell root named by ``data.livecell`` (see the module docstring).

    A folder that holds ``LIVECell_dataset_2021/`` (a download's parent) is accepted too.
    """
    spec = Path(spec)
    cands = [spec] if spec.is_absolute() else [Path(data_dir) / spec, spec]
    for c in cands:
        for root in (c, c / LIVECELL_DIR):
            if (root / "annotations" / "LIVECell").is_dir():
                return LivecellLayout(root)
    raise CellsegError(
        f"data.livecell={spec}: no LIVECell layout (annotations/LIVECell/) in {' or '.join(str(c) for c in cands)}; "
        "give the path of LIVECell_dataset_2021 (data.livecell=/path/to/LIVECell_dataset_2021)"
    )


def load_split(data, data_dir: str | Path, split: str, class_names: Sequence[str]) -> CocoStore:
    """One LIVECell split of ``data`` (a :class:`cellseg.config.experiment.DataConfig`) as a CocoStore."""
    layout = find_livecell(data.livecell, data_dir)
    json_path = layout.annotations(split)
    if not json_path.is_file():
        raise CellsegError(f"{json_path}: LIVECell {split} annotations not found")
    return load_coco(json_path, layout.images(split), data.coco_class_map, class_names, data.coco_cell_type)


# ----------------------------------------------------------------------------- validation


class LazyTruth(Mapping):
    """image id -> :class:`ImageAnnotation` (``cell_type`` = the cell line), decoded on access."""

    def __init__(self, store: CocoStore, indices: Sequence[int]) -> None:
        self.store = store
        self.index = {store.image_id(i): i for i in indices}

    def __getitem__(self, image_id: str) -> ImageAnnotation:
        i = self.index[image_id]
        crops, _ = self.store.crops(i)
        line = self.store.lines[int(self.store.line[i])]
        return ImageAnnotation(image_id, line, int(self.store.height[i]), int(self.store.width[i]), crops)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def round_robin(groups: np.ndarray, n: int) -> list[int]:
    """Up to ``n`` indices taken in turn from each group (each group in index order)."""
    queues = [list(np.flatnonzero(groups == g)) for g in np.unique(groups)]
    out: list[int] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(int(q.pop(0)))
    return out


@dataclass
class LivecellValidation:
    """A LIVECell split as the training hold-out: competition metric per image, mean per cell line
    (scored by :func:`cellseg.training.engine.evaluate_livecell`)."""

    store: CocoStore
    indices: list[int]

    @property
    def truth(self) -> LazyTruth:
        return LazyTruth(self.store, self.indices)

    @property
    def groups(self) -> list[str]:
        """The cell lines scored (the report's ``per_class`` keys)."""
        return sorted({self.store.lines[int(self.store.line[i])] for i in self.indices})

    @property
    def paths(self) -> dict[str, Path]:
        """image id -> its image file."""
        return {self.store.image_id(i): self.store.path(i) for i in self.indices}


def validation_set(cfg, data_dir: str | Path) -> LivecellValidation | None:
    """The LIVECell split named by ``cfg.data.livecell_val`` (None when empty), at most
    ``cfg.train.val_max_images`` images taken in turn from each cell line."""
    data = cfg.data
    if not data.livecell_val:
        return None
    if not data.livecell:
        raise CellsegError("data.livecell_val needs data.livecell (the LIVECell_dataset_2021 folder)")
    store = load_split(data, data_dir, data.livecell_val, cfg.model.class_names)
    n = cfg.train.val_max_images or len(store)
    return LivecellValidation(store, round_robin(store.line, n))
