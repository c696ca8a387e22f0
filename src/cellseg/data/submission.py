"""submission.csv: write (atomically), read, and validate like the Kaggle scorer.

Format: header ``id,predicted``; one row per predicted instance with its row-major RLE; an image
with no predictions gets one row with an empty ``predicted``.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from cellseg.data.masks import CropMask
from cellseg.data.rle import BatchDecodeError, decode_crop, decode_crops
from cellseg.errors import CellsegError
from cellseg.io import atomic_path, image_size, list_pngs

HEADER = ("id", "predicted")


def normalize_id(raw: str) -> str:
    """The id a submission row stands for: surrounding white space dropped. The writer writes ids this
    way and the reader / validator compare them this way, so what one writes the other finds."""
    return raw.strip()


def id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be a submission id (empty, not valid UTF-8 (a file name of undecodable
    bytes), holding a line break), or None when it can."""
    norm = normalize_id(image_id)
    if not norm:
        return "empty id"
    try:
        norm.encode("utf-8")
    except UnicodeEncodeError:
        return f"{ascii(image_id)} is not valid UTF-8"
    if "\n" in norm or "\r" in norm:
        return f"{ascii(image_id)} holds a line break"
    return None


def write_submission(
    path: str | Path, rows: Mapping[str, Sequence[str]], warn: Callable[[str], None] | None = None
) -> Path:
    """Write ``rows`` (image id -> RLE strings, in order) to ``path`` atomically, UTF-8.

    An id with no RLE gets one row with an empty ``predicted``. Ids are written normalised
    (:func:`normalize_id`); an id that cannot be one (:func:`id_problem`) is skipped with a ``warn``
    line (default: stderr), never a crash. Returns the path.
    """
    path = Path(path)
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(HEADER)
            for image_id, rles in rows.items():
                why = id_problem(image_id)
                if why is not None:
                    warn(f"warning: {path}: skipping a row: {why}")
                    continue
                norm = normalize_id(image_id)
                rles = [r for r in rles if r]
                if not rles:
                    w.writerow((norm, ""))
                for r in rles:
                    w.writerow((norm, r))
    return path


def read_submission(path: str | Path) -> dict[str, list[tuple[int, str]]]:
    """Read a submission: image id -> [(1-based line, rle), ...] (empty rles dropped, ids kept)."""
    path = Path(path)
    if not path.is_file():
        raise CellsegError(f"{path}: file not found" if not path.is_dir() else f"{path}: is a folder, not a CSV file")
    if path.stat().st_size == 0:
        raise CellsegError(f"{path}: empty file (0 bytes); expected a CSV with header 'id,predicted'")
    data = path.read_bytes()
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data[:1], 0, 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CellsegError(
            f"{path}: not a UTF-8 text file ({len(data)} bytes of binary data); expected a CSV with header 'id,predicted'"
        ) from None
    out: dict[str, list[tuple[int, str]]] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != list(HEADER):
            raise CellsegError(f"{path}:1: header must be 'id,predicted', got {','.join(header or [])!r}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise CellsegError(f"{path}:{line}: expected 2 fields, got {len(row)}")
            image_id, rle = normalize_id(row[0]), row[1].strip()
            if not image_id:
                raise CellsegError(f"{path}:{line}: empty id")
            out.setdefault(image_id, [])
            if rle:
                out[image_id].append((line, rle))
    except csv.Error as e:
        raise CellsegError(f"{path}:{reader.line_num}: not a readable CSV ({e})") from None
    return out


def _first_duplicate(items: Sequence[tuple[int, str]]) -> tuple[int, int] | None:
    """(first line, repeating line) of the first RLE that appears twice among ``items``, else None."""
    seen: dict[str, int] = {}
    for line, rle in items:
        if rle in seen:
            return seen[rle], line
        seen[rle] = line
    return None


def decode_submission(path: str | Path, sizes: Mapping[str, tuple[int, int]]) -> dict[str, list[CropMask]]:
    """Decode every RLE of a submission onto crops, with (height, width) per id from ``sizes``.

    Raises CellsegError naming the file and line for a bad RLE or an id missing from ``sizes``.
    """
    path = Path(path)
    out = {}
    for image_id, items in read_submission(path).items():
        if image_id not in sizes:
            line = items[0][0] if items else "?"
            raise CellsegError(f"{path}:{line}: id {image_id!r} is not in the truth")
        h, w = sizes[image_id]
        dup = _first_duplicate(items)
        if dup is not None:
            raise CellsegError(f"{path}:{dup[1]}: duplicates line {dup[0]} (the same mask twice: masks overlap)")
        try:
            crops = decode_crops([rle for _, rle in items], h, w)
        except BatchDecodeError as e:
            raise CellsegError(f"{path}:{items[e.index][0]}: {e}") from None
        out[image_id] = crops
    return out


def validate_submission(path: str | Path, test_dir: str | Path, sample_ids: Iterable[str] = ()) -> list[str]:
    """Check a submission against a test folder the way the scorer would.

    Checks: header, every test id (``*.png`` in any letter case) and every id of ``sample_ids``
    (those of ``sample_submission.csv``) present, no unknown ids, RLE syntax, runs within the image
    (size from the PNG header), no two masks of an image overlapping. An unreadable test PNG is a
    problem only when the submission has masks for it; a ``sample_ids`` id without a PNG may only
    have an empty row. Returns the problems, each prefixed with ``line N:`` where it has one; an
    empty list means valid.
    """
    path, test_dir = Path(path), Path(test_dir)
    if not test_dir.is_dir():
        raise CellsegError(f"{test_dir}: test folder not found")
    problems: list[str] = []
    sizes = {normalize_id(k): v for k, v in list_pngs(test_dir).items()}  # ids as the writer writes them
    expected = set(sizes) | {normalize_id(i) for i in sample_ids}
    try:
        sub = read_submission(path)
    except CellsegError as e:
        return [str(e)]
    for missing in sorted(expected - set(sub)):
        problems.append(f"test id {missing} has no row")
    for image_id, items in sub.items():
        if image_id not in expected:
            problems.append(f"line {items[0][0] if items else '?'}: id {image_id} is not in {test_dir}")
            continue
        if not items:
            continue  # an empty row needs no image size
        if image_id not in sizes:
            problems.append(f"line {items[0][0]}: masks for id {image_id}, which has no PNG in {test_dir}")
            continue
        try:
            h, w = image_size(sizes[image_id])
        except CellsegError as e:
            problems.append(f"line {items[0][0]}: masks for an image whose size cannot be read ({e})")
            continue
        dup = _first_duplicate(items)
        if dup is not None:
            problems.append(f"line {dup[1]}: duplicates line {dup[0]} (the same mask twice: masks overlap)")
            continue
        owner = np.zeros((h, w), dtype=np.int32)  # index+1 into `lines` of the mask owning a pixel
        lines: list[int] = []
        for line, rle in items:
            try:
                crop = decode_crop(rle, h, w)
            except ValueError as e:
                problems.append(f"line {line}: {e}")
                continue
            lines.append(line)
            hh, ww = crop.mask.shape
            view = owner[crop.top : crop.top + hh, crop.left : crop.left + ww]
            hit = view[crop.mask]
            hit = hit[hit > 0]
            if hit.size:
                problems.append(
                    f"line {line}: mask overlaps the mask on line {lines[int(hit[0]) - 1]} "
                    f"({hit.size} pixel(s)); the scorer rejects overlapping masks"
                )
            view[crop.mask & (view == 0)] = len(lines)
    return problems
