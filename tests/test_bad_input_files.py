"""Bad input files to ``cellseg score``, ``validate`` and ``train``: rows of docs/BAD_INPUT.md. Each
asserts the exit status, no traceback, the line that names the problem, and nothing half-written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bad_input_helpers import REPO, assert_one_line_error, cli, cli_inproc, leftovers
from cellseg.data import rle
from cellseg.io import write_gray
from helpers import train_rows, write_test_dir, write_train_csv

DEMO = REPO / "configs" / "demo.yaml"


def mask(h: int, w: int, y: int, x: int, size: int = 4) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y : y + size, x : x + size] = True
    return m


@pytest.fixture
def scored(tmp_path):
    """train.csv for images a, b, c (20 x 30, two cells each), their PNGs, and a's true RLEs."""
    rows, rles = [], {}
    for k, image_id in enumerate("abc"):
        masks = [mask(20, 30, 2, 2 + k), mask(20, 30, 10, 15)]
        rows += train_rows(image_id, "cort", masks)
        rles[image_id] = [rle.encode(m) for m in masks]
    truth = write_train_csv(tmp_path / "train.csv", rows)
    test = write_test_dir(tmp_path / "test", ["a", "b"], shape=(20, 30))
    write_gray(test / "c.PNG", np.zeros((20, 30), np.uint8))  # upper-case suffix counts as a PNG
    return tmp_path, truth, test, rles


def write(path, text: str):
    path.write_text(text)
    return path


# ------------------------------------------------------------------ score


@pytest.mark.slow
def test_score_warns_about_missing_ids_and_strict_refuses(scored):
    tmp, truth, _, rles = scored
    sub = write(tmp / "sub.csv", "id,predicted\n" + "".join(f"a,{r}\n" for r in rles["a"]))
    res = cli("score", "--truth", truth, "--submission", sub, cwd=tmp)
    assert res.code == 0 and "Traceback" not in res.text
    (warning,) = [ln for ln in res.err.splitlines() if "warning" in ln]
    assert "has no row for 2 of 3 image(s) (b, c); they score 0" in warning
    assert "overall" in res.out
    strict = cli("score", "--truth", truth, "--submission", sub, "--strict", cwd=tmp)
    assert_one_line_error(strict, "has no row for 2 of 3 image(s) (b, c)", "--strict")
    assert strict.out == ""


@pytest.mark.slow
def test_score_header_only_submission(scored):
    tmp, truth, _, _ = scored
    sub = write(tmp / "sub.csv", "id,predicted\n")
    res = cli("score", "--truth", truth, "--submission", sub, "--json", cwd=tmp)
    assert res.code == 0 and "Traceback" not in res.text
    assert "has no rows (header only): all 3 image(s) (a, b, c) score 0" in res.err
    assert '"score": 0.0' in res.out
    assert_one_line_error(
        cli("score", "--truth", truth, "--submission", sub, "--strict", cwd=tmp), "header only", "--strict"
    )


@pytest.mark.slow
def test_score_duplicate_rows_and_empty_file(scored):
    tmp, truth, _, rles = scored
    dup = write(tmp / "dup.csv", f"id,predicted\na,{rles['a'][0]}\nb,\na,{rles['a'][0]}\n")
    assert_one_line_error(cli("score", "--truth", truth, "--submission", dup, cwd=tmp), "dup.csv:4: duplicates line 2")
    empty = write(tmp / "empty.csv", "")
    assert_one_line_error(
        cli("score", "--truth", truth, "--submission", empty, cwd=tmp), "empty.csv: empty file (0 bytes)"
    )


# ------------------------------------------------------------------ validate


@pytest.mark.slow
def test_validate_missing_ids_duplicates_and_empty_file(scored):
    tmp, _, test, rles = scored
    missing = write(tmp / "missing.csv", "id,predicted\na,\n")
    res = cli("validate", missing, "--test-dir", test, cwd=tmp)
    assert res.code == 1 and "Traceback" not in res.text
    assert "test id b has no row" in res.err and "test id c has no row" in res.err  # c.PNG counts
    assert "INVALID (2 problem(s))" in res.err
    dup = write(tmp / "dup.csv", f"id,predicted\na,{rles['a'][0]}\na,{rles['a'][0]}\nb,\nc,\n")
    res = cli("validate", dup, "--test-dir", test, cwd=tmp)
    assert res.code == 1 and "line 3: duplicates line 2" in res.err and "INVALID (1 problem(s))" in res.err
    empty = write(tmp / "empty.csv", "")
    res = cli("validate", empty, "--test-dir", test, cwd=tmp)
    assert res.code == 1 and "Traceback" not in res.text and "empty file (0 bytes)" in res.err


