"""``tools/push.py train`` and ``fetch`` end to end: the real kaggle client in a subprocess against the
loopback fake Kaggle (tests/fake_kaggle.py); the key never shows in any output (``push`` checks)."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from test_push import KEY, USER, error_lines, push

from cellseg.io import default_mode
from cellseg.kaggle.training import OUTPUT_MARKER, verify_output
from cellseg.paths import configs_dir
from fake_kaggle import PLANTED, REPO, FakeKaggle, make_checkout, plant_secrets

COMP = "sartorius-cell-instance-segmentation"
BUNDLE = f"{USER}/sartorius-cellseg-train-bundle"
BASE = f"{USER}/sartorius-cellseg-train"
CONFIG = str(configs_dir() / "demo.yaml")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A checkout copy with credentials, VCS data, tests and caches planted where a careless bundler
    would pick them up, and an init checkpoint with a kaggle.json beside it."""
    tmp = tmp_path_factory.mktemp("push-train-site")
    checkout = make_checkout(tmp / "checkout")
    init = tmp / "init" / "coco.pth"
    init.parent.mkdir()
    init.write_bytes(np.random.default_rng(1).bytes(30_000))
    plant_secrets(checkout, init.parent)
    return {"checkout": checkout, "init": init}


@pytest.fixture
def fake():
    with FakeKaggle(username=USER, key=KEY, processing_polls=1) as f:
        yield f


def train_output(fold: str, status: str = "complete", seed: int = 0, epochs_done: int = 2) -> dict[str, bytes]:
    """The files a training kernel leaves in /kaggle/working, with its output marker."""
    rng = np.random.default_rng(seed)
    metrics = "epoch,step,loss,val_score,val_shsy5y,val_astro,val_cort\n" + "".join(
        f"{e},{3 * e},{1.5 / e:.4f},{0.1 * e:.4f},0.1,0.2,0.3\n" for e in range(1, epochs_done + 1)
    )
    files = {
        "run/last.pth": rng.bytes(20_000),
        "run/best.pth": rng.bytes(9_000),
        "run/metrics.csv": metrics.encode(),
        "run/config.yaml": b"train:\n  epochs: 4\n",
    }
    marker = {
        "format": 1,
        "kind": "train-output",
        "fold": fold,
        "status": status,
        "epochs_done": epochs_done,
        "epochs": 4,
        "step": 3 * epochs_done,
        "best_score": 0.1 * epochs_done,
        "best_epoch": epochs_done,
        "config_name": "demo",
        "files": [
            {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in sorted(files.items())
        ],
    }
    return {**files, OUTPUT_MARKER: json.dumps(marker).encode()}


def uploads_of(fake: FakeKaggle, method: str) -> dict[str, bytes]:
    (body,) = fake.bodies(method)
    files = body["files"] if method == "CreateDataset" else body["body"]["files"]
    return dict(fake.uploaded(f["token"]) for f in files)


@pytest.mark.slow
def test_dry_run_plans_a_gpu_kernel_per_fold_and_sends_nothing(tmp_path, site, fake):
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "all", "--init", str(site["init"]),
             "--dry-run", "--username", USER, creds=None)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert fake.calls == []
    for k in range(5):
        assert f'"id": "{BASE}-fold{k}"' in p.stdout and f"STAGED = {{'fold': '{k}', 'bundle_id':" in p.stdout
    assert p.stdout.count('"enable_gpu": true') == 5 and p.stdout.count('"enable_internet": false') == 5
    assert "coco.pth" in p.stdout and "demo.yaml" in p.stdout and '"train.time_limit=11h30m"' in p.stdout
    assert not (site["checkout"] / "dist").exists()


