import numpy as np
import pytest

from cellseg.data.truth import cell_type_from_filename, image_ids, read_sample_submission, read_train_csv
from cellseg.errors import CellsegError
from helpers import train_rows, write_train_csv


def ring(h=12, w=12):
    m = np.zeros((h, w), bool)
    m[2:9, 2:9] = True
    m[4:7, 4:7] = False  # a hole, like the broken astro annotations
    return m


def blob(h=12, w=12):
    m = np.zeros((h, w), bool)
    m[0:2, 9:12] = True
    return m


def test_groups_rows_per_image_and_decodes_crops(tmp_path):
    rows = train_rows("a1", "astro", [ring(), blob()]) + train_rows("c1", "cort", [blob()])
    ts = read_train_csv(write_train_csv(tmp_path / "train.csv", rows))
    assert list(ts.images) == ["a1", "c1"]
    a1 = ts.images["a1"]
    assert (a1.cell_type, a1.height, a1.width, a1.lines) == ("astro", 12, 12, [2, 3])
    assert np.array_equal(a1.masks(), np.stack([ring(), blob()]))
    lab = a1.label_image()
    assert lab.dtype == np.int32 and set(np.unique(lab)) == {0, 1, 2}
    assert a1.instances[1].box == (9, 0, 12, 2)
    assert a1.meta["sample_id"] == "astro[x]_a1"
    assert ts.holes_filled == 0


def test_fill_holes_option_reports_changes(tmp_path):
    rows = train_rows("a1", "astro", [ring(), blob()]) + train_rows("c1", "cort", [ring()])
    ts = read_train_csv(write_train_csv(tmp_path / "train.csv", rows), fill_holes=True)
    assert ts.holes_filled == 2
    filled = ts.images["a1"].masks()[0]
    assert filled.sum() == ring().sum() + 9 and filled[5, 5]


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda r: r[2].update(cell_type="neuron"), r"train.csv:4: unknown cell_type 'neuron'"),
        (lambda r: r[1].update(width="abc"), r"train.csv:3: width must be a positive integer"),
        (lambda r: r[1].update(height=13), r"train.csv:3: height 13 of image a1 differs"),
        (lambda r: r[2].update(annotation="1 2 3"), r"train.csv:4: bad annotation: odd number"),
        (lambda r: r[0].update(annotation="140 10"), r"train.csv:2: bad annotation: .*past the 12x12"),
    ],
)
def test_errors_name_file_and_line(tmp_path, mutate, words):
    rows = train_rows("a1", "astro", [ring(), blob()]) + train_rows("c1", "cort", [blob()])
    mutate(rows)
    with pytest.raises(CellsegError, match=words):
        read_train_csv(write_train_csv(tmp_path / "train.csv", rows))


def test_missing_column(tmp_path):
    p = tmp_path / "train.csv"
    p.write_text("id,annotation,width,height\nx,1 2,3,4\n")
    with pytest.raises(CellsegError, match="train.csv:1: missing column"):
        read_train_csv(p)


def test_test_folder_and_sample_submission(tmp_path):
    (tmp_path / "test").mkdir()
    for i in ("b", "a"):
        (tmp_path / "test" / f"{i}.png").write_bytes(b"")
    assert image_ids(tmp_path / "test") == ["a", "b"]
    (tmp_path / "sample_submission.csv").write_text("id,predicted\nb,\na,\n")
    assert read_sample_submission(tmp_path / "sample_submission.csv") == ["b", "a"]
    with pytest.raises(CellsegError, match="folder not found"):
        image_ids(tmp_path / "nope")


def test_cell_type_from_filename():
    assert cell_type_from_filename("shsy5y[diff]_E10-4_Vessel-714_Ph_3_0001.png") == "shsy5y"
    assert cell_type_from_filename("astros[cereb]_F8-3_Vessel-361_Ph_4_0005.png") == "astro"
    assert cell_type_from_filename("cort[pre-treat]_B2-1.png") == "cort"
    assert cell_type_from_filename("0a6ecc5fe78a.png") is None
