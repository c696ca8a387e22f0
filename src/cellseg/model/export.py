"""Turn trained checkpoints into a shippable weights folder (``weights/<name>/``).

``cellseg train`` leaves ``best.pth`` / ``last.pth`` in a run folder (``last.pth`` carries the whole
resume state: optimiser, RNG, history). :func:`export_weights` copies the weights only (float16 by
default: half the size, loaded back as float32), checks that each file rebuilds its model from its
own config, and writes ``manifest.yaml`` with the checksums, each model's provenance (what it was
trained on, :mod:`cellseg.model.provenance`), the TTA views and the per-class thresholds (the
defaults, or those of a template manifest), so the folder is what ``cellseg predict``, ``dry-run``,
``tune`` and the Kaggle bundle read::

    export_weights(["runs/r50/fold0/best.pth", "runs/r50/fold1/best.pth"], "weights/r50")
    # weights/r50/model_0.pth, model_1.pth, manifest.yaml

``adapt_bn`` (``cellseg export --adapt-bn DIR``) recomputes each model's backbone BatchNorm statistics
on unlabelled images first (:mod:`cellseg.model.adapt`) and records them in the model's provenance.

Every argument is checked before anything is written. The folder is built complete beside ``out``
(checkpoints, then the manifest), checked (the manifest loads and every checksum matches) and only
then renamed into place: a failure at any point (a bad argument, a full disk, a kill) leaves an
earlier folder exactly as it was and no half-made one. ``force`` replaces an earlier export (a folder
holding ``manifest.yaml``), keeping the files of it that the new export does not write (e.g. the
``manifest.vN.yaml`` versions ``cellseg tune`` keeps); a folder of other files is never replaced.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cellseg import CELL_TYPES
from cellseg.config.experiment import ExperimentConfig, upgrade_keys
from cellseg.config.loader import check_number, field_range, from_dict
from cellseg.config.manifest import VIEWS, Manifest, ModelEntry, View, default_classes, load_manifest, write_manifest
from cellseg.errors import CellsegError
from cellseg.io import check_replaceable, check_writable, read_gray, replace_dir, staging
from cellseg.model.adapt import adapt_batchnorm, adaptation_record, pick_images
from cellseg.model.build import set_input_scale
from cellseg.model.checkpoint import load_model, save_checkpoint
from cellseg.model.provenance import from_checkpoint
from cellseg.progress import progress


@dataclass
class ExportResult:
    manifest: Path
    #: (file written, source checkpoint, size in bytes) per model, in manifest order.
    files: list[tuple[Path, Path, int]]


def _file_names(n: int) -> list[str]:
    return ["model.pth"] if n == 1 else [f"model_{i}.pth" for i in range(n)]


MARKER = "manifest.yaml"


def check_tta(tta: Sequence[str]) -> list[str]:
    """The views of ``--tta``, or CellsegError: at least one, each known, none twice."""
    views = [v.strip() for v in tta]
    if not views or not all(views):
        raise CellsegError(f"--tta: {','.join(tta)!r} names no view; expected some of {', '.join(VIEWS)}")
    bad = [v for v in views if v not in VIEWS]
    if bad:
        raise CellsegError(f"--tta: unknown view {bad[0]!r}; expected some of {', '.join(VIEWS)}")
    twice = sorted({v for v in views if views.count(v) > 1})
    if twice:
        raise CellsegError(f"--tta: view {twice[0]!r} given twice")
    return views


def _check_arguments(srcs: list[Path], tta: Sequence[str], weights: Sequence[float] | None) -> list[str]:
    if not srcs:
        raise CellsegError("export: give at least one checkpoint")
    for s in srcs:
        if not s.is_file():
            raise CellsegError(f"{s}: checkpoint not found")
    views = check_tta(tta)
    if weights is not None:
        if len(weights) != len(srcs):
            raise CellsegError(f"--model-weights: {len(weights)} value(s) for {len(srcs)} checkpoint(s)")
        bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise CellsegError(f"--model-weights: {bad[0]} is out of range (allowed: > 0, finite)")
    return views


def _check_out(out: Path, force: bool) -> None:
    check_writable(out, "dir")
    if (out / MARKER).exists() and not force:
        raise CellsegError(f"{out / MARKER} exists; use --force to replace it")
    check_replaceable(out, MARKER, "an earlier export (a folder with manifest.yaml)")


def _write_models(
    loaded: list, tmp: Path, half: bool, weights: Sequence[float] | None, input_scale: float | None
) -> tuple[list, list]:
    """Save each loaded checkpoint's weights into ``tmp``: (files, manifest entries)."""
    files, entries = [], []
    for i, ((s, model, info), fname) in enumerate(zip(loaded, _file_names(len(loaded)))):
        cfg = (
            from_dict(ExperimentConfig, upgrade_keys(info.experiment, str(s)), "experiment")
            if info.experiment
            else info.model_config
        )
        provenance = dict(info.provenance, exported_from=str(s.resolve()))
        try:
            dest = save_checkpoint(tmp / fname, model, cfg, info.class_names, provenance, half=half)
        except RuntimeError as e:  # torch's writer reports a full disk as "file write failed"
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CellsegError(f"{tmp.parent}: cannot write {fname} ({first}); nothing was replaced") from None
        files.append((fname, s, dest.stat().st_size))
        entries.append(
            ModelEntry(
                fname,
                weight=1.0 if weights is None else float(weights[i]),
                input_scale=input_scale,
                provenance=from_checkpoint(info.provenance),  # None (unknown) for pre-provenance checkpoints
            )
        )
    return files, entries