@pytest.mark.slow
def test_validate_with_sample_submission_requires_its_ids(scored):
    tmp, _, test, _ = scored
    sample = write(tmp / "sample_submission.csv", "id,predicted\na,\nb,\nc,\nd,\n")
    ok = write(tmp / "ok.csv", "id,predicted\na,\nb,\nc,\nd,\n")
    res = cli("validate", ok, "--test-dir", test, "--sample-submission", sample, cwd=tmp)
    assert res.code == 0, res.err  # d has no PNG but an empty row: fine
    short = write(tmp / "short.csv", "id,predicted\na,\nb,\nc,\nd,1 3\n")
    res = cli("validate", short, "--test-dir", test, "--sample-submission", sample, cwd=tmp)
    assert res.code == 1 and "masks for id d, which has no PNG" in res.err


# ------------------------------------------------------------------ train


@pytest.fixture
def tiny_data(tmp_path):
    """A competition folder with two small annotated train images (enough to reach --init loading)."""
    root = tmp_path / "data"
    rows = []
    for k, image_id in enumerate(["t0", "t1"]):
        masks = [mask(48, 64, 5 + k, 5, 8), mask(48, 64, 25, 30, 8)]
        rows += train_rows(image_id, "cort", masks, sample_id=f"cort[x]_{k}")
        write_gray(root / "train" / f"{image_id}.png", np.full((48, 64), 120, np.uint8))
    write_train_csv(root / "train.csv", rows)
    return root


def test_train_binary_file_as_config(tmp_path, capsys):
    best = tmp_path / "best.pth"
    torch.save({"model": {"w": torch.zeros(3)}}, best)
    res = cli_inproc(capsys, "train", "--config", best, "--data", tmp_path, "--out", tmp_path / "run")
    assert_one_line_error(res, str(best), "not a text file", "PyTorch checkpoint", "expected an experiment config")
    assert not (tmp_path / "run").exists()


def test_train_missing_data_folder(tmp_path, capsys):
    res = cli_inproc(capsys, "train", "--config", DEMO, "--data", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert_one_line_error(res, str(tmp_path / "nowhere" / "train.csv"), "not found")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.epochs=abc", ["'train.epochs=abc'", "train.epochs: expected int, got str"]),
        ("model.no_such_key=1", ["'model.no_such_key=1'", "unknown config key 'model.no_such_key'"]),
        ("train.lr=[1,", ["'train.lr=[1,'", "value is not valid YAML"]),
        ("train.epochs.x=1", ["'train.epochs.x=1'", "'epochs' is not a section"]),
    ],
)
def test_override_errors_name_the_command_line(tmp_path, capsys, override, words):
    res = cli_inproc(capsys, "train", "--config", DEMO, "--data", tmp_path, "--out", tmp_path / "run", override)
    line = assert_one_line_error(res, "command-line override", *words)
    assert "demo.yaml" not in line  # the file is fine: do not send the user there
    assert leftovers(tmp_path) == []


def test_config_file_errors_still_name_the_file(tmp_path, capsys):
    bad = write(tmp_path / "bad.yaml", "train:\n  epochs: many\n")
    res = cli_inproc(capsys, "train", "--config", bad, "--data", tmp_path, "--out", tmp_path / "run", "train.lr=0.1")
    assert_one_line_error(res, f"{bad}: train.epochs: expected int, got str")
    nowhere = tmp_path / "nowhere"
    fixed = cli_inproc(capsys, "train", "--config", bad, "--data", nowhere, "--out", tmp_path / "run", "train.epochs=1")
    assert_one_line_error(fixed, "train.csv not found")  # the override repaired the file's value


@pytest.mark.parametrize("kind", ["truncated", "pickled-module", "empty"])
def test_train_bad_init_file_gets_our_message(tiny_data, tmp_path, capsys, kind):
    init = tmp_path / "init.pth"
    if kind == "truncated":
        torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, init)
        init.write_bytes(init.read_bytes()[:-300])
        words = ["truncated or corrupt"]
    elif kind == "pickled-module":
        torch.save(torch.nn.Linear(2, 2), init)
        words = ["pickled Python objects", "save model.state_dict() instead"]
    else:
        init.write_bytes(b"")
        words = ["empty file (0 bytes)"]
    run = tmp_path / "run"
    args = ("train", "--config", DEMO, "--data", tiny_data, "--fold", "all", "--init", init, "--out", run, "--quiet")
    res = cli_inproc(capsys, *args)
    assert_one_line_error(res, f"--init {init}: not a readable PyTorch checkpoint", *words)
    assert "weights_only" not in res.text and "PyTorch 2.6" not in res.text
    assert not (run / "last.pth").exists() and not (run / "best.pth").exists()


