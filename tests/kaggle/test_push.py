"""tools/push.py end to end: the real kaggle client (in a subprocess) against a fake Kaggle API served
on 127.0.0.1 by the test (tests/fake_kaggle.py). Each run gets its own HOME and TMPDIR, no proxy, and
its output is checked never to contain the API key."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile

import pytest

from cellseg.kaggle import bundle
from cellseg.kaggle.kernel_code import stage_code
from fake_kaggle import REPO, FakeKaggle, make_checkout, make_weights

KEY = "k3y-must-never-be-printed-91b2"
USER = "alice"
DATASET = f"{USER}/sartorius-cellseg-bundle"
KERNEL = f"{USER}/sartorius-cellseg-submit"
PUSH = REPO / "tools" / "push.py"
SECRET_FORMS = (KEY, base64.b64encode(f"{USER}:{KEY}".encode()).decode())


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A checkout copy, a weights folder and a bundle staged from them (shared, read-only)."""
    tmp = tmp_path_factory.mktemp("push-site")
    checkout = make_checkout(tmp / "checkout")
    manifest = make_weights(tmp / "weights" / "demo")
    staged = bundle.stage_bundle(manifest, tmp / "bundle", username=USER, repo=checkout)
    return {"checkout": checkout, "manifest": manifest, "bundle": staged.root}


@pytest.fixture
def fake():
    with FakeKaggle(username=USER, key=KEY, processing_polls=2) as f:
        yield f


def push(tmp_path, site, endpoint, *args, creds="env", env_extra=None, timeout=90):
    """Run tools/push.py; returns the CompletedProcess (stdout/stderr text) and checks the key never shows."""
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(exist_ok=True)
    tmpdir.mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KAGGLE_", "CELLSEG_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env.update(HOME=str(home), TMPDIR=str(tmpdir), NO_PROXY="127.0.0.1,localhost", CELLSEG_KAGGLE_ENDPOINT=endpoint)
    if creds == "env":
        env.update(KAGGLE_USERNAME=USER, KAGGLE_KEY=KEY)
    elif creds == "file":
        (home / ".kaggle").mkdir(exist_ok=True)
        (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": USER, "key": KEY}))
        (home / ".kaggle" / "kaggle.json").chmod(0o600)
    env.update(env_extra or {})
    cmd = [
        sys.executable,
        str(PUSH),
        *args,
        "--repo",
        str(site["checkout"]),
        "--poll-interval",
        "0.01",
        "--retry-budget",
        "1",
        "--wait-timeout",
        "30",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for secret in SECRET_FORMS:
        assert secret not in proc.stdout + proc.stderr
    return proc


def error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("push.py: error:")]


@pytest.mark.slow
def test_dry_run_prints_the_full_plan_and_sends_nothing(tmp_path, site, fake):
    p = push(
        tmp_path,
        site,
        fake.url,
        "all",
        "--dry-run",
        "--weights",
        str(site["manifest"]),
        "--username",
        USER,
        "-m",
        "first try",
        creds=None,
    )
    assert p.returncode == 0, p.stderr
    assert fake.calls == []
    out = p.stdout
    for name in ("cellseg-bundle.json", "weights/demo/model.pth", "weights/demo/manifest.yaml", "kernel/submit.py"):
        assert name in out
    assert "wheels.zip (folder wheels/)" in out and "weights.zip (folder weights/)" in out
    assert '"enable_internet": false' in out and f'"id": "{DATASET}"' in out
    for call in (
        "GetDatasetStatus",
        "CreateDatasetVersion",
        "SaveKernel",
        "GetKernelSessionStatus",
        "CreateCodeSubmission",
    ):
        assert call in out
    assert "'first try'" in out
    assert not (site["checkout"] / "dist").exists()  # the dry run stages into a scratch folder


def test_new_dataset_is_created_private_with_zipped_folders(tmp_path, site, fake):
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]), "--wait")
    assert p.returncode == 0, p.stderr
    (create,) = fake.bodies("CreateDataset")
    assert (create["ownerSlug"], create["slug"], create["isPrivate"]) == (USER, "sartorius-cellseg-bundle", True)
    assert create["title"] == "Sartorius cellseg bundle" and create["licenseName"] == "CC0-1.0"
    uploads = dict(fake.uploaded(f["token"]) for f in create["files"])
    root = site["bundle"]
    assert sorted(uploads) == ["cellseg-bundle.json", "weights.zip", "wheels.zip"]
    assert uploads["cellseg-bundle.json"] == (root / "cellseg-bundle.json").read_bytes()
    marker = json.loads(uploads["cellseg-bundle.json"])
    with zipfile.ZipFile(io.BytesIO(uploads["weights.zip"])) as z:
        assert z.read("demo/model.pth") == (root / "weights/demo/model.pth").read_bytes()
        assert {n for n in z.namelist() if not n.endswith("/")} == {"demo/model.pth", "demo/manifest.yaml"}
    with zipfile.ZipFile(io.BytesIO(uploads["wheels.zip"])) as z:
        assert z.namelist() == [marker["wheel"].split("/", 1)[1]]
    # --wait: polled until the new version is ready (the fake keeps it processing for 2 polls).
    after = fake.methods()[fake.methods().index("CreateDataset") + 1 :]
    assert after == ["GetDatasetStatus"] * 3


