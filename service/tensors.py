"""Raw-bytes ↔ numpy conversion shared by the protocol adapters (no protocol types here)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .errors import InvalidArgument

#: Most dimensions a request tensor may have (numpy's own limit is 64; models here use <= 4).
MAX_RANK = 32
#: Largest element count of any request tensor, empty ones included (numpy refuses shapes whose
#: non-zero dimensions multiply past the address space, even when another dimension is 0).
MAX_ELEMENTS = 2**40


def check_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    """``shape`` as a tuple, or InvalidArgument for a negative dimension, more than
    :data:`MAX_RANK` dimensions, or more than :data:`MAX_ELEMENTS` elements (zeros ignored)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) > MAX_RANK:
        raise InvalidArgument(f"{what}: at most {MAX_RANK} dimensions, got {len(shape)}")
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: dimensions must be >= 0, got shape {list(shape)}")
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:
        raise InvalidArgument(f"{what}: shape {list(shape)} is far too large (over {MAX_ELEMENTS} elements)")
    return shape


def from_bytes(raw: bytes, dtype: np.dtype, shape: Sequence[int], what: str) -> np.ndarray:
    """Interpret ``raw`` as a C-order little-endian tensor of ``dtype`` and ``shape``.

    Raises InvalidArgument when the shape is invalid (:func:`check_shape`) or the byte length does
    not match.
    """
    shape = check_shape(shape, what)
    dtype = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgument(
            f"{what}: shape {list(shape)} of {dtype.name} needs {expected} bytes "
            f"({math.prod(shape)} x {dtype.itemsize}), got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def check_finite(array: np.ndarray, what: str, expected: str = "finite numbers") -> None:
    """Raise InvalidArgument naming the count and first index of NaN/inf values in a float array."""
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.argwhere(~finite)
        raise InvalidArgument(
            f"{what} expects {expected}, got {len(bad)} NaN/inf value(s), "
            f"the first at index {tuple(int(i) for i in bad[0])}"
        )


def to_bytes(array: np.ndarray) -> bytes:
    """C-order little-endian bytes of ``array``."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
