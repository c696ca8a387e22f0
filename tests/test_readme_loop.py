"""The README's "loop a user runs", run command by command as README.md writes it.

The commands are extracted from the README's bash block, so the README cannot drift from what works.
The only changes are the ones the README itself documents for a CPU (``configs/demo.yaml`` instead
of the R50 config, no ``--init`` COCO file) plus sizes through documented flags and ``KEY=VALUE``
overrides (a tiny synthetic set, two training steps, one pseudo-labelled image), and ``--dry-run``
for ``push.py`` (no network). ``cellseg`` commands run in this process (``cellseg.cli.main``) to save
the interpreter start-up per command; ``python tools/push.py`` runs as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.cli import main
from cellseg.model.checkpoint import read_checkpoint_info

REPO = Path(__file__).resolve().parents[1]

#: what the README's CPU paragraph says to change (each must occur in the block: the test fails if
#: the README stops saying it)
CPU_VARIANT = [
    ("configs/maskrcnn_r50_fpn.yaml", str(REPO / "configs" / "demo.yaml")),
    ("--init coco_maskrcnn_r50.pth", ""),
]
#: sizes, appended per command (documented flags / KEY=VALUE overrides)
SIZES = {
    "synth": ["--train-images", "10", "--test-images", "1", "--semi-images", "1", "--workers", "1"],
    "train": [
        "train.max_steps=2",
        "train.val_max_images=1",
        "train.num_workers=0",
        "train.log_every=0",
        "model.rpn_post_nms_top_n_test=100",
        "model.box_detections_per_img=20",
    ],
    "predict-raw": ["--device", "cpu", "--quiet"],
    "tune": ["--nms-iou", "0.3,0.5", "--mask-threshold", "0.5", "--min-pixels", "0,50"],
    "dry-run": ["--device", "cpu", "--no-progress"],
    "pseudo-label": ["--images", "1", "--device", "cpu"],
}


def readme_loop() -> list[list[str]]:
    """The commands of the README's "The loop a user runs" bash block, one argv each (comments,
    blank lines and the venv activation dropped)."""
    text = (REPO / "README.md").read_text()
    section = text.split("## The loop a user runs", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv and argv[0] not in (".", "source"):
            commands.append(argv)
    return commands


def cpu_sized(argv: list[str]) -> list[str]:
    line = shlex.join(argv)
    for old, new in CPU_VARIANT:
        line = line.replace(old, new)
    argv = shlex.split(line)
    if argv[0] == "cellseg":
        argv += SIZES.get(argv[1], [])
    elif argv[:2] == ["python", "tools/push.py"]:
        argv = [sys.executable, str(REPO / "tools" / "push.py"), *argv[2:], "--dry-run"]
    return argv


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cellseg(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv[1:])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_the_readme_block_says_what_this_test_changes():
    commands = [shlex.join(c) for c in readme_loop()]
    for old, _ in CPU_VARIANT:
        assert any(old in c for c in commands), f"README loop no longer contains {old!r}: update CPU_VARIANT"
    assert [c.split()[1] for c in commands if c.startswith("cellseg")][:2] == ["synth", "folds"]
    # the README's CPU paragraph documents the same substitutions
    readme = (REPO / "README.md").read_text()
    assert "configs/demo.yaml" in readme and "without `--init coco_maskrcnn_r50.pth`" in readme


@pytest.mark.slow
def test_readme_loop_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = readme_loop()
    outputs: list[str] = []
    trains: list[list[str]] = []
    exports: dict[str, str] = {}
    first_run: dict[str, str] = {}
    for argv in commands:
        sized = cpu_sized(argv)
        if argv[0] == "cellseg":
            if argv[1] == "train" and trains:  # the first run must survive the second
                first = Path(trains[0][trains[0].index("--out") + 1])
                first_run = {p.name: sha(p) for p in first.iterdir()}
            code, out = run_cellseg(sized, capsys)
            assert code == 0, f"{shlex.join(argv)}\n{out[-3000:]}"
            if argv[1] == "train":
                trains.append(argv)
            if argv[1] == "export":
                exports[argv[argv.index("--out") + 1]] = argv[2]
        else:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("KAGGLE", "HTTP", "HTTPS"))}
            env.update(KAGGLE_USERNAME="readme-user", HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO / "src"))
            r = subprocess.run(sized, capture_output=True, text=True, timeout=120, env=env)
            out = r.stdout + r.stderr
            assert r.returncode == 0, f"{shlex.join(argv)}\n{out[-3000:]}"
        outputs.append(out)

    # item 1: two training runs, two folders; the second starts from the first's best.pth and left it intact
    outs = [Path(t[t.index("--out") + 1]) for t in trains]
    assert len(trains) == 2 and outs[0] != outs[1]
    assert {p.name: sha(p) for p in outs[0].iterdir()} == first_run
    init = read_checkpoint_info(outs[1] / "best.pth").provenance["init"]
    assert Path(init) == outs[0] / "best.pth"
    # running the first train command again is refused, with one line naming the folder
    code, out = run_cellseg(cpu_sized(trains[0]), capsys)
    assert code == 2 and str(outs[0]) in out and len(out.strip().splitlines()) == 1
    assert {p.name: sha(p) for p in outs[0].iterdir()} == first_run

    # item 4: the push stages the weights the loop exported, not the demo model
    push = commands[-1]
    shipped = push[push.index("--weights") + 1]
    assert str(Path(shipped).parent) in exports, f"push ships {shipped}, which no export step wrote"
    assert f"staging the bundle from {shipped}" in outputs[-1]
    assert "weights/demo" not in outputs[-1]

    # item 7: the folds CSV is what train / predict-raw / dry-run held out
    folds = json.loads(Path("runs/cache/r50/index.json").read_text())["ids"]
    import pandas as pd

    csv = pd.read_csv("runs/folds.csv")
    assert sorted(folds) == sorted(csv.loc[csv["fold"] == 0, "id"])
    dry = json.loads(Path("runs/dry/r50/summary.json").read_text())
    assert dry["images"] == len(folds)
    assert any("train image(s)" in o for o in outputs) and not any("test image(s)" in o for o in outputs)


@pytest.mark.parametrize("argv", [a for a in readme_loop() if a[0] == "cellseg"], ids=lambda a: a[1])
def test_every_readme_command_parses(argv):
    """Each command's options exist (argparse): a renamed flag fails here, before the slow test."""
    from cellseg.cli import build_parser

    args, extra = build_parser(argv[1]).parse_known_args(cpu_sized(argv)[1:])
    assert all("=" in e for e in extra), extra