def test_new_version_waits_for_the_previous_one_first(tmp_path, site, fake):
    fake.add_dataset(DATASET, pending_polls=2)  # the previous version is still processing
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]), "-m", "thresholds v2")
    assert p.returncode == 0, p.stderr
    methods = fake.methods()
    assert methods[:3] == ["GetDatasetStatus"] * 3  # blobs_received, blobs_received, ready
    assert "CreateDatasetVersion" in methods and all(
        c.status == 200 for c in fake.calls if c.method != "GetDatasetStatus"
    )
    assert fake.datasets[DATASET].versions[-1]["notes"] == "thresholds v2"
    assert sorted(name for name, _ in fake.datasets[DATASET].versions[-1]["files"]) == [
        "cellseg-bundle.json",
        "weights.zip",
        "wheels.zip",
    ]
    assert methods[-1] == "CreateDatasetVersion"  # no --wait: returns once the version is accepted


def test_403_on_version_waits_and_retries_once_without_reuploading(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    fake.fail(
        "CreateDatasetVersion",
        403,
        "Dataset is being processed",
        then=lambda: setattr(fake.datasets[DATASET], "pending_polls", 1),
    )
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]))
    assert p.returncode == 0, p.stderr
    assert "Dataset is being processed" in p.stdout
    versions = [c for c in fake.calls if c.method == "CreateDatasetVersion"]
    assert [c.status for c in versions] == [403, 200]
    # The finished top-level upload is reused, not sent again (zipped folders are archived anew).
    assert [c.body["name"] for c in fake.calls if c.method == "StartBlobUpload"].count("cellseg-bundle.json") == 1
    i, j = (fake.calls.index(c) for c in versions)
    between = fake.calls[i + 1 : j]
    assert [c.method for c in between[:2]] == ["GetDatasetStatus", "GetDatasetStatus"]  # waited until ready
    assert {c.body["name"] for c in between if c.method == "StartBlobUpload"} == {"weights.zip", "wheels.zip"}


def test_persistent_403_is_a_remote_failure_with_the_servers_message(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    fake.fail("CreateDatasetVersion", 403, "Permission 'datasets.versions.create' was denied", times=2)
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]))
    assert p.returncode == 1
    assert "Permission 'datasets.versions.create' was denied" in p.stderr
    assert "push.py: next:" in p.stderr and "--username" in p.stderr


def test_404_on_version_creates_the_dataset(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    fake.fail("CreateDatasetVersion", 404, "Dataset not found", then=lambda: fake.datasets.pop(DATASET))
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]))
    assert p.returncode == 0, p.stderr
    assert len(fake.bodies("CreateDataset")) == 1
    assert fake.datasets[DATASET].versions[0]["is_private"] is True


def test_invalid_slug_is_caught_before_any_request(tmp_path, site, fake):
    bad = tmp_path / "bundle"
    shutil.copytree(site["bundle"], bad)
    meta = json.loads((bad / "dataset-metadata.json").read_text())
    meta["id"] = f"{USER}/Cell_Bundle"
    (bad / "dataset-metadata.json").write_text(json.dumps(meta))
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(bad))
    assert p.returncode == 2
    assert fake.calls == []
    (line,) = error_lines(p)
    assert "Cell_Bundle" in line and "^[a-z0-9]+(-[a-z0-9]+)*$" in line
    assert p.stdout == ""


