"""cellseg.detectron2.config.read_d2_config: a merged Detectron2 config.yaml read, every bad file one CellsegError."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg.detectron2.config import read_d2_config
from cellseg.errors import CellsegError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "detectron2" / "config.yaml"


def test_the_fixture_config_reads_as_a_nested_dict():
    cfg = read_d2_config(FIXTURE)
    assert cfg["MODEL"]["RESNETS"]["DEPTH"] == 50


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, r"not found \(expected a Detectron2 config\.yaml\)"),
        ("MODEL: [unclosed\n", r"invalid YAML .*expected a Detectron2 config\.yaml"),
        ("- MODEL\n", r"expected a mapping at the top level \(a Detectron2 config\.yaml\)"),
        ("", r"not a Detectron2 config \(no MODEL section\)"),
        ("SOLVER: {BASE_LR: 0.01}\n", r"not a Detectron2 config \(no MODEL section\)"),
        ("_BASE_: Base-RCNN-FPN.yaml\nMODEL: {MASK_ON: true}\n", r"has _BASE_ \(a partial config\)"),
    ],
)
def test_a_bad_config_is_one_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CellsegError, match=message) as e:
        read_d2_config(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)
