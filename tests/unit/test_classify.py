"""classification.classify: order (ties by index), every numeric kind, shapes, labels."""

import ml_dtypes
import numpy as np
import pytest

from server.classification import classify


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int32, np.uint64, np.float16, np.float32, np.float64,
                                   ml_dtypes.bfloat16])
def test_highest_first_ties_in_index_order(dtype):
    hi = 255 if dtype in (np.uint8, np.uint64) else 100
    row = np.array([[0, hi, 7, hi, 0]]).astype(dtype)
    got = [s.decode().split(":")[1] for s in classify(row, 5, (), True)[0]]
    assert got == ["1", "3", "2", "0", "4"]


def test_values_labels_and_shapes():
    x = np.array([[[0.5, 2.0, 1.0], [3.0, 0.0, -1.0]]], dtype=np.float32)  # [batch 1, 2, 3]: 6 classes
    assert classify(x, 2, ("a", "b", "c", "d"), True).tolist() == [[b"3.000000:3:d", b"2.000000:1:b"]]
    assert classify(x, 10, (), True).shape == (1, 6)  # k above the class count: every class
    assert classify(x[0], 1, (), False).tolist() == [b"3.000000:3"]  # a model that does not batch: [k]
    assert classify(np.array([[True, False, True]]), 1, (), True).tolist() == [[b"1:0"]]


def test_bfloat16_with_nan_sorts_the_rest_in_order():
    row = np.array([[0.5, np.nan, 0.9, np.nan]], ml_dtypes.bfloat16)
    got = [s.decode() for s in classify(row, 4, (), True)[0]]
    numbers = [g for g in got if not g.startswith("nan")]
    assert numbers == ["0.898438:2", "0.500000:0"]