def test_kernel_title_not_matching_its_slug_is_caught_before_any_request(tmp_path, site, fake):
    checkout = make_checkout(tmp_path / "checkout")
    meta = json.loads((checkout / "kernel-metadata.json").read_text())
    meta.update(title="My Submission", enable_internet=True)
    (checkout / "kernel-metadata.json").write_text(json.dumps(meta))
    p = push(tmp_path, {**site, "checkout": checkout}, fake.url, "kernel")
    assert p.returncode == 2 and fake.calls == []
    lines = error_lines(p)
    assert len(lines) == 2
    assert "slugifies to 'my-submission'" in lines[0] and "enable_internet" in lines[1]


def test_missing_credentials_is_one_line_and_exit_2(tmp_path, site, fake):
    args = ("dataset", "--bundle", str(site["bundle"]), "--username", USER)
    p = push(tmp_path, site, fake.url, *args, creds=None, env_extra={"XDG_CONFIG_HOME": ""})
    assert p.returncode == 2 and fake.calls == []
    assert p.stderr.strip().count("\n") == 0 and "no Kaggle credentials" in p.stderr
    home = tmp_path / "home"  # every place the client would read, in its order (docs/KAGGLE.md)
    assert f"{home}/.kaggle/kaggle.json (no {home}/.kaggle folder); then {home}/.config/kaggle/kaggle.json" in p.stderr


def test_rejected_key_is_a_credentials_error(tmp_path, site, fake):
    p = push(tmp_path, site, fake.url, "kernel", env_extra={"KAGGLE_KEY": "stale-key"})
    assert p.returncode == 2
    (line,) = error_lines(p)
    assert "Kaggle rejected the credentials (HTTP 401: Unauthenticated)" in line
    assert [c.status for c in fake.calls] == [401]


@pytest.mark.slow
def test_server_down_gives_up_within_the_retry_budget(tmp_path, site):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    p = push(tmp_path, site, f"http://127.0.0.1:{port}", "dataset", "--bundle", str(site["bundle"]))
    elapsed = time.monotonic() - start
    assert p.returncode == 1
    assert "gave up after" in p.stderr and "ConnectionError" in p.stderr and "push.py: next:" in p.stderr
    assert p.stderr.count("retry ") >= 2
    assert elapsed < 20


def test_transient_5xx_and_429_are_retried(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    fake.fail("GetDatasetStatus", 503, "backend unavailable")
    fake.fail("StartBlobUpload", 429, "slow down")
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]))
    assert p.returncode == 0, p.stderr
    assert "HTTP 503: backend unavailable; retry 1" in p.stderr and "HTTP 429: slow down; retry 1" in p.stderr
    assert [c.status for c in fake.calls if c.method == "CreateDatasetVersion"] == [200]


def test_failed_upload_creates_nothing_and_the_next_run_completes(tmp_path, site, fake, monkeypatch):
    fake.add_dataset(DATASET)
    # The upload of the top-level file fails (chosen by name: the client uploads in listdir order).
    failed: list[str] = []

    def put(token, data, content_range, real=fake.put):
        if fake.uploads[token].name == bundle.MARKER and not failed:
            failed.append(token)
            return 500, {}
        return real(token, data, content_range)

    monkeypatch.setattr(fake, "put", put)
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]))
    assert p.returncode == 1
    assert "Upload unsuccessful" in p.stderr and "push.py: next:" in p.stderr
    assert "CreateDatasetVersion" not in fake.methods() and len(fake.datasets[DATASET].versions) == 1
    assert len(failed) == 1
    n = len(fake.calls)
    p = push(tmp_path, site, fake.url, "dataset", "--bundle", str(site["bundle"]))  # same TMPDIR: resumes
    assert p.returncode == 0, p.stderr
    assert sorted(name for name, _ in fake.datasets[DATASET].versions[-1]["files"]) == [
        "cellseg-bundle.json",
        "weights.zip",
        "wheels.zip",
    ]
    started = [c.body["name"] for c in fake.calls[n:] if c.method == "StartBlobUpload"]
    # The top-level file resumes its upload session; zipped folders are archived anew each run.
    assert sorted(started) == ["weights.zip", "wheels.zip"]
    assert fake.uploaded(failed[0])[0] == bundle.MARKER


