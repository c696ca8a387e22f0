"""`cellseg bundle`: a whitelisted, sha256-checked, atomically staged Kaggle dataset folder whose wheel
installs offline. The checkout and weights used here are copies with credentials planted in them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cellseg.errors import CellsegError
from cellseg.kaggle import bundle, training
from cellseg.paths import configs_dir, repo_root
from fake_kaggle import PLANTED, make_checkout, make_weights, plant_secrets
from kernel_helpers import bare_env


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A bundle staged by the CLI (real subprocess) from a checkout copy and weights with secrets planted."""
    tmp = tmp_path_factory.mktemp("bundle")
    checkout = make_checkout(tmp / "checkout")
    manifest = make_weights(tmp / "weights" / "demo")
    plant_secrets(checkout, manifest.parent)
    out = tmp / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cellseg",
            "bundle",
            "--repo",
            str(checkout),
            "--weights",
            str(manifest),
            "--out",
            str(out),
            "--username",
            "Alice",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return checkout, manifest, out, proc.stdout


@pytest.mark.slow
def test_bundle_holds_exactly_the_whitelist(staged):
    checkout, manifest, out, _ = staged
    marker = json.loads((out / bundle.MARKER).read_text())
    wheel = marker["wheel"]
    assert wheel.startswith("wheels/sartorius_cellseg-") and wheel.endswith("-py3-none-any.whl")
    assert marker["manifest"] == "weights/demo/manifest.yaml"
    assert files_under(out) == {
        bundle.MARKER,
        "dataset-metadata.json",
        wheel,
        "weights/demo/manifest.yaml",
        "weights/demo/model.pth",
    }
    # The wheel: exactly the package's real modules (planted files and caches left out) + dist-info.
    with zipfile.ZipFile(out / wheel) as z:
        names = z.namelist()
        blob = b"".join(z.read(n) for n in names)
    shipped = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    src = checkout / "src"
    expected = {p.relative_to(src).as_posix() for p in (src / "cellseg").rglob("*.py")} - {
        "cellseg/commands/credentials.py"
    }
    assert shipped == expected | {"cellseg/py.typed"}
    assert all(n.split("/")[0] == "cellseg" or n.startswith("sartorius_cellseg-") for n in names)
    # No planted secret anywhere: not in a file of the bundle, not inside the wheel.
    assert PLANTED.encode() not in blob
    for p in out.rglob("*"):
        if p.is_file():
            assert PLANTED.encode() not in p.read_bytes(), p


def test_marker_and_table_describe_the_files(staged):
    _, manifest, out, stdout = staged
    marker = json.loads((out / bundle.MARKER).read_text())
    listed = {f["path"]: f for f in marker["files"]}
    assert set(listed) == files_under(out) - {bundle.MARKER, "dataset-metadata.json"}
    for path, f in listed.items():
        assert f["size"] == (out / path).stat().st_size
        assert f["sha256"] == sha256(out / path)
    assert (out / "weights/demo/model.pth").read_bytes() == (manifest.parent / "model.pth").read_bytes()
    assert marker["version"] == marker["wheel"].split("-")[1]
    meta = json.loads((out / "dataset-metadata.json").read_text())
    assert meta["id"] == "alice/sartorius-cellseg-bundle" and marker["dataset"] == meta["id"]
    # The printed table: every uploaded file with its size and sha256, and the total.
    for path in files_under(out) - {"dataset-metadata.json"}:
        row = next(line for line in stdout.splitlines() if line.startswith(path + " "))
        assert sha256(out / path) in row
    total = sum((out / p).stat().st_size for p in files_under(out) - {"dataset-metadata.json"})
    assert f"({total} bytes)" in stdout


