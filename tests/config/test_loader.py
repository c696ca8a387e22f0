from dataclasses import dataclass, field
from typing import Literal

import pytest

from cellseg.config.loader import Range, apply_overrides, bounds, check_ranges, dump_yaml, from_dict, load_yaml, to_dict
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
    with pytest.raises(CellsegError, match="command-line override .epochs. is not KEY=VALUE"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(CellsegError, match="not found"):
        load_yaml(Outer, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(CellsegError, match="invalid YAML"):
        load_yaml(Outer, bad)


@dataclass
class Paired:
    """Two fields that must agree (as model.anchor_sizes and model.returned_layers do)."""

    a: int = 1
    b: int = 1

    def __post_init__(self):
        if self.a != self.b:
            raise CellsegError(f"a ({self.a}) and b ({self.b}) must be equal")


def test_override_errors_name_the_override_not_the_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("a: 1\nb: 1\n")
    # fine together even though the first alone breaks the pair: no error
    assert load_yaml(Paired, p, ["a=2", "b=2"]) == Paired(2, 2)
    with pytest.raises(CellsegError, match=r"^command-line override 'a=3': a \(3\) and b \(1\) must be equal$"):
        load_yaml(Paired, p, ["a=3"])
    with pytest.raises(CellsegError, match=r"^command-line override 'epochs=x': epochs: expected int, got str$"):
        load_yaml(Outer, _outer(tmp_path), ["inner.ratio=2", "epochs=x"])
    with pytest.raises(CellsegError, match=r"^command-line override 'inner.sizes=\[1,': value is not valid YAML"):
        load_yaml(Outer, _outer(tmp_path), ["inner.sizes=[1,"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: x\n")
    with pytest.raises(CellsegError, match=rf"^{bad}: epochs: expected int"):
        load_yaml(Outer, bad, ["fp16=true"])
    assert load_yaml(Outer, bad, ["epochs=2"]).epochs == 2  # an override may repair the file


def _outer(tmp_path):
    p = tmp_path / "o.yaml"
    p.write_text("name: a\n")
    return p


def test_binary_file_as_yaml_names_file_and_expectation(tmp_path):
    p = tmp_path / "model.pth"
    p.write_bytes(b"PK\x03\x04\x00\x00binary\xff\xfe")
    with pytest.raises(CellsegError, match=r"model\.pth: not a text file .*PyTorch checkpoint\); expected a YAML"):
        load_yaml(Outer, p)


@dataclass
class Ranged:
    lr: float = field(default=0.1, metadata=bounds(0, lo_open=True))
    p: float = field(default=0.5, metadata=bounds(0, 1))
    steps: list[float] = field(default_factory=lambda: [0.5], metadata=bounds(0, 1))
    per: dict[str, float] = field(default_factory=dict, metadata=bounds(0))
    free: float = 1.0
    maybe: float | None = None
    inner: Inner = field(default_factory=Inner)


@pytest.mark.parametrize(
    "data, words",
    [
        ({"lr": 0}, r"lr: 0.0 is out of range \(allowed: > 0\)"),
        ({"p": 1.5}, r"p: 1.5 is out of range \(allowed: \[0, 1\]\)"),
        ({"steps": [0.5, 2]}, r"steps\[1\]: 2.0 is out of range"),
        ({"per": {"cort": -1}}, r"per.cort: -1.0 is out of range \(allowed: >= 0\)"),
        ({"free": float("nan")}, "free: nan is not allowed .allowed: any finite number; NaN and inf never are"),
        ({"maybe": float("inf")}, "maybe: inf is not allowed"),
        ({"inner": {"ratio": float("-inf")}}, "inner.ratio: -inf is not allowed"),
        ({"p": float("nan")}, r"p: nan is not allowed \(allowed: \[0, 1\]"),
    ],
)
def test_ranges_and_non_finite_floats_are_refused_with_the_key_and_range(data, words):
    with pytest.raises(CellsegError, match=words):
        from_dict(Ranged, data)


def test_check_ranges_checks_objects_built_in_code():
    check_ranges(Ranged())
    with pytest.raises(CellsegError, match=r"inner.ratio: nan is not allowed"):
        check_ranges(Ranged(inner=Inner(ratio=float("nan"))))
    with pytest.raises(CellsegError, match=r"lr: -1 is out of range"):
        check_ranges(Ranged(lr=-1))


def test_range_text():
    assert [str(Range(0, 1)), str(Range(0, 1, lo_open=True)), str(Range(1)), str(Range(hi=5, hi_open=True))] == [
        "[0, 1]",
        "(0, 1]",
        ">= 1",
        "< 5",
    ]
