import hashlib

import pytest
import yaml

from cellseg.config.manifest import (
    Manifest,
    ModelEntry,
    default_classes,
    load_manifest,
    sha256_file,
    write_manifest,
)
from cellseg.errors import CellsegError


def _ensemble(tmp_path, names=("a.pth", "b.pth")):
    for i, n in enumerate(names):
        (tmp_path / n).write_bytes(bytes([i]) * (3_000_000 + i))  # > one 1 MiB read chunk
    m = Manifest(
        name="t",
        models=[ModelEntry(n, weight=1.0 + i) for i, n in enumerate(names)],
        tta=["identity", "hflip"],
        classes=default_classes(),
    )
    return write_manifest(m, tmp_path / "manifest.yaml")


def test_sha256_file_matches_hashlib(tmp_path):
    p = tmp_path / "x.bin"
    data = bytes(range(256)) * 10_000
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_round_trip_and_relative_paths(tmp_path):
    path = _ensemble(tmp_path)
    raw = yaml.safe_load(path.read_text())
    assert "base_dir" not in raw and raw["tta"] == ["identity", "hflip"]
    assert raw["classes"]["astro"]["min_pixels"] == 150
    m = load_manifest(path)
    assert [e.checkpoint for e in m.models] == ["a.pth", "b.pth"]
    assert m.checkpoint_path(m.models[1]) == (tmp_path / "b.pth").resolve()
    assert m.thresholds("cort").score == pytest.approx(0.55)
    assert m.models[0].sha256 == hashlib.sha256((tmp_path / "a.pth").read_bytes()).hexdigest()


def test_mismatch_names_the_file(tmp_path):
    path = _ensemble(tmp_path)
    (tmp_path / "b.pth").write_bytes(b"tampered")
    with pytest.raises(CellsegError, match=r"b\.pth: sha256 mismatch") as e:
        load_manifest(path)
    assert "\n" not in str(e.value)
    load_manifest(path, verify=False)  # structure alone is fine


def test_missing_checkpoint_names_the_file(tmp_path):
    path = _ensemble(tmp_path)
    (tmp_path / "a.pth").unlink()
    with pytest.raises(CellsegError, match=r"a\.pth: checkpoint listed in the manifest not found"):
        load_manifest(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(models=[]), "no models listed"),
        (lambda d: d["classes"].pop("astro"), "lacks thresholds for astro"),
        (lambda d: d.update(tta=["identity", "rot90"]), r"tta\[1\]: expected one of"),
        (lambda d: d["classes"]["cort"].update(score="high"), r"classes\.cort\.score: expected float"),
        (lambda d: d.update(extra=1), "unknown config key 'extra'"),
    ],
)
def test_bad_manifests_stop_with_one_line(tmp_path, edit, message):
    path = _ensemble(tmp_path)
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CellsegError, match=message) as e:
        load_manifest(path)
    assert "\n" not in str(e.value)


def test_missing_manifest_file(tmp_path):
    with pytest.raises(CellsegError, match="not found"):
        load_manifest(tmp_path / "nope.yaml")


def test_overrides_and_directory_argument(tmp_path):
    _ensemble(tmp_path)
    m = load_manifest(tmp_path, overrides=["classes.cort.score=0.9", "fusion.iou_type=box"])
    assert m.classes["cort"].score == 0.9 and m.fusion.iou_type == "box"


def test_committed_demo_weights_verify_and_rebuild():
    """weights/demo as committed: checksums match, every threshold is present, the checkpoint
    rebuilds its model from the file alone, and it stays within the 25 MB the repo allows."""
    from cellseg import CELL_TYPES
    from cellseg.config.manifest import load_manifest
    from cellseg.model.checkpoint import load_model
    from cellseg.paths import demo_manifest

    m = load_manifest(demo_manifest())  # raises on a checksum mismatch
    assert set(m.classes) == set(CELL_TYPES)
    for entry in m.models:
        path = m.checkpoint_path(entry)
        assert path.stat().st_size <= 25 * 1024 * 1024
        _, info = load_model(path)
        assert info.class_names == list(CELL_TYPES)
        assert info.model_config.box_detections_per_img >= 1000  # shsy5y images hold up to ~790 cells


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("score", 2.0, r"classes.cort.score: 2.0 is out of range \(allowed: \[0, 1\]\)"),
        ("mask_threshold", float("nan"), r"classes.cort.mask_threshold: nan is not allowed"),
        ("nms_iou", 0.0, r"classes.cort.nms_iou: 0.0 is out of range \(allowed: \(0, 1\]\)"),
        ("min_pixels", -5, r"classes.cort.min_pixels: -5 is out of range \(allowed: >= 0\)"),
    ],
)
def test_a_manifest_with_a_threshold_out_of_range_is_never_written(tmp_path, field, value, words):
    path = _ensemble(tmp_path)
    before = path.read_bytes()
    m = load_manifest(path)
    setattr(m.classes["cort"], field, value)
    with pytest.raises(CellsegError, match=words):
        write_manifest(m, path)
    assert path.read_bytes() == before