# ------------------------------------------------------------------ binary and non-UTF-8 files

NOT_TEXT = {
    "binary (a PNG)": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "latin-1 text": "id,predicted\ncaf\xe9,\n".encode("latin-1"),
    "NUL bytes in a CSV": b"id,predicted\na,1 2\x00\n",
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(NOT_TEXT))
def test_score_and_validate_a_file_that_is_not_utf8_text(scored, kind):
    tmp, truth, test, _ = scored
    sub = tmp / "sub.csv"
    sub.write_bytes(NOT_TEXT[kind])
    assert_one_line_error(
        cli("score", "--truth", truth, "--submission", sub, cwd=tmp), "sub.csv", "not a UTF-8 text file"
    )
    res = cli("validate", sub, "--test-dir", test, cwd=tmp)
    assert res.code == 1 and "Traceback" not in res.text, res.text
    assert "not a UTF-8 text file" in res.err and "INVALID (1 problem(s))" in res.err


def test_score_binary_or_empty_truth(scored, capsys):
    tmp, _, _, rles = scored
    sub = write(tmp / "sub.csv", f"id,predicted\na,{rles['a'][0]}\n")
    binary = tmp / "truth.bin"
    binary.write_bytes(b"\x80\x04\x95 pickled \x00\xff")
    assert_one_line_error(
        cli_inproc(capsys, "score", "--truth", binary, "--submission", sub), "truth.bin", "not a readable CSV"
    )
    header = write(
        tmp / "header.csv", "id,annotation,width,height,cell_type,plate_time,sample_date,sample_id,elapsed_timedelta\n"
    )
    res = cli_inproc(capsys, "score", "--truth", header, "--submission", sub)
    assert_one_line_error(res, "header.csv", "holds no annotated image", "nothing to score against")
    assert res.out == ""  # no 0.0000 score
    empty = write(tmp / "empty.csv", "")
    assert_one_line_error(
        cli_inproc(capsys, "score", "--truth", empty, "--submission", sub), "empty.csv", "not a readable CSV"
    )


def test_tune_with_an_empty_truth_says_so_not_rerun_predict_raw(scored, tmp_path, capsys):
    from inference_helpers import make_manifest

    tmp, _, _, _ = scored
    w = make_manifest(tmp_path / "w", n_models=1, tta=("identity",))
    header = write(
        tmp / "header.csv", "id,annotation,width,height,cell_type,plate_time,sample_date,sample_id,elapsed_timedelta\n"
    )
    (tmp / "cache").mkdir()
    res = cli_inproc(capsys, "tune", "--cache", tmp / "cache", "--truth", header, "--weights", w)
    line = assert_one_line_error(res, "header.csv", "holds no annotated image")
    assert "predict-raw" not in line


# ------------------------------------------------------------------ folds CSVs


@pytest.mark.parametrize(
    "fold, words",
    [
        ("x", ("fold must be an integer >= 0, got 'x'",)),
        ("1.5", ("got '1.5'",)),
        ("-1", ("got '-1'",)),
        ("", ("got ''",)),
    ],
)
def test_a_folds_csv_with_a_bad_fold_value_is_one_line(tiny_data, tmp_path, capsys, fold, words):
    folds = tmp_path / "folds.csv"
    assert cli_inproc(capsys, "folds", "--data", tiny_data, "--out", folds, "-k", "2").code == 0
    lines = folds.read_text().splitlines()
    head, first, *rest = lines
    first = ",".join(first.split(",")[:3] + [fold])
    folds.write_text("\n".join([head, first, *rest]) + "\n")
    res = cli_inproc(
        capsys,
        "predict-raw",
        "--data",
        tiny_data,
        "--weights",
        REPO / "weights" / "demo",
        "--out",
        tmp_path / "c",
        "--fold",
        "0",
        "--folds-csv",
        folds,
    )
    assert_one_line_error(res, "folds.csv:2:", *words)
    assert not (tmp_path / "c").exists()


