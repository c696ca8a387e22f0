"""What a model was trained on: one record per checkpoint, carried into the weights manifest, a
one-line summary per ensemble and the "synthetic data only" verdict ``tools/push.py`` refuses to submit.

Every piece of provenance logic lives here; the sites only call it:

* ``cellseg synth`` writes :data:`cellseg.config.provenance.SYNTH_MARKER` into the folder it generates;
* ``cellseg train`` stores :func:`training_sources` (path, sha256, image count and whether the
  images came from ``cellseg synth``, per source) and the init weights' sha256 in every checkpoint's
  ``provenance`` dict (keys ``data_sources``, ``init_sha256``);
* ``cellseg export`` / ``convert-detectron2`` turn that dict into a :class:`Provenance` with
  :func:`from_checkpoint` and write it on the model's manifest entry;
* ``cellseg bundle`` and ``tools/push.py`` print :func:`plan_lines`; ``predict`` / ``dry-run`` log
  :func:`summarize`; ``tools/push.py submit``/``all`` refuse when :func:`synthetic_only` holds.

A manifest entry without provenance (written before this existed) is "provenance unknown": it loads
as before and never triggers the refusal. Example summary::

    3 models: real train.csv (606 images) + pseudo-labels (1,972)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from cellseg.config.loader import from_dict, to_dict
from cellseg.config.provenance import (
    DETECTRON2,
    IMPORT_MARKER,
    SYNTH_MARKER,
    TRAINED,
    Adaptation,
    DataSource,
    FileRef,
    Provenance,
    SourceKind,
    read_marker,
)
from cellseg.errors import CellsegError
from cellseg.io import sha256_file

UNKNOWN = "provenance unknown"
_LABELS = {"train_csv": "train.csv", "pseudo_csv": "pseudo-labels", "coco_json": "COCO json"}


# ----------------------------------------------------------------------------------- recording


_Markers = tuple[dict | None, dict | None]


def _image_markers(image: Path, cache: dict[Path, _Markers]) -> _Markers:
    """``(synth marker, import marker)`` of the dataset an image belongs to (None: not found).

    Each is looked up in the image's folder (``<csv dir>/x.png``), then the folder above
    (``<data>/train/x.png``), then the same two for the file a symlink points to, so a merged folder
    of links keeps each image's origin. ``cache`` holds every folder's two markers, read once."""
    places = [image.parent, image.parent.parent]
    if image.is_symlink():
        real = image.resolve()
        places += [real.parent, real.parent.parent]
    found: list[dict | None] = [None, None]
    for folder in places:
        if folder not in cache:
            cache[folder] = (read_marker(folder, SYNTH_MARKER), read_marker(folder, IMPORT_MARKER))
        found = [f if f is not None else m for f, m in zip(found, cache[folder])]
        if all(f is not None for f in found):
            break
    return found[0], found[1]


def _source(kind: SourceKind, path: Path, images: Sequence[Path], cache: dict) -> DataSource:
    unique = sorted({str(p) for p in images})
    markers, imports = zip(*(_image_markers(Path(p), cache) for p in unique)) if unique else ((), ())
    synthetic = bool(markers) and all(m is not None for m in markers)
    first = markers[0] if markers else None
    seed = first.get("seed") if synthetic and first is not None else None
    return DataSource(
        kind,
        str(path.resolve()),
        sha256_file(path),
        len(unique),
        synthetic,
        seed if isinstance(seed, int) else None,
        synthetic_images=sum(m is not None for m in markers),
        imported_images=sum(m is not None for m in imports),
        licences=sorted({str(m["licence"]) for m in imports if m and m.get("licence")}),
    )


def _not_competition(s: DataSource) -> bool:
    """Every image of the source is synthetic or imported (``cellseg import-labels``: other cells)."""
    return s.synthetic or (s.images > 0 and s.synthetic_images + s.imported_images >= s.images)


def _origin_label(s: DataSource) -> str:
    """``synthetic``, ``imported``, ``synthetic + imported`` or ``real`` (a train.csv with other images)."""
    if s.synthetic:
        return "synthetic"
    if _not_competition(s):
        return "imported" if s.imported_images >= s.images else "synthetic + imported"
    return "real"


def training_sources(cfg: Any, train_csv: Path, base: Iterable[Any], extra: Iterable[Any]) -> list[DataSource]:
    """The data sources of one training run, from the records the run's dataset holds.

    Args:
        cfg: the ExperimentConfig (``cfg.data.extra_csv`` / ``coco_json`` name the extra files).
        train_csv: the run's train.csv.
        base, extra: :class:`cellseg.data.dataset.Record` objects of train.csv and of the extra files
            (``CellDataset.records`` / ``.extra``); an extra record names its file by ``source``
            (``csv:<name>`` / ``coco:<name>``), so two extra files of the same name share their count.
    Returns:
        One :class:`DataSource` per file (train.csv first), images counted once each.
    """
    cache: dict[Path, _Markers] = {}
    extra = list(extra)
    out = [_source("train_csv", Path(train_csv), [r.path for r in base], cache)]
    extras: list[tuple[SourceKind, str, list[str]]] = [
        ("pseudo_csv", "csv", cfg.data.extra_csv),
        ("coco_json", "coco", cfg.data.coco_json),
    ]
    for kind, prefix, files in extras:
        for f in files:
            label = f"{prefix}:{Path(f).name}"
            out.append(_source(kind, Path(f), [r.path for r in extra if r.source == label], cache))
    return out


def init_record(init: str | Path | None) -> tuple[str | None, dict]:
    """(sha256 of the init weights or None, the init's own provenance dict when it is a cellseg
    checkpoint, else {}) for a training run's ``init``."""
    if not init or not Path(init).is_file():
        return None, {}
    # lazy: torch-heavy, and tools/push.py reads provenance without torch
    from cellseg.model.checkpoint import read_checkpoint_info

    try:
        inherited = read_checkpoint_info(init).provenance
    except CellsegError:  # torchvision / ImageNet weights: no provenance of ours
        inherited = {}
    return sha256_file(init), inherited


