#!/usr/bin/env python
"""Two training steps of every shipped config (configs/*.yaml), on CPU, in the running interpreter's
torch/torchvision: the check ``tools/oldtorch_venv.sh`` runs on the oldest versions that train.

    python tools/train_every_config.py                 # every config, 2 steps each
    python tools/train_every_config.py demo maskrcnn_r50_fpn

Each config trains as shipped (architecture, input scale, augmentations, optimiser) on a few
``cellseg synth`` images; only the data and the length change: ``train.max_steps=2``, no
validation, no workers, fp32 (CPU). Configs that pretrain on LIVECell train here on the synthetic
competition images instead, with the competition's three classes (``LIVECELL_TO_SYNTH``): no
LIVECell copy is needed, and the backbone, transforms and loop are what run on the old versions.
Exit 1 when any config fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STEPS = [
    "train.max_steps=2",
    "train.epochs=1",
    "train.batch_size=1",
    "train.num_workers=0",
    "train.threads=1",
    "train.val_every=0",
    "train.amp=false",
    "train.log_every=0",
    "data.folds=2",
]
LIVECELL_TO_SYNTH = [
    "data.use_train=true",
    "data.livecell=''",
    "data.livecell_val=''",
    "data.coco_class_map={}",
    "model.class_names=[shsy5y, astro, cort]",
    "model.num_classes=4",
]


#: Augmentations no shipped config turns on, trained once more on the demo config: the custom
#: RandomGamma goes through torchvision's transform hooks, whose names changed in 0.21.
EXTRA_RUNS = {"demo.yaml + gamma": ("demo", ["augment.gamma=[0.8, 1.2]"])}


def cellseg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellseg", *args], capture_output=True, text=True)


def main(argv: list[str]) -> int:
    import torch
    import torchvision

    configs = sorted((REPO / "configs").glob("*.yaml"))
    if argv:
        configs = [c for c in configs if c.stem in argv]
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}: {len(configs)} configs", flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="cellseg-train-every-config-") as tmp:
        data = Path(tmp) / "data"
        p = cellseg("synth", "--out", str(data), "--train-images", "6", "--test-images", "1", "--semi-images", "0")
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return 1
        runs = []
        for cfg in configs:
            text = cfg.read_text()
            runs.append(
                (cfg.name, cfg, LIVECELL_TO_SYNTH if "livecell:" in text and "use_train: false" in text else [])
            )
        runs += [(name, REPO / "configs" / f"{stem}.yaml", extra) for name, (stem, extra) in EXTRA_RUNS.items()
                 if not argv or stem in argv]  # fmt: skip
        for i, (name, cfg, extra) in enumerate(runs):
            start = time.monotonic()
            out = Path(tmp) / "runs" / str(i)
            p = cellseg("train", "--config", str(cfg), "--data", str(data), "--fold", "0", "--out", str(out),
                        "--quiet", *STEPS, *extra)  # fmt: skip
            ok = p.returncode == 0 and (out / "last.pth").is_file()
            print(f"{'ok    ' if ok else 'FAILED'} {name}: {time.monotonic() - start:.0f} s", flush=True)
            if not ok:
                print("\n".join((p.stderr or p.stdout).strip().splitlines()[-15:]), file=sys.stderr)
                failed.append(name)
    if failed:
        print(f"training failed for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
