"""Provenance: what each model was trained on, from ``cellseg train`` through ``export`` and ``bundle`` to
``tools/push.py``, which refuses to submit an ensemble trained on ``cellseg synth`` data only.

Two tiny models are really trained (one step each) on copies of the session's synthetic folder: one
copy keeps the generator's marker, the other has it removed and gets an extra pseudo-label CSV.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cellseg.config.experiment import load_experiment
from cellseg.config.manifest import load_manifest
from cellseg.config.provenance import SYNTH_MARKER
from cellseg.inference.runner import predict_folder
from cellseg.model.checkpoint import read_checkpoint_info
from cellseg.model.export import export_weights
from cellseg.model.provenance import from_checkpoint, no_competition_data, summarize, synthetic_only, verdict
from cellseg.paths import configs_dir, demo_manifest
from cellseg.training.loop import train
from fake_kaggle import REPO, FakeKaggle, make_checkout
from helpers import TOY_MODEL_OVERRIDES

OVERRIDES = [
    *TOY_MODEL_OVERRIDES,
    "train.epochs=1",
    "train.max_steps=1",
    "train.batch_size=1",
    "train.num_workers=0",
    "train.threads=1",
    "train.log_every=0",
    "augment.crop_size=[128, 128]",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_train(data: Path, out: Path, init: Path | None = None, extra: list[str] = ()) -> Path:
    cfg = load_experiment(configs_dir() / "demo.yaml", [*OVERRIDES, *extra])
    train(cfg, data, fold=None, init=init, out=out, progress=False, config_name="tiny")
    return out / "best.pth"


@pytest.fixture(scope="module")
def runs(synth_dir, tmp_path_factory):
    """{"synth": (data folder, best.pth), "real": (...)}: the same images, marked and unmarked."""
    root = tmp_path_factory.mktemp("prov")
    syn, real = root / "synth", root / "real"
    shutil.copytree(synth_dir, syn)
    shutil.copytree(synth_dir, real)
    (real / SYNTH_MARKER).unlink()  # what a folder of real images looks like: no generator marker
    truth = pd.read_csv(real / "train.csv")
    pseudo = truth[truth["id"].isin(truth["id"].unique()[:2])]  # 2 images' rows as "pseudo-labels"
    pseudo.to_csv(real / "pseudo.csv", index=False)
    extra = [f"data.extra_csv=[{real / 'pseudo.csv'}]"]
    return {
        "synth": (syn, tiny_train(syn, root / "run-synth")),
        "real": (real, tiny_train(real, root / "run-real", extra=extra)),
        "root": root,
    }


@pytest.fixture(scope="module")
def exported(runs):
    """Weights folders exported from the two runs (the manifest carries each model's provenance)."""
    out = runs["root"] / "weights"
    return {k: export_weights([runs[k][1]], out / k).manifest for k in ("synth", "real")}


def test_synth_marks_the_folder_it_writes(synth_dir):
    marker = json.loads((synth_dir / SYNTH_MARKER).read_text())
    assert marker["generator"] == "cellseg synth" and marker["seed"] == 123
    assert marker["train_images"] == len(list((synth_dir / "train").glob("*.png"))) == 12
    assert marker["instances"] == len(pd.read_csv(synth_dir / "train.csv"))


@pytest.mark.slow
def test_checkpoint_records_every_source_with_fingerprint_count_and_origin(runs):
    real, best = runs["real"]
    prov = read_checkpoint_info(best).provenance
    csv, pseudo = prov["data_sources"]
    assert (csv["kind"], csv["path"], csv["images"], csv["synthetic"]) == (
        "train_csv",
        str((real / "train.csv").resolve()),
        12,
        False,
    )
    assert csv["sha256"] == sha256(real / "train.csv")
    assert (pseudo["kind"], pseudo["images"], pseudo["synthetic"]) == ("pseudo_csv", 2, False)
    assert pseudo["sha256"] == sha256(real / "pseudo.csv")
    assert prov["init_sha256"] is None and prov["origin"] == "cellseg train"
    (src,) = read_checkpoint_info(runs["synth"][1]).provenance["data_sources"]
    assert src["synthetic"] is True and src["synth_seed"] == 123 and src["images"] == 12


@pytest.mark.slow
def test_provenance_survives_train_export_bundle(runs, exported, tmp_path):
    m = load_manifest(exported["real"])
    (entry,) = m.models
    ckpt = read_checkpoint_info(runs["real"][1]).provenance
    assert [s.sha256 for s in entry.provenance.sources] == [s["sha256"] for s in ckpt["data_sources"]]
    assert summarize(m) == "1 model: real train.csv (12 images) + pseudo-labels (2)"
    # the exported checkpoint still says it too (export -> export keeps it)
    assert from_checkpoint(read_checkpoint_info(m.checkpoint_path(entry)).provenance) == entry.provenance
    checkout = make_checkout(tmp_path / "checkout")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "cellseg", "bundle", "--repo", str(checkout), "--weights", str(exported["real"])]
        + ["--out", str(tmp_path / "bundle"), "--username", "alice"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model.pth: cellseg train" in proc.stdout and str(runs["real"][0] / "pseudo.csv") in proc.stdout
    assert "ensemble: 1 model: real train.csv (12 images) + pseudo-labels (2)" in proc.stdout
    shipped = load_manifest(tmp_path / "bundle" / "weights" / "real" / "manifest.yaml")
    assert shipped.models[0].provenance == entry.provenance


def test_verdict_synthetic_only_and_fine_tuning_chains(runs, exported, tmp_path):
    syn, real = load_manifest(exported["synth"]), load_manifest(exported["real"])
    assert synthetic_only(syn) and not synthetic_only(real)
    assert summarize(syn) == "1 model: synthetic train.csv (12 images)"
    both = syn.models + real.models
    assert not synthetic_only(both)
    assert (
        summarize(both) == "2 models: synthetic train.csv (12 images) + real train.csv (12 images) + pseudo-labels (2)"
    )
    # a model fine-tuned on synthetic data from one trained on real data was not trained on synthetic data only
    tuned = tiny_train(runs["synth"][0], tmp_path / "tuned", init=runs["real"][1])
    prov = read_checkpoint_info(tuned).provenance
    assert prov["init_sha256"] == sha256(runs["real"][1])
    p = from_checkpoint(prov)
    assert [(s.kind, s.synthetic) for s in p.sources] == [
        ("train_csv", True),
        ("train_csv", False),
        ("pseudo_csv", False),
    ]
    assert not synthetic_only([p])


def test_committed_demo_weights_hold_no_competition_data():
    """weights/demo: fine-tuned on synthetic + imported Usiigaci images (MIT), never competition data."""
    m = load_manifest(demo_manifest())  # the model file's sha256 is verified: the weights are unchanged
    assert no_competition_data(m) and not synthetic_only(m)
    assert summarize(m) == "1 model: synthetic + imported train.csv (480 images)"
    assert verdict(m).startswith("no competition data")
    (src,) = m.models[0].provenance.sources
    assert (src.synthetic_images, src.imported_images, src.licences) == (360, 120, ["MIT License"])


def test_old_manifest_loads_as_provenance_unknown_and_is_never_refused(tmp_path):
    data = yaml.safe_load(demo_manifest().read_text())
    for e in data["models"]:
        del e["provenance"]  # the manifest as written before provenance existed
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (tmp_path / "model.pth").symlink_to(demo_manifest().parent / "model.pth")
    m = load_manifest(tmp_path / "manifest.yaml")
    assert m.models[0].provenance is None
    assert summarize(m) == "1 model: provenance unknown" and not synthetic_only(m)
    assert "provenance unknown" in verdict(m)
    p = run_push(tmp_path, None, "submit", "--dry-run", "--weights", str(tmp_path / "manifest.yaml"))
    assert p.returncode == 0 and "REFUSED" not in p.stdout and "model.pth: provenance unknown" in p.stdout


def test_predict_names_the_ensembles_provenance_in_its_first_line(runs, exported, tmp_path):
    lines: list[str] = []
    data = runs["real"][0]
    one = sorted(p.stem for p in (data / "test").glob("*.png"))[:1]
    predict_folder(data, exported["real"], tmp_path / "sub.csv", progress=False, log=lines.append, image_ids=one)
    assert lines[0].startswith("loaded 1 model(s)")
    assert lines[0].endswith("ensemble: 1 model: real train.csv (12 images) + pseudo-labels (2)")


# ------------------------------------------------------------------------------- tools/push.py


def run_push(tmp_path: Path, endpoint: str | None, *args: str) -> subprocess.CompletedProcess:
    """tools/push.py in a subprocess with its own HOME/TMPDIR and test credentials (no proxy)."""
    for d in ("home", "tmp"):
        (tmp_path / d).mkdir(exist_ok=True)
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE_", "CELLSEG_")) and "proxy" not in k.lower()
    }
    env.update(HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"), NO_PROXY="127.0.0.1,localhost")
    env.update(KAGGLE_USERNAME="alice", KAGGLE_KEY="test-key")
    if endpoint:
        env["CELLSEG_KAGGLE_ENDPOINT"] = endpoint
    checkout = tmp_path / "checkout"
    if not checkout.exists():
        make_checkout(checkout)
    cmd = [sys.executable, str(REPO / "tools" / "push.py"), *args, "--repo", str(checkout)]
    cmd += ["--poll-interval", "0.01", "--retry-budget", "1", "--wait-timeout", "30"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_push_refuses_synthetic_only_weights_but_submits_real_ones(exported, tmp_path):
    with FakeKaggle(username="alice", key="test-key") as fake:
        p = run_push(tmp_path, fake.url, "submit", "--kernel-version", "2", "--weights", str(exported["synth"]))
        assert p.returncode == 2 and fake.calls == []
        (line,) = p.stderr.strip().splitlines()
        assert line.startswith("push.py: error:") and "synthetic data only" in line and "--allow-synthetic" in line
        fake.set_output("alice/sartorius-cellseg-submit", {"submission.csv": b"id,predicted\n"}, version=2)
        p = run_push(tmp_path, fake.url, "submit", "--kernel-version", "2", "--weights", str(exported["real"]))
        assert p.returncode == 0, p.stderr
        assert [s["kernelVersion"] for s in fake.submissions] == [2]
        assert "ensemble: 1 model: real train.csv (12 images) + pseudo-labels (2)" in p.stdout


def test_imported_and_merged_data_is_counted_per_image_and_never_submitted(runs, tmp_path):
    """A run on a folder of links to an ``import-labels`` folder (MIT Usiigaci crop) and a synthetic
    folder records where each image came from and the licence; push refuses it like synthetic-only."""
    from cellseg.data.import_labels import import_labels

    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "usiigaci"
    imported = tmp_path / "imported"
    import_labels(fixture, imported, tile=(128, 192))
    merged = tmp_path / "merged"
    (merged / "train").mkdir(parents=True)
    syn = runs["synth"][0]
    frames = []
    for folder in (imported, syn):
        for png in sorted((folder / "train").glob("*.png")):
            (merged / "train" / png.name).symlink_to(png)
        frames.append(pd.read_csv(folder / "train.csv", dtype=str, keep_default_na=False))
    pd.concat(frames).to_csv(merged / "train.csv", index=False)
    n_syn = len(list((syn / "train").glob("*.png")))
    m = export_weights([tiny_train(merged, tmp_path / "run")], tmp_path / "weights").manifest
    loaded = load_manifest(m)
    (src,) = loaded.models[0].provenance.sources
    assert (src.images, src.synthetic_images, src.imported_images) == (n_syn + 1, n_syn, 1)
    assert not src.synthetic and src.licences == ["MIT License"]
    assert no_competition_data(loaded) and not synthetic_only(loaded)
    assert summarize(loaded) == f"1 model: synthetic + imported train.csv ({n_syn + 1} images)"
    assert verdict(loaded).startswith("no competition data")
    p = run_push(tmp_path, None, "submit", "--dry-run", "--kernel-version", "2", "--weights", str(m))
    assert p.returncode == 0 and "licence MIT License" in p.stdout, p.stderr
    assert "would be REFUSED" in p.stdout and "no competition data" in p.stdout
    # the imported folder alone is "imported"; a copy without the marker counts as competition data
    real = tmp_path / "unmarked"
    shutil.copytree(imported, real)
    (real / "cellseg-import.json").unlink()
    copy = export_weights([tiny_train(real, tmp_path / "run-real")], tmp_path / "w-real").manifest
    assert not no_competition_data(load_manifest(copy))
    assert summarize(load_manifest(copy)) == "1 model: real train.csv (1 image)"
