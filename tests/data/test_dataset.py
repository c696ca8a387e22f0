"""CellDataset: item layout on real PNGs + train.csv, fold split, hole filling, pseudo-label csv,
COCO json (polygons / RLE), copy-paste inside the dataset, and the show-aug CLI as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cellseg import CLASS_IDS
from cellseg.config.experiment import AugmentConfig, DataConfig, ExperimentConfig
from cellseg.data.dataset import build_datasets, build_train_dataset, collate_fn
from cellseg.data.truth import TRAIN_COLUMNS
from cellseg.errors import CellsegError
from cellseg.io import write_gray
from helpers import train_rows, write_train_csv

H, W = 30, 40
TYPES = ["shsy5y", "shsy5y", "astro", "astro", "cort", "cort"]
REPO = Path(__file__).resolve().parents[2]


def exp(augment: AugmentConfig | None = None, **data) -> ExperimentConfig:
    """An experiment config with this augmentation and these ``data`` fields (the rest default)."""
    return ExperimentConfig(data=DataConfig(**data), augment=augment or AugmentConfig())


def rect(top, left, h, w, shape=(H, W)):
    m = np.zeros(shape, dtype=bool)
    m[top : top + h, left : left + w] = True
    return m


def ring(top, left, size, shape=(H, W)):
    """A hollow square outline (a broken astro annotation): hole filling makes it solid."""
    m = rect(top, left, size, size, shape)
    m[top + 1 : top + size - 1, left + 1 : left + size - 1] = False
    return m


def tight(masks: np.ndarray) -> np.ndarray:
    out = []
    for m in masks:
        r, c = np.nonzero(m)
        out.append([c.min(), r.min(), c.max() + 1, r.max() + 1])
    return np.array(out, dtype=np.float32).reshape(-1, 4)


@pytest.fixture(scope="module")
def comp(tmp_path_factory) -> dict:
    """A tiny competition folder: 6 train images (2 per type, own sample ids), 1 semi image."""
    root = tmp_path_factory.mktemp("comp")
    (root / "train").mkdir()
    (root / "train_semi_supervised").mkdir()
    rng = np.random.default_rng(0)
    rows, truth, pixels = [], {}, {}
    for k, cell_type in enumerate(TYPES):
        image_id = f"img{k}"
        masks = [rect(2 + k, 3, 5, 6), rect(15, 20 + k, 4, 8), rect(20, 2, 6, 5 + k)]
        if cell_type == "astro":
            masks.append(ring(8, 25, 6))
        img = rng.integers(0, 256, (H, W), dtype=np.uint8)
        write_gray(root / "train" / f"{image_id}.png", img)
        rows += train_rows(image_id, cell_type, masks, sample_id=f"{cell_type}[s]_{k}")
        truth[image_id], pixels[image_id] = np.stack(masks), img
    write_train_csv(root / "train.csv", rows)
    write_gray(root / "train_semi_supervised" / "shsy5y_semi_0001.png", rng.integers(0, 256, (H, W), dtype=np.uint8))
    return {"root": root, "truth": truth, "pixels": pixels}


def check_item(item, shape=None):
    image, target = item
    n = len(target["labels"])
    assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, *image.shape[1:])
    assert isinstance(target["image_id"], str)
    if shape is not None:
        assert tuple(image.shape[1:]) == shape
    m = target["masks"].numpy().astype(bool)
    assert np.array_equal(target["boxes"].numpy(), tight(m))
    return image, target


def test_fold_split_and_unaugmented_holdout_items_equal_the_annotations(comp):
    train, val = build_datasets(exp(AugmentConfig(), folds=2, fold_seed=0), comp["root"], fold=0)
    ids_train = {train.record(i).image_id for i in range(len(train))}
    ids_val = {val.record(i).image_id for i in range(len(val))}
    assert ids_train | ids_val == set(comp["truth"]) and not ids_train & ids_val and ids_val
    for i in range(len(val)):
        image, target = check_item(val[i], (H, W))
        want = comp["truth"][target["image_id"]].copy()
        cell_type = TYPES[int(target["image_id"][3:])]
        if cell_type == "astro":  # the ring comes back filled (hole filling is on by default)
            want[3] = rect(8, 25, 6, 6)
        assert np.array_equal(target["masks"].numpy().astype(bool), want)
        assert (target["labels"] == CLASS_IDS[cell_type]).all()
        assert torch.allclose(image[0], torch.from_numpy(comp["pixels"][target["image_id"]]).float() / 255, atol=1e-6)


def test_fill_holes_can_be_switched_off(comp):
    train, _ = build_datasets(exp(AugmentConfig(enabled=False), fill_holes=False), comp["root"])
    assert len(train) == 6
    i = next(j for j in range(6) if train.record(j).cell_type == "astro")
    _, target = check_item(train[i], (H, W))
    assert np.array_equal(target["masks"][3].numpy().astype(bool), ring(8, 25, 6))


def test_augmented_items_with_copy_paste_stay_consistent(comp):
    cfg = AugmentConfig(
        copy_paste_p=1.0,
        copy_paste_max_cells=3,
        hflip=0.5,
        vflip=0.5,
        rot90=0.5,
        scale_range=(0.8, 1.5),
        crop_size=(24, 32),
        noise_sigma=0.05,
        gamma=(0.8, 1.2),
        min_area=2,
    )
    train, _ = build_datasets(exp(cfg), comp["root"])
    torch.manual_seed(0)
    grew = 0
    for _ in range(3):
        for i in range(len(train)):
            rec = train.record(i)
            _, target = check_item(train[i])
            # same-type copy-paste: every instance keeps the image's class
            assert (target["labels"] == CLASS_IDS[rec.cell_type]).all()
            grew += len(target["labels"]) > len(rec)
    assert grew  # pasted cells showed up


def test_pseudo_label_csv_with_ratio_and_holdout_exclusion(comp, tmp_path):
    semi = rect(4, 4, 6, 6)
    rows = train_rows("shsy5y_semi_0001", "shsy5y", [semi, rect(20, 20, 5, 9)])
    _, val = build_datasets(exp(folds=2), comp["root"], fold=0)
    held = val.record(0)
    rows += train_rows(held.image_id, held.cell_type, [rect(1, 1, 4, 4)])  # a pseudo-label on a hold-out image
    df = pd.DataFrame(rows, columns=list(TRAIN_COLUMNS))
    df["source"] = "pseudo"
    csv = tmp_path / "pseudo.csv"
    df.to_csv(csv, index=False)
    train, val = build_datasets(exp(AugmentConfig(enabled=False), folds=2, extra_csv=[str(csv)]), comp["root"], fold=0)
    n_base = len(train.records)
    assert len(train) == n_base + 1  # the hold-out image's pseudo-label is left out
    _, target = check_item(train[n_base], (H, W))
    assert target["image_id"] == "shsy5y_semi_0001"
    assert np.array_equal(target["masks"][0].numpy().astype(bool), semi)
    assert (target["labels"] == 1).all()
    train, _ = build_datasets(exp(folds=2, extra_csv=[str(csv)], extra_ratio=1.5), comp["root"], fold=0)
    assert len(train) == n_base + round(1.5 * n_base)
    assert {train.record(i).image_id for i in range(n_base, len(train))} == {"shsy5y_semi_0001"}
    missing = tmp_path / "missing.csv"
    write_train_csv(missing, train_rows("nowhere", "cort", [semi]))
    with pytest.raises(CellsegError, match="nowhere.png not found"):
        build_datasets(exp(extra_csv=[str(missing)]), comp["root"])


def test_coco_json_polygons_and_rle(comp, tmp_path):
    from pycocotools import mask as mask_utils

    imgs = tmp_path / "images" / "livecell_train"
    imgs.mkdir(parents=True)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(imgs / "SHSY5Y_Phase_A10_1.tif")
    Image.fromarray(rng.integers(0, 256, (H, W), dtype=np.uint8)).save(imgs.parent / "BV2_Phase_B4_2.tif")
    rle_mask = rect(3, 20, 7, 9)
    compressed = mask_utils.encode(np.asfortranarray(rle_mask.astype(np.uint8)))
    compressed["counts"] = compressed["counts"].decode()
    # uncompressed COCO RLE: column-major run lengths starting with zeros
    flat = rect(18, 5, 5, 12).ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    counts = np.diff(np.concatenate([[0], edges])).tolist()
    coco = {
        "images": [
            {"id": 7, "file_name": "livecell_train/SHSY5Y_Phase_A10_1.tif", "height": H, "width": W},
            {"id": 8, "file_name": "BV2_Phase_B4_2.tif", "height": H, "width": W},
        ],
        "categories": [{"id": 1, "name": "cell"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [2, 2, 10, 8],
                "segmentation": [[2, 2, 12, 2, 12, 10, 2, 10]],
            },
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [20, 3, 9, 7], "segmentation": compressed},
            {
                "id": 3,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [5, 18, 12, 5],
                "segmentation": {"size": [H, W], "counts": counts},
            },
            {
                "id": 4,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 1,
                "bbox": [0, 0, 5, 5],
                "segmentation": {"size": [H, W], "counts": [0, 25]},
            },
            {
                "id": 5,
                "image_id": 8,
                "category_id": 1,
                "iscrowd": 0,
                "bbox": [30, 20, 6, 6],
                "segmentation": [[30, 20, 36, 20, 36, 26, 30, 26]],
            },
        ],
    }
    ann_dir = tmp_path / "annotations"
    ann_dir.mkdir()
    path = ann_dir / "livecell.json"
    path.write_text(json.dumps(coco))
    cfg = exp(
        AugmentConfig(enabled=False),
        coco_json=[str(path)],
        coco_images_dir=str(tmp_path / "images"),
        coco_cell_type="cort",
        use_train=False,
    )
    train, val = build_datasets(cfg, comp["root"])
    assert val is None and len(train) == 2
    _, t = check_item(train[0], (H, W))
    m = t["masks"].numpy().astype(bool)
    assert len(m) == 3 and t["image_id"] == "SHSY5Y_Phase_A10_1"
    poly = rect(2, 2, 8, 10)
    assert (m[0] & poly).sum() / (m[0] | poly).sum() > 0.7  # rasterised polygon ~ its rectangle
    assert np.array_equal(m[1], rle_mask) and np.array_equal(m[2], rect(18, 5, 5, 12))
    assert (t["labels"] == CLASS_IDS["shsy5y"]).all()  # from the file-name prefix
    _, t = check_item(train[1], (H, W))
    assert t["labels"].tolist() == [CLASS_IDS["cort"]]  # unknown line -> coco_cell_type
    with pytest.raises(CellsegError, match="not found"):
        build_datasets(exp(coco_json=[str(path)]), comp["root"])  # no images dir: the tifs are not beside the json


def test_collate_and_build_train_dataset_for_the_trainer(comp):
    cfg = ExperimentConfig()
    ds = build_train_dataset(cfg, comp["root"], ["img0", "img4"])
    assert [ds.record(i).image_id for i in range(len(ds))] == ["img0", "img4"]
    images, targets = collate_fn([ds[0], ds[1]])
    assert len(images) == len(targets) == 2 and targets[1]["image_id"] == "img4"
    assert (targets[1]["labels"] == CLASS_IDS["cort"]).all()


def test_size_mismatch_is_a_clear_error(comp, tmp_path):
    import shutil

    root = tmp_path / "c"
    shutil.copytree(comp["root"], root)
    write_gray(root / "train" / "img0.png", np.zeros((H + 1, W), dtype=np.uint8))
    train, _ = build_datasets(exp(), root)
    with pytest.raises(CellsegError, match="annotations say 30x40"):
        train[0]


def test_synth_items_at_competition_size(synth_dir):
    train, val = build_datasets(exp(AugmentConfig(copy_paste_p=0.5), folds=3), synth_dir, fold=1)
    assert len(train) + len(val) == 12
    torch.manual_seed(0)
    for ds in (train, val):
        image, target = check_item(ds[0])
        assert sorted(image.shape[1:]) == [520, 704] and len(target["labels"]) > 0


@pytest.mark.slow
def test_show_aug_cli_writes_a_png(synth_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("augment:\n  copy_paste_p: 1.0\n  crop_size: [256, 320]\n")
    args = [
        "show-aug",
        "--data",
        str(synth_dir),
        "-n",
        "2",
        "--out",
        str(out),
        "--seed",
        "1",
        "--config",
        str(cfg),
        "--boxes",
    ]
    proc = subprocess.run([sys.executable, "-m", "cellseg", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
        px = np.asarray(im.convert("RGB")).reshape(-1, 3).astype(int)
    assert (np.ptp(px, axis=1) > 100).sum() > 50  # coloured contour pixels, not just grey
    # a bad config key: one line, exit 2 (in-process: the same CLI entry point, no second torch import)
    from cellseg.cli import main

    cfg.write_text("augment:\n  hflipp: 0.5\n")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "hflipp" in err and len(err.strip().splitlines()) == 1


def test_type_repeat_oversamples_per_cell_type(comp):
    """data.type_repeat: round(f * n) items per type, cycling the type's images in order; types left
    out keep their count; the trainer's dataset gets it from the config (KEY=VALUE override)."""
    from collections import Counter

    from cellseg.config.experiment import load_experiment
    from cellseg.data.dataset import Record, repeat_by_type

    recs = [
        Record(f"{t}{i}", comp["root"], t, H, W, [])
        for t, n in (("cort", 4), ("shsy5y", 2), ("astro", 3))
        for i in range(n)
    ]
    out = repeat_by_type(recs, {"shsy5y": 2.0, "astro": 1.5, "cort": 0.5})
    assert Counter(r.cell_type for r in out) == {"cort": 2, "shsy5y": 4, "astro": 4}  # astro: round(4.5) = 4
    assert [r.image_id for r in out if r.cell_type == "astro"] == ["astro0", "astro1", "astro2", "astro0"]
    assert [r.image_id for r in out if r.cell_type == "cort"] == ["cort0", "cort1"]
    assert repeat_by_type(recs, {}) == recs
    with pytest.raises(CellsegError, match="unknown cell type 'neuron'"):
        repeat_by_type(recs, {"neuron": 2.0})
    with pytest.raises(CellsegError, match="type_repeat.astro: expected a factor > 0"):
        repeat_by_type(recs, {"astro": 0.0})

    cfg = load_experiment(REPO / "configs/demo.yaml", ["data.type_repeat={astro: 3, shsy5y: 2}"])
    ids = list(comp["truth"])
    ds = build_train_dataset(cfg, comp["root"], ids)
    base = Counter(build_train_dataset(load_experiment(REPO / "configs/demo.yaml"), comp["root"], ids).cell_types)
    assert Counter(ds.cell_types) == {"cort": base["cort"], "shsy5y": 2 * base["shsy5y"], "astro": 3 * base["astro"]}


def test_build_datasets_is_the_trainers_split_and_dataset(comp):
    """build_datasets = holdout_split (the split training uses) + build_train_dataset: the same
    hold-out, the same oversampling by data.type_repeat, the same extra-source exclusion."""
    from cellseg.data.folds import holdout_split
    from cellseg.data.truth import read_train_csv

    cfg = exp(AugmentConfig(enabled=False), folds=2, fold_seed=1, type_repeat={"astro": 3.0})
    train, val = build_datasets(cfg, comp["root"], fold=1)
    train_ids, hold_ids = holdout_split(read_train_csv(comp["root"] / "train.csv"), 1, k=2, seed=1)
    assert [val.record(i).image_id for i in range(len(val))] == hold_ids
    trainer = build_train_dataset(cfg, comp["root"], train_ids)
    assert [r.image_id for r in train.records] == [r.image_id for r in trainer.records]
    n_astro = sum(1 for i in train_ids if TYPES[int(i[3:])] == "astro")
    assert n_astro > 0 and train.cell_types.count("astro") == 3 * n_astro