def test_package_metadata_builds_under_setuptools_strict_rules(wheel_dir):
    """pyproject.toml uses no form that setuptools deprecates: the ``license = {text = ...}`` table is
    refused by setuptools releases after 2027-02-18, and `make venv` (an isolated build with the newest
    setuptools) would then fail on a fresh machine. Applied with warnings as errors, and the wheel
    carries the SPDX expression."""
    probe = (
        "from setuptools.dist import Distribution\n"
        "from setuptools.config.pyprojecttoml import apply_configuration\n"
        "print(apply_configuration(Distribution(), 'pyproject.toml').metadata.license_expression)"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", probe], capture_output=True, text=True, cwd=repo_root(), timeout=60
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "MIT", proc.stderr[-500:]
    (whl,) = wheel_dir.glob("*.whl")
    with zipfile.ZipFile(whl) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta.splitlines()


def test_wheel_installs_offline_into_a_fresh_venv(staged, tmp_path):
    """The kernel's install command, in a bare venv: no index, no deps, only the bundle's wheels.
    The venv sees this environment's numpy/scipy through a .pth file, as Kaggle's image provides them."""
    _, _, out, _ = staged
    venv = tmp_path / "venv"
    # --without-pip + this environment's pip (``pip --python``): the same install, minus seconds of ensurepip.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(py),
            "install",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "--find-links",
            str(out / "wheels"),
            "sartorius-cellseg",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=bare_env(),  # a checkout's src/ on PYTHONPATH would read as cellseg already installed
    )
    assert proc.returncode == 0, proc.stderr
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert sorted(p.name for p in Path(site).iterdir() if "cellseg" in p.name) == [
        "cellseg",
        out.joinpath(json.loads((out / bundle.MARKER).read_text())["wheel"]).name.split("-py3")[0] + ".dist-info",
    ]
    # After the install (else pip would see this environment's editable cellseg as already installed).
    (Path(site) / "kaggle_image.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    probe = subprocess.run(
        [py, "-c", "import cellseg, cellseg.data.rle; print(cellseg.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
        env=bare_env(),  # no PYTHONPATH: a checkout's src/ on it would shadow the installed wheel
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(venv)


def test_checksum_mismatch_fails_and_leaves_nothing(tmp_path):
    checkout = make_checkout(tmp_path / "checkout")
    manifest = make_weights(tmp_path / "weights" / "demo")
    (manifest.parent / "model.pth").write_bytes(b"corrupted")
    with pytest.raises(CellsegError, match="sha256 mismatch"):
        bundle.stage_bundle(manifest, tmp_path / "out", username="alice", repo=checkout)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout", "weights"]  # no out, no temp folder


@pytest.mark.slow
def test_restaging_replaces_a_bundle_but_never_a_foreign_folder(tmp_path):
    checkout = make_checkout(tmp_path / "checkout")
    manifest = make_weights(tmp_path / "weights" / "demo")
    out = tmp_path / "out"
    bundle.stage_bundle(manifest, out, username="alice", repo=checkout)
    make_weights(manifest.parent, size=10)  # new checkpoint + manifest with its sha256
    # Extra inference wheels come from a local wheel dir, matched by normalised project name.
    wheel_dir = tmp_path / "wheelhouse"
    wheel_dir.mkdir()
    with zipfile.ZipFile(wheel_dir / "tiny_dep-1.2-py3-none-any.whl", "w") as z:
        z.writestr("tiny_dep/__init__.py", "")
    (wheel_dir / "other-0.1-py3-none-any.whl").write_bytes(b"")
    b = bundle.stage_bundle(
        manifest, out, username="bob", repo=checkout, extra_wheels=["Tiny-Dep"], wheel_dir=wheel_dir
    )
    assert b.metadata["id"] == "bob/sartorius-cellseg-bundle"
    assert (out / "weights/demo/model.pth").stat().st_size == 10
    assert "wheels/tiny_dep-1.2-py3-none-any.whl" in b.marker["wheels"]
    assert not (out / "wheels/other-0.1-py3-none-any.whl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout", "out", "weights", "wheelhouse"]
    with pytest.raises(CellsegError, match="no wheel of 'missing'"):
        bundle.stage_bundle(
            manifest, out, username="alice", repo=checkout, extra_wheels=["missing"], wheel_dir=wheel_dir
        )
    assert json.loads((out / bundle.MARKER).read_text())["dataset"] == "bob/sartorius-cellseg-bundle"  # untouched

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(CellsegError, match="not a bundle"):
        bundle.stage_bundle(manifest, foreign, username="alice", repo=checkout)
    assert (foreign / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("kind", ["predict", "train"])
def test_a_foreign_out_is_refused_before_anything_is_copied_or_built(tmp_path, monkeypatch, kind):
    checkout = make_checkout(tmp_path / "checkout")
    manifest = make_weights(tmp_path / "weights" / "demo")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    built = []

    def build_wheel(repo, out_dir):
        built.append(repo)
        raise CellsegError("the wheel was built")

    monkeypatch.setattr(bundle, "build_wheel", build_wheel)
    monkeypatch.setattr(training, "build_wheel", build_wheel)
    with pytest.raises(CellsegError, match="mine exists and is not a bundle"):
        if kind == "predict":
            bundle.stage_bundle(manifest, foreign, username="alice", repo=checkout)
        else:  # the training bundle comes from this checkout (its template and configs)
            training.stage_train_bundle(configs_dir() / "demo.yaml", foreign, ["0"], username="alice")
    assert built == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkout", "mine", "weights"]  # no staging folder
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_bad_owner_or_metadata_fails_before_building(tmp_path):
    checkout = make_checkout(tmp_path / "checkout")
    manifest = make_weights(tmp_path / "weights" / "demo")
    with pytest.raises(CellsegError, match="not a valid owner"):
        bundle.stage_bundle(manifest, tmp_path / "out", username="bad user!", repo=checkout)
    meta = json.loads((checkout / "dataset-metadata.json").read_text())
    meta["id"] = "{username}/Bad_Slug"
    (checkout / "dataset-metadata.json").write_text(json.dumps(meta))
    with pytest.raises(CellsegError, match="Bad_Slug"):
        bundle.stage_bundle(manifest, tmp_path / "out", username="alice", repo=checkout)
    assert not (tmp_path / "out").exists()