def _adapt(loaded: list, folder: Path, files: list[Path]) -> None:
    """Recompute the BatchNorm statistics of every loaded model on the images ``files`` of ``folder``
    (in place) and record it in each checkpoint's provenance (``bn_adapted``)."""
    images = [read_gray(p) for p in files]  # every image is read (and checked) before any model changes
    record = adaptation_record(folder, files)  # one digest of the images for every model
    for s, model, info in loaded:
        bar = progress(total=len(images), desc=f"adapt-bn {s.name}", unit="img", every=25)
        layers = adapt_batchnorm(model, images, on_batch=bar.update)
        bar.close()
        info.provenance["bn_adapted"] = dict(record, layers=layers)


def _keep_extras(out: Path, tmp: Path) -> None:
    """Copy into ``tmp`` the files of the earlier export ``out`` that the new one does not write
    (kept manifest versions, notes), but not its model files."""
    if not out.is_dir():
        return
    old_models = {e.checkpoint for e in load_manifest(out, verify=False).models} if (out / MARKER).is_file() else set()
    for p in out.iterdir():
        if (tmp / p.name).exists() or p.name in old_models or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name, symlinks=True)
        else:
            shutil.copy2(p, tmp / p.name, follow_symlinks=False)


def export_weights(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    name: str | None = None,
    half: bool = True,
    tta: Sequence[str] = ("identity", "hflip"),
    template: str | Path | None = None,
    weights: Sequence[float] | None = None,
    force: bool = False,
    input_scale: float | None = None,
    adapt_bn: str | Path | None = None,
    adapt_images: int = 200,
) -> ExportResult:
    """Write ``out/model*.pth`` + ``out/manifest.yaml`` from our checkpoints (built beside ``out``,
    checked, then swapped in: see the module docstring).

    Args:
        checkpoints: files written by ``cellseg train`` (``best.pth``, ``last.pth``) or ``export``.
        name: manifest name (default: the folder name).
        half: store float16 weights (about half the size of float32; resume state always dropped).
        tta: views for the manifest (subset of identity, hflip, vflip, hvflip; each once).
        template: an existing manifest whose fusion, classes (thresholds) and post-processing are
            kept (e.g. the tuned one of a previous version); default: the public-notebook thresholds.
            Its ranges are checked, so a bad manifest is never copied into a new one.
        weights: ensemble weight per checkpoint (default 1 each; each finite and > 0).
        force: replace an earlier export in ``out`` (a folder holding ``manifest.yaml``).
        input_scale: inference input scale of every model (the manifest's ``models[i].input_scale``);
            None = each predicts at the scale it was trained at. Each model must be a fixed-scale one.
        adapt_bn: a folder of unlabelled PNG images like those the models will predict: the
            backbone's and FPN's BatchNorm statistics of every model are recomputed on them, at
            ``input_scale`` when given (:mod:`cellseg.model.adapt`). None: kept as trained.
        adapt_images: at most this many images of ``adapt_bn`` are used, evenly spaced over its
            sorted file names.

    Returns:
        The manifest path and, per model, (file in ``out``, source checkpoint, size in bytes).
    """
    srcs = [Path(c) for c in checkpoints]
    views = _check_arguments(srcs, tta, weights)
    if input_scale is not None:
        check_number(input_scale, "--input-scale", field_range(ModelEntry, "input_scale"))
    out = Path(out)
    _check_out(out, force)
    # a missing or empty folder is refused before any model loads
    adapt_files = pick_images(adapt_bn, adapt_images) if adapt_bn is not None else []
    base = load_manifest(template, verify=False) if template is not None else Manifest(classes=default_classes())
    loaded = []
    for s in srcs:
        model, info = load_model(s)  # CellsegError when it is not ours or does not match its config
        if list(info.class_names) != list(CELL_TYPES):
            raise CellsegError(f"{s}: classes {info.class_names} differ from the competition's {list(CELL_TYPES)}")
        if input_scale is not None:
            set_input_scale(model, input_scale, str(s))  # a min/max-size model has no factor: refused here
        loaded.append((s, model, info))
    if adapt_bn is not None:
        _adapt(loaded, Path(adapt_bn), adapt_files)
    with staging(out) as tmp:
        files, entries = _write_models(loaded, tmp, half, weights, input_scale)
        m = dataclasses.replace(
            base, name=name or out.resolve().name, models=entries, tta=cast(list[View], views), base_dir=""
        )
        write_manifest(m, tmp / MARKER)
        load_manifest(tmp / MARKER, verify=True)  # the finished folder loads and every checksum matches
        _keep_extras(out, tmp)
        replace_dir(tmp, out, MARKER, "an earlier export (a folder with manifest.yaml)")
    return ExportResult(out / MARKER, [(out / f, s, size) for f, s, size in files])
