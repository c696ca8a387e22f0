import numpy as np
import pytest

from cellseg.data import rle
from cellseg.data.submission import decode_submission, read_submission, validate_submission, write_submission
from cellseg.errors import CellsegError
from helpers import write_test_dir


def test_write_read_round_trip_keeps_empty_images(tmp_path):
    m = np.zeros((20, 30), bool)
    m[3:5, 4:9] = True
    p = write_submission(tmp_path / "sub.csv", {"a": [rle.encode(m)], "b": []})
    assert p.read_text().splitlines() == ["id,predicted", f"a,{rle.encode(m)}", "b,"]
    sub = read_submission(p)
    assert sub == {"a": [(2, rle.encode(m))], "b": []}
    crops = decode_submission(p, {"a": (20, 30), "b": (20, 30)})
    assert np.array_equal(crops["a"][0].to_full(20, 30), m) and crops["b"] == []
    assert not list(tmp_path.glob(".*tmp"))


def test_write_is_atomic_on_failure(tmp_path):
    target = tmp_path / "sub.csv"
    target.write_text("old\n")

    class Boom:
        def items(self):
            yield "a", ["1 2"]
            raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        write_submission(target, Boom())
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_validate_reports_each_problem_with_line(tmp_path):
    test_dir = write_test_dir(tmp_path / "test", ["a", "b", "c"], shape=(20, 30))
    sub = tmp_path / "sub.csv"
    sub.write_text(
        "id,predicted\n"
        "a,1 5\n"
        "a,3 4\n"  # overlaps line 2
        "a,590 20\n"  # past 20x30 = 600
        "b,1 2 3\n"  # odd tokens
        "zz,1 1\n"  # unknown id
    )  # c missing
    problems = validate_submission(sub, test_dir)
    text = "\n".join(problems)
    assert "test id c has no row" in text
    assert "line 3: mask overlaps the mask on line 2" in text
    assert "line 4: RLE run 1" in text and "past the 20x30" in text
    assert "line 5: odd number" in text
    assert "line 6: id zz is not in" in text
    assert len(problems) == 5


def test_validate_accepts_valid_and_checks_header(tmp_path):
    test_dir = write_test_dir(tmp_path / "test", ["a", "b"], shape=(20, 30))
    ok = write_submission(tmp_path / "ok.csv", {"a": ["1 5", "31 5"], "b": []})
    assert validate_submission(ok, test_dir) == []
    bad = tmp_path / "bad.csv"
    bad.write_text("image,rle\na,1 5\nb,\n")
    assert "header must be 'id,predicted'" in validate_submission(bad, test_dir)[0]
    with pytest.raises(CellsegError, match="test folder not found"):
        validate_submission(ok, tmp_path / "nope")


def test_decode_submission_errors_name_line(tmp_path):
    p = write_submission(tmp_path / "s.csv", {"a": ["1 5", "9 0"]})
    with pytest.raises(CellsegError, match=r"s.csv:3: non-positive RLE length"):
        decode_submission(p, {"a": (20, 30)})
    with pytest.raises(CellsegError, match="not in the truth"):
        decode_submission(p, {"b": (20, 30)})


def test_validate_unreadable_test_image_matters_only_with_masks(tmp_path):
    test_dir = write_test_dir(tmp_path / "test", ["a", "b"], shape=(20, 30))
    (test_dir / "b.png").write_bytes(b"not a png")
    ok = write_submission(tmp_path / "ok.csv", {"a": ["1 5"], "b": []})
    assert validate_submission(ok, test_dir) == []
    bad = write_submission(tmp_path / "bad.csv", {"a": ["1 5"], "b": ["1 5"]})
    [problem] = validate_submission(bad, test_dir)
    assert problem.startswith("line 3: masks for an image whose size cannot be read")