def test_a_binary_folds_csv_is_one_line(tiny_data, tmp_path, capsys):
    folds = tmp_path / "folds.csv"
    folds.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    res = cli_inproc(
        capsys,
        "dry-run",
        "--data",
        tiny_data,
        "--weights",
        REPO / "weights" / "demo",
        "--report",
        tmp_path / "r",
        "--fold",
        "0",
        "--folds-csv",
        folds,
    )
    assert_one_line_error(res, "folds.csv", "not a readable folds CSV")


# ------------------------------------------------------------------ show-aug, ids


def test_show_aug_with_a_manifest_says_it_is_a_manifest(tiny_data, tmp_path, capsys):
    manifest = REPO / "weights" / "demo" / "manifest.yaml"
    res = cli_inproc(capsys, "show-aug", "--data", tiny_data, "--config", manifest, "--out", tmp_path / "g.png")
    line = assert_one_line_error(res, "manifest.yaml", "is an ensemble manifest", "not an experiment config")
    assert "unknown config key" not in line
    assert not (tmp_path / "g.png").exists()


def test_the_writer_skips_an_id_that_cannot_be_one_and_the_validator_agrees(tmp_path, capsys):
    from cellseg.data.submission import read_submission, validate_submission, write_submission

    test = tmp_path / "test"
    test.mkdir()
    write_gray(test / " padded .png", np.zeros((4, 4), np.uint8))  # white space around: normalised alike
    rows = {" padded ": [], "bad\udcff": [], "ok": []}
    write_submission(tmp_path / "s.csv", rows)
    err = capsys.readouterr().err
    assert "skipping a row: 'bad\\udcff' is not valid UTF-8" in err
    assert list(read_submission(tmp_path / "s.csv")) == ["padded", "ok"]
    assert validate_submission(tmp_path / "s.csv", test, ["ok"]) == []


@pytest.mark.slow
def test_predict_skips_a_test_file_name_that_is_not_utf8(tmp_path):
    import os

    from cellseg.data.submission import read_submission
    from inference_helpers import make_competition, make_manifest

    w = make_manifest(tmp_path / "w", n_models=1, tta=("identity",), detections_per_view=20)
    comp = make_competition(tmp_path / "comp", n_test=1, height=40, width=48)
    first = next((comp / "test").iterdir())
    os.link(first, os.path.join(os.fsencode(comp / "test"), b"\xff\xfe.png"))
    res = cli("predict", "--data", comp, "--weights", w, "--out", tmp_path / "s.csv", "--no-progress", cwd=tmp_path)
    assert res.code == 0 and "Traceback" not in res.text, res.err[-3000:]
    assert "skipping '\\xff\\xfe.png': the file name is not valid UTF-8" in res.err
    assert list(read_submission(tmp_path / "s.csv")) == [first.stem]


def test_train_force_into_the_folder_holding_its_init_refuses_and_keeps_it(tiny_data, tmp_path, capsys):
    """``--force`` clears an old run's files: an ``--init`` inside ``--out`` must be refused before that."""
    run = tmp_path / "run"
    run.mkdir()
    init = run / "best.pth"
    torch.save({"model": {"w": torch.zeros(3)}}, init)
    before = init.read_bytes()
    res = cli_inproc(capsys, "train", "--config", DEMO, "--data", tiny_data, "--out", run, "--init", init, "--force")
    assert_one_line_error(res, str(run))
    assert init.read_bytes() == before


@pytest.mark.parametrize("ratio", ["nan", "inf", "0"])
def test_train_pseudo_ratio_must_be_finite_and_positive(tiny_data, tmp_path, capsys, ratio):
    res = cli_inproc(
        capsys, "train", "--config", DEMO, "--data", tiny_data, "--out", tmp_path / "run", "--pseudo-ratio", ratio
    )
    assert_one_line_error(res, "--pseudo-ratio", "finite")
    assert not (tmp_path / "run").exists()


def test_train_a_head_without_the_competition_classes_on_train_csv_is_one_line(tiny_data, tmp_path, capsys):
    """The LIVECell pretraining head (shsy5y, cell) cannot take train.csv's astro / cort labels: one line
    before any folder, not an IndexError from the loss in the first step."""
    cfg = REPO / "configs" / "livecell_pretrain_r50.yaml"
    res = cli_inproc(
        capsys,
        "train",
        "--config",
        cfg,
        "--data",
        tiny_data,
        "--fold",
        "all",
        "--out",
        tmp_path / "run",
        "data.use_train=true",
        "data.livecell=''",
        "data.livecell_val=''",
        "train.max_steps=1",
    )
    assert_one_line_error(res, "model.class_names", "shsy5y", "cell", "data.use_train")
    assert not (tmp_path / "run").exists()
