"""Training: the real loop on a tiny competition folder, `cellseg train` end to end, a SIGKILLed run
resumed to the same weights as an uninterrupted one, and 2-process DDP (gloo, torchrun) in sync."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cellseg.config.experiment import TrainConfig, load_experiment
from cellseg.model.checkpoint import load_model, read_checkpoint, read_checkpoint_info
from cellseg.paths import configs_dir
from cellseg.training.loop import balanced_subset
from cellseg.training.optim import build_optimizer, lr_factor
from cellseg.training.rng import rng_state, set_rng_state
from train_helpers import TINY_OVERRIDES, cli, train_args


def weights(path: Path) -> dict:
    return read_checkpoint(path)["model"]


# ---------------------------------------------------------------------------------------- units


def test_lr_schedule_warmup_cosine_step():
    cfg = TrainConfig(warmup_iters=10, warmup_factor=0.1, schedule="cosine", min_lr_ratio=0.0)
    f = [lr_factor(s, 100, cfg) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[5] == pytest.approx(0.55 * (0.5 + 0.5 * np.cos(np.pi * 0.05)))
    assert all(a < b for a, b in zip(f[:10], f[1:11]))  # warm-up rises
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[100] == pytest.approx(0.0)
    step = TrainConfig(warmup_iters=0, schedule="step", steps=[0.5, 0.8], gamma=0.1)
    assert [lr_factor(s, 100, step) for s in (0, 49, 50, 79, 80)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def test_optimizer_skips_decay_on_norms_and_biases():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].weight.requires_grad_(False)
    for kind, cls in (("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        opt = build_optimizer(model, TrainConfig(optimizer=kind, weight_decay=0.05))
        assert isinstance(opt, cls)
        decay, no_decay = opt.param_groups
        assert [p.shape for p in decay["params"]] == [(4, 3, 3, 3)] and decay["weight_decay"] == 0.05
        assert len(no_decay["params"]) == 2 and no_decay["weight_decay"] == 0.0  # conv bias, bn bias


def test_rng_state_round_trip():
    import random

    state = rng_state()
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_validation_subset_covers_every_cell_type():
    from types import SimpleNamespace

    types = ["cort"] * 6 + ["astro"] * 2 + ["shsy5y"] * 3
    truth = {f"i{k}": SimpleNamespace(cell_type=t) for k, t in enumerate(types)}
    pick = balanced_subset(truth, 7)
    assert len(pick) == 7 and len(set(pick)) == 7
    assert sorted(truth[i].cell_type for i in pick) == ["astro"] * 2 + ["cort"] * 3 + ["shsy5y"] * 2
    assert balanced_subset(truth, 50) and len(balanced_subset(truth, 50)) == 11


# ---------------------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_cli_train_writes_a_complete_run_folder(tiny_data, tmp_path):
    out = tmp_path / "run"
    r = cli(*train_args(tiny_data, out, "train.reference_batch=4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "best hold-out score" in r.stdout
    # demo.yaml's lr 0.002 is set here for 4 images per step; this run takes 2 (1 process x 2): half the
    # lr, twice the warm-up
    assert "lr 0.002 for global batch 4 -> 0.001 for global batch 2 (1 process x 2), warmup_iters 2 -> 4" in r.stdout
    names = {p.name for p in out.iterdir()}
    assert {"last.pth", "best.pth", "metrics.csv", "curves.png", "config.yaml"} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3] and metrics["step"].tolist() == [3, 6, 9]  # 6 train images / batch 2
    assert {
        "loss",
        "loss_mask",
        "loss_objectness",
        "val_score",
        "val_shsy5y",
        "val_astro",
        "val_cort",
        "data_wait",
    } <= set(metrics)
    assert metrics["val_score"].between(0, 1).all()
    assert metrics["lr"].iloc[-1] == pytest.approx(0.001 * 0.01)  # the end of the cosine: lr x min_lr_ratio
    best = read_checkpoint_info(out / "best.pth").provenance
    assert best["fold"] == 0 and best["score"] == pytest.approx(metrics["val_score"].max())
    assert metrics.loc[metrics["val_score"].idxmax(), "epoch"] == best["epoch"]
    assert read_checkpoint_info(out / "last.pth").provenance["epoch"] == 3
    model, info = load_model(out / "best.pth")
    assert info.model_config.fpn_channels == 16 and info.experiment["data"]["folds"] == 3
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved config reproduces the run's config
    assert load_experiment(out / "config.yaml").model == info.model_config


def test_cli_errors_are_one_line(tiny_data, tmp_path, capsys):
    from cellseg.cli import main

    assert main(train_args(tiny_data, tmp_path / "x", "--fold", "5")) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "out of range 0..2" in err
    assert main(train_args(tiny_data, tmp_path / "x", "train.lr=fast")) == 2
    assert "train.lr: expected float" in capsys.readouterr().err
    assert main(train_args(tiny_data, tmp_path / "x", "--init", str(tmp_path / "none.pth"))) == 2
    assert "none.pth: checkpoint not found" in capsys.readouterr().err
    # --config may be left out only by a resume, which then needs a run folder with its config.yaml
    bare = ["train", "--data", str(tiny_data), "--quiet"]
    assert main(bare) == 2
    assert "--config is required" in capsys.readouterr().err
    assert main([*bare, "--resume"]) == 2
    assert "--resume without --config needs --out" in capsys.readouterr().err
    assert main([*bare, "--resume", "--out", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "config.yaml: not found" in err
    assert not (tmp_path / "empty").exists()


def test_resume_continues_with_the_runs_own_config(tiny_data, tmp_path):
    """The error a resume with another model config gets says "resume with the run's own config.yaml":
    leaving --config out reads it, and naming it is no longer refused as an input inside --out."""
    out = tmp_path / "run"
    first = cli(*train_args(tiny_data, out, "train.epochs=1"))
    assert first.returncode == 0, first.stderr[-3000:]
    r = cli("train", "--data", str(tiny_data), "--out", str(out), "--quiet", "--resume", "train.epochs=2")
    assert r.returncode == 0, r.stderr[-3000:]
    info = read_checkpoint_info(out / "last.pth")
    assert info.provenance["epoch"] == 2 and info.provenance["config"] == "demo"  # the name of the run's config
    assert info.model_config.fpn_channels == 16  # the toy model of the first call, not demo.yaml's
    assert load_experiment(out / "config.yaml").train.epochs == 2  # rewritten with this call's override
    r = cli("train", "--config", str(out / "config.yaml"), "--data", str(tiny_data), "--out", str(out), "--quiet",
            "--resume", "train.epochs=3")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert read_checkpoint_info(out / "last.pth").provenance["epoch"] == 3
    # without --resume the run's own config.yaml is still an input inside the output folder
    r = cli("train", "--config", str(out / "config.yaml"), "--data", str(tiny_data), "--out", str(out), "--force")
    assert r.returncode == 2 and "is (or holds) the input" in r.stderr
    assert (out / "last.pth").is_file() and read_checkpoint_info(out / "last.pth").provenance["epoch"] == 3


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tiny_data, tmp_path):
    extra = ["train.epochs=4", "train.num_workers=1", "augment.copy_paste_p=0.5"]
    full = subprocess.Popen(
        [sys.executable, "-m", "cellseg", *train_args(tiny_data, tmp_path / "full", *extra)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = tmp_path / "killed"
    victim = subprocess.Popen(
        [sys.executable, "-m", "cellseg", *train_args(tiny_data, out, *extra)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 240
    while not (out / "last.pth").exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    killed_at = read_checkpoint_info(out / "last.pth").provenance["epoch"]
    assert killed_at < 4
    r = cli(*train_args(tiny_data, out, *extra, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    _, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    a, b = weights(tmp_path / "full" / "last.pth"), weights(out / "last.pth")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    sa, sb = (
        read_checkpoint(tmp_path / "full" / "last.pth")["train_state"],
        read_checkpoint(out / "last.pth")["train_state"],
    )
    assert sa["step"] == sb["step"] == 12
    mom_a, mom_b = sa["optimizer"]["state"], sb["optimizer"]["state"]  # demo.yaml: AdamW's two moments
    assert mom_a.keys() == mom_b.keys() and mom_a
    assert all(torch.equal(mom_a[i][k], mom_b[i][k]) for i in mom_a for k in ("exp_avg", "exp_avg_sq", "step"))
    la = pd.read_csv(tmp_path / "full" / "metrics.csv")
    lb = pd.read_csv(out / "metrics.csv")
    pd.testing.assert_frame_equal(la.drop(columns=["seconds", "data_wait"]), lb.drop(columns=["seconds", "data_wait"]))


#: prepended to the two-process scripts: ``ddp_alive()`` counts the DistributedDataParallel wrappers
#: still alive. One that outlives train() keeps the process group alive through its reducer (after
#: destroy_process_group too); freed at interpreter exit, gloo's threads can then end the process
#: with SIGABRT ("terminate called without an active exception") instead of its exit status.
TRACK_DDP = """
import weakref
from torch.nn.parallel import DistributedDataParallel
_ddp = []
_init = DistributedDataParallel.__init__
def _track(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    _ddp.append(weakref.ref(self))
DistributedDataParallel.__init__ = _track
def ddp_alive():
    return sum(r() is not None for r in _ddp)
"""

DDP_SCRIPT = (
    TRACK_DDP
    + """
import os, sys, torch
from cellseg.config.experiment import load_experiment
from cellseg.training.loop import train
import torch.distributed as dist

# every tensor a collective gets must be on the training device (NCCL has no CPU tensors)
def on_device(fn):
    def check(tensor, *args, **kwargs):
        local = int(os.environ["LOCAL_RANK"])
        want = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        assert tensor.device == want, f"{fn.__name__} got a tensor on {tensor.device}, training on {want}"
        return fn(tensor, *args, **kwargs)
    return check
dist.all_reduce, dist.broadcast = on_device(dist.all_reduce), on_device(dist.broadcast)
cfg = load_experiment(sys.argv[1], sys.argv[4:])
res = train(cfg, sys.argv[2], fold=0, out=sys.argv[3], progress=False)
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
torch.save({k: v for k, v in res.model.state_dict().items()}, f"{sys.argv[3]}/rank{rank}.pt")
# one file per rank: two processes printing to one pipe can interleave their lines
# train() destroyed the group it created (else gloo may SIGABRT at interpreter exit)
text = f"rank {rank} world {world} steps {res.steps_done} group left {dist.is_initialized()} ddp alive {ddp_alive()}"
open(f"{sys.argv[3]}/rank{rank}.txt", "w").write(text)
"""
)


@pytest.mark.slow
def test_ddp_two_processes_keep_identical_weights(tiny_data, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    out.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(configs_dir() / "demo.yaml"),
            str(tiny_data),
            str(out),
            *TINY_OVERRIDES,
            "train.epochs=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    # 6 train images / 2 ranks = 3 each, batch 2 -> 2 steps per epoch on each rank
    assert [(out / f"rank{k}.txt").read_text() for k in (0, 1)] == [
        f"rank {k} world 2 steps 4 group left False ddp alive 0" for k in (0, 1)
    ]
    w0, w1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    assert [k for k in w0 if not torch.equal(w0[k], w1[k])] == []
    init = read_checkpoint(out / "last.pth")["model"]
    assert all(torch.equal(init[k], w0[k]) for k in w0)  # rank 0 wrote the shared weights
    ckpt = read_checkpoint_info(out / "last.pth")
    assert ckpt.provenance["world_size"] == 2 and ckpt.provenance["epoch"] == 2
    assert len(read_checkpoint(out / "last.pth")["train_state"]["rng"]) == 2  # every rank's RNG is resumable
    # saved by 2 processes, resumed by 1 (a 2-GPU session continued on a 1-GPU machine): with a warning,
    # from the epoch reached, at this run's 3 steps per epoch (6 images / batch 2)
    r = cli(*train_args(tiny_data, out, "train.epochs=3", "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "saved by 2 process(es), resumed with 1" in r.stdout
    state = read_checkpoint(out / "last.pth")["train_state"]
    assert state["epoch"] == 3 and state["step"] == 2 * 3 + 3 and len(state["rng"]) == 1
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]


def test_collectives_get_tensors_on_the_training_device(monkeypatch):
    """NCCL has no CPU backend: the loss means and BatchNorm buffers must be all-reduced / broadcast on
    the training device. A 'meta' device stands in for the GPU (the gloo run above trains on the CPU)."""
    from cellseg.training import distributed

    class Stop(Exception):
        pass

    seen = []

    def all_reduce(t, *a, **k):
        seen.append(("all_reduce", t.device))
        raise Stop  # a meta tensor has no values to read back

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(distributed.dist, "broadcast", lambda t, *a, **k: seen.append(("broadcast", t.device)))
    info = distributed.DistInfo(rank=1, world_size=2, device=torch.device("meta"))
    with pytest.raises(Stop):
        distributed.reduce_mean({"loss": 1.0, "loss_mask": 0.5}, info)
    distributed.broadcast_buffers(torch.nn.BatchNorm2d(4).to("meta"), info)
    assert [name for name, _ in seen] == ["all_reduce", "broadcast", "broadcast", "broadcast"]
    assert {d for _, d in seen} == {torch.device("meta")}


FAILING_VALIDATION_SCRIPT = (
    TRACK_DDP
    + """
import os, sys
import torch.distributed as dist
import cellseg.training.loop as loop
from cellseg.config.experiment import load_experiment
rank = int(os.environ["RANK"])
if rank == 0:
    def broken(*args, **kwargs):
        raise RuntimeError("validation blew up")
    loop.evaluate = broken
cfg = load_experiment(sys.argv[1], sys.argv[4:])
try:
    loop.train(cfg, sys.argv[2], fold=0, out=sys.argv[3], progress=False)
except Exception as e:
    with open(f"{sys.argv[3]}/rank{rank}.err", "w") as f:
        f.write(f"group left {dist.is_initialized()} ddp alive {ddp_alive()} {type(e).__name__}: {e}")
    if rank == 0:
        sys.stdin.read()  # alive but gone (as a process stuck in NCCL teardown) until the test lets it go
    sys.exit(1)
"""
)


@pytest.mark.slow
def test_rank0_failing_in_validation_stops_the_other_ranks_at_once(tiny_data, tmp_path):
    """Two gloo processes launched by hand (no torchrun to kill the survivors); rank 0 raises in its
    validation and then stays alive, blocked on its stdin until rank 1 has exited: rank 1, waiting for
    rank 0, must stop with a clear line without rank 0 exiting (else it would wait for the gloo group's
    3 h timeout, far past the 150 s allowed here)."""
    import socket

    script = tmp_path / "fail_val.py"
    script.write_text(FAILING_VALIDATION_SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    cmd = [sys.executable, str(script), str(configs_dir() / "demo.yaml"), str(tiny_data), str(out)]
    cmd += [*TINY_OVERRIDES, "train.epochs=1", "train.max_steps=1"]
    procs = [
        subprocess.Popen(
            cmd,
            env=dict(base, RANK=str(r), LOCAL_RANK=str(r)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in (0, 1)
    ]
    try:
        procs[1].wait(timeout=150)
        log1 = procs[1].stdout.read().decode()
        assert procs[1].returncode == 1, log1[-3000:]
        assert procs[0].poll() is None  # rank 0 is still alive (its stdin is open): rank 1 did not wait for it
        procs[0].stdin.close()
        assert procs[0].wait(timeout=60) == 1
        err1 = (out / "rank1.err").read_text()
        assert "CellsegError" in err1 and "rank 0 failed" in err1 and "validation blew up" in err1, err1
        # the failing ranks destroyed their gloo group: no SIGABRT at interpreter exit instead of exit 1
        for err in (err1, (out / "rank0.err").read_text()):
            assert "group left False ddp alive 0" in err, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