def run_provenance(sources: list[DataSource], init_sha256: str | None, inherited: dict) -> dict:
    """The checkpoint ``provenance`` keys of a training run: ``origin``, ``data_sources`` (this run's
    sources plus those an init checkpoint of ours was trained on), ``init_sha256`` and ``imported``
    (a Detectron2 import the init descends from)."""
    parent = from_checkpoint(inherited) if inherited else None
    merged = _merge(sources + (parent.sources if parent else []))
    out: dict[str, Any] = {
        "origin": TRAINED,
        "data_sources": [to_dict(s) for s in merged],
        "init_sha256": init_sha256,
    }
    if parent is not None and parent.imported is not None:
        out["imported"] = to_dict(parent.imported)
    return out


def _merge(sources: Iterable[DataSource]) -> list[DataSource]:
    """One source per (kind, sha256, synthetic), keeping the largest image count, first-seen order."""
    seen: dict[tuple[str, str, bool], DataSource] = {}
    for s in sources:
        key = (s.kind, s.sha256, s.synthetic)
        if key not in seen:
            seen[key] = s
        elif s.images > seen[key].images:
            seen[key] = dataclasses.replace(seen[key], images=s.images)
    return list(seen.values())


def from_checkpoint(prov: dict | None) -> Provenance | None:
    """The :class:`Provenance` of a checkpoint's ``provenance`` dict; None when it records no
    training data (checkpoints written before provenance existed)."""
    prov = dict(prov or {})
    common: dict[str, Any] = {
        "fold": prov.get("fold"),
        "epoch": prov.get("epoch"),
        "git_commit": prov.get("git_commit"),
    }
    adapted = from_dict(Adaptation, prov["bn_adapted"], "bn_adapted") if prov.get("bn_adapted") else None
    if prov.get("source") == "detectron2" or prov.get("origin") == DETECTRON2:
        return Provenance(
            origin=DETECTRON2,
            imported=FileRef(str(prov.get("detectron2_weights", "")), prov.get("detectron2_weights_sha256")),
            git_commit=prov.get("git_commit"),
            adapted=adapted,
        )
    if "data_sources" not in prov:
        return None
    init = FileRef(str(prov["init"]), prov.get("init_sha256")) if prov.get("init") else None
    return Provenance(
        origin=TRAINED,
        sources=[from_dict(DataSource, s, "data_sources") for s in prov["data_sources"]],
        init=init,
        imported=from_dict(FileRef, prov["imported"], "imported") if prov.get("imported") else None,
        adapted=adapted,
        **common,
    )


# ----------------------------------------------------------------------------------- reading


def _records(models: Any) -> list[Provenance | None]:
    """Per-model provenance of a Manifest (or its ``models`` list, or a list of records)."""
    items = getattr(models, "models", models)
    return [getattr(m, "provenance", m) if not isinstance(m, Provenance) else m for m in items]


def _count(n: int, kind: str) -> str:
    return (f"{n:,} image" + ("s" if n != 1 else "")) if kind == "train_csv" else f"{n:,}"


def _every_source(models: Any, test: Callable[[DataSource], bool]) -> bool:
    """True when every model was trained by us (recorded sources, no Detectron2 import) and ``test``
    holds for each of its sources; unknown provenance makes it False."""
    recs = _records(models)
    return bool(recs) and all(
        p is not None and p.origin == TRAINED and p.imported is None and p.sources and all(map(test, p.sources))
        for p in recs
    )


def synthetic_only(models: Any) -> bool:
    """True when every model of the ensemble was trained on ``cellseg synth`` data only. Models of
    unknown provenance, Detectron2 imports and models without recorded sources make it False."""
    return _every_source(models, lambda s: s.synthetic)


