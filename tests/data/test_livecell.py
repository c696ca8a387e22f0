"""LIVECell: the streaming COCO reader (flat arrays, rasterisation equal to pycocotools' full frame),
the LIVECell_dataset_2021 layout found inside the competition folder, the explicit class mapping,
bad input as one line, and the two-stage recipe end to end: pretrain (2 steps, validated per cell
line) -> --init fine-tune on synthetic competition data (2 steps) -> predict -> a valid submission."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from cellseg.config.experiment import ModelConfig, load_experiment
from cellseg.data import jsonstream
from cellseg.data.coco import load_coco
from cellseg.data.dataset import build_train_dataset
from cellseg.data.livecell import LIVECELL_DIR, find_livecell, validation_set
from cellseg.errors import CellsegError
from cellseg.model.build import build_model, class_specific
from cellseg.model.checkpoint import load_init, read_checkpoint_info, save_checkpoint
from cellseg.paths import configs_dir
from helpers import TOY_MODEL_OVERRIDES

H, W = 64, 80
LINES = ("SHSY5Y", "A172", "BV2")
#: the recipe's configs shrunk to a toy (the data sections, class map included, stay as shipped).
TINY_MODEL = [
    "model.backbone=resnet18",
    "model.backbone_blocks=[1, 1, 1, 1]",
    "model.norm=bn",
    "model.trainable_backbone_layers=5",
    "model.input_scale=1.0",
    *TOY_MODEL_OVERRIDES,
]
TINY_TRAIN = [
    "train.epochs=1",
    "train.max_steps=2",
    "train.batch_size=2",
    "train.num_workers=0",
    "train.threads=1",
    "train.warmup_iters=1",
    "train.amp=false",
    "train.log_every=0",
    "train.val_thresholds.score=0.0",
    "augment.crop_size=[0, 0]",
]


def ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 16) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.round(np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1), 2).ravel().tolist()


def make_livecell(parent: Path, seed: int = 0) -> tuple[Path, dict]:
    """``parent/LIVECell_dataset_2021``: train and val jsons (train's ``annotations`` keyed by id as in
    LIVECell, val's a list), 8-bit TIFFs in per-line folders, 2 images per line per split with 2-4
    elliptic cells each, one image without annotations and one crowd annotation. Returns the root and
    the number of (non-crowd) polygons per image name."""
    root = parent / LIVECELL_DIR
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    counts: dict[str, int] = {}
    for split in ("train", "val"):
        images, anns = [], []
        names = [(line, f"{line}_Phase_A{k}_1_00d04h00m_{split}{k}.tif") for line in LINES for k in range(2)]
        names.append(("SHSY5Y", f"SHSY5Y_Phase_B1_1_00d00h00m_{split}empty.tif"))
        for image_id, (line, name) in enumerate(names, start=10):
            image = rng.normal(90, 4, (H, W))
            n = 0 if name.endswith("empty.tif") else int(rng.integers(2, 5))
            for _ in range(n):
                cx, cy, rx, ry = rng.uniform(12, W - 12), rng.uniform(12, H - 12), rng.uniform(4, 8), rng.uniform(4, 8)
                image[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] += 70
                anns.append(
                    {
                        "id": 1000 + len(anns),
                        "image_id": image_id,
                        "category_id": 1,
                        "iscrowd": 0,
                        "area": float(np.pi * rx * ry),
                        "bbox": [cx - rx, cy - ry, 2 * rx, 2 * ry],
                        "segmentation": [ellipse(cx, cy, rx, ry)],
                    }
                )
            counts[name] = n
            folder = root / "images" / "livecell_train_val_images" / line
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / name)
            images.append({"id": image_id, "file_name": name, "height": H, "width": W})
        crowd = {"size": [H, W], "counts": [0, 40, H * W - 40]}
        anns.append(
            {"id": 9999, "image_id": 10, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 1, 40], "segmentation": crowd}
        )
        rng.shuffle(anns)  # annotations need not be grouped by image
        doc = {
            "info": {"description": "LIVECell-format fixture"},
            "n_annotations": 12345678901234567890,  # a bare number: the reader must not stop at a chunk end
            "images": images,
            "annotations": {str(a["id"]): a for a in anns} if split == "train" else anns,
            "categories": [{"supercategory": "cell", "id": 1, "name": "cell"}],
        }
        (root / "annotations" / "LIVECell").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json").write_text(json.dumps(doc))
    return root, counts


@pytest.fixture(scope="module")
def competition(tmp_path_factory, synth_dir) -> tuple[Path, dict]:
    """A copy of the synthetic competition folder with LIVECell_dataset_2021/ inside (as on Kaggle)."""
    data = tmp_path_factory.mktemp("comp") / "data"
    shutil.copytree(synth_dir, data)
    _, counts = make_livecell(data)
    return data, counts


def pretrain_cfg(*extra: str):
    return load_experiment(configs_dir() / "livecell_pretrain_r50.yaml", [*TINY_MODEL, *TINY_TRAIN, *extra])


# ------------------------------------------------------------------------------- the store


def full_frame(seg, h: int, w: int) -> np.ndarray:
    """pycocotools' own full-frame rasterisation of one annotation (the reference)."""
    if isinstance(seg, list):
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
    if isinstance(seg["counts"], str):  # compressed
        return mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(bool)
    return mask_utils.decode(mask_utils.frPyObjects(seg, h, w)).astype(bool)


def test_crops_equal_pycocotools_full_frame_rasterisation(tmp_path):
    rng = np.random.default_rng(7)
    h, w = 50, 70
    segs = [
        [ellipse(3.3, 4.7, 6.1, 5.2)],  # crosses the top-left corner
        [ellipse(68.6, 48.9, 5.0, 7.5)],  # crosses the bottom-right corner
        [ellipse(30.25, 20.75, 9.9, 3.1), ellipse(50.5, 30.5, 4.0, 4.0)],  # two polygons, one annotation
        [[10.2, 40.1, 11.1, 40.3, 10.6, 41.0]],  # a sliver inside one pixel or two
        [list(rng.uniform(0, 60, 24).round(3))],  # a self-intersecting 12-gon
        {"size": [h, w], "counts": [5 * h + 3, 7, h - 7, 7, h * w - 6 * h - 10]},  # uncompressed RLE
    ]
    compressed = mask_utils.encode(np.asfortranarray(full_frame([ellipse(20, 25, 8, 6)], h, w).astype(np.uint8)))
    segs.append({"size": [h, w], "counts": compressed["counts"].decode()})
    doc = {
        "images": [{"id": 1, "file_name": "X_1.png", "height": h, "width": w}],
        "annotations": [{"id": i, "image_id": 1, "segmentation": s} for i, s in enumerate(segs)],
    }
    Image.fromarray(np.zeros((h, w), np.uint8)).save(tmp_path / "X_1.png")
    (tmp_path / "a.json").write_text(json.dumps(doc))
    store = load_coco(tmp_path / "a.json", default_type="cort")
    crops, labels = store.crops(0)
    refs = [full_frame(s, h, w) for s in segs]
    assert len(crops) == len(refs) == 7 and (labels == 3).all()
    for crop, ref in zip(crops, refs):
        assert ref.any() and np.array_equal(crop.to_full(h, w), ref)
    assert store.nbytes < 2000  # a few arrays, no per-vertex objects


def test_streaming_reader_is_independent_of_the_chunk_size(competition, monkeypatch):
    data, _ = competition
    path = data / LIVECELL_DIR / "annotations" / "LIVECell" / "livecell_coco_train.json"
    images = data / LIVECELL_DIR / "images"
    ref = load_coco(path, images, {"*": "shsy5y"})
    monkeypatch.setattr(jsonstream, "CHUNK", 3)  # every number, key and string split across refills
    small = load_coco(path, images, {"*": "shsy5y"})
    for k, v in vars(ref).items():
        if isinstance(v, np.ndarray):
            assert np.array_equal(v, getattr(small, k), equal_nan=v.dtype.kind == "f"), k
    assert len(ref) == 7 and ref.crowd == 1 and len(ref.coords) > 0


# ------------------------------------------------------------------------------- layout + mapping


def test_livecell_found_inside_the_competition_folder_with_its_class_mapping(competition):
    data, counts = competition
    cfg = pretrain_cfg("augment.enabled=false")
    ds = build_train_dataset(cfg, data, [])  # the shipped config: LIVECell train only
    assert len(ds) == 7  # 3 lines x 2 + the image without annotations; no train.csv image
    seen = set()
    for i in range(len(ds)):
        rec = ds.record(i)
        image, target = ds[i]
        line = rec.image_id.split("_")[0]
        assert rec.path.parent.name == line and rec.path.suffix == ".tif"
        assert image.shape == (3, H, W) and len(target["masks"]) == counts[rec.path.name]  # the crowd one skipped
        want = 1 if line == "SHSY5Y" else 2  # model classes [shsy5y, cell]
        assert (target["labels"] == want).all() and rec.cell_type == cfg.model.class_names[want - 1]
        seen.add(line)
    assert seen == set(LINES)
    # an explicit path, and the folder holding LIVECell_dataset_2021, work as well
    assert find_livecell(str(data / LIVECELL_DIR), "/nonexistent").root == data / LIVECELL_DIR
    assert find_livecell(str(data), "/nonexistent").root == data / LIVECELL_DIR


def test_validation_split_grouped_per_cell_line(competition):
    data, counts = competition
    val = validation_set(pretrain_cfg("train.val_max_images=3"), data)
    assert val.groups == sorted(LINES)  # one image per line, taken in turn
    truth = val.truth
    assert len(truth) == 3 and {a.cell_type for a in truth.values()} == set(LINES)
    for image_id, ann in truth.items():
        assert len(ann.instances) == counts[f"{image_id}.tif"] and ann.height == H
    assert set(val.paths) == set(truth) and all(p.is_file() for p in val.paths.values())


@pytest.mark.slow
def test_data_package_does_not_import_training_or_inference():
    """The LIVECell validation is scored on the training side (training.engine.evaluate_livecell): reading
    data pulls in neither the training loop, the inference pipeline nor the metric."""
    code = (
        "import sys, cellseg.data.dataset, cellseg.data.livecell; "
        "print(sorted(m for m in sys.modules if m.startswith(('cellseg.training', 'cellseg.inference', 'cellseg.evaluation.metric'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"


def test_bad_input_is_one_line(tmp_path, competition):
    data, _ = competition
    src = data / LIVECELL_DIR / "annotations" / "LIVECell" / "livecell_coco_train.json"
    images = data / LIVECELL_DIR / "images"
    cases = {
        "not COCO": ('{"licenses": [], "categories": []}', "not a COCO instances file"),
        "a list": ("[1, 2, 3]", "not a COCO instances file"),
        "broken": ('{"images": [{"id": 1, "file_name": "a.tif", "height": 5, "width"', "not valid JSON"),
        "csv": ("id,annotation\nabc,1 2\n", "not a COCO instances file|not valid JSON"),
    }
    for name, (text, msg) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(text)
        with pytest.raises(CellsegError, match=msg) as e:
            load_coco(p, images)
        assert "\n" not in str(e.value), name
    doc = json.loads(src.read_text())
    doc["images"][0]["file_name"] = "A172_Phase_Z9_1_gone.tif"
    (tmp_path / "missing.json").write_text(json.dumps(doc))
    with pytest.raises(CellsegError, match=r"1 of 7 images not found .*A172_Phase_Z9_1_gone.tif"):
        load_coco(tmp_path / "missing.json", images)
    with pytest.raises(CellsegError, match=r"no data.coco_class_map entry covers category 'cell' or cell line 'A172'"):
        load_coco(src, images, {"SHSY5Y": "shsy5y", "BV2": "cell"}, ["shsy5y", "cell"])
    with pytest.raises(CellsegError, match=r"maps to 'glia', which is not one of model.class_names"):
        load_coco(src, images, {"*": "glia"}, ["shsy5y", "cell"])
    doc = json.loads(src.read_text())
    next(iter(doc["annotations"].values()))["segmentation"] = {"size": [H, W], "counts": [3, 4, 5]}
    (tmp_path / "rle.json").write_text(json.dumps(doc))
    with pytest.raises(CellsegError, match=rf"RLE counts do not cover its size {H}x{W}"):
        load_coco(tmp_path / "rle.json", images)
    with pytest.raises(CellsegError, match="no LIVECell layout"):
        find_livecell("elsewhere", tmp_path)


@pytest.mark.slow
def test_cli_reports_a_json_that_is_not_coco_in_one_line(tmp_path, competition):
    data, _ = competition
    lc = tmp_path / "lc"
    shutil.copytree(data / LIVECELL_DIR / "annotations", lc / "annotations")
    (lc / "images").symlink_to(data / LIVECELL_DIR / "images")
    (lc / "annotations" / "LIVECell" / "livecell_coco_train.json").write_text('{"type": "instances"}')
    cmd = [sys.executable, "-m", "cellseg", "train", "--config", str(configs_dir() / "livecell_pretrain_r50.yaml")]
    cmd += ["--data", str(data), "--fold", "all", "--out", str(tmp_path / "run"), "--quiet", f"data.livecell={lc}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "not a COCO instances file" in res.stderr
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- head re-initialisation


def test_init_keeps_matching_class_rows_and_reinitialises_the_others(tmp_path):
    tiny = dict(
        backbone="resnet18",
        backbone_blocks=[1, 1, 1, 1],
        norm="bn",
        returned_layers=[1, 2],
        anchor_sizes=[[8], [16], [32]],
        fpn_channels=16,
        box_head_dim=32,
        mask_head_convs=1,
    )
    torch.manual_seed(0)
    src_cfg = ModelConfig(**tiny, num_classes=3, class_names=["shsy5y", "cell"])
    src = build_model(src_cfg)
    path = save_checkpoint(tmp_path / "pre.pth", src, src_cfg, src_cfg.class_names, {})
    torch.manual_seed(1)
    dst = build_model(ModelConfig(**tiny))
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    msg = load_init(dst, path, ["shsy5y", "astro", "cort"])
    assert "\n" not in msg and "kept shsy5y, re-initialised astro, cort" in msg and "mask_fcn_logits" in msg
    own, pre = dst.state_dict(), src.state_dict()
    for k in own:
        if not class_specific(k):
            assert torch.equal(own[k], pre[k]), k
            continue
        per = own[k].shape[0] // 4  # rows per class: 1, or 4 for the box regressor
        assert torch.equal(own[k][: 2 * per], pre[k][: 2 * per]), k  # background + shsy5y from LIVECell
        assert torch.equal(own[k][2 * per :], fresh[k][2 * per :]), k  # astro, cort fresh
    # same number of classes under other names: shapes match, rows still must not be taken
    other_cfg = ModelConfig(**tiny, class_names=["a172", "bv2", "cell"])
    path2 = save_checkpoint(tmp_path / "other.pth", build_model(other_cfg), other_cfg, other_cfg.class_names, {})
    dst2 = build_model(ModelConfig(**tiny))
    before = dst2.state_dict()["roi_heads.box_predictor.cls_score.weight"].clone()
    assert "kept background only" in load_init(dst2, path2, ["shsy5y", "astro", "cort"])
    assert torch.equal(dst2.state_dict()["roi_heads.box_predictor.cls_score.weight"][1:], before[1:])


# ------------------------------------------------------------------------------- the recipe


@pytest.mark.slow
def test_pretrain_then_finetune_then_predict(tmp_path, competition, capsys):
    from cellseg.data.submission import read_submission, validate_submission
    from cellseg.inference.runner import predict_folder
    from cellseg.model.export import export_weights
    from cellseg.training.loop import train

    data, _ = competition
    pre = train(pretrain_cfg("train.val_max_images=3"), data, fold=None, out=tmp_path / "pre", progress=False)
    assert pre.steps_done == 2 and pre.best_score is not None  # validated on LIVECell val
    metrics = pd.read_csv(tmp_path / "pre" / "metrics.csv")
    assert {f"val_{line}" for line in LINES} <= set(metrics.columns) and "val_astro" not in metrics.columns
    info = read_checkpoint_info(tmp_path / "pre" / "best.pth")
    assert info.class_names == ["shsy5y", "cell"] and set(info.provenance["per_class"]) == set(LINES)

    capsys.readouterr()
    ft_cfg = load_experiment(
        configs_dir() / "finetune_from_livecell_r50.yaml", [*TINY_MODEL, *TINY_TRAIN, "augment.crop_size=[128, 128]"]
    )
    ft = train(ft_cfg, data, fold=None, init=tmp_path / "pre" / "best.pth", out=tmp_path / "ft", progress=False)
    notice = [line for line in capsys.readouterr().out.splitlines() if "pre" in line and "loaded" in line]
    assert len(notice) == 1 and "kept shsy5y, re-initialised astro, cort" in notice[0]
    assert ft.steps_done == 2 and read_checkpoint_info(tmp_path / "ft" / "best.pth").class_names == [
        "shsy5y",
        "astro",
        "cort",
    ]

    manifest = export_weights([tmp_path / "ft" / "best.pth"], tmp_path / "weights", tta=["identity"]).manifest
    sub = tmp_path / "submission.csv"
    predict_folder(data, manifest, sub, device="cpu", progress=False, log=lambda m: None)  # validates too
    assert validate_submission(sub, data / "test") == []
    assert set(read_submission(sub)) == {p.stem for p in (data / "test").glob("*.png")}
