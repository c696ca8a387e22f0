"""COCO instance json (LIVECell) read into flat arrays, decoded one image at a time.

LIVECell's train json holds about a million polygons in several hundred megabytes. ``json.load``
turns it into a few Python objects per vertex (about 5x the file size), and DataLoader workers that
touch those objects copy the pages they live on (copy-on-read through reference counts and the
garbage collector). So :func:`load_coco` never holds the parsed file: it decodes one element of
``images`` / ``annotations`` at a time from a sliding text buffer (:class:`cellseg.data.jsonstream.JsonStream`), appends
its numbers to typed arrays and drops it. What stays is a :class:`CocoStore` of numpy arrays::

    images (I):       paths (fs-encoded bytes), height, width, line (index into ``lines``)
    annotations (A):  label (1-based model class), seg_start (A + 1) -> polygons,
                      rle_index (-1 = polygon annotation)
    polygons (P):     poly_start (P + 1) -> coords, x, y interleaved float32
    RLE (R):          rle_start (R + 1) -> rle_bytes (compressed COCO counts), rle_size (R, 2) h, w
    per image:        ann_start (I + 1) -> order (the annotations of each image, file order)

``annotations`` may be a list (COCO) or an object keyed by id (LIVECell). ``iscrowd`` annotations
are skipped; images without annotations are kept. :meth:`CocoStore.crops` rasterises one image's
polygons on their own boxes (pycocotools, shifted by whole pixels, so the pixels equal a full-frame
rasterisation) into :class:`cellseg.data.masks.CropMask` objects.

Class of an annotation (:func:`resolve_class`): with an explicit ``class_map`` (category name or cell
line -> class name, ``"*"`` = anything else) the category name is looked up first, then the image's
cell line (file-name prefix before the first ``_``); without one, the category name if it is a cell
type, else a cell-type file-name prefix, else ``default_type``.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from cellseg import CELL_TYPES, CLASS_IDS
from cellseg.data.jsonstream import JsonStream
from cellseg.data.masks import CropMask
from cellseg.data.truth import cell_type_from_filename
from cellseg.errors import CellsegError

# ----------------------------------------------------------------------------- classes


def cell_line(file_name: str) -> str:
    """LIVECell cell line of an image: its file name's prefix before the first ``_`` (``SHSY5Y``)."""
    return Path(file_name).name.split("_", 1)[0]


def resolve_class(category: str, file_name: str, class_map: Mapping[str, str], default_type: str) -> str | None:
    """Class name of an annotation (see the module docstring); None when ``class_map`` covers neither."""
    if class_map:
        lower = {k.lower(): v for k, v in class_map.items()}
        for key in (category.lower(), cell_line(file_name).lower(), "*"):
            if key in lower:
                return lower[key]
        return None
    name = category.lower()
    if name in CLASS_IDS:
        return name
    return cell_type_from_filename(file_name) or default_type


# ----------------------------------------------------------------------------- the store


