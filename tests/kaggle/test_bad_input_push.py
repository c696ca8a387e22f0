"""tools/push.py with a broken or too-open kaggle.json (rows of docs/BAD_INPUT.md), run as a real
subprocess; the 0644 case goes through the real kaggle client against the loopback fake server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bad_input_helpers import Result, assert_one_line_error, child_env
from fake_kaggle import REPO, FakeKaggle, make_checkout

KEY = "k3y-never-printed-7c1d"
USER = "alice"


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return make_checkout(tmp_path_factory.mktemp("push") / "checkout")


def push(tmp_path: Path, checkout: Path, kaggle_json: str, mode: int, *args: str, endpoint: str = "") -> Result:
    """Run tools/push.py with HOME holding ``kaggle_json`` (chmod ``mode``) and no KAGGLE_* variables."""
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    (home / ".kaggle").mkdir(parents=True)
    tmpdir.mkdir()
    cfg = home / ".kaggle" / "kaggle.json"
    cfg.write_text(kaggle_json)
    cfg.chmod(mode)
    env = {k: v for k, v in child_env().items() if not k.startswith(("KAGGLE_", "CELLSEG_"))}
    env = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HOME=str(home), TMPDIR=str(tmpdir), NO_PROXY="127.0.0.1,localhost", CELLSEG_KAGGLE_ENDPOINT=endpoint)
    cmd = [sys.executable, str(REPO / "tools" / "push.py"), *args, "--repo", str(checkout)]
    cmd += ["--poll-interval", "0.01", "--retry-budget", "1", "--wait-timeout", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    res = Result(proc.returncode, proc.stdout, proc.stderr)
    assert KEY not in res.text
    return res


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"username": "alice", "key": ' + f'"{KEY}"', ["not valid JSON (line 1 column"]),  # cut short
        ("", ["not valid JSON"]),
        ('["alice"]', ["expected a JSON object"]),
    ],
)
def test_unparseable_kaggle_json_says_so(tmp_path, checkout, text, words):
    res = push(tmp_path, checkout, text, 0o600, "submit", "--kernel-version", "1", "--dry-run")
    line = assert_one_line_error(res, str(tmp_path / "home" / ".kaggle" / "kaggle.json"), *words, prefix="push.py")
    assert "put kaggle.json" not in line


def test_kaggle_json_mode_644_works_with_a_warning(tmp_path, checkout):
    with FakeKaggle(username=USER, key=KEY) as fake:
        fake.set_output(f"{USER}/sartorius-cellseg-submit", {"submission.csv": b"id,predicted\n"}, version=3)
        creds = json.dumps({"username": USER, "key": KEY})
        res = push(tmp_path, checkout, creds, 0o644, "submit", "--kernel-version", "3", endpoint=fake.url)
        assert res.code == 0, res.err[-3000:]
        assert "Traceback" not in res.text
        cfg = tmp_path / "home" / ".kaggle" / "kaggle.json"
        assert f"push.py: warning: {cfg} is readable by other users (mode 644); run: chmod 600 {cfg}" in res.err
        assert fake.methods()[-1] == "CreateCodeSubmission"
        assert oct(os.stat(cfg).st_mode & 0o777) == "0o644"  # we warn; we do not touch the user's file
