"""Stage the Kaggle dataset bundle: everything the offline kernel needs, and nothing else.

Layout of a staged bundle (the folder ``tools/push.py`` uploads; sub-folders go up zipped and
Kaggle unpacks them)::

    <out>/cellseg-bundle.json        marker the kernel searches /kaggle/input for (see below)
    <out>/dataset-metadata.json      filled from the repository's template (not uploaded as a file)
    <out>/wheels/sartorius_cellseg-<version>-py3-none-any.whl   (+ extra inference wheels)
    <out>/weights/<name>/manifest.yaml + the checkpoints it lists

The marker holds ``{"manifest": "weights/<name>/manifest.yaml", "wheel": "wheels/<file>.whl",
"version": ..., "files": [{path, size, sha256}, ...]}`` with paths relative to the bundle root.

Whitelist only: the wheel is built from a copy of ``pyproject.toml``, ``README.md``, ``LICENSE`` and
the package's source files, the weights are the manifest plus exactly the checkpoints it lists (their
sha256 checked against it), and the finished folder is audited: a file that is not on the plan, or
whose name looks like a credential, fails the staging. Staging is atomic: a temporary folder beside
``out`` is renamed into place only when complete.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from cellseg.config.manifest import Manifest, load_manifest, sha256_file
from cellseg.errors import CellsegError
from cellseg.io import check_replaceable, replace_dir, staging
from cellseg.kaggle.metadata import (
    DATASET_METADATA,
    check,
    fill,
    load_template,
    resolve_username,
    validate_dataset_metadata,
)
from cellseg.model.provenance import plan_lines
from cellseg.paths import git_commit, repo_root

MARKER = "cellseg-bundle.json"
PACKAGE = "sartorius-cellseg"
#: Inference dependencies the Kaggle GPU image lacks, shipped as wheels (``--extra-wheels`` adds more).
#: Empty: everything cellseg imports at inference is already on the image (FACTS.md).
EXTRA_WHEELS: tuple[str, ...] = ()

#: Names that never go up, wherever they are (credentials, caches, environments). Every hidden name
#: (.git, .env, .venv, .pytest_cache, ...) is denied as well.
DENY_PATTERNS: tuple[str, ...] = (
    "kaggle.json",
    "access_token",
    "access_token.txt",
    "*.env",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
    "*credential*",
    "*secret*",
    "*token*",
    "__pycache__",
    "*.pyc",
    "*.pyo",
    "venv",
    "*.egg-info",
)
#: Top-level files of the checkout the wheel build reads.
_BUILD_FILES = ("pyproject.toml", "setup.cfg", "README.md", "LICENSE", "LICENSE.txt", "MANIFEST.in")
#: Source files of the package that may be part of the wheel (code and package data).
_SOURCE_SUFFIXES = {".py", ".typed", ".yaml", ".yml", ".json", ".txt", ".csv"}


def denied(name: str) -> bool:
    """True when a file or folder name must never be part of a bundle."""
    return name.startswith(".") or any(fnmatch.fnmatch(name.lower(), p) for p in DENY_PATTERNS)


@dataclass(frozen=True)
class BundleFile:
    """One file of the bundle: ``path`` relative to the bundle root."""

    path: str
    size: int
    sha256: str


@dataclass
class Bundle:
    """A staged bundle: its folder, the filled dataset metadata and every file that goes up."""

    root: Path
    metadata: dict
    marker: dict
    files: list[BundleFile] = field(default_factory=list)


def copy_hashed(src: Path, dst: Path, rel: str, chunk: int = 1 << 20) -> BundleFile:
    """Copy ``src`` to ``dst`` reading it once; return it as bundle file ``rel`` with size and sha256."""
    h = hashlib.sha256()
    size = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while block := fin.read(chunk):
            h.update(block)
            fout.write(block)
            size += len(block)
    shutil.copystat(src, dst)
    return BundleFile(rel, size, h.hexdigest())


def _hash(path: Path, rel: str) -> BundleFile:
    return BundleFile(rel, path.stat().st_size, sha256_file(path))


def copy_source_tree(repo: Path, dst: Path) -> None:
    """Copy what the wheel build needs from ``repo`` into ``dst``: the top-level build files and the
    package's source files under ``src/``, skipping anything :func:`denied`."""
    for name in _BUILD_FILES:
        if (repo / name).is_file():
            shutil.copy2(repo / name, dst / name)
    if not (dst / "pyproject.toml").is_file():
        raise CellsegError(f"{repo}: no pyproject.toml (is it the sartorius-cellseg checkout?)")
    src_root = repo / "src"
    for dirpath, dirnames, filenames in os.walk(src_root):
        dirnames[:] = sorted(d for d in dirnames if not denied(d))
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            if denied(fn) or p.suffix not in _SOURCE_SUFFIXES or p.is_symlink():
                continue
            rel = p.relative_to(repo)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst / rel)


