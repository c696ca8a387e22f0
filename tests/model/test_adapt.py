"""BatchNorm statistics from unlabelled images: ``cellseg.model.adapt`` and ``cellseg export --adapt-bn``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cellseg.cli import main
from cellseg.config.manifest import load_manifest
from cellseg.errors import CellsegError
from cellseg.inference.ensemble import Ensemble
from cellseg.io import write_gray
from cellseg.model.adapt import adapt_batchnorm, norm_layers, pick_images
from cellseg.model.build import FrozenBatchNorm2d, build_model, image_tensor
from cellseg.model.checkpoint import load_model, read_checkpoint, save_checkpoint
from cellseg.model.provenance import describe
from inference_helpers import blob_image, make_checkpoint, tiny_model_config


def _images(n: int, offset: int = 0) -> list[np.ndarray]:
    """Blob images made darker and more contrasted than ``blob_image``'s, so their statistics differ
    from whatever a model's running statistics hold."""
    return [np.clip(blob_image(i).astype(int) * 2 - 150 + offset, 0, 255).astype(np.uint8) for i in range(n)]


def _model(norm: str = "bn") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(tiny_model_config(norm=norm, heads="v2"), training_targets=False).eval()


def test_the_first_layer_gets_the_mean_and_variance_of_its_input_and_nothing_else_changes():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images(2)
    n = adapt_batchnorm(model, images, batch_size=2)
    assert n == len(norm_layers(model)) > 5

    # what backbone.body.bn1 saw: conv1 of the transformed batch (the model's own resize and normalisation)
    with torch.no_grad():
        batch, _ = model.transform([image_tensor(a, torch.device("cpu")) for a in images])
        x = model.backbone.body.conv1(batch.tensors)
    bn1 = model.backbone.body.bn1
    torch.testing.assert_close(bn1.running_mean, x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn1.running_var, x.var(dim=(0, 2, 3), unbiased=True))

    after = model.state_dict()
    adapted = {f"{name}.{b}" for name, _ in norm_layers(model) for b in ("running_mean", "running_var")}
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert adapted - changed == set()  # every backbone / FPN statistic moved
    assert changed - adapted <= {k for k in after if k.endswith("num_batches_tracked")}
    # the heads' BatchNorm layers (v2 heads) and every learned weight are as trained
    assert any("roi_heads" in k and k.endswith("running_mean") for k in after)
    assert not model.training and not any(m.training for m in model.modules())


def test_statistics_are_the_average_of_the_batches_the_last_short_one_included():
    images = _images(5, offset=20)
    whole = _model()
    adapt_batchnorm(whole, images, batch_size=2)  # batches [0, 1], [2, 3], [4]
    parts = []
    for batch in (images[0:2], images[2:4], images[4:5]):
        m = _model()
        adapt_batchnorm(m, batch, batch_size=2)
        parts.append(m.backbone.body.bn1.running_mean)
    torch.testing.assert_close(whole.backbone.body.bn1.running_mean, torch.stack(parts).mean(0))
    other = _model()
    adapt_batchnorm(other, _images(5, offset=60), batch_size=2)  # brighter images: other statistics
    assert not torch.allclose(whole.backbone.body.bn1.running_mean, other.backbone.body.bn1.running_mean)


def test_frozen_batchnorm_layers_are_adapted_and_stay_frozen():
    model = _model("frozen_bn")
    layers = norm_layers(model, "backbone.body.")  # the FPN of v2 heads has trainable BatchNorm layers
    assert layers and all(isinstance(m, FrozenBatchNorm2d) for _, m in layers)
    weights = {name: m.weight.clone() for name, m in layers}
    means = {name: m.running_mean.clone() for name, m in layers}
    keys = list(model.state_dict())
    adapt_batchnorm(model, _images(2))
    after = dict(model.named_modules())
    for name, m in layers:
        assert after[name] is m  # the very module, still frozen
        assert torch.equal(m.weight, weights[name])
        assert not torch.equal(m.running_mean, means[name])
    assert list(model.state_dict()) == keys


def test_a_groupnorm_model_and_no_images_are_refused():
    gn = build_model(tiny_model_config(norm="gn"), training_targets=False).eval()  # v1 heads: no norm in the FPN
    with pytest.raises(CellsegError, match="no BatchNorm layer"):
        adapt_batchnorm(gn, _images(2))
    model = _model()
    before = model.backbone.body.bn1.running_mean.clone()
    with pytest.raises(CellsegError, match="no image"):
        adapt_batchnorm(model, [])
    assert torch.equal(model.backbone.body.bn1.running_mean, before)
    assert all(isinstance(m, torch.nn.BatchNorm2d) and m.momentum == 0.1 for _, m in norm_layers(model))