def test_kernel_push_sends_internet_off_and_polls_to_complete(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    p = push(tmp_path, site, fake.url, "kernel")
    assert p.returncode == 0, p.stderr
    (body,) = fake.kernels
    assert body["slug"] == KERNEL and body["newTitle"] == "Sartorius cellseg submit"
    assert (body["enableInternet"], body["enableGpu"], body["isPrivate"]) == (False, True, True)
    assert body["datasetDataSources"] == [DATASET]
    assert body["competitionDataSources"] == ["sartorius-cell-instance-segmentation"]
    assert (body["language"], body["kernelType"]) == ("python", "script")
    # One self-contained file: kernel/kaggle_env.py inlined (Kaggle runs only the code file).
    assert body["text"] == stage_code(site["checkout"] / "kernel" / "submit.py")
    assert "def import_cellseg(" in body["text"] and "from kaggle_env import" not in body["text"]
    assert fake.methods() == ["GetDatasetStatus", "SaveKernel"] + ["GetKernelSessionStatus"] * 3
    assert "COMPLETE" in p.stdout


def test_kernel_error_prints_the_log_tail(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    fake.kernel_statuses = ["RUNNING", "ERROR"]
    fake.set_output(KERNEL, {"submission.csv": b"id,predicted\n" * 1000}, log=fake.kernel_log)
    p = push(tmp_path, site, fake.url, "kernel")
    assert p.returncode == 1
    assert "Traceback: boom" in p.stdout and "loading weights" in p.stdout
    assert "ended in ERROR: Your notebook hit an error" in p.stderr
    assert fake.methods()[-1] == "ListKernelSessionOutput"
    assert "GET" not in fake.methods()  # only the log comes down, not the kernel's output files


def test_invalid_sources_reported_by_kaggle_are_an_error(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    fake.rejected_sources = [DATASET]
    p = push(tmp_path, site, fake.url, "kernel")
    assert p.returncode == 1
    assert f"rejected dataset_sources ['{DATASET}']" in p.stderr
    assert "GetKernelSessionStatus" not in fake.methods()


SUBMISSION = b"id,predicted\nabc,1 2\n"


def test_submit_sends_the_kernel_version_and_prints_the_score(tmp_path, site, fake):
    fake.set_output(KERNEL, {"submission.csv": SUBMISSION, "other.bin": b"x" * 1000}, version=7)
    p = push(tmp_path, site, fake.url, "submit", "--kernel-version", "7", "-m", "v7 thresholds", "--wait", creds="file")
    assert p.returncode == 0, p.stderr
    (sub,) = fake.submissions
    assert sub == {
        "competitionName": "sartorius-cell-instance-segmentation",
        "kernelOwner": USER,
        "kernelSlug": "sartorius-cellseg-submit",
        "kernelVersion": 7,
        "fileName": "submission.csv",
        "submissionDescription": "v7 thresholds",
    }
    # v7's output is checked for submission.csv first (only that file comes down)
    assert fake.methods() == [
        "ListKernelSessionOutput",
        "GET",
        "CreateCodeSubmission",
        "GetSubmission",
        "GetSubmission",
    ]
    assert fake.bodies("ListKernelSessionOutput")[0]["versionLabel"] == "v7"
    assert "public score 0.301" in p.stdout


def test_all_runs_the_three_steps_in_order(tmp_path, site, fake):
    fake.pushed_output = {"submission.csv": SUBMISSION}
    p = push(
        tmp_path,
        site,
        fake.url,
        "all",
        "--bundle",
        str(site["bundle"]),
        "--wait",
        "-m",
        "full loop",
        env_extra={"VERBOSE": "1"},
    )  # the client's verbose mode would print the Authorization header
    assert p.returncode == 0, p.stderr
    m = fake.methods()
    assert m.index("CreateDataset") < m.index("SaveKernel") < m.index("CreateCodeSubmission")
    # The kernel is pushed only once the new dataset version is ready.
    between = m[m.index("CreateDataset") + 1 : m.index("SaveKernel")]
    assert between == ["GetDatasetStatus"] * 4
    assert fake.submissions[0]["kernelVersion"] == 1 and fake.submissions[0]["submissionDescription"] == "full loop"
    assert "public score 0.301" in p.stdout


def test_all_stops_at_the_first_failure_and_says_what_next(tmp_path, site, fake):
    fake.kernel_statuses = ["ERROR"]
    p = push(tmp_path, site, fake.url, "all", "--bundle", str(site["bundle"]))
    assert p.returncode == 1
    assert "CreateCodeSubmission" not in fake.methods() and "CreateDataset" in fake.methods()
    assert "push.py: next:" in p.stderr and "push.py kernel" in p.stderr


# the committed demo model: synthetic + imported (Usiigaci) data only, no competition data
DEMO = REPO / "weights" / "demo" / "manifest.yaml"


def test_submit_and_all_refuse_the_synthetic_demo_weights_before_anything(tmp_path, site, fake):
    for step in ("submit", "all"):
        p = push(tmp_path, site, fake.url, step, "--weights", str(DEMO))
        assert p.returncode == 2 and fake.calls == [], p.stderr
        (line,) = p.stderr.strip().splitlines()
        assert line.startswith("push.py: error:") and "no competition data" in line and "--allow-synthetic" in line
    assert not (site["checkout"] / "dist").exists()  # refused before staging anything


def test_dry_run_shows_the_verdict_without_refusing(tmp_path, site, fake):
    p = push(tmp_path, site, fake.url, "submit", "--dry-run", "--weights", str(DEMO), "--username", USER, creds=None)
    assert p.returncode == 0, p.stderr
    assert fake.calls == []
    assert "model.pth: cellseg train epoch 2" in p.stdout and "360 synthetic + 120 imported" in p.stdout
    assert "licence MIT License" in p.stdout
    assert "ensemble: 1 model: synthetic + imported train.csv (480 images)" in p.stdout
    assert "submit: would be REFUSED (exit 2)" in p.stdout


def test_allow_synthetic_submits_the_demo_weights(tmp_path, site, fake):
    fake.set_output(KERNEL, {"submission.csv": SUBMISSION}, version=3)
    p = push(tmp_path, site, fake.url, "submit", "--kernel-version", "3", "--weights", str(DEMO), "--allow-synthetic")
    assert p.returncode == 0, p.stderr
    assert [s["kernelVersion"] for s in fake.submissions] == [3]
    assert "submit: allowed (--allow-synthetic)" in p.stdout


VALID_KERNEL = {
    "id": KERNEL,
    "title": "Sartorius cellseg submit",
    "code_file": "kernel/submit.py",
    "language": "python",
    "kernel_type": "script",
    "is_private": True,
    "enable_gpu": True,
    "enable_internet": False,
    "dataset_sources": [DATASET],
    "competition_sources": ["sartorius-cell-instance-segmentation"],
}
VALID_DATASET = {"id": DATASET, "title": "Sartorius cellseg bundle", "licenses": [{"name": "CC0-1.0"}]}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"id": "alice/Bad_Slug"}, "dataset id"),
        ({"id": "alice/short"}, "6-50"),
        ({"id": "alice/" + "x" * 51}, "6-50"),
        ({"id": "sartorius-cellseg-bundle"}, "owner/slug"),
        ({"id": "{username}/sartorius-cellseg-bundle"}, "placeholder"),
        ({"title": "Tiny"}, "dataset title"),
        ({"licenses": []}, "licenses"),
        ({"subtitle": "too short"}, "subtitle"),
    ],
)
def test_each_dataset_metadata_problem_is_one_line(change, field):
    from cellseg.kaggle.metadata import validate_dataset_metadata

    assert validate_dataset_metadata(VALID_DATASET) == []
    (problem,) = validate_dataset_metadata({**VALID_DATASET, **change})
    assert field in problem and "\n" not in problem