@pytest.mark.slow
def test_train_uploads_config_and_init_and_pushes_one_gpu_kernel_per_fold(tmp_path, site, fake):
    fake.kernel_statuses_by_slug = {f"{BASE}-fold0": ["RUNNING", "COMPLETE"], f"{BASE}-fold1": ["COMPLETE"]}
    fake.set_output(f"{BASE}-fold0", train_output("0", "stopped"))
    fake.set_output(f"{BASE}-fold1", train_output("1", "complete"))
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "0,1", "--init", str(site["init"]),
             "train.epochs=2", "--wait")  # fmt: skip
    assert p.returncode == 0, p.stderr

    # The dataset: config, init weights, the wheel and the marker; nothing planted.
    (create,) = fake.bodies("CreateDataset")
    assert (create["ownerSlug"], create["slug"], create["isPrivate"]) == (USER, "sartorius-cellseg-train-bundle", True)
    up = uploads_of(fake, "CreateDataset")
    assert sorted(up) == ["cellseg-bundle.json", "coco.pth", "demo.yaml", "wheels.zip"]
    assert up["coco.pth"] == site["init"].read_bytes() and up["demo.yaml"] == Path(CONFIG).read_bytes()
    with zipfile.ZipFile(io.BytesIO(up["wheels.zip"])) as z:
        (wheel_name,) = z.namelist()
        with zipfile.ZipFile(io.BytesIO(z.read(wheel_name))) as w:
            members = {n: w.read(n) for n in w.namelist()}
    assert all(n.split("/")[0] == "cellseg" or ".dist-info/" in n for n in members)
    for blob in [*up.values(), *members.values()]:
        assert PLANTED.encode() not in blob
    marker = json.loads(up["cellseg-bundle.json"])
    assert (marker["kind"], marker["config"], marker["init"], marker["folds"]) == (
        "train",
        "demo.yaml",
        "coco.pth",
        ["0", "1"],
    )
    assert marker["overrides"] == ["train.epochs=2", "train.time_limit=11h30m"]

    # One kernel per fold: GPU on, internet off, private, the right sources, its fold written in.
    assert [k["slug"] for k in fake.kernels] == [f"{BASE}-fold0", f"{BASE}-fold1"]
    for fold, body in enumerate(fake.kernels):
        assert body["newTitle"] == f"Sartorius cellseg train fold{fold}"
        assert (body["enableGpu"], body["enableInternet"], body["isPrivate"]) == (True, False, True)
        assert body["datasetDataSources"] == [BUNDLE] and body["competitionDataSources"] == [COMP]
        assert body.get("kernelDataSources", []) == []  # the wire format leaves empty lists out
        assert f"STAGED: dict = {{'fold': '{fold}', 'bundle_id': '{marker['bundle_id']}'}}" in body["text"]
        assert "from kaggle_env import" not in body["text"]
        compile(body["text"], "train.py", "exec")
    m = fake.methods()
    assert m.index("CreateDataset") < m.index("GetDatasetStatus", m.index("CreateDataset")) < m.index("SaveKernel")

    # --wait: both polled to the end; fold 0 stopped at the time limit -> how to continue it.
    assert "fold 0 stopped after epoch 2 of 4" in p.stdout and "fold 1 complete after epoch 2 of 4" in p.stdout
    assert f"--fold 0 --resume-from {BASE}" in p.stdout
    assert f"push.py fetch --kernel {BASE} --fold 0,1 --out runs/kaggle/demo" in p.stdout


@pytest.mark.slow
def test_resume_from_adds_the_source_and_an_error_ends_polling_with_the_log_tail(tmp_path, site, fake):
    source = f"{BASE}-fold2"
    fake.set_output(source, train_output("2", "stopped"), log=fake.kernel_log)
    fake.kernel_statuses = ["RUNNING", "ERROR"]
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "2", "--resume-from", BASE, "--wait")
    assert p.returncode == 1
    (body,) = fake.kernels
    # a new session of the fold, whose only kernel source is the previous session: never itself
    assert body["slug"] == f"{source}-s2" and body["kernelDataSources"] == [source]
    assert body["newTitle"] == "Sartorius cellseg train fold2 s2"
    assert body["datasetDataSources"] == [BUNDLE]
    m = fake.methods()
    assert m.index("ListKernelSessionOutput") < m.index("CreateDataset")  # the source is checked first
    assert f"fold 2: resumes {source} (stopped after epoch 2 of 4)" in p.stdout
    assert "Traceback: boom" in p.stdout and "loading weights" in p.stdout  # the log tail
    assert "ended in ERROR: Your notebook hit an error" in p.stderr
    assert "folds 2 did not complete" in p.stderr and "push.py: next:" in p.stderr
    assert m.count("GetKernelSessionStatus") == 2
    assert (
        m[-1] == "ListKernelSessionOutput"
        and fake.bodies("ListKernelSessionOutput")[-1]["kernelSlug"] == body["slug"][6:]
    )
    assert m.count("GET") == 1  # the output marker of the source; the log tail downloads no checkpoint