def summarize(models: Any) -> str:
    """The ensemble's provenance in one line, e.g. ``3 models: real train.csv (606 images) +
    pseudo-labels (1,972)``; a source shared by several models (same sha256) is counted once."""
    recs = _records(models)
    n = len(recs)
    groups: dict[tuple[str, str], dict[str, int]] = {}
    imports: dict[str, FileRef] = {}
    unknown = 0
    for p in recs:
        if p is None:
            unknown += 1
            continue
        for s in p.sources:
            label = _origin_label(s)
            prefix = "" if label == "real" and s.kind != "train_csv" else f"{label} "
            g = groups.setdefault((s.kind, prefix), {})
            g[s.sha256] = max(g.get(s.sha256, 0), s.images)
        if p.imported is not None:
            imports[p.imported.sha256 or p.imported.path] = p.imported
    parts = []
    for (kind, prefix), files in groups.items():
        parts.append(f"{prefix}{_LABELS[kind]} ({_count(sum(files.values()), kind)})")
    for ref in imports.values():
        parts.append(f"{DETECTRON2} (sha256 {(ref.sha256 or '?')[:12]})")
    if unknown:
        parts.append(UNKNOWN if unknown == n else f"{UNKNOWN} ({unknown} of {n})")
    if not parts:
        parts.append("no training data recorded")
    return f"{n} model{'s' if n != 1 else ''}: " + " + ".join(parts)


def describe(p: Provenance | None) -> str:
    """One model's provenance in one line (for the bundle / push plans)."""
    if p is None:
        return UNKNOWN
    adapted = (
        f"; BatchNorm statistics from {p.adapted.images:,} unlabelled images in {p.adapted.path} "
        f"(sha256 {p.adapted.sha256[:12]})"
        if p.adapted is not None
        else ""
    )
    if p.origin == DETECTRON2 and p.imported is not None:
        return f"{DETECTRON2} of {p.imported.path} (sha256 {p.imported.sha256 or '?'}){adapted}"
    srcs = []
    for s in p.sources:
        what = "synthetic (cellseg synth" + (f" seed {s.synth_seed}" if s.synth_seed is not None else "") + ")"
        mix = [f"{n:,} {k}" for n, k in ((s.synthetic_images, "synthetic"), (s.imported_images, "imported")) if n]
        origin = what if s.synthetic else "not synthetic" + (f": {' + '.join(mix)}" if mix else "")
        licence = f", licence {' + '.join(s.licences)}" if s.licences else ""
        srcs.append(
            f"{_LABELS[s.kind]} {s.path} ({_count(s.images, s.kind)}, sha256 {s.sha256[:12]}, {origin}{licence})"
        )
    bits = [f"{TRAINED}" + (f" fold {p.fold}" if p.fold is not None else "") + (f" epoch {p.epoch}" if p.epoch else "")]
    bits.append("; ".join(srcs) if srcs else "no training data recorded")
    if p.init is not None:
        bits.append(f"init {p.init.path} (sha256 {(p.init.sha256 or '?')[:12]})")
    if p.imported is not None:
        bits.append(f"from {DETECTRON2} {p.imported.path} (sha256 {(p.imported.sha256 or '?')[:12]})")
    return ": ".join(bits[:2]) + "".join(f"; {b}" for b in bits[2:]) + adapted


def no_competition_data(models: Any) -> bool:
    """True when every model was trained only on ``cellseg synth`` output and ``cellseg
    import-labels`` data (other cells, another microscope: the demo weights), so a leaderboard
    submission would score near 0. Unknown provenance and Detectron2 imports make it False."""
    return _every_source(models, _not_competition)


def verdict(models: Any) -> str:
    """What the provenance means for a leaderboard submission, in one line."""
    recs = _records(models)
    if synthetic_only(recs):
        return "synthetic data only: every model was trained on `cellseg synth` output (near 0 on the leaderboard)"
    if no_competition_data(recs):
        return (
            "no competition data: every model was trained on `cellseg synth` output and `cellseg import-labels` "
            "data only (other cells, another microscope; near 0 on the leaderboard)"
        )
    unknown = sum(p is None for p in recs)
    if unknown:
        return f"{UNKNOWN} for {unknown} of {len(recs)} model(s): the synthetic-data check does not apply"
    return "trained on data that is not (only) synthetic"


def plan_lines(manifest: Any) -> list[str]:
    """Plan text: one line per model (``<checkpoint>: <provenance>``), the summary and the verdict."""
    lines = [f"  {e.checkpoint}: {describe(e.provenance)}" for e in manifest.models]
    lines.append(f"  ensemble: {summarize(manifest)}")
    lines.append(f"  verdict: {verdict(manifest)}")
    return lines


__all__ = [
    "describe",
    "from_checkpoint",
    "no_competition_data",
    "init_record",
    "plan_lines",
    "run_provenance",
    "summarize",
    "synthetic_only",
    "training_sources",
    "verdict",
]
