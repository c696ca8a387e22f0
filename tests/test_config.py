from dataclasses import dataclass, field
from typing import Literal

import pytest

from cellseg.config import apply_overrides, dump_yaml, from_dict, load_yaml, to_dict
from cellseg.errors import CellsegError


@dataclass
class Inner:
    sizes: list[int] = field(default_factory=lambda: [8, 16])
    ratio: float = 1.0
    mode: Literal["box", "mask"] = "mask"


@dataclass
class Outer:
    name: str = "x"
    epochs: int = 1
    fp16: bool = False
    inner: Inner = field(default_factory=Inner)
    per_class: dict[str, float] = field(default_factory=dict)
    note: str | None = None


def test_yaml_with_overrides_round_trip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: a\ninner:\n  sizes: [4, 8]\n  ratio: 2\nper_class: {cort: 0.5}\n")
    cfg = load_yaml(Outer, p, ["epochs=3", "inner.mode=box", "inner.sizes=[1, 2, 3]", "fp16=true"])
    assert cfg == Outer("a", 3, True, Inner([1, 2, 3], 2.0, "box"), {"cort": 0.5})
    dump_yaml(cfg, tmp_path / "d.yaml")
    assert load_yaml(Outer, tmp_path / "d.yaml") == cfg
    assert to_dict(cfg)["inner"]["sizes"] == [1, 2, 3]


@pytest.mark.parametrize(
    "data, words",
    [
        ({"epoch": 3}, "unknown config key 'epoch'"),
        ({"inner": {"sizes": "8"}}, r"inner.sizes: expected list"),
        ({"inner": {"mode": "poly"}}, r"inner.mode: expected one of"),
        ({"epochs": 1.5}, r"epochs: expected int"),
        ({"fp16": "yes"}, r"fp16: expected bool"),
    ],
)
def test_errors_name_the_key(data, words):
    with pytest.raises(CellsegError, match=words):
        from_dict(Outer, data)


def test_bad_override_and_missing_file(tmp_path):
    with pytest.raises(CellsegError, match="not KEY=VALUE"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(CellsegError, match="not found"):
        load_yaml(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(CellsegError, match="invalid YAML"):
        load_yaml(Outer, bad)
