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

The manifest is written last, after every checkpoint is in place, so a killed export never leaves a
manifest pointing at missing or half-written files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cellseg import CELL_TYPES
from cellseg.config.experiment import ExperimentConfig, upgrade_keys
from cellseg.config.loader import from_dict
from cellseg.config.manifest import VIEWS, Manifest, ModelEntry, View, default_classes, load_manifest, write_manifest
from cellseg.errors import CellsegError
from cellseg.model.checkpoint import load_model, save_checkpoint
from cellseg.model.provenance import from_checkpoint


@dataclass
class ExportResult:
    manifest: Path
    #: (file written, source checkpoint, size in bytes) per model, in manifest order.
    files: list[tuple[Path, Path, int]]


def _file_names(n: int) -> list[str]:
    return ["model.pth"] if n == 1 else [f"model_{i}.pth" for i in range(n)]


def export_weights(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    name: str | None = None,
    half: bool = True,
    tta: Sequence[str] = ("identity", "hflip"),
    template: str | Path | None = None,
    weights: Sequence[float] | None = None,
    force: bool = False,
) -> ExportResult:
    """Write ``out/model*.pth`` + ``out/manifest.yaml`` from our checkpoints.

    Args:
        checkpoints: files written by ``cellseg train`` (``best.pth``, ``last.pth``) or ``export``.
        name: manifest name (default: the folder name).
        half: store float16 weights (about half the size of float32; resume state always dropped).
        tta: views for the manifest (subset of identity, hflip, vflip, hvflip).
        template: an existing manifest whose fusion, classes (thresholds) and post-processing are
            kept (e.g. the tuned one of a previous version); default: the public-notebook thresholds.
        weights: ensemble weight per checkpoint (default 1 each).
        force: replace an existing ``out/manifest.yaml`` (and the model files it would reuse).
    """
    srcs = [Path(c) for c in checkpoints]
    if not srcs:
        raise CellsegError("export: give at least one checkpoint")
    for s in srcs:
        if not s.is_file():
            raise CellsegError(f"{s}: checkpoint not found")
    bad = [v for v in tta if v not in VIEWS]
    if bad:
        raise CellsegError(f"--tta: unknown view {bad[0]!r}; expected some of {', '.join(VIEWS)}")
    if weights is not None and len(weights) != len(srcs):
        raise CellsegError(f"--model-weights: {len(weights)} value(s) for {len(srcs)} checkpoint(s)")
    out = Path(out)
    manifest_path = out / "manifest.yaml"
    if manifest_path.exists() and not force:
        raise CellsegError(f"{manifest_path} exists; use --force to replace it")
    base = load_manifest(template, verify=False) if template is not None else Manifest(classes=default_classes())

    loaded = []
    for s in srcs:
        model, info = load_model(s)  # CellsegError when it is not ours or does not match its config
        if list(info.class_names) != list(CELL_TYPES):
            raise CellsegError(f"{s}: classes {info.class_names} differ from the competition's {list(CELL_TYPES)}")
        loaded.append((s, model, info))

    out.mkdir(parents=True, exist_ok=True)
    files, entries = [], []
    for i, ((s, model, info), fname) in enumerate(zip(loaded, _file_names(len(srcs)))):
        cfg = (
            from_dict(ExperimentConfig, upgrade_keys(info.experiment, str(s)), "experiment")
            if info.experiment
            else info.model_config
        )
        provenance = dict(info.provenance, exported_from=str(s.resolve()))
        dest = save_checkpoint(out / fname, model, cfg, info.class_names, provenance, half=half)
        files.append((dest, s, dest.stat().st_size))
        entries.append(
            ModelEntry(
                fname,
                weight=1.0 if weights is None else float(weights[i]),
                provenance=from_checkpoint(info.provenance),  # None (unknown) for pre-provenance checkpoints
            )
        )
    m = dataclasses.replace(
        base, name=name or out.resolve().name, models=entries, tta=cast(list[View], list(tta)), base_dir=""
    )
    write_manifest(m, manifest_path)
    return ExportResult(manifest_path, files)
