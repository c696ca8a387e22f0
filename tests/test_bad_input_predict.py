"""Bad input to ``cellseg predict`` (and every other command that writes), as a new user would give
it: each test is a row of docs/BAD_INPUT.md. Each asserts the exit status, no traceback, one line
naming the problem, and nothing half-written."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bad_input_helpers import (
    REPO,
    assert_one_line_error,
    child_env,
    cli,
    cli_inproc,
    leftovers,
    read_only_mount_prefix,
    save_as,
)
from cellseg.config.manifest import load_manifest, write_manifest
from cellseg.data.submission import read_submission, validate_submission
from cellseg.data.truth import read_sample_submission
from cellseg.io import default_mode
from inference_helpers import blob_image, make_competition, make_manifest
from test_io import unwritable_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A one-model, one-view tiny ensemble (fast on CPU)."""
    return make_manifest(tmp_path_factory.mktemp("tiny"), n_models=1, tta=("identity",), detections_per_view=30)


def comp_with(tmp_path: Path, n: int) -> tuple[Path, list[str]]:
    comp = make_competition(tmp_path / "comp", n_test=n)
    return comp, read_sample_submission(comp / "sample_submission.csv")


# ------------------------------------------------------------------ unreadable and missing images


@pytest.mark.slow
def test_predict_every_image_unreadable_writes_a_valid_empty_submission(tiny, tmp_path):
    comp, ids = comp_with(tmp_path, 3)
    (comp / "test" / f"{ids[0]}.png").write_bytes(b"")  # 0 bytes
    (comp / "test" / f"{ids[1]}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (comp / "test" / f"{ids[2]}.png").write_bytes(b"GIF89a not a png at all")
    out = tmp_path / "out" / "submission.csv"
    res = cli("predict", "--data", comp, "--weights", tiny, "--out", out, "--no-progress", cwd=tmp_path)
    assert res.code == 1, res.err[-3000:]  # documented: valid file written, but nothing was predicted
    assert "Traceback" not in res.text
    (line,) = [ln for ln in res.err.splitlines() if ln.startswith("cellseg predict: ")]
    assert "no image predicted: every one of the 3 test image(s) is unreadable" in line
    assert "0 bytes" in line and f"valid {out}" in line
    assert validate_submission(out, comp / "test", ids) == []
    assert read_submission(out) == {i: [] for i in ids}
    assert leftovers(out.parent) == ["submission.csv"]
    assert out.stat().st_mode & 0o777 == default_mode()  # not 0600


def test_predict_zero_byte_png_gets_an_empty_row(tiny, tmp_path, capsys):
    comp, ids = comp_with(tmp_path, 2)
    (comp / "test" / f"{ids[0]}.png").write_bytes(b"")
    out = tmp_path / "sub.csv"
    res = cli_inproc(capsys, "predict", "--data", comp, "--weights", tiny, "--out", out, "--no-progress")
    assert res.code == 0, res.err
    assert f"{ids[0]}.png: unreadable image (empty file, 0 bytes); writing an empty row" in res.err
    sub = read_submission(out)
    assert sub[ids[0]] == [] and len(sub[ids[1]]) > 0
    assert "1 unreadable" in res.out


def test_predict_empty_test_folder_writes_a_row_per_sample_id(tiny, tmp_path, capsys):
    comp, ids = comp_with(tmp_path, 2)
    for p in (comp / "test").iterdir():
        p.unlink()
    out = tmp_path / "sub.csv"
    res = cli_inproc(capsys, "predict", "--data", comp, "--weights", tiny, "--out", out, "--no-progress")
    assert res.code == 1, res.err
    assert f"warning: {comp / 'test'} holds no PNG image" in res.err
    assert "no image predicted" in res.err and "holds no PNG" in res.err.splitlines()[-1]
    assert read_submission(out) == {i: [] for i in ids}
    assert validate_submission(out, comp / "test", ids) == []
    assert out.read_text().splitlines()[0] == "id,predicted" and len(out.read_text().splitlines()) == 3


def test_predict_with_nothing_to_predict_is_an_error(tiny, tmp_path, capsys):
    comp, _ = comp_with(tmp_path, 1)
    for p in (comp / "test").iterdir():
        p.unlink()
    (comp / "sample_submission.csv").write_text("id,predicted\n")
    out = tmp_path / "sub.csv"
    res = cli_inproc(capsys, "predict", "--data", comp, "--weights", tiny, "--out", out, "--no-progress")
    assert_one_line_error(res, "holds no PNG", "lists no id", "nothing to predict")
    assert not out.exists()


# ------------------------------------------------------------------ unwritable --out


def unwritable(form: str, tmp_path: Path) -> tuple[Path, tuple[str, ...], tuple[str, ...]]:
    """(--out path, command prefix, words the error must contain) for one unwritable form."""
    if form == "is-a-folder":
        (tmp_path / "sub.csv").mkdir()
        return tmp_path / "sub.csv", (), ("sub.csv: is a folder",)
    if form == "parent-is-a-file":
        (tmp_path / "results").write_text("a file\n")
        return tmp_path / "results" / "sub.csv", (), ("results is a file, not a folder",)
    if form == "no-permission":
        return unwritable_folder(tmp_path) / "sub.csv", (), ("cannot write in", "Permission denied")
    prefix = read_only_mount_prefix(tmp_path / "ro")
    if prefix is None:
        pytest.skip("no way to mount a read-only filesystem here (unprivileged user namespaces disabled)")
    return tmp_path / "ro" / "sub.csv", prefix, ("cannot write in", "Read-only file system")


@pytest.mark.parametrize("form", ["is-a-folder", "parent-is-a-file", "no-permission", "read-only-fs"])
def test_predict_unwritable_out_fails_before_loading_models(tiny, tmp_path, form):
    comp, _ = comp_with(tmp_path, 1)
    # weights whose checksum fails: reading the manifest would be an error about them, not about --out
    weights = tmp_path / "weights"
    shutil.copytree(tiny.parent, weights)
    (weights / "model0.pth").write_bytes(b"not the model the manifest lists")
    out, prefix, words = unwritable(form, tmp_path)
    before = leftovers(tmp_path)
    res = cli(
        "predict", "--data", comp, "--weights", weights, "--out", out, "--no-progress", cwd=tmp_path, prefix=prefix
    )
    assert_one_line_error(res, str(out), *words)
    assert "loaded" not in res.err and "sha256" not in res.err  # neither the manifest nor a model was read
    assert leftovers(tmp_path) == before


# every other command that writes: the check comes before any model or data is loaded
WRITERS = {
    "dry-run": ("--data", "{data}", "--weights", "{w}", "--report", "{out}"),
    "predict-raw": ("--data", "{data}", "--weights", "{w}", "--out", "{out}"),
    "pseudo-label": ("--data", "{data}", "--weights", "{w}", "--out", "{out}"),
    "export": ("{ckpt}", "--out", "{out}"),
    "bundle": ("--weights", "{w}", "--out", "{out}", "--username", "alice"),
    "train": ("--config", str(REPO / "configs" / "demo.yaml"), "--data", "{data}", "--out", "{out}"),
    "synth": ("--out", "{out}"),
    "folds": ("--data", "{data}", "--out", "{out}"),
}
FILE_OUT = {"pseudo-label", "folds"}


@pytest.mark.parametrize("command", list(WRITERS))
@pytest.mark.parametrize("form", ["parent-is-a-file", "wrong-kind"])
def test_every_writer_checks_its_output_first(tiny, tmp_path, capsys, command, form):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_text("")  # exists (folds checks that first); never read
    (tmp_path / "afile").write_text("x\n")
    if form == "parent-is-a-file":
        out, words = tmp_path / "afile" / "out", ("afile is a file, not a folder",)
    elif command in FILE_OUT:
        (tmp_path / "adir").mkdir()
        out, words = tmp_path / "adir", ("adir: is a folder; expected a file",)
    else:
        out, words = tmp_path / "afile", ("afile: is a file; expected a folder",)
    fill = {"data": data, "w": tiny, "out": out, "ckpt": tiny.parent / "model0.pth"}
    args = [a.format(**fill) for a in WRITERS[command]]
    before = leftovers(tmp_path)
    res = cli_inproc(capsys, command, *args)
    assert_one_line_error(res, *words)
    assert leftovers(tmp_path) == before
    assert (tmp_path / "afile").read_text() == "x\n"


# ------------------------------------------------------------------ model files


def test_predict_binary_file_as_weights_names_the_file_and_what_was_expected(tiny, tmp_path, capsys):
    comp, _ = comp_with(tmp_path, 1)
    ckpt = tiny.parent / "model0.pth"
    res = cli_inproc(capsys, "predict", "--data", comp, "--weights", ckpt, "--out", tmp_path / "s.csv")
    assert_one_line_error(res, str(ckpt), "not a text file", "PyTorch checkpoint", "expected an ensemble manifest")
    assert not (tmp_path / "s.csv").exists()


def test_predict_truncated_model_file(tiny, tmp_path, capsys):
    weights = tmp_path / "w"
    shutil.copytree(tiny.parent, weights)
    model = weights / "model0.pth"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    comp, _ = comp_with(tmp_path, 1)
    args = ("predict", "--data", comp, "--weights", weights, "--out", tmp_path / "s.csv", "--no-progress")
    assert_one_line_error(cli_inproc(capsys, *args), str(model), "sha256 mismatch")
    # with the checksum refreshed the loader itself must say what is wrong, in our words
    write_manifest(load_manifest(weights, verify=False), weights / "manifest.yaml")
    res = cli_inproc(capsys, *args)
    assert_one_line_error(res, str(model), "not a readable PyTorch checkpoint", "truncated or corrupt")
    assert "weights_only" not in res.text
    assert not (tmp_path / "s.csv").exists()


# ------------------------------------------------------------------ a kill mid-run


@pytest.mark.slow
def test_sigkill_mid_predict_leaves_no_partial_submission(tiny, tmp_path):
    comp = make_competition(tmp_path / "comp", n_test=40)
    out = tmp_path / "out" / "submission.csv"
    cmd = [sys.executable, "-m", "cellseg", "predict", "--data", str(comp), "--weights", str(tiny)]
    cmd += ["--out", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=tmp_path)
    try:
        for line in proc.stderr:  # wait until the models are loaded and the images are being predicted
            if line.startswith("loaded "):
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        rest = proc.stderr.read()
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "wrote" not in rest  # it really was killed mid-run
    assert not out.exists()
    assert leftovers(out.parent) == []  # no temporary file either


# ------------------------------------------------------------------ PNG modes, through predict


@pytest.mark.slow
def test_png_modes_and_upper_case_suffix_predict_the_same_as_grey(tiny, tmp_path):
    comp = tmp_path / "comp"
    (comp / "test").mkdir(parents=True)
    grey = blob_image(3)
    names = {"L": "000000000001.png", "LA": "000000000002.png", "P": "000000000003.png"}
    names |= {"RGB": "000000000004.Png", "I;16": "000000000005.PNG"}
    for mode, name in names.items():
        save_as(grey, mode, comp / "test" / name, seed=1)
    ids = sorted(Path(n).stem for n in names.values())
    (comp / "sample_submission.csv").write_text("id,predicted\n" + "".join(f"{i},\n" for i in ids))
    out = tmp_path / "sub.csv"
    res = cli("predict", "--data", comp, "--weights", tiny, "--out", out, "--no-progress", cwd=tmp_path)
    assert res.code == 0, res.err[-3000:]
    assert "Traceback" not in res.text and "0 unreadable" in res.out
    sub = read_submission(out)
    assert sorted(sub) == ids
    grey_rows = [r for _, r in sub["000000000001"]]
    assert len(grey_rows) > 0
    for mode, name in names.items():
        assert [r for _, r in sub[Path(name).stem]] == grey_rows, mode


# ------------------------------------------------------------------ other folders of images


def test_predict_zero_byte_sample_submission_is_a_warning(tiny, tmp_path, capsys):
    comp, ids = comp_with(tmp_path, 1)
    (comp / "sample_submission.csv").write_bytes(b"")
    out = tmp_path / "sub.csv"
    res = cli_inproc(capsys, "predict", "--data", comp, "--weights", tiny, "--out", out, "--no-progress")
    assert res.code == 0, res.err
    assert "warning: " in res.err and "sample_submission.csv: not a readable CSV" in res.err
    assert list(read_submission(out)) == ids


def test_pseudo_label_skips_an_unreadable_image_and_refuses_when_all_are(tiny, tmp_path, capsys):
    semi = tmp_path / "data" / "train_semi_supervised"
    semi.mkdir(parents=True)
    save_as(blob_image(1), "L", semi / "cort[x]_A1_0001.PNG")
    (semi / "cort[x]_A1_0002.png").write_bytes(b"")
    out = tmp_path / "pseudo.csv"
    args = ("pseudo-label", "--data", tmp_path / "data", "--weights", tiny, "--out", out, "--score-margin", "0")
    res = cli_inproc(capsys, *args)
    assert res.code == 0, res.err
    assert "warning: skipping" in res.err and "cort[x]_A1_0002.png: unreadable image (empty file, 0 bytes)" in res.err
    assert out.is_file() and "cort[x]_A1_0001" in out.read_text()
    out.unlink()
    (semi / "cort[x]_A1_0001.PNG").write_bytes(b"\x89PNG\r\n\x1a\n")
    res = cli_inproc(capsys, *args)
    assert_one_line_error(res, "every one of the 2 image(s) is unreadable")
    assert leftovers(tmp_path) == ["data"]