@pytest.mark.slow
def test_resume_from_a_kernel_without_training_output_changes_nothing(tmp_path, site, fake):
    fake.kernels_known.add(f"{BASE}-fold0")  # exists, but its output holds no training run
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--resume-from", BASE)
    assert p.returncode == 1
    assert f"--resume-from {BASE}-fold0: its output holds no {OUTPUT_MARKER}" in p.stderr
    assert set(fake.methods()) == {"GetAcceleratorQuotaStatistics", "ListKernelSessionOutput"}  # reads only


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--slug", "Bad_Slug"], "slug 'Bad_Slug-fold0' must match"),
        (["--fold", "7"], "--fold 7 out of range 0..4"),
        (["--fold", "0,1", "--resume-from", f"{BASE}-fold0"], "names one fold's kernel"),
        (["train.time_limit=soon"], "duration 'soon' not understood"),
    ],
)
def test_bad_input_is_refused_before_any_request(tmp_path, site, fake, args, message):
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, *args)
    assert p.returncode == 2 and fake.calls == []
    assert any(message in line for line in error_lines(p)), p.stderr


@pytest.mark.slow
def test_fetch_verifies_every_file_and_never_leaves_a_partial_download(tmp_path, site, fake):
    fake.set_output(f"{BASE}-fold0", train_output("0"), log=fake.kernel_log)
    bad = train_output("1")
    bad["run/last.pth"] = bad["run/last.pth"][:-100]  # the kernel wrote more than came back
    fake.set_output(f"{BASE}-fold1", bad)
    fake.set_output(f"{BASE}-fold2", {k: v for k, v in train_output("2").items() if k != OUTPUT_MARKER})
    out = tmp_path / "runs" / "r"
    p = push(tmp_path, site, fake.url, "fetch", "--kernel", BASE, "--fold", "0,1,2", "--out", str(out))
    assert p.returncode == 1
    got = verify_output(out / "fold0")
    assert got["fold"] == "0" and (out / "fold0" / "run" / "last.pth").read_bytes() == train_output("0")["run/last.pth"]
    assert sorted(p.name for p in out.iterdir()) == ["fold0"]  # no fold1/fold2, no temporary folders left
    assert stat.S_IMODE((out / "fold0").stat().st_mode) == default_mode(directory=True)  # not mkdtemp's 0700
    assert "run/last.pth: 19900 bytes, but the kernel wrote 20000 (truncated or changed)" in p.stderr
    assert f"no {OUTPUT_MARKER} in the kernel's output" in p.stderr and "nothing was written to" in p.stderr
    assert "best hold-out score 0.2000 at epoch 2" in p.stdout and "val_score" in p.stdout
    assert f"next: cellseg export {out / 'fold0' / 'run' / 'best.pth'} --out weights/" in p.stdout


@pytest.mark.slow
def test_fetch_a_version_then_refetch_replaces_the_earlier_fetch(tmp_path, site, fake):
    fake.set_output(BASE, train_output("full", seed=1, epochs_done=1), version=1)
    fake.set_output(BASE, train_output("full", seed=2, epochs_done=3), version=2)
    out = tmp_path / "runs" / "full"
    p = push(tmp_path, site, fake.url, "fetch", "--kernel", BASE, "--version", "1", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert fake.bodies("ListKernelSessionOutput")[-1]["versionLabel"] == "v1"
    assert verify_output(out)["epochs_done"] == 1
    p = push(tmp_path, site, fake.url, "fetch", "--kernel", BASE, "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert verify_output(out)["epochs_done"] == 3 and sorted(x.name for x in out.parent.iterdir()) == ["full"]

    other = tmp_path / "not-a-fetch"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    n = len(fake.calls)
    p = push(tmp_path, site, fake.url, "fetch", "--kernel", BASE, "--out", str(other))
    assert p.returncode == 2 and len(fake.calls) == n and (other / "notes.txt").read_text() == "mine"
    assert "not-a-fetch exists and is not an earlier fetch: choose an empty or new --out" in p.stderr


# ----------------------------------------------------------------------------------------------
# Accelerator, weekly quota, pinned versions, sessions (issue: Kaggle's real limits)


@pytest.mark.slow
def test_training_kernels_ask_for_two_t4s_and_accelerator_overrides(tmp_path, site, fake):
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "0")
    assert p.returncode == 0, p.stderr
    (body,) = fake.kernels
    assert body["machineShape"] == "NvidiaTeslaT4"  # the client's "GPU T4 x2"
    assert "accelerator: NvidiaTeslaT4 (2 x T4 16 GB; 2 GPUs per session)" in p.stdout
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "1", "--accelerator", "NvidiaL4X1")
    assert p.returncode == 0, p.stderr
    assert fake.kernels[-1]["machineShape"] == "NvidiaL4X1" and "accelerator: NvidiaL4X1" in p.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator", "T4x2"], "accelerator 'T4x2' is not one the kaggle client knows: NvidiaTeslaT4,"),
        (["--accelerator", "NvidiaTeslaP100"], "is retired"),
        (["--accelerator", "TpuV5E8"], "is a TPU"),
    ],
)
def test_unknown_or_unusable_accelerator_is_refused_before_any_request(tmp_path, site, fake, args, message):
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, *args)
    assert p.returncode == 2 and fake.calls == []
    assert any(message in line for line in error_lines(p)), p.stderr