def test_pick_images_spreads_over_the_sorted_names(tmp_path: Path):
    for i in range(10):
        write_gray(tmp_path / f"img{i}.png", _images(1)[0])
    (tmp_path / "notes.txt").write_text("not an image")
    picked = [p.name for p in pick_images(tmp_path, 3)]
    assert len(picked) == 3 and picked[0] == "img0.png" and picked[-1] == "img9.png"
    assert len(set(picked)) == 3
    assert len(pick_images(tmp_path, 50)) == 10


@pytest.fixture
def adapt_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, a in enumerate(_images(3)):
        write_gray(folder / f"u{i}.png", a)
    return folder


def _trained_checkpoint(path: Path) -> Path:
    """A tiny v2-heads checkpoint whose provenance records its training data, as `cellseg train` writes."""
    model, info = load_model(make_checkpoint(path, heads="v2"))
    source = {"kind": "train_csv", "path": "/data/train.csv", "sha256": "0" * 64, "images": 3, "synthetic": True}
    return save_checkpoint(path, model, info.model_config, info.class_names, {"data_sources": [source]})


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_adapt_bn_writes_a_verified_weights_folder_with_the_record(tmp_path, adapt_dir, capsys):
    ckpt = _trained_checkpoint(tmp_path / "best.pth")
    plain, adapted = tmp_path / "plain", tmp_path / "adapted"
    assert main(["export", str(ckpt), "--out", str(plain), "--float32"]) == 0
    args = ["export", str(ckpt), "--out", str(adapted), "--float32", "--adapt-bn", str(adapt_dir)]
    assert main([*args, "--adapt-images", "2"]) == 0
    assert "adapt-bn best.pth" in capsys.readouterr().err  # progress

    m = load_manifest(adapted)  # checksums verified
    rec = m.models[0].provenance.adapted
    assert rec is not None and rec.images == 2 and rec.path == str(adapt_dir.resolve())
    assert rec.layers == len(norm_layers(load_model(ckpt)[0]))
    assert "BatchNorm statistics from 2 unlabelled images" in describe(m.models[0].provenance)
    assert load_manifest(plain).models[0].provenance.adapted is None
    assert read_checkpoint(adapted / "model.pth")["provenance"]["bn_adapted"]["sha256"] == rec.sha256

    a, _ = load_model(adapted / "model.pth")
    p, _ = load_model(plain / "model.pth")
    sa, sp = a.state_dict(), p.state_dict()
    differ = {k for k in sa if not torch.equal(sa[k], sp[k])}
    assert differ and all(k.startswith("backbone.") and ("running_" in k or "num_batches" in k) for k in differ)
    Ensemble.load(load_manifest(adapted), torch.device("cpu"))  # the predict path loads it

    # the same images give the same file; two other images another one
    again = tmp_path / "again"
    assert (
        main(
            ["export", str(ckpt), "--out", str(again), "--float32", "--adapt-bn", str(adapt_dir), "--adapt-images", "2"]
        )
        == 0
    )
    state = read_checkpoint(adapted / "model.pth")["model"]
    assert _same(read_checkpoint(again / "model.pth")["model"], state)
    assert main([*args, "--force"]) == 0  # all three images
    assert yaml.safe_load((adapted / "manifest.yaml").read_text())["models"][0]["provenance"]["adapted"]["images"] == 3
    assert not _same(read_checkpoint(adapted / "model.pth")["model"], state)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "is not a folder of images"),
        ("empty", "holds no PNG image"),
        ("zero", "--adapt-images: 0 is out of range"),
        ("no-dir", "--adapt-images needs --adapt-bn"),
        ("corrupt", "cannot"),
        ("groupnorm", "no BatchNorm layer"),
    ],
)
def test_export_adapt_bn_refusals_exit_2_and_leave_the_earlier_export(tmp_path, adapt_dir, capsys, case, message):
    ckpt = make_checkpoint(tmp_path / "best.pth", heads="v2")
    out = tmp_path / "w"
    assert main(["export", str(ckpt), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    folder: Path = adapt_dir
    extra: list[str] = []
    if case == "missing":
        folder = tmp_path / "nope"
    elif case == "empty":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif case == "zero":
        extra = ["--adapt-images", "0"]
    elif case == "corrupt":
        (adapt_dir / "u1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "groupnorm":
        ckpt = make_checkpoint(tmp_path / "gn.pth", norm="gn")  # v1 heads: no BatchNorm anywhere in the backbone
    cmd = ["export", str(ckpt), "--out", str(out), "--force", *extra]
    cmd += ["--adapt-images", "2"] if case == "no-dir" else ["--adapt-bn", str(folder)]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
