"""cellseg.data.masks: label images to CropMasks and back."""

import numpy as np

from cellseg.data.masks import instances, label_image


def test_instances_inverts_label_image_with_gaps_and_split_labels() -> None:
    rng = np.random.default_rng(0)
    labels = np.zeros((40, 50), dtype=np.uint16)
    labels[2:9, 3:12] = 3
    labels[30:38, 40:49] = 3  # one value in two pieces stays one instance
    labels[15:25, 20:23] = 7
    labels[rng.random(labels.shape) < 0.02] = 12  # scattered single pixels
    found = instances(labels)
    assert [v for v, _ in found] == [3, 7, 12]  # ascending, absent values skipped
    for v, crop in found:
        assert crop.area == np.count_nonzero(labels == v)
    rebuilt, overlap = label_image([c for _, c in found], *labels.shape)
    assert overlap == 0
    np.testing.assert_array_equal(rebuilt > 0, labels > 0)
    values = np.array([0, 3, 7, 12])
    np.testing.assert_array_equal(values[rebuilt], labels)


def test_instances_of_an_empty_label_image_is_empty() -> None:
    assert instances(np.zeros((5, 6), dtype=np.int32)) == []
