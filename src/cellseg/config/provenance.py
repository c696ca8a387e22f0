"""The provenance records: what the weights manifest stores about where each model's weights came
from (:class:`Provenance`), and the marker file ``cellseg synth`` leaves in every dataset folder it
generates. Schemas and their files only; :mod:`cellseg.model.provenance` records and reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

#: marker file ``cellseg synth`` writes into every dataset folder it generates (seed and counts).
SYNTH_MARKER = "cellseg-synth.json"
#: marker ``cellseg import-labels`` writes into its output (source, licence, counts)
IMPORT_MARKER = "cellseg-import.json"
TRAINED: Final = "cellseg train"
DETECTRON2: Final = "detectron2 import"

SourceKind = Literal["train_csv", "pseudo_csv", "coco_json"]


@dataclass
class DataSource:
    """One training source: a train.csv, a pseudo-label CSV or a COCO (LIVECell) json.

    ``images``: images of this source the run trained on (hold-out ids excluded). ``synthetic``: every
    one of its images lies in a folder marked by ``cellseg synth`` (``synth_seed``: the marker's seed).
    ``synthetic_images`` / ``imported_images``: how many of its images come from a ``cellseg synth``
    folder / a ``cellseg import-labels`` folder (symlinks followed: a folder of links merging both
    keeps each image's origin); the rest is competition (or other) data. ``licences``: the licences
    import-labels recorded for those folders, e.g. ``["MIT License"]`` for Usiigaci.
    """

    kind: SourceKind
    path: str
    sha256: str
    images: int
    synthetic: bool = False
    synth_seed: int | None = None
    synthetic_images: int = 0
    imported_images: int = 0
    licences: list[str] = field(default_factory=list)


@dataclass
class FileRef:
    """A file by path and content fingerprint (sha256 None: the file was not at hand when recorded)."""

    path: str
    sha256: str | None = None


@dataclass
class Adaptation:
    """BatchNorm statistics recomputed on unlabelled images (``cellseg export --adapt-bn``): the
    folder, how many of its images, one sha256 over their names and contents, how many layers."""

    path: str
    images: int
    sha256: str
    layers: int


@dataclass
class Provenance:
    """Where one model's weights came from (the ``provenance`` of a manifest entry).

    ``sources``: every data source the weights were trained on, those of an init checkpoint of ours
    included (fine-tuning chains). ``init``: the starting weights of the last run. ``imported``: the
    original file of a Detectron2 conversion (``origin`` "detectron2 import"), kept through fine-tuning.
    ``adapted``: the images the backbone's BatchNorm statistics were recomputed on after training
    (None: they are the training data's).
    """

    origin: Literal["cellseg train", "detectron2 import"] = TRAINED
    sources: list[DataSource] = field(default_factory=list)
    init: FileRef | None = None
    imported: FileRef | None = None
    fold: int | None = None
    epoch: int | None = None
    git_commit: str | None = None
    note: str = ""
    adapted: Adaptation | None = None


def read_marker(folder: str | Path, name: str) -> dict | None:
    """The JSON marker file ``name`` of ``folder`` (``{}`` when unreadable), or None if there is none."""
    p = Path(folder) / name
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_synth_marker(folder: str | Path, info: dict[str, Any]) -> Path:
    """Write the marker (``{"generator": "cellseg synth", **info}``) into ``folder``; returns its path."""
    p = Path(folder) / SYNTH_MARKER
    p.write_text(json.dumps({"generator": "cellseg synth", **info}, indent=2) + "\n")
    return p


__all__ = [
    "DETECTRON2",
    "IMPORT_MARKER",
    "SYNTH_MARKER",
    "TRAINED",
    "DataSource",
    "FileRef",
    "Provenance",
    "SourceKind",
    "read_marker",
    "write_synth_marker",
]
