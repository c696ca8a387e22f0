"""``cellseg export``: trained checkpoints -> weights folder + manifest that predict/dry-run read."""

from __future__ import annotations

import pytest
import torch
import yaml

from cellseg.cli import main
from cellseg.config.manifest import ClassThresholds, load_manifest, write_manifest
from cellseg.errors import CellsegError
from cellseg.inference.ensemble import Ensemble
from cellseg.model.build import build_model
from cellseg.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from cellseg.model.export import export_weights
from cellseg.tuning.raw_cache import cache_fingerprint
from inference_helpers import blob_image, make_checkpoint, make_competition, tiny_model_config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two 'fold' run folders as `cellseg train` leaves them: best.pth, and last.pth with resume state."""
    root = tmp_path_factory.mktemp("runs")
    for i in range(2):
        (root / f"fold{i}").mkdir()
        best = make_checkpoint(root / f"fold{i}" / "best.pth", seed=i)
        model, info = load_model(best)
        save_checkpoint(
            root / f"fold{i}" / "last.pth",
            model,
            info.model_config,
            info.class_names,
            info.provenance,
            train_state={"optimizer": {"momentum": torch.randn(300_000)}, "epoch": 3},
        )
    return root


@pytest.mark.slow
def test_export_writes_a_verified_manifest_of_half_weights(run_dir, tmp_path):
    srcs = [run_dir / "fold0" / "last.pth", run_dir / "fold1" / "best.pth"]
    res = export_weights(srcs, tmp_path / "w" / "tiny2", tta=["identity", "vflip"], weights=[1.0, 2.0])
    m = load_manifest(res.manifest)  # checksums verified
    assert m.name == "tiny2" and m.tta == ["identity", "vflip"]
    assert [(e.checkpoint, e.weight) for e in m.models] == [("model_0.pth", 1.0), ("model_1.pth", 2.0)]
    assert set(m.classes) == {"shsy5y", "astro", "cort"}
    for (dest, src, size), entry in zip(res.files, m.models):
        assert dest == m.checkpoint_path(entry)
        raw = read_checkpoint(dest)
        assert "train_state" not in raw and raw["half"] is True
        assert raw["provenance"]["exported_from"] == str(src.resolve())
        assert size < src.stat().st_size
        exported, _ = load_model(dest)
        original, _ = load_model(src)
        for k, v in original.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(exported.state_dict()[k], v.half().float())
    # the resume state made last.pth much bigger than the exported copy
    assert res.files[0][2] < 0.6 * srcs[0].stat().st_size


def test_template_thresholds_are_kept_and_predict_runs(run_dir, tmp_path, capsys):
    tpl = load_manifest(export_weights([run_dir / "fold0" / "best.pth"], tmp_path / "old").manifest)
    loose = ClassThresholds(score=0.05, mask_threshold=0.45, nms_iou=0.5, min_pixels=2)
    tpl.classes = {"shsy5y": loose, "astro": loose, "cort": loose}
    tpl.fusion.detections_per_view = 50
    tpl.fusion.model_score_thresh = 0.01
    write_manifest(tpl, tmp_path / "old" / "manifest.yaml")

    out = tmp_path / "new"
    assert (
        main(
            [
                "export",
                str(run_dir / "fold1" / "best.pth"),
                "--out",
                str(out),
                "--tta",
                "identity",
                "--thresholds-from",
                str(tmp_path / "old" / "manifest.yaml"),
                "--float32",
            ]
        )
        == 0
    )
    m = load_manifest(out / "manifest.yaml")
    assert m.classes["astro"] == loose and m.fusion.detections_per_view == 50 and m.tta == ["identity"]
    assert read_checkpoint(out / "model.pth")["half"] is False

    comp = make_competition(tmp_path / "comp", n_test=2)
    sub = tmp_path / "submission.csv"
    assert (
        main(
            [
                "predict",
                "--data",
                str(comp),
                "--weights",
                str(out / "manifest.yaml"),
                "--out",
                str(sub),
                "--no-progress",
            ]
        )
        == 0
    )
    rows = sub.read_text().splitlines()
    assert rows[0] == "id,predicted" and len(rows) > 3  # the loose thresholds keep detections


def test_errors_leave_no_manifest(run_dir, tmp_path, capsys):
    out = tmp_path / "w"
    junk = tmp_path / "junk.pth"
    torch.save({"weights": torch.zeros(3)}, junk)
    with pytest.raises(CellsegError, match="not a cellseg checkpoint"):
        export_weights([run_dir / "fold0" / "best.pth", junk], out)
    assert not (out / "manifest.yaml").exists()

    other = tmp_path / "other.pth"
    cfg = tiny_model_config(num_classes=3, class_names=["a", "b"])
    save_checkpoint(other, build_model(cfg), cfg, ["a", "b"], {})
    with pytest.raises(CellsegError, match="differ from the competition"):
        export_weights([other], out)
    with pytest.raises(CellsegError, match="unknown view 'rot90'"):
        export_weights([run_dir / "fold0" / "best.pth"], out, tta=["identity", "rot90"])
    with pytest.raises(CellsegError, match="checkpoint not found"):
        export_weights([tmp_path / "nope.pth"], out)
    assert not out.exists() or not (out / "manifest.yaml").exists()

    export_weights([run_dir / "fold0" / "best.pth"], out)
    before = (out / "manifest.yaml").read_text()
    assert main(["export", str(run_dir / "fold1" / "best.pth"), "--out", str(out)]) == 2
    assert "use --force" in capsys.readouterr().err
    assert (out / "manifest.yaml").read_text() == before
    assert main(["export", str(run_dir / "fold1" / "best.pth"), "--out", str(out), "--force"]) == 0
    assert (
        yaml.safe_load((out / "manifest.yaml").read_text())["models"][0]["sha256"]
        != yaml.safe_load(before)["models"][0]["sha256"]
    )


def _raw_boxes(weights_dir, image) -> list:
    ens = Ensemble.load(load_manifest(weights_dir / "manifest.yaml"), torch.device("cpu"))
    return [(r.boxes, r.scores) for r in ens.forward(image)]


def test_input_scale_predicts_as_the_model_trained_at_that_scale(tmp_path):
    # the same weights (same seed) saved once as a scale-1 model and once as a scale-2 model
    at1 = make_checkpoint(tmp_path / "s1.pth", input_scale=1.0)
    at2 = make_checkpoint(tmp_path / "s2.pth", input_scale=2.0)
    assert main(["export", str(at1), "--out", str(tmp_path / "over"), "--input-scale", "2"]) == 0
    export_weights([at2], tmp_path / "native2")
    export_weights([at1], tmp_path / "native1")
    assert load_manifest(tmp_path / "over" / "manifest.yaml").models[0].input_scale == 2.0
    assert load_manifest(tmp_path / "native1" / "manifest.yaml").models[0].input_scale is None
    # unset, the key is left out: the manifest is what exports wrote before input_scale existed
    assert "input_scale" not in (tmp_path / "native1" / "manifest.yaml").read_text()

    image = blob_image(0, 96, 128)
    over, native2, native1 = (_raw_boxes(tmp_path / d, image) for d in ("over", "native2", "native1"))
    assert len(over) == 2 and all(len(b) for b, _ in over)
    for (b, s), (b2, s2) in zip(over, native2):
        torch.testing.assert_close(b, b2)
        torch.testing.assert_close(s, s2)
    assert any(b.shape != b1.shape or not torch.allclose(b, b1) for (b, _), (b1, _) in zip(over, native1))

    # a cached pre-fusion run of one scale is never reused for another
    assert cache_fingerprint(load_manifest(tmp_path / "over" / "manifest.yaml")) != cache_fingerprint(
        load_manifest(tmp_path / "native1" / "manifest.yaml")
    )


def test_input_scale_refusals_write_nothing(run_dir, tmp_path, capsys):
    sized = run_dir / "fold0" / "best.pth"  # resizes to min_size / max_size: no factor to set
    out = tmp_path / "w"
    assert main(["export", str(sized), "--out", str(out), "--input-scale", "1.5"]) == 2
    assert "needs a model trained at a fixed input scale" in capsys.readouterr().err
    assert not out.exists()
    fixed = make_checkpoint(tmp_path / "fixed.pth", input_scale=1.0)
    for bad in ("0", "-1", "nan", "9"):
        assert main(["export", str(fixed), "--out", str(out), "--input-scale", bad]) == 2
        err = capsys.readouterr().err
        assert "--input-scale" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
    # a hand-edited manifest is checked as well
    export_weights([fixed], out)
    data = yaml.safe_load((out / "manifest.yaml").read_text())
    data["models"][0]["input_scale"] = 0
    (out / "manifest.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CellsegError, match=r"models\[0\]\.input_scale: 0.0 is out of range"):
        load_manifest(out / "manifest.yaml")