@dataclass
class CocoStore:
    """The annotations of one COCO json as flat arrays (layout in the module docstring)."""

    source: Path
    paths: np.ndarray
    height: np.ndarray
    width: np.ndarray
    line: np.ndarray
    lines: list[str]
    ann_start: np.ndarray
    order: np.ndarray
    label: np.ndarray
    seg_start: np.ndarray
    poly_start: np.ndarray
    coords: np.ndarray
    rle_index: np.ndarray
    rle_start: np.ndarray
    rle_bytes: np.ndarray
    rle_size: np.ndarray
    class_names: tuple[str, ...]
    #: (I,) int8 class of each image: its annotations' most common, else its cell line's (0 = none).
    image_label: np.ndarray
    crowd: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def path(self, i: int) -> Path:
        return Path(os.fsdecode(self.paths[i]))

    def image_id(self, i: int) -> str:
        return self.path(i).stem

    def count(self, i: int) -> int:
        """Number of (non-crowd) annotations of image ``i``."""
        return int(self.ann_start[i + 1] - self.ann_start[i])

    def image_class(self, i: int) -> str:
        """Class name of image ``i`` (see ``image_label``; the first class when it has none)."""
        return self.class_names[max(int(self.image_label[i]), 1) - 1]

    def polygons(self, a: int) -> list[np.ndarray]:
        """Polygons of annotation ``a``: (V, 2) float64 x, y arrays (empty for an RLE annotation)."""
        p0, p1 = self.seg_start[a], self.seg_start[a + 1]
        starts = self.poly_start[p0 : p1 + 1]
        return [self.coords[s:e].astype(np.float64).reshape(-1, 2) for s, e in zip(starts[:-1], starts[1:])]

    def crops(self, i: int) -> tuple[list[CropMask], np.ndarray]:
        """Image ``i``'s instances as tight crops and their (N,) int64 labels; empty masks dropped."""
        h, w = int(self.height[i]), int(self.width[i])
        out, labels = [], []
        for a in self.order[self.ann_start[i] : self.ann_start[i + 1]].tolist():
            r = int(self.rle_index[a])
            if r >= 0:
                s, e = self.rle_start[r], self.rle_start[r + 1]
                rle = {"size": self.rle_size[r].tolist(), "counts": self.rle_bytes[s:e].tobytes()}
                crop = CropMask.from_full(mask_utils.decode(rle).astype(bool))
            else:
                polys = self.polygons(a)
                if not polys:
                    continue
                xy = np.concatenate(polys)
                x0, y0 = (max(int(np.floor(v)) - 1, 0) for v in xy.min(axis=0))
                x1 = min(int(np.ceil(xy[:, 0].max())) + 2, w)
                y1 = min(int(np.ceil(xy[:, 1].max())) + 2, h)
                if x1 <= x0 or y1 <= y0:
                    continue
                shifted = [(p - (x0, y0)).ravel().tolist() for p in polys]
                rles = mask_utils.frPyObjects(shifted, y1 - y0, x1 - x0)
                m = mask_utils.decode(rles[0] if len(rles) == 1 else mask_utils.merge(rles)).astype(bool)
                crop = CropMask(y0, x0, m).tight()
            if crop.mask.any():
                out.append(crop)
                labels.append(int(self.label[a]))
        return out, np.array(labels, dtype=np.int64)


@dataclass
class CocoRef:
    """One image of a :class:`CocoStore` (what a dataset record keeps instead of annotation objects)."""

    store: CocoStore
    index: int

    def __len__(self) -> int:
        return self.store.count(self.index)

    def crops(self) -> tuple[list[CropMask], np.ndarray]:
        return self.store.crops(self.index)


# ----------------------------------------------------------------------------- loading


def _image_index(folder: Path, depth: int = 2) -> dict[str, Path]:
    """Bare file name -> path of the files in ``folder`` and its sub-folders (``depth`` levels)."""
    out: dict[str, Path] = {}
    level = [folder]
    for _ in range(depth + 1):
        nxt = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.is_dir():
                    nxt.append(Path(e.path))
                else:
                    out.setdefault(e.name, Path(e.path))
        level = nxt
    return out