def build_wheel(repo: Path, out_dir: Path) -> Path:
    """Build the package wheel from a whitelisted copy of ``repo`` into ``out_dir``; return its path.

    ``pip wheel --no-deps --no-build-isolation --no-index``: no network, the venv's setuptools.
    The checkout itself is never written to (no build/ or egg-info left behind).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="cellseg-wheel-") as tmp:
        src = Path(tmp) / "src-copy"
        src.mkdir()
        copy_source_tree(repo, src)
        built = Path(tmp) / "dist"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "-w",
            str(built),
            str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(built.glob("*.whl")) if built.is_dir() else []
        if proc.returncode != 0 or len(wheels) != 1:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel produced"]
            raise CellsegError(f"building the wheel of {repo} failed: {tail[0]}")
        audit_wheel(wheels[0])
        dst = out_dir / wheels[0].name
        shutil.move(str(wheels[0]), dst)
    return dst


def audit_wheel(path: Path) -> None:
    """Raise CellsegError if the wheel holds anything but the cellseg package and its dist-info."""
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            top = name.split("/")[0]
            if not (top == "cellseg" or (top.endswith(".dist-info") and top.startswith("sartorius_cellseg"))):
                raise CellsegError(f"{path.name}: unexpected member {name} (only the cellseg package may ship)")
            if any(denied(part) for part in name.split("/")[1:]):
                raise CellsegError(f"{path.name}: member {name} is on the deny list")


def _wheel_project(filename: str) -> str:
    """Normalised project name of a wheel file name (``Foo_Bar-1.0-py3-none-any.whl`` -> ``foo-bar``)."""
    # lazy: packaging comes with pip/build (bundling tools), not with cellseg's own dependencies
    from packaging.utils import canonicalize_name, parse_wheel_filename

    return canonicalize_name(parse_wheel_filename(filename)[0])


def fetch_extra_wheels(names: list[str], out_dir: Path, wheel_dir: Path | None) -> list[Path]:
    """Wheels of ``names`` (project names) into ``out_dir``: taken from ``wheel_dir`` when given,
    else ``pip download --no-deps --only-binary=:all:`` (network at bundle time only, never at run time)."""
    from packaging.utils import canonicalize_name  # lazy: see _wheel_project

    got = []
    for name in names:
        want = canonicalize_name(name)
        if wheel_dir is not None:
            found = sorted(p for p in Path(wheel_dir).glob("*.whl") if _wheel_project(p.name) == want)
            if not found:
                raise CellsegError(f"no wheel of {name!r} in {wheel_dir}")
            dst = out_dir / found[-1].name
            shutil.copy2(found[-1], dst)
            got.append(dst)
            continue
        with tempfile.TemporaryDirectory(prefix="cellseg-dl-") as tmp:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                name,
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = sorted(Path(tmp).glob("*.whl"))
            if proc.returncode != 0 or not found:
                raise CellsegError(
                    f"pip download {name} failed (pass --wheel-dir with a local wheel): "
                    + ((proc.stderr.strip().splitlines() or ["no wheel"])[-1])
                )
            dst = out_dir / found[0].name
            shutil.move(str(found[0]), dst)
            got.append(dst)
    return got


def _weights_plan(manifest_path: Path) -> tuple[str, Path, list[tuple[Path, str, str]]]:
    """(name, manifest file, [(checkpoint path, path relative to its folder, manifest sha256)])."""
    if manifest_path.is_dir():
        manifest_path = manifest_path / "manifest.yaml"
    m = load_manifest(manifest_path, verify=False)  # checksums are checked while copying (one read)
    folder = Path(m.base_dir)
    name = m.name or folder.name
    if not name or denied(name) or "/" in name:
        raise CellsegError(f"{manifest_path}: unusable ensemble name {name!r}")
    plan = []
    for e in m.models:
        p = m.checkpoint_path(e)
        rel = Path(e.checkpoint)
        if rel.is_absolute() or ".." in rel.parts:
            raise CellsegError(f"{manifest_path}: checkpoint {e.checkpoint!r} must lie inside {folder}")
        if any(denied(part) for part in rel.parts):
            raise CellsegError(f"{manifest_path}: checkpoint {e.checkpoint!r} has a name on the deny list")
        if not p.is_file():
            raise CellsegError(f"{p}: checkpoint listed in the manifest not found")
        if not e.sha256:
            raise CellsegError(f"{p}: the manifest gives no sha256 for this checkpoint")
        plan.append((p, rel.as_posix(), e.sha256.lower()))
    return name, manifest_path, plan


def seal(tmp: Path, out: Path, meta: dict, marker: dict, files: list[BundleFile]) -> Bundle:
    """Finish a staged bundle: write its marker and dataset metadata, check that nothing else is in
    ``tmp`` (:func:`audit_bundle`), then move it to ``out`` (replacing an earlier bundle).

    Args:
        tmp: the staging folder (:func:`cellseg.io.staging`), holding exactly ``files``.
        out: the bundle folder to create or replace.
        meta: the filled dataset metadata; marker: the kernel's marker (``cellseg-bundle.json``).
        files: the staged files, hashed; the marker is appended.

    Returns:
        The :class:`Bundle` at ``out`` with every uploaded file, sorted by path.
    """
    (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    files.append(_hash(tmp / MARKER, MARKER))
    (tmp / DATASET_METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    audit_bundle(tmp, {f.path for f in files} | {DATASET_METADATA})
    replace_dir(tmp, out, MARKER, "a bundle")
    return Bundle(out, meta, marker, sorted(files, key=lambda f: f.path))


def stage_bundle(
    manifest: str | Path,
    out: str | Path,
    username: str | None = None,
    repo: str | Path | None = None,
    extra_wheels: list[str] | tuple[str, ...] = EXTRA_WHEELS,
    wheel_dir: str | Path | None = None,
) -> Bundle:
    """Stage the dataset bundle for the ensemble of ``manifest`` into ``out`` (atomically).

    Args:
        manifest: ``weights/<name>/manifest.yaml``; its checkpoints' sha256 must match.
        out: the bundle folder to create or replace (an earlier bundle or an empty folder; anything else
            is refused before any file is copied or built).
        username: Kaggle owner of the dataset (else KAGGLE_USERNAME / kaggle.json).
        repo: checkout the wheel and ``dataset-metadata.json`` come from (default: this package's).
        extra_wheels: project names of inference dependencies the Kaggle image lacks.
        wheel_dir: local folder to take those wheels from (else ``pip download``).
    Returns:
        The :class:`Bundle` with every uploaded file's size and sha256.
    """
    repo = Path(repo) if repo is not None else repo_root()
    if repo is None:
        raise CellsegError("cellseg runs from an installed wheel: pass the source checkout with --repo")
    repo = repo.resolve()
    out = Path(out).resolve()
    if out == repo or (repo in out.parents and out.relative_to(repo).parts[0] in ("src", "weights", "kernel", "tools")):
        raise CellsegError(f"--out {out} would write into the checkout's sources: pick another folder")
    # Everything that can be checked locally is checked before the slow work.
    check_replaceable(out, MARKER, "a bundle")
    meta = fill(load_template(repo / DATASET_METADATA), resolve_username(username))
    check(validate_dataset_metadata(meta))
    name, manifest_file, weights = _weights_plan(Path(manifest))

    with staging(out) as tmp:
        files: list[BundleFile] = []
        wdir = f"weights/{name}"
        for src, rel, want in weights:  # first: a bad checkpoint fails before the slow wheel build
            got = copy_hashed(src, tmp / wdir / rel, f"{wdir}/{rel}")
            if got.sha256 != want:
                raise CellsegError(f"{src}: sha256 mismatch (manifest {want[:12]}..., file {got.sha256[:12]}...)")
            files.append(got)
        files.append(copy_hashed(manifest_file, tmp / wdir / "manifest.yaml", f"{wdir}/manifest.yaml"))
        (tmp / "wheels").mkdir()
        extras = fetch_extra_wheels(list(extra_wheels), tmp / "wheels", Path(wheel_dir) if wheel_dir else None)
        wheel = build_wheel(repo, tmp / "wheels")
        for p in [wheel, *extras]:
            files.append(_hash(p, f"wheels/{p.name}"))
        files.sort(key=lambda f: f.path)
        marker = {
            "format": 1,
            "package": PACKAGE,
            "version": _wheel_version(wheel.name),
            "wheel": f"wheels/{wheel.name}",
            "wheels": [f.path for f in files if f.path.startswith("wheels/")],
            "manifest": f"{wdir}/manifest.yaml",
            "weights": name,
            "dataset": meta["id"],
            "git_commit": git_commit(repo),
            "files": [f.__dict__ for f in files],
        }
        return seal(tmp, out, meta, marker, files)


def _wheel_version(filename: str) -> str:
    from packaging.utils import parse_wheel_filename  # lazy: see _wheel_project

    return str(parse_wheel_filename(filename)[1])


def audit_bundle(root: Path, expected: set[str]) -> None:
    """Raise CellsegError unless ``root`` holds exactly ``expected`` (relative paths), none denied."""
    present = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            if denied(n):
                raise CellsegError(f"bundle audit: {Path(dirpath, n).relative_to(root)} is on the deny list")
        present |= {Path(dirpath, n).relative_to(root).as_posix() for n in filenames}
    if present != expected:
        extra, missing = sorted(present - expected), sorted(expected - present)
        raise CellsegError(f"bundle audit: unexpected {extra}, missing {missing}")


def read_bundle(root: str | Path) -> Bundle:
    """Open an already-staged bundle folder; CellsegError unless its marker and metadata are there
    and every listed file has its recorded size."""
    root = Path(root)
    try:
        marker = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        raise CellsegError(f"{root}: not a staged bundle (no readable {MARKER}; run `cellseg bundle`)") from None
    meta = load_template(root / DATASET_METADATA)
    files = [BundleFile(**f) for f in marker.get("files", [])]
    for f in files:
        p = root / f.path
        if not p.is_file() or p.stat().st_size != f.size:
            raise CellsegError(f"{root}: {f.path} missing or changed since staging (stage the bundle again)")
    files.append(_hash(root / MARKER, MARKER))
    audit_bundle(root, {f.path for f in files} | {DATASET_METADATA})
    return Bundle(root, meta, marker, sorted(files, key=lambda f: f.path))


def bundle_manifest(b: Bundle) -> Manifest:
    """The :class:`cellseg.config.manifest.Manifest` of a staged bundle's ensemble (checksums were
    checked while staging and are not read again)."""
    return load_manifest(b.root / b.marker["manifest"], verify=False)


def format_provenance(b: Bundle) -> str:
    """The plan's provenance block: what each model of the bundle was trained on (one line each),
    the ensemble's one-line summary and the verdict (see :mod:`cellseg.model.provenance`)."""
    return "\n".join([f"provenance ({b.marker['manifest']}):", *plan_lines(bundle_manifest(b))])


def human_size(n: int) -> str:
    """``n`` bytes as B / KiB / MiB / GiB text, e.g. ``human_size(1536) == "1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def format_table(files: list[BundleFile]) -> str:
    """The upload table: one row per file (path, size, sha256) and a total line."""
    width = max([len(f.path) for f in files] + [4])
    lines = [f"{'file':<{width}}  {'size':>10}  sha256", f"{'-' * width}  {'-' * 10}  {'-' * 64}"]
    lines += [f"{f.path:<{width}}  {human_size(f.size):>10}  {f.sha256}" for f in files]
    total = sum(f.size for f in files)
    lines.append(f"{'total (' + str(len(files)) + ' files)':<{width}}  {human_size(total):>10}  ({total} bytes)")
    return "\n".join(lines)