@pytest.mark.parametrize(
    "change, field",
    [
        ({"title": "Another title"}, "slugifies to 'another-title'"),
        ({"code_file": "kernel/missing.py"}, "not found"),
        ({"code_file": "../outside.py"}, "relative path inside"),
        ({"enable_internet": None}, "enable_internet"),
        ({"enable_gpu": False}, "enable_gpu"),
        ({"dataset_sources": ["alice"]}, "dataset_sources"),
        ({"dataset_sources": ["alice/Bad Slug"]}, "dataset_sources"),
        ({"competition_sources": []}, "competition_sources"),
        ({"kernel_type": "app"}, "kernel_type"),
    ],
)
def test_each_kernel_metadata_problem_is_one_line(tmp_path, change, field):
    from cellseg.kaggle.metadata import validate_kernel_metadata

    (tmp_path / "kernel").mkdir()
    (tmp_path / "kernel" / "submit.py").write_text("print()\n")
    assert validate_kernel_metadata(VALID_KERNEL, tmp_path) == []
    (problem,) = validate_kernel_metadata({**VALID_KERNEL, **change}, tmp_path)
    assert field in problem and "\n" not in problem


# ----------------------------------------------------------------------------------------------
# Pinned kernel versions, and what push.py refuses before it calls anything


@pytest.mark.slow
def test_kernel_step_polls_the_version_it_pushed(tmp_path, site, fake):
    fake.add_dataset(DATASET)
    fake.kernel_versions[KERNEL] = 2  # v1 and v2 ran to COMPLETE earlier
    fake.kernel_statuses = ["RUNNING", "ERROR"]
    p = push(tmp_path, site, fake.url, "kernel")
    assert p.returncode == 1, p.stdout  # an unversioned poll would have read v2's COMPLETE
    assert [b.get("versionLabel") for b in fake.bodies("GetKernelSessionStatus")] == ["v3", "v3"]
    assert f"kernel {KERNEL} v3 ended in ERROR" in p.stderr
    assert fake.bodies("ListKernelSessionOutput")[-1]["versionLabel"] == "v3"  # that version's log


