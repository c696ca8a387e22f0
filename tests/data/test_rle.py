import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellseg.data import rle
from cellseg.data.masks import CropMask

shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


@st.composite
def masks(draw):
    h, w = draw(shapes)
    return draw(arrays(bool, (h, w)))


@given(masks())
@settings(max_examples=300, deadline=None)
def test_round_trip(mask):
    h, w = mask.shape
    assert np.array_equal(rle.decode(rle.encode(mask), h, w), mask)


@given(masks())
@settings(max_examples=300, deadline=None)
def test_encode_is_row_major_reference(mask):
    # straightforward per-pixel reference over the C-order flattening
    runs, start = [], None
    flat = list(mask.ravel(order="C")) + [False]
    for i, v in enumerate(flat):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs += [start + 1, i - start]
            start = None
    assert rle.encode(mask) == " ".join(map(str, runs))


@given(masks(), st.data())
@settings(max_examples=300, deadline=None)
def test_crop_encode_and_decode_match_full_frame(mask, data):
    h, w = mask.shape
    crop = CropMask.from_full(mask)
    assert rle.encode_crop(crop, h, w) == rle.encode(mask)
    d = rle.decode_crop(rle.encode(mask), h, w)
    if mask.any():
        assert np.array_equal(d.to_full(h, w), mask)
        assert d.box == crop.box


def test_full_width_crop_merges_runs_across_rows():
    m = np.zeros((4, 5), bool)
    m[1, 3:] = True
    m[2, :2] = True  # contiguous with row 1's run in row-major order
    assert rle.encode_crop(CropMask.from_full(m), 4, 5) == rle.encode(m) == "9 4"


def test_row_major_not_column_major():
    m = np.zeros((3, 4), bool)
    m[0, 1] = m[0, 2] = True  # two horizontal neighbours -> one run in row-major order
    assert rle.encode(m) == "2 2"
    assert np.array_equal(rle.decode("5 1", 3, 4), np.eye(1, 12, 4, dtype=bool).reshape(3, 4))


@pytest.mark.parametrize(
    "text, words",
    [
        ("1 2 3", "odd number"),
        ("1 x", "non-integer"),
        ("1 2.5", "non-integer"),
        ("0 3", "non-positive RLE start"),
        ("3 0", "non-positive RLE length"),
        ("1 -2", "non-positive RLE length"),
        ("10 5", "past the"),
        ("5 1 2 1", "not sorted"),
        ("2 3 4 1", "overlap"),
    ],
)
def test_decode_errors_say_which(text, words):
    with pytest.raises(ValueError, match=words):
        rle.decode(text, 3, 4)


@given(st.lists(st.integers(-5, 30), min_size=1, max_size=12))
@settings(max_examples=300, deadline=None)
def test_decode_accepts_exactly_valid_runs(values):
    text = " ".join(map(str, values))
    h, w = 4, 5
    valid = len(values) % 2 == 0 and all(v > 0 for v in values)
    if valid:
        starts, lens = np.array(values[0::2]) - 1, np.array(values[1::2])
        ends = starts + lens
        valid = ends.max() <= h * w and all(starts[1:] >= ends[:-1])
    if valid:
        m = rle.decode(text, h, w)
        assert m.sum() == sum(values[1::2])
    else:
        with pytest.raises(ValueError):
            rle.decode(text, h, w)


def test_empty():
    assert rle.encode(np.zeros((3, 3), bool)) == ""
    assert not rle.decode("", 3, 3).any()


@pytest.mark.slow
@given(st.lists(masks(), min_size=1, max_size=6), st.data())
@settings(max_examples=200, deadline=None)
def test_batch_decode_matches_single_decode(mask_list, data):
    h, w = mask_list[0].shape
    mask_list = [np.resize(m, (h, w)) for m in mask_list]
    texts = [rle.encode(m) for m in mask_list]
    for single, batch in zip([rle.decode_crop(t, h, w) for t in texts], rle.decode_crops(texts, h, w)):
        assert (single.top, single.left) == (batch.top, batch.left)
        assert np.array_equal(single.mask, batch.mask)


@pytest.mark.parametrize("bad", ["1 2 3", "1 x", "0 3", "3 0", "10 5", "5 1 2 1", "2 3 4 1"])
def test_batch_decode_names_the_bad_item_with_the_single_message(bad):
    with pytest.raises(ValueError) as single:
        rle.decode(bad, 3, 4)
    with pytest.raises(rle.BatchDecodeError) as batch:
        rle.decode_crops(["1 2", "4 1", bad, "1 1"], 3, 4)
    assert batch.value.index == 2 and str(batch.value) == str(single.value)
