"""Raw bytes ⇄ numpy and the checks every request tensor goes through (no protocol types here)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import InvalidArgument

#: Most dimensions a request tensor may have (numpy's own limit is 64; models here use <= 4).
MAX_RANK = 32
#: Largest element count of any request tensor, empty ones included (numpy refuses shapes whose
#: non-zero dimensions multiply past the address space, even when another dimension is 0).
MAX_ELEMENTS = 2**40
#: Elements looked at per step when locating non-finite values (bounds the mask's memory).
_FINITE_BLOCK = 1 << 16


def check_shape(shape: Sequence[int], what: object) -> tuple[int, ...]:
    """``shape`` as a tuple, or InvalidArgument for a negative dimension, more than
    :data:`MAX_RANK` dimensions, or more than :data:`MAX_ELEMENTS` elements (zeros ignored)."""
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{what}: at most {MAX_RANK} dimensions, got {len(shape)}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{what}: dimensions must be >= 0, got shape {list(dims)}")
    if math.prod(d for d in dims if d) > MAX_ELEMENTS:
        raise InvalidArgument(f"{what}: shape {list(dims)} is far too large (over {MAX_ELEMENTS} elements)")
    return dims


def from_bytes(raw: bytes, dtype: np.dtype, shape: Sequence[int], what: object) -> np.ndarray:
    """Interpret ``raw`` as a C-order little-endian tensor of ``dtype`` and ``shape`` (a view, no
    copy). InvalidArgument when the shape is invalid (:func:`check_shape`) or the byte length
    does not match."""
    little = np.dtype(dtype).newbyteorder("<")
    if (
        type(shape) is tuple
        and len(shape) <= MAX_RANK
        and len(raw) == math.prod(shape) * little.itemsize
        and min(shape, default=1) > 0
    ):
        return np.frombuffer(raw, dtype=little).reshape(shape)  # the usual case: admitted already
    dims = check_shape(shape, what)
    expected = math.prod(dims) * little.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{what}: shape {list(dims)} of {little.name} needs {expected} bytes "
            f"({math.prod(dims)} x {little.itemsize}), got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=little).reshape(dims)


def check_finite(array: np.ndarray, what: object, expected: str = "finite numbers") -> None:
    """InvalidArgument naming the count and first index of NaN/inf values in a float array.

    O(1) extra memory for a valid array (min and max propagate NaN and show ±inf); only an
    invalid one is scanned again, block by block, to say where."""
    if array.dtype.kind != "f" or array.size == 0:
        return
    if math.isfinite(array.min()) and math.isfinite(array.max()):
        return
    flat = array.reshape(-1)  # a view: request arrays are C-contiguous
    count, first = 0, -1
    for start in range(0, flat.size, _FINITE_BLOCK):
        bad = ~np.isfinite(flat[start : start + _FINITE_BLOCK])
        found = int(np.count_nonzero(bad))
        if found and first < 0:
            first = start + int(bad.argmax())
        count += found
    index = tuple(int(i) for i in np.unravel_index(first, array.shape))
    raise InvalidArgument(f"{what} expects {expected}, got {count} NaN/inf value(s), the first at index {index}")


def to_bytes(array: np.ndarray) -> bytes:
    """C-order little-endian bytes of ``array``."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
