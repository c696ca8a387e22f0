"""The README's main job, end to end on a laptop: synthetic data -> Kaggle kernel emulation ->
submission.csv -> dry-run score.

1. ``cellseg.data.synth.generate`` writes a small competition-layout dataset (default 24 train, 3 test).
2. A fake ``/kaggle`` tree is built like Kaggle mounts it: ``input/competitions/<slug>/`` with the
   test images and sample_submission.csv, ``input/datasets/<user>/cellseg-bundle/`` with the marker
   ``cellseg-bundle.json``, a wheel built from this checkout and the ensemble's weights + manifest.
3. ``kernel/submit.py --kaggle-root <tree>`` runs in a subprocess (as Kaggle would run it) and writes
   ``<tree>/working/submission.csv``, which is validated and copied to ``<out>/submission.csv``.
4. ``cellseg.evaluation.dry_run`` runs the same path on a few train images and prints the competition score.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cellseg.config.manifest import load_manifest
from cellseg.data.submission import validate_submission
from cellseg.data.synth import generate
from cellseg.errors import CellsegError
from cellseg.evaluation.dry_run import dry_run
from cellseg.kaggle.bundle import MARKER, build_wheel
from cellseg.kaggle.metadata import COMPETITION
from cellseg.paths import demo_manifest, kernel_entry, repo_root


@dataclass
class DemoResult:
    submission: Path
    score: float
    table: str
    seconds: float


def build_fake_kaggle(root: Path, data: Path, manifest: Path, wheel_dir: Path | None = None) -> Path:
    """Fake ``/kaggle`` tree at ``root`` for ``data`` (competition layout) and ``manifest``'s ensemble.

    The wheel comes from ``wheel_dir`` when given, else it is built from the checkout
    (:func:`cellseg.kaggle.bundle.build_wheel`). Returns ``root``.
    """
    m = load_manifest(manifest)  # checksums verified before anything is copied
    if root.exists():
        shutil.rmtree(root)
    comp = root / "input" / "competitions" / COMPETITION
    comp.mkdir(parents=True)
    shutil.copytree(data / "test", comp / "test")
    shutil.copy2(data / "sample_submission.csv", comp / "sample_submission.csv")
    bundle = root / "input" / "datasets" / "demo" / "cellseg-bundle"
    wdir = bundle / "weights" / (m.name or "demo")
    wdir.mkdir(parents=True)
    for e in m.models:
        dst = wdir / e.checkpoint
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(m.checkpoint_path(e), dst)
    manifest = Path(manifest)
    shutil.copy2(manifest / "manifest.yaml" if manifest.is_dir() else manifest, wdir / "manifest.yaml")
    (bundle / "wheels").mkdir()
    if wheel_dir is not None:
        for w in Path(wheel_dir).glob("*.whl"):
            shutil.copy2(w, bundle / "wheels" / w.name)
    else:
        repo = repo_root()
        if repo is None:
            raise CellsegError("cellseg demo builds the wheel from the source checkout; run it from one")
        build_wheel(repo, bundle / "wheels")
    marker = {
        "format": 1,
        "manifest": f"weights/{wdir.name}/manifest.yaml",
        "weights": wdir.name,
        "wheels": [f"wheels/{w.name}" for w in (bundle / "wheels").glob("*.whl")],
    }
    (bundle / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    (root / "working").mkdir()
    (root / "temp").mkdir()
    return root


def run_demo(
    out: str | Path,
    manifest: str | Path | None = None,
    train_images: int = 24,
    test_images: int = 3,
    dry_run_images: int = 6,
    seed: int = 0,
    device: str = "auto",
    kernel_budget: str = "4m",
    dry_run_budget: str = "3m",
    log=print,
) -> DemoResult:
    """Run the four steps into ``out``. The kernel and the dry run get time budgets (TTA views, then
    models, are dropped when the machine is too slow), which keeps the demo under 10 minutes."""
    t0 = time.monotonic()
    out = Path(out)
    manifest = Path(manifest) if manifest is not None else demo_manifest()
    if not manifest.exists():
        raise CellsegError(f"{manifest} not found: the demo weights are missing; pass --weights MANIFEST")
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    log(f"[1/4] synthetic data: {train_images} train / {test_images} test images -> {data}")
    generate(
        data, train_images=train_images, test_images=test_images, semi_images=0, seed=seed, progress=False, force=True
    )
    log(f"[2/4] fake Kaggle tree with the bundle (wheel built from this checkout) -> {out / 'kaggle'}")
    root = build_fake_kaggle(out / "kaggle", data, manifest)
    log(f"[3/4] kernel/submit.py --kaggle-root {root}")
    sys.stdout.flush()
    proc = subprocess.run(
        [
            sys.executable,
            str(kernel_entry()),
            "--kaggle-root",
            str(root),
            "--device",
            device,
            "--time-budget",
            kernel_budget,
        ]
    )
    if proc.returncode != 0:
        raise CellsegError(f"kernel/submit.py exited with {proc.returncode} (its error is printed above)")
    sub = root / "working" / "submission.csv"
    problems = validate_submission(sub, data / "test")
    if problems:
        raise CellsegError(f"{sub}: {len(problems)} problem(s); first: {problems[0]}")
    shutil.copy2(sub, out / "submission.csv")
    log(f"      submission: {out / 'submission.csv'} (valid)")
    log(f"[4/4] dry run on {dry_run_images} train images -> {out / 'dry-run'}")
    res = dry_run(
        data, manifest, out / "dry-run", images=dry_run_images, seed=seed, device=device, time_budget=dry_run_budget
    )
    return DemoResult(out / "submission.csv", res.score, res.table, time.monotonic() - t0)