def test_submit_without_a_version_sends_the_latest_complete_one(tmp_path, site, fake):
    fake.kernel_versions[KERNEL] = 3
    fake.version_statuses[(KERNEL, 3)] = "ERROR"
    fake.set_output(KERNEL, {"submission.csv": SUBMISSION}, version=2)
    p = push(tmp_path, site, fake.url, "submit", "--allow-synthetic")
    assert p.returncode == 0, p.stderr
    assert [s["kernelVersion"] for s in fake.submissions] == [2]
    assert [b.get("versionLabel") for b in fake.bodies("GetKernelSessionStatus")] == ["v3", "v2"]
    assert "latest complete version is v2" in p.stdout


def test_submit_refuses_a_version_whose_output_has_no_submission_csv(tmp_path, site, fake):
    fake.set_output(KERNEL, {"notes.txt": b"the kernel crashed before writing it"}, version=5)
    p = push(tmp_path, site, fake.url, "submit", "--kernel-version", "5", "--allow-synthetic")
    assert p.returncode == 2
    (line,) = error_lines(p)
    assert f"kernel {KERNEL} v5: its output holds no submission.csv; not submitted" in line
    assert "CreateCodeSubmission" not in fake.methods() and fake.submissions == []


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_retry_budget_must_be_finite_and_not_negative(tmp_path, site, value):
    cmd = [sys.executable, str(PUSH), "dataset", "--dry-run", "--retry-budget", value, "--repo", str(site["checkout"])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "argument --retry-budget" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("endpoint", ["127.0.0.1:8765", "htp://x", "http://", "http://127.0.0.1:99999"])
def test_a_malformed_endpoint_is_refused_without_the_username_hint(tmp_path, site, endpoint):
    p = push(tmp_path, site, endpoint, "dataset", "--bundle", str(site["bundle"]))
    assert p.returncode == 2
    (line,) = error_lines(p)
    assert "CELLSEG_KAGGLE_ENDPOINT" in line and "--username" not in p.stderr


@pytest.mark.slow
def test_a_connection_failure_does_not_blame_the_username(tmp_path, site):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = push(tmp_path, site, f"http://127.0.0.1:{port}", "kernel")
    assert p.returncode == 1 and "--username" not in p.stderr and "check your connection" in p.stderr


def test_the_push_modules_import_without_the_client_and_without_a_cycle():
    """push_train and remote never import push (push imports push_train only to dispatch), and no
    cellseg.kaggle module imports the kaggle client at import time."""
    code = (
        "import sys, cellseg.kaggle.push_train, cellseg.kaggle.remote, cellseg.kaggle.budget;"
        "assert 'cellseg.kaggle.push' not in sys.modules, 'push_train imports push';"
        "import cellseg.kaggle.push;"
        "assert 'kaggle' not in sys.modules and 'kagglesdk' not in sys.modules"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize(
    "args", [["submit", "--kernel-version", "0"], ["fetch", "--kernel", "a/bcdef", "--out", "x", "--version", "-2"]]
)
def test_kernel_versions_start_at_1(tmp_path, site, args):
    cmd = [sys.executable, str(PUSH), *args, "--repo", str(site["checkout"])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "kernel versions start at 1" in p.stderr and "Traceback" not in p.stderr
