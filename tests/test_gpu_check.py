"""benchmarks/gpu_check.sh, the prepared GPU run, kept from rotting: every stage on the CPU with tiny sizes
(``--cpu-smoke``), and a failing stage recorded while the next ones still run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from cellseg.paths import repo_root

SCRIPT = repo_root() / "benchmarks" / "gpu_check.sh"
STAGES = ["env", "synth", "train", "memory", "nccl", "ddp", "predict", "dry-run"]


def run_check(
    tmp: Path, python: str, *args: str, timeout: int = 600, script: Path = SCRIPT
) -> subprocess.CompletedProcess:
    """Run ``script`` (it works in the checkout it lies in) with OUT and WORK under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OUT=str(tmp / "out"), WORK=str(tmp / "work"), PYTHON=python)
    return subprocess.run(
        ["bash", str(script), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp
    )


def stage_lines(tmp: Path) -> dict[str, str]:
    lines = (tmp / "out" / "summary.txt").read_text().splitlines()
    return {line.split()[0]: line for line in lines if line.split() and line.split()[0] in STAGES}


def test_cpu_smoke_runs_every_stage(tmp_path):
    r = run_check(tmp_path, sys.executable, "--cpu-smoke")
    log = (tmp_path / "out" / "gpu_check.log").read_text() if (tmp_path / "out" / "gpu_check.log").exists() else ""
    assert r.returncode == 0, (r.stdout + r.stderr + log)[-4000:]
    stages = stage_lines(tmp_path)
    assert list(stages) == STAGES and all(" ok " in line for line in stages.values()), stages
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    for amp in ("amp_on", "amp_off"):
        t = res["train"][amp]
        assert t["s_per_step"] > 0 and t["peak_mb_densest_pair"] > 0 and t["img_per_s"] > 0
    assert res["train"]["densest_pair_cells"][0] >= res["train"]["densest_pair_cells"][1] > 0
    assert res["nccl"]["ok"] is True and res["nccl"]["backend"] == "gloo"
    for views in ("views_1", "views_4"):
        p = res["predict"][views]
        assert p["forward_s_per_image"] > 0 and p["rest_s_per_image"] > 0 and p["failed"] == 0
    assert 0.0 <= res["dry_run"]["score"] <= 1.0 and res["dry_run"]["images"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.log", "summary.txt"]


def test_a_failing_stage_is_recorded_and_the_next_still_run(tmp_path):
    # in a copy of the script whose checkout holds the .whl/ that --prepare-wheels leaves: --cpu-smoke
    # must not install it (with PYTHON=false that pip call would end the script before any stage)
    checkout = tmp_path / "checkout"
    script = checkout / "benchmarks" / SCRIPT.name
    script.parent.mkdir(parents=True)
    shutil.copy2(SCRIPT, script)
    (checkout / ".whl").mkdir()
    (checkout / ".whl" / "pycocotools-0-cp312-cp312-manylinux_2_17_x86_64.whl").write_bytes(b"")
    r = run_check(tmp_path, "false", "--cpu-smoke", timeout=120, script=script)  # every python call fails at once
    assert r.returncode == 1
    stages = stage_lines(tmp_path)
    assert list(stages) == STAGES
    assert all("FAILED (exit" in stages[s] for s in STAGES), stages
    assert re.search(r"\b8 stage\(s\) failed", r.stdout), r.stdout
