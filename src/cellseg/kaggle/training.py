"""Training on Kaggle: the training bundle ``tools/push.py train`` uploads, and the checks on the
output ``tools/push.py fetch`` brings back.

Training bundle (a dataset of its own, ``{username}/sartorius-cellseg-train-bundle``, from the
template ``dataset-train-metadata.json``)::

    <out>/cellseg-bundle.json      marker, "kind": "train" (the inference bundle's marker has no kind)
    <out>/dataset-metadata.json    filled template (read by the client, not uploaded as a file)
    <out>/<config>.yaml            the experiment config, as in configs/
    <out>/<init>.pth               optional starting weights (--init)
    <out>/wheels/sartorius_cellseg-<version>-py3-none-any.whl

The marker records what ``kernel/train.py`` runs: ``config``, ``config_name``, ``overrides``
(``KEY=VALUE``, ``train.time_limit`` included), ``init``, ``folds`` (strings: "0".."K-1", or "full"
for every image without validation) and ``bundle_id``, a digest of all of it: each pushed kernel
carries the id it was pushed with and refuses a bundle version staged for another push.

Output of a training kernel (``/kaggle/working``)::

    run/last.pth, run/best.pth, run/metrics.csv, run/curves.png, run/config.yaml
    cellseg-train-output.json      written last: fold, status (complete / stopped / failed), epochs,
                                   best score, and every run/ file with its size and sha256

A fetched output counts as complete only when that file is there and every file it lists has its
recorded size and sha256 (:func:`verify_output`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cellseg.config.manifest import sha256_file
from cellseg.errors import CellsegError
from cellseg.io import check_replaceable, staging
from cellseg.kaggle.bundle import (
    MARKER,
    PACKAGE,
    Bundle,
    BundleFile,
    _hash,
    _wheel_version,
    build_wheel,
    copy_hashed,
    denied,
    seal,
)
from cellseg.kaggle.metadata import (
    DATASET_METADATA,
    _ref_problems,
    check,
    fill,
    load_template,
    resolve_username,
    validate_dataset_metadata,
    validate_kernel_metadata,
)
from cellseg.paths import git_commit, repo_root

#: Templates of the training dataset and kernel at the repository root.
TRAIN_DATASET_METADATA = "dataset-train-metadata.json"
TRAIN_KERNEL_METADATA = "kernel-train-metadata.json"
#: Written last by kernel/train.py into /kaggle/working (the same name is in kernel/kaggle_env.py).
OUTPUT_MARKER = "cellseg-train-output.json"
#: Where kernel/train.py puts the run folder, relative to /kaggle/working.
RUN_DIR = "run"


def fold_suffix(fold: str) -> str:
    """Kernel slug suffix of a fold: ``-fold3``, or ``-full`` for training on every image."""
    return "-full" if fold == "full" else f"-fold{fold}"


def parse_folds(spec: str, n_folds: int) -> list[str]:
    """``--fold`` of push.py train: ``K``, ``K,L,...``, ``all`` (every fold 0..n_folds-1, one kernel
    each) or ``full`` (one kernel on every image, no validation). Returns fold strings."""
    spec = str(spec).strip().lower()
    if spec == "all":
        return [str(k) for k in range(n_folds)]
    if spec == "full":
        return ["full"]
    out = []
    for part in spec.split(","):
        try:
            k = int(part)
        except ValueError:
            raise CellsegError(f"--fold {spec!r}: expected K, K,L,..., all or full") from None
        if not 0 <= k < n_folds:
            raise CellsegError(f"--fold {k} out of range 0..{n_folds - 1} (data.folds={n_folds})")
        if str(k) not in out:
            out.append(str(k))
    return out


def bundle_digest(
    files: list[BundleFile], config_name: str, overrides: list[str], init: str | None, folds: list[str]
) -> str:
    """16 hex digits identifying what a training kernel will run (files, overrides, init, folds)."""
    payload = {
        "files": sorted((f.path, f.sha256) for f in files),
        "config_name": config_name,
        "overrides": list(overrides),
        "init": init,
        "folds": list(folds),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def stage_train_bundle(
    config: str | Path,
    out: str | Path,
    folds: list[str],
    overrides: list[str] | None = None,
    init: str | Path | None = None,
    username: str | None = None,
    repo: str | Path | None = None,
) -> Bundle:
    """Stage the training bundle into ``out`` (atomically; an existing ``out`` must be an earlier bundle).

    Args:
        config: the experiment YAML (``configs/*.yaml``); copied as it is, ``overrides`` go in the marker.
        out: the bundle folder to create or replace.
        folds: fold strings the kernels may train ("0".., "full"), see :func:`parse_folds`.
        overrides: ``KEY=VALUE`` config overrides recorded in the marker.
        init: starting weights shipped with the bundle (None: none).
        username: Kaggle owner of the dataset (else KAGGLE_USERNAME / kaggle.json).
        repo: checkout the wheel and the template come from (default: this package's).
    Returns:
        The :class:`~cellseg.kaggle.bundle.Bundle` (files with size and sha256; ``marker`` as written).
    """
    repo = Path(repo) if repo is not None else repo_root()
    if repo is None:
        raise CellsegError("cellseg runs from an installed wheel: pass the source checkout with --repo")
    repo, out, config = repo.resolve(), Path(out).resolve(), Path(config)
    check_replaceable(out, MARKER, "a bundle")  # before the copies and the wheel build, as stage_bundle
    overrides = list(overrides or [])
    meta = fill(load_template(repo / TRAIN_DATASET_METADATA), resolve_username(username))
    check(validate_dataset_metadata(meta))
    if not config.is_file():
        raise CellsegError(f"--config {config}: file not found")
    shipped = [config] + ([Path(init)] if init else [])
    if init and not Path(init).is_file():
        raise CellsegError(f"--init {init}: file not found")
    names = [p.name for p in shipped]
    for n in names:
        if denied(n) or n in (MARKER, DATASET_METADATA, "wheels"):
            raise CellsegError(f"{n}: this file name cannot go into the bundle (rename the file)")
    if len(set(names)) != len(names):
        raise CellsegError(f"--config and --init have the same file name {names[0]!r}")

    with staging(out) as tmp:
        files = [copy_hashed(p, tmp / p.name, p.name) for p in shipped]
        wheel = build_wheel(repo, tmp / "wheels")
        files.append(_hash(wheel, f"wheels/{wheel.name}"))
        files.sort(key=lambda f: f.path)
        init_name = Path(init).name if init else None
        marker = {
            "format": 1,
            "kind": "train",
            "package": PACKAGE,
            "version": _wheel_version(wheel.name),
            "wheel": f"wheels/{wheel.name}",
            "wheels": [f"wheels/{wheel.name}"],
            "config": config.name,
            "config_name": config.stem,
            "overrides": overrides,
            "init": init_name,
            "folds": list(folds),
            "dataset": meta["id"],
            "git_commit": git_commit(repo),
            "bundle_id": bundle_digest(files, config.stem, overrides, init_name, folds),
            "files": [f.__dict__ for f in files],
        }
        return seal(tmp, out, meta, marker, files)


# ----------------------------------------------------------------------------------------------
# The kernel of each fold


@dataclass
class FoldKernel:
    """One fold's kernel: its filled metadata, the values written into the pushed file, its source.

    ``resume_ref`` is the kernel whose output this one continues (``--resume-from``): on a push it is
    the base of that fold (``OWNER/SLUG-fold{K}``, whose latest session is looked up on Kaggle) or one
    session named exactly (``...-fold{K}-s{N}``); :func:`resumed` turns it into the next session."""

    fold: str
    meta: dict
    staged: dict
    resume_ref: str | None = None

    @property
    def ref(self) -> str:
        return self.meta["id"]


#: A resumed session's kernel slug ends with ``-s{N}`` (N >= 2); session 1 has no suffix.
SESSION_RE = re.compile(r"^(?P<base>.+?)-s(?P<n>[0-9]+)$")


def split_session(ref: str) -> tuple[str, int]:
    """``(fold kernel ref, session number)`` of a kernel ref: ``a/x-fold0-s3`` -> ``("a/x-fold0", 3)``,
    ``a/x-fold0`` -> ``("a/x-fold0", 1)``."""
    m = SESSION_RE.match(ref)
    return (m["base"], int(m["n"])) if m and int(m["n"]) >= 2 else (ref, 1)


def session_ref(fold_ref: str, n: int) -> str:
    """The kernel of session ``n`` of a fold: ``fold_ref`` itself for 1, ``fold_ref-s{n}`` after."""
    return fold_ref if n <= 1 else f"{fold_ref}-s{n}"


def resume_ref_for(spec: str | None, fold: str, n_folds: int) -> str | None:
    """The source of ``fold`` for ``--resume-from OWNER/SLUG``: the slug with this fold's suffix
    appended (one command resumes every fold), or the slug as given when it already names this
    fold's kernel or one of its sessions (one fold only)."""
    if not spec:
        return None
    problems = _ref_problems("--resume-from", spec)
    if problems:
        raise CellsegError("; ".join(problems))
    suffix = fold_suffix(fold)
    if split_session(spec)[0].endswith(suffix):
        if n_folds > 1:
            raise CellsegError(f"--resume-from {spec} names one fold's kernel; give the slug without {suffix}")
        return spec
    return spec + suffix


def fold_kernel(
    repo: Path,
    username: str,
    dataset_ref: str,
    fold: str,
    slug: str | None,
    bundle_id: str,
    resume: str | None,
    session: int = 1,
    accelerator: str | None = None,
) -> FoldKernel:
    """The kernel of one fold from ``kernel-train-metadata.json``: slug + ``-fold{K}`` (+ ``-s{N}`` for
    session N >= 2 of a resumed fold), title to match, ``resume`` added to ``kernel_sources``,
    ``accelerator`` as its ``machine_shape``. Problems: :class:`~cellseg.kaggle.metadata.MetadataError`,
    one line each (a kernel listing itself as its own source among them)."""
    meta = fill(load_template(repo / TRAIN_KERNEL_METADATA), username)
    base = slug or str(meta.get("id", "/")).split("/")[-1]
    meta["id"] = session_ref(f"{username}/{base}{fold_suffix(fold)}", session)
    words = meta["id"].split("/")[1][len(base) + 1 :].replace("-", " ")
    if slug:
        meta["title"] = " ".join(meta["id"].split("/")[1].split("-")).capitalize()
    else:
        meta["title"] = f"{meta.get('title', '')} {words}"
    if resume:
        meta["kernel_sources"] = [*meta.get("kernel_sources", []), resume]
    if accelerator:
        meta["machine_shape"] = accelerator
    problems = validate_kernel_metadata(meta, repo)
    if dataset_ref not in meta.get("dataset_sources", []):
        problems.append(f"kernel dataset_sources: {meta.get('dataset_sources')} does not include {dataset_ref}")
    check(problems)
    return FoldKernel(fold, meta, {"fold": fold, "bundle_id": bundle_id}, resume)


def resumed(fk: FoldKernel, repo: Path, username: str, dataset_ref: str, slug: str | None, source: str) -> FoldKernel:
    """``fk`` as the next session after ``source`` (the latest session found on Kaggle): pushed as
    ``...-fold{K}-s{N+1}`` with ``source`` as its kernel source (its metadata check refuses a kernel
    listed as its own source)."""
    n = split_session(source)[1]
    shape = fk.meta.get("machine_shape")
    return fold_kernel(repo, username, dataset_ref, fk.fold, slug, fk.staged["bundle_id"], source, n + 1, shape)


# ----------------------------------------------------------------------------------------------
# The output of a training kernel


def verify_output(folder: str | Path) -> dict:
    """The output marker of a downloaded (or attached) training output, after checking that every
    file it lists is in ``folder`` with its recorded size and sha256.

    Raises CellsegError naming the first problem: no marker (the kernel did not get as far as writing
    it), a missing file, or a file whose size or digest differs (truncated or changed).
    """
    folder = Path(folder)
    path = folder / OUTPUT_MARKER
    try:
        out = json.loads(path.read_text())
    except FileNotFoundError:
        raise CellsegError(
            f"no {OUTPUT_MARKER} in the kernel's output: the kernel stopped before writing it (see its log)"
        ) from None
    except (OSError, ValueError) as e:
        raise CellsegError(f"{path}: unreadable ({e})") from None
    if not isinstance(out, dict) or out.get("kind") != "train-output" or not isinstance(out.get("files"), list):
        raise CellsegError(f"{path}: not a cellseg training output marker")
    for f in out["files"]:
        rel = str(f.get("path", ""))
        p = folder / rel
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CellsegError(f"{path}: bad file entry {rel!r}")
        if not p.is_file():
            raise CellsegError(f"{rel}: listed in {OUTPUT_MARKER} but missing")
        size = p.stat().st_size
        if size != f.get("size"):
            raise CellsegError(f"{rel}: {size} bytes, but the kernel wrote {f.get('size')} (truncated or changed)")
        if f.get("sha256") and sha256_file(p) != f["sha256"]:
            raise CellsegError(f"{rel}: sha256 differs from what the kernel wrote (corrupted download)")
    return out


def summarize_output(folder: str | Path, out: dict) -> list[str]:
    """Lines describing a verified training output: status, epochs, best hold-out score, the last
    epochs of ``run/metrics.csv``."""
    folder = Path(folder)
    status = out.get("status", "?")
    lines = [
        f"fold {out.get('fold')}: {status}, epoch {out.get('epochs_done')} of {out.get('epochs')}, "
        f"step {out.get('step')}, config {out.get('config_name')}"
    ]
    if out.get("best_score") is not None:
        lines.append(f"best hold-out score {out['best_score']:.4f} at epoch {out.get('best_epoch')}")
    metrics = folder / RUN_DIR / "metrics.csv"
    if metrics.is_file():
        df = pd.read_csv(metrics)
        cols = [c for c in ("epoch", "step", "loss", "val_score", "val_shsy5y", "val_astro", "val_cort") if c in df]
        lines += df[cols].tail(5).to_string(index=False, float_format=lambda v: f"{v:.4f}").splitlines()
    if status == "stopped":
        lines.append("stopped by train.time_limit: push again with --resume-from to continue")
    elif status == "failed":
        lines.append("the training failed (see the kernel log); last.pth holds the last finished epoch")
    return lines
