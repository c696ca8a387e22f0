"""A resumed run keeps the provenance of the run it continues: the documented resume command has no
``--init``, yet the weights still descend from the init of the first start (its sha256, its data
sources and the Detectron2 import it came from)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from cellseg.config.experiment import load_experiment
from cellseg.model.build import build_model
from cellseg.model.checkpoint import read_checkpoint_info, save_checkpoint
from cellseg.model.provenance import from_checkpoint, synthetic_only
from cellseg.paths import configs_dir
from cellseg.training.loop import train
from helpers import TOY_MODEL_OVERRIDES

OVERRIDES = [
    *TOY_MODEL_OVERRIDES,
    "train.epochs=2",
    "train.batch_size=1",
    "train.num_workers=0",
    "train.threads=1",
    "train.log_every=0",
    "augment.crop_size=[128, 128]",
]
#: the init's own record: trained on real data, fine-tuned from a Detectron2 import.
PARENT = {
    "origin": "cellseg train",
    "data_sources": [
        {"kind": "train_csv", "path": "/kaggle/train.csv", "sha256": "a" * 64, "images": 606, "synthetic": False}
    ],
    "init_sha256": "b" * 64,
    "imported": {"path": "model_final.pth", "sha256": "c" * 64},
}
KEYS = ("init", "init_sha256", "imported", "data_sources")


def run(data: Path, out: Path, max_steps: int, init: Path | None = None, resume: bool = False) -> dict:
    cfg = load_experiment(configs_dir() / "demo.yaml", [*OVERRIDES, f"train.max_steps={max_steps}"])
    train(cfg, data, fold=None, init=init, out=out, resume=resume, progress=False, config_name="tiny")
    return read_checkpoint_info(out / "last.pth").provenance


def test_resume_without_init_keeps_the_init_provenance(synth_dir, tmp_path):
    cfg = load_experiment(configs_dir() / "demo.yaml", OVERRIDES)
    parent = save_checkpoint(tmp_path / "parent.pth", build_model(cfg.model), cfg, cfg.model.class_names, PARENT)
    out = tmp_path / "run"
    first = run(synth_dir, out, max_steps=1, init=parent)  # stops after 1 step, in epoch 1 of 2
    assert first["epoch"] == 1 and first["init"] == str(parent)
    assert first["init_sha256"] == hashlib.sha256(parent.read_bytes()).hexdigest()
    assert first["imported"] == PARENT["imported"]
    assert [s["synthetic"] for s in first["data_sources"]] == [True, False]  # synth_dir + the parent's real data
    parent.unlink()  # the init need not be at hand to resume

    second = run(synth_dir, out, max_steps=2, resume=True)  # the documented resume: no --init
    assert second["epoch"] == 2 and second["step"] == 2
    assert {k: second.get(k) for k in KEYS} == {k: first[k] for k in KEYS}
    assert {k: read_checkpoint_info(out / "best.pth").provenance.get(k) for k in KEYS} == {k: first[k] for k in KEYS}
    assert not synthetic_only([from_checkpoint(second)])