@pytest.mark.slow
def test_plan_over_the_weekly_quota_is_refused_before_anything_is_uploaded(tmp_path, site, fake):
    fake.gpu_quota_hours = (20.0, 2.0, 30.0)  # 8 h left; 2 folds x 11h30m = 23 h
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "0,1")
    assert p.returncode == 2, p.stderr
    assert fake.methods() == ["GetAcceleratorQuotaStatistics"]  # no dataset version, no kernel
    (line,) = error_lines(p)
    assert "up to 23.0 GPU-hours" in line and "weekly GPU quota is 30.0 h with 8.0 h left" in line
    assert "--ignore-quota" in line
    plan = p.stdout.index("2 kernels x 11.50 h time limit = 23.0 GPU-hours at most")
    assert plan < p.stdout.index("weekly GPU quota: 30.0 h, 8.0 h left")  # printed before the check

    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "0,1", "--ignore-quota")
    assert p.returncode == 0, p.stderr
    assert len(fake.kernels) == 2 and "--ignore-quota: pushing anyway" in p.stderr


@pytest.mark.slow
def test_a_plan_within_the_quota_is_checked_first_and_an_unreadable_quota_only_warns(tmp_path, site, fake):
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "0", "--time-limit", "2h")
    assert p.returncode == 0, p.stderr
    m = fake.methods()
    assert m[0] == "GetAcceleratorQuotaStatistics" and "SaveKernel" in m
    assert "weekly GPU quota: 30.0 h, 30.0 h left; this plan: up to 2.0 h" in p.stdout

    fake.fail("GetAcceleratorQuotaStatistics", 403, "quota is not visible")
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "1")
    assert p.returncode == 0, p.stderr
    assert "warning: could not read the weekly GPU quota (HTTP 403" in p.stderr and "going on" in p.stderr
    assert fake.kernels[-1]["slug"] == f"{BASE}-fold1"


@pytest.mark.slow
def test_each_kernel_is_polled_at_the_version_its_push_returned(tmp_path, site, fake):
    ref = f"{BASE}-fold0"
    fake.kernel_versions[ref] = 3  # earlier runs, COMPLETE: an unversioned poll reads their status
    fake.kernel_statuses = ["QUEUED", "RUNNING", "ERROR"]
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--fold", "0", "--wait")
    assert p.returncode == 1, p.stdout
    assert [b.get("versionLabel") for b in fake.bodies("GetKernelSessionStatus")] == ["v4"] * 3
    assert f"kernel {ref} v4 ended in ERROR" in p.stderr