def _need(obj: Any, keys: Sequence[str], where: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise CellsegError(f"{path}: {where} is a {type(obj).__name__}, expected an object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise CellsegError(f"{path}: {where} has no {missing[0]!r}")


@dataclass
class _Parsed:
    """What :func:`load_coco` keeps of a COCO json while streaming it: typed arrays (``array``
    offsets start with 0: element k spans ``end[k]:end[k + 1]``), the categories and counters."""

    img_ids: array = field(default_factory=lambda: array("q"))
    heights: array = field(default_factory=lambda: array("i"))
    widths: array = field(default_factory=lambda: array("i"))
    names: list[str] = field(default_factory=list)
    ann_img: array = field(default_factory=lambda: array("q"))
    ann_cat: array = field(default_factory=lambda: array("q"))
    seg_end: array = field(default_factory=lambda: array("q", [0]))
    poly_end: array = field(default_factory=lambda: array("q", [0]))
    coords: array = field(default_factory=lambda: array("f"))
    rle_index: array = field(default_factory=lambda: array("i"))
    rle_end: array = field(default_factory=lambda: array("q", [0]))
    rle_size: array = field(default_factory=lambda: array("i"))
    rle_buf: bytearray = field(default_factory=bytearray)
    categories: list = field(default_factory=list)
    crowd: int = 0
    seen: set[str] = field(default_factory=set)

    def add_image(self, im: Any, k: int, path: Path) -> None:
        _need(im, ("id", "file_name", "height", "width"), f"images[{k}]", path)
        self.img_ids.append(int(im["id"]))
        self.heights.append(int(im["height"]))
        self.widths.append(int(im["width"]))
        self.names.append(str(im["file_name"]))

    def add_annotation(self, a: Any, k: int, path: Path) -> None:
        if not isinstance(a, dict) or "image_id" not in a or "segmentation" not in a:
            _need(a, ("image_id", "segmentation"), f"annotations[{k}]", path)
        if a.get("iscrowd"):
            self.crowd += 1
            return
        self.ann_img.append(int(a["image_id"]))
        self.ann_cat.append(int(a.get("category_id", 0) or 0))
        seg = a["segmentation"]
        if isinstance(seg, list):
            for poly in seg:
                if len(poly) >= 6:  # < 3 vertices has no area (and pycocotools reads 4 as a box)
                    self.coords.extend(poly[: len(poly) // 2 * 2])
                    self.poly_end.append(len(self.coords))
            self.rle_index.append(-1)
        elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
            self.rle_index.append(len(self.rle_end) - 1)
            self.rle_buf += _compressed(seg, path, k)
            self.rle_end.append(len(self.rle_buf))
            self.rle_size.extend(int(v) for v in seg["size"])
        else:
            raise CellsegError(f"{path}: annotations[{k}].segmentation is neither polygons nor RLE")
        self.seg_end.append(len(self.poly_end) - 1)


def _check_class_map(class_map: Mapping[str, str], class_names: Sequence[str], default_type: str) -> None:
    if not class_map and default_type not in class_names:
        raise CellsegError(f"unknown cell type {default_type!r} (known: {', '.join(class_names)})")
    bad = sorted({v for v in class_map.values() if v not in class_names})
    if bad:
        raise CellsegError(
            f"data.coco_class_map maps to {bad[0]!r}, which is not one of model.class_names ({', '.join(class_names)})"
        )


def _parse_top_level(s: JsonStream, path: Path) -> _Parsed:
    """Stream the top-level object: ``images`` and ``annotations`` one element at a time,
    ``categories`` whole, anything else skipped."""
    out = _Parsed()
    if s.peek() != "{":
        raise CellsegError(f"{path}: not a COCO instances file (expected a JSON object with 'images')")
    s.take("{")
    while s.peek() != "}":
        key = s.value()
        s.take(":")
        out.seen.add(key)
        if key == "images":
            for k, im in enumerate(s.elements()):
                out.add_image(im, k, path)
        elif key == "annotations":
            for k, a in enumerate(s.elements()):
                out.add_annotation(a, k, path)
        elif key == "categories":
            out.categories = s.value()
        else:
            s.value()
        if s.take(",}") == "}":
            break
    else:
        s.take("}")
    if s.peek():
        s.fail("extra data after the top-level object")
    return out


def _parse_file(path: Path) -> _Parsed:
    """:func:`_parse_top_level` of the file at ``path``, every failure a one-line CellsegError."""
    try:
        f = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise CellsegError(f"{path}: COCO json not found") from None
    except OSError as e:
        raise CellsegError(f"{path}: cannot read ({e.strerror})") from None
    try:
        with f:
            parsed = _parse_top_level(JsonStream(f, path), path)
    except UnicodeDecodeError as e:
        raise CellsegError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (TypeError, ValueError) as e:
        raise CellsegError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
    if "images" not in parsed.seen or "annotations" not in parsed.seen:
        raise CellsegError(f"{path}: not a COCO instances file (needs 'images' and 'annotations')")
    return parsed


def load_coco(
    path: str | Path,
    images_dir: str | Path | None = None,
    class_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] = CELL_TYPES,
    default_type: str = "shsy5y",
) -> CocoStore:
    """Read a COCO instance json into a :class:`CocoStore`.

    Args:
        images_dir: where images are: ``file_name`` is looked up beside the json, in ``images_dir``,
            then by bare name in ``images_dir`` and its sub-folders (LIVECell's per-line folders).
        class_map, default_type: classes, see :func:`resolve_class`.
        class_names: the model's classes; label = position + 1.

    Raises:
        CellsegError: file missing, not JSON, not COCO, an image missing, a class not covered.
    """
    path = Path(path)
    class_map = dict(class_map or {})
    _check_class_map(class_map, class_names, default_type)
    parsed = _parse_file(path)
    return _finish(path, parsed, images_dir, _Classes(class_map, tuple(class_names), default_type))


def _compressed(seg: dict, path: Path, k: int) -> bytes:
    """Compressed COCO counts of an RLE segmentation (uncompressed ones are converted)."""
    counts = seg["counts"]
    h, w = (int(v) for v in seg["size"])
    if isinstance(counts, list):
        counts = mask_utils.frPyObjects(seg, h, w)["counts"] if sum(counts) == h * w else b""
    if isinstance(counts, str):
        counts = counts.encode()
    if not isinstance(counts, bytes):
        raise CellsegError(f"{path}: annotations[{k}].segmentation.counts is neither a string nor a list")
    if _rle_total(counts) != h * w:
        raise CellsegError(f"{path}: annotations[{k}].segmentation: RLE counts do not cover its size {h}x{w}")
    return counts


def _rle_total(counts: bytes) -> int:
    """Pixels covered by compressed COCO counts (pycocotools' ``rleFrString``; -1 if malformed)."""
    runs: list[int] = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return -1
            c = counts[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            return -1
        runs.append(x)
    return sum(runs) if runs else -1


def _arr(a: array, dtype: Any) -> np.ndarray:
    return np.frombuffer(a, dtype=a.typecode).astype(dtype) if len(a) else np.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class _Classes:
    """How annotations get their class (see :func:`resolve_class`) and the model's class names."""

    class_map: Mapping[str, str]
    names: tuple[str, ...]
    default_type: str


def _image_of(path: Path, ids: np.ndarray, a_ids: np.ndarray) -> np.ndarray:
    """(A,) index into ``ids`` (unique image ids, file order) of each annotation's ``a_ids`` image."""
    uniq, first = np.unique(ids, return_index=True)
    if len(uniq) != len(ids):
        raise CellsegError(f"{path}: image id {int(ids[np.setdiff1d(np.arange(len(ids)), first)[0]])} appears twice")
    sorter = np.argsort(ids, kind="stable")
    pos = np.searchsorted(ids, a_ids, sorter=sorter) if len(ids) else np.zeros(len(a_ids), dtype=np.int64)
    pos = np.minimum(pos, max(len(ids) - 1, 0))
    image_of = sorter[pos] if len(ids) else pos
    unknown = np.flatnonzero(ids[image_of] != a_ids) if len(ids) else np.arange(len(a_ids))
    if len(unknown):
        raise CellsegError(
            f"{path}: an annotation refers to image_id {int(a_ids[unknown[0]])}, which is not in 'images'"
        )
    return image_of


def _annotation_labels(
    path: Path, p: _Parsed, image_of: np.ndarray, classes: _Classes
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(A,) int8 label of each annotation (one :func:`resolve_class` per (category, cell line) pair
    that occurs), (I,) int16 cell line of each image, and the sorted cell lines."""
    cat_name = {int(c["id"]): str(c.get("name", "")) for c in p.categories if isinstance(c, dict) and "id" in c}
    lines = sorted({cell_line(n) for n in p.names})
    line_of = {n: i for i, n in enumerate(lines)}
    img_line = np.array([line_of[cell_line(n)] for n in p.names], dtype=np.int16)
    cats = _arr(p.ann_cat, np.int64)
    cat_ids, cat_idx = np.unique(cats, return_inverse=True)
    pair = cat_idx.astype(np.int64) * len(lines) + img_line[image_of]
    label = np.zeros(len(cats), dtype=np.int8)
    example: dict[int, str] = {}
    for i, n in enumerate(p.names):
        example.setdefault(int(img_line[i]), n)
    for q in np.unique(pair).tolist():
        cat = cat_name.get(int(cat_ids[q // len(lines)]), "")
        fname = example[q % len(lines)]
        name = resolve_class(cat, fname, classes.class_map, classes.default_type)
        if name is None:
            raise CellsegError(
                f"{path}: no data.coco_class_map entry covers category {cat!r} or cell line "
                f"{cell_line(fname)!r} (e.g. {Path(fname).name}); known: {', '.join(classes.class_map)}"
            )
        if name not in classes.names:
            raise CellsegError(
                f"{path}: class {name!r} (of {Path(fname).name}) is not one of model.class_names "
                f"({', '.join(classes.names)}); map it with data.coco_class_map"
            )
        label[pair == q] = classes.names.index(name) + 1
    return label, img_line, lines


def _image_labels(
    names: list[str], image_of: np.ndarray, label: np.ndarray, counts: np.ndarray, classes: _Classes
) -> np.ndarray:
    """(I,) int8 class of each image: its annotations' most common, else its cell line's (0 = none)."""
    votes = np.zeros((len(names), len(classes.names) + 1), dtype=np.int64)
    np.add.at(votes, (image_of, label), 1)
    image_label = votes.argmax(axis=1).astype(np.int8)
    for i in np.flatnonzero(counts == 0).tolist():
        name = resolve_class("", names[i], classes.class_map, classes.default_type)
        image_label[i] = classes.names.index(name) + 1 if name in classes.names else 0
    return image_label


def _finish(path: Path, p: _Parsed, images_dir: str | Path | None, classes: _Classes) -> CocoStore:
    """The :class:`CocoStore` of a parsed json: annotations tied to their images, classes resolved,
    RLE sizes checked against their images', image files found."""
    image_of = _image_of(path, _arr(p.img_ids, np.int64), _arr(p.ann_img, np.int64))
    label, img_line, lines = _annotation_labels(path, p, image_of, classes)
    names = p.names
    order = np.argsort(image_of, kind="stable")
    counts = np.bincount(image_of, minlength=len(names)) if len(names) else np.zeros(0, dtype=np.int64)
    image_label = _image_labels(names, image_of, label, counts, classes)
    size = _arr(p.rle_size, np.int32).reshape(-1, 2)
    r_idx = _arr(p.rle_index, np.int32)
    h_arr, w_arr = _arr(p.heights, np.int32), _arr(p.widths, np.int32)
    rle_ann = np.flatnonzero(r_idx >= 0)
    bad_size = rle_ann[(size[r_idx[rle_ann]] != np.stack([h_arr, w_arr], 1)[image_of[rle_ann]]).any(axis=1)]
    if len(bad_size):
        raise CellsegError(
            f"{path}: an RLE annotation's size differs from its image's (image {names[image_of[bad_size[0]]]})"
        )
    paths = _resolve_images(path, images_dir, names)
    return CocoStore(
        source=path,
        paths=paths,
        height=h_arr,
        width=w_arr,
        line=img_line,
        lines=lines,
        ann_start=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        order=order.astype(np.int32 if len(order) < 2**31 else np.int64),
        label=label,
        seg_start=_arr(p.seg_end, np.int64),
        poly_start=_arr(p.poly_end, np.int64),
        coords=np.frombuffer(p.coords, dtype=np.float32) if len(p.coords) else np.zeros(0, dtype=np.float32),
        rle_index=r_idx,
        rle_start=_arr(p.rle_end, np.int64),
        rle_bytes=np.frombuffer(bytes(p.rle_buf), dtype=np.uint8),
        rle_size=size,
        class_names=classes.names,
        image_label=image_label,
        crowd=p.crowd,
    )


def _resolve_images(path: Path, images_dir: str | Path | None, names: list[str]) -> np.ndarray:
    folders = [path.parent] + ([Path(images_dir)] if images_dir is not None else [])
    index = _image_index(Path(images_dir)) if images_dir is not None else {}
    out, missing = [], []
    for n in names:
        file = next((f / n for f in folders if (f / n).is_file()), None) or index.get(Path(n).name)
        if file is None:
            missing.append(n)
        else:
            out.append(os.fsencode(file))
    if missing:
        raise CellsegError(
            f"{path}: {len(missing)} of {len(names)} images not found in {', '.join(str(f) for f in folders)} "
            f"or their sub-folders (e.g. {missing[0]})"
        )
    return np.array(out, dtype=bytes) if out else np.zeros(0, dtype="S1")
