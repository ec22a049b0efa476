"""Request tensor checks (service.core.tensors): shapes, byte views, finite values."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.tensors import MAX_RANK, check_finite, check_shape, from_bytes, to_bytes
from service.errors import InvalidArgument


def test_check_finite_names_the_count_and_the_first_index() -> None:
    x = np.zeros((2, 3, 4), np.float32)
    x[1, 2, 0] = np.nan
    x[1, 2, 3] = -np.inf
    x[0, 1, 1] = np.inf
    with pytest.raises(InvalidArgument) as info:
        check_finite(x, "input 'x'")
    assert str(info.value) == "input 'x' expects finite numbers, got 3 NaN/inf value(s), the first at index (0, 1, 1)"
    with pytest.raises(InvalidArgument, match=r"^images expects pixels in \[0, 1\], got 1"):
        check_finite(np.array([np.nan], np.float64), "images", "pixels in [0, 1]")


def test_check_finite_on_a_large_array_with_one_nan() -> None:
    """Blocks of 65,536 elements are scanned only for an invalid array: count and first index
    come out right across block boundaries (and in a float16 array too)."""
    x = np.ones((64, 1024, 70), np.float32)  # 4.6 M elements, 70 blocks
    check_finite(x, "x")  # valid: nothing raised
    x[41, 1000, 3] = np.nan
    with pytest.raises(InvalidArgument, match=r"got 1 NaN/inf value\(s\), the first at index \(41, 1000, 3\)"):
        check_finite(x, "x")
    x[63, 1023, 69] = np.inf  # the very last element, in another block
    with pytest.raises(InvalidArgument, match=r"got 2 NaN/inf value\(s\), the first at index \(41, 1000, 3\)"):
        check_finite(x, "x")
    half = np.zeros(70_000, np.float16)
    half[65_536] = np.float16(np.inf)
    with pytest.raises(InvalidArgument, match=r"the first at index \(65536,\)"):
        check_finite(half, "h")


def test_check_finite_ignores_integers_and_empty_arrays() -> None:
    check_finite(np.array([2**31 - 1], np.int32), "i")
    check_finite(np.zeros((0, 3), np.float32), "empty")


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ([2, -1], "dimensions must be >= 0, got shape [2, -1]"),
        ([1] * (MAX_RANK + 1), f"at most {MAX_RANK} dimensions, got {MAX_RANK + 1}"),
        ([2**21, 2**21], "far too large (over 1099511627776 elements)"),
        ([0, 2**62, 2**62], "far too large"),
    ],
)
def test_check_shape(shape: list[int], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_shape(shape, "t")
    assert str(info.value).startswith("t: ") and message in str(info.value)


def test_check_shape_accepts_zeros_and_returns_a_tuple() -> None:
    assert check_shape([0, 3], "t") == (0, 3)
    assert check_shape([1] * MAX_RANK, "t") == (1,) * MAX_RANK


def test_from_bytes_is_a_little_endian_view_and_checks_the_length() -> None:
    raw = np.array([[1.5, -2.0]], "<f4").tobytes()
    array = from_bytes(raw, np.dtype(np.float32), [1, 2], "x")
    assert array.tolist() == [[1.5, -2.0]] and not array.flags.owndata
    with pytest.raises(InvalidArgument, match=r"x: shape \[1, 3\] of float32 needs 12 bytes \(3 x 4\), got 8"):
        from_bytes(raw, np.dtype(np.float32), [1, 3], "x")
    assert to_bytes(np.array([1.5], ">f4")) == np.array([1.5], "<f4").tobytes()