@pytest.mark.slow
def test_a_resumed_fold_continues_the_latest_session_and_fetch_finds_it(tmp_path, site, fake):
    fold0 = f"{BASE}-fold0"
    fake.set_output(fold0, train_output("0", "stopped", seed=1, epochs_done=1))
    fake.set_output(f"{fold0}-s2", train_output("0", "stopped", seed=2, epochs_done=3))
    p = push(tmp_path, site, fake.url, "train", "--config", CONFIG, "--resume-from", BASE)
    assert p.returncode == 0, p.stderr
    (body,) = fake.kernels
    assert body["slug"] == f"{fold0}-s3" and body["kernelDataSources"] == [f"{fold0}-s2"]
    assert f"fold 0: resumes {fold0}-s2 (stopped after epoch 3 of 4)" in p.stdout
    for b in fake.kernels:  # no pushed kernel is its own source
        assert b["slug"] not in b.get("kernelDataSources", [])

    fake.set_output(f"{fold0}-s3", train_output("0", "complete", seed=3, epochs_done=4))  # s3 has run
    out = tmp_path / "runs" / "r"
    p = push(tmp_path, site, fake.url, "fetch", "--kernel", BASE, "--fold", "0", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert f"{fold0}: latest session is {fold0}-s3" in p.stdout
    assert verify_output(out / "fold0")["epochs_done"] == 4


@pytest.mark.slow
def test_fetch_takes_each_folds_latest_session(tmp_path, site, fake):
    fold0 = f"{BASE}-fold0"
    fake.set_output(fold0, train_output("0", "stopped", seed=1, epochs_done=1))
    fake.set_output(f"{fold0}-s2", train_output("0", "complete", seed=2, epochs_done=4))
    out = tmp_path / "runs" / "r"
    p = push(tmp_path, site, fake.url, "fetch", "--kernel", BASE, "--fold", "0", "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert verify_output(out / "fold0")["epochs_done"] == 4
    assert f"{fold0}: latest session is {fold0}-s2" in p.stdout


@pytest.mark.slow
def test_dry_run_prints_the_gpu_plan_and_the_recipe_stage_that_applies(tmp_path, site, fake):
    config = str(configs_dir() / "finetune_from_livecell_r50.yaml")
    p = push(tmp_path, site, fake.url, "train", "--config", config, "--fold", "all", "--dry-run",
             "--username", USER, "--time-limit", "1h30m", creds=None)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert fake.calls == []
    out = p.stdout
    assert "5 kernels x 1.50 h time limit = 7.5 GPU-hours at most" in out
    assert "ESTIMATE 1 s/step (not measured on this accelerator; pass --sec-per-step)" in out
    assert "week 1: 5 folds from LIVECell" in out and "week 2: pseudo-label round, 5 folds" in out
    assert "LIVECell pretraining" not in out  # another config's stage
    assert out.count('"machine_shape": "NvidiaTeslaT4"') == 5
    p = push(tmp_path, site, fake.url, "train", "--config", config, "--fold", "0", "--dry-run",
             "--username", USER, "--sec-per-step", "0.5", creds=None)  # fmt: skip
    assert "measured 0.5 s/step" in p.stdout


def test_kernel_listing_itself_as_its_source_is_a_metadata_problem(tmp_path):
    from cellseg.kaggle.metadata import validate_kernel_metadata

    meta = json.loads((REPO / "kernel-train-metadata.json").read_text().replace("{username}", USER))
    assert validate_kernel_metadata(meta, REPO) == []
    (problem,) = validate_kernel_metadata({**meta, "kernel_sources": [meta["id"]]}, REPO)
    assert "lists the kernel itself" in problem


def test_the_docs_budget_table_is_the_recipe_push_py_prints():
    """docs/KAGGLE.md's GPU budget rows hold the same steps, images, hours, time limits and weeks as
    cellseg.kaggle.budget.RECIPE (what --dry-run prints), and the schedule's weeks fit the quota."""
    from cellseg.kaggle.budget import RECIPE

    text = (REPO / "docs" / "KAGGLE.md").read_text()
    table = text.split("### GPU budget of the default recipe")[1].split("**Schedule.**")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("| ")]
    rows = rows[1:]  # the header
    assert len(rows) == len(RECIPE)
    for row, stage in zip(rows, RECIPE):
        assert row[0].startswith(stage.name.split(" (")[0])
        assert (int(row[2]), int(row[3].replace(",", "")), int(row[4].replace(",", ""))) == (
            stage.kernels,
            stage.steps,
            stage.images,
        )
        assert float(row[5]) == round(stage.hours, 1) and row[7] == str(stage.week)
        assert row[6] == (stage.time_limit or "-")
    for week in {s.week for s in RECIPE}:
        assert sum(s.hours for s in RECIPE if s.week == week) < 15  # half the ~30 h quota: room for 2x
