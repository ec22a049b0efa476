"""Tensor element types: the Open Inference Protocol's datatype names (``FP32``, ``UINT8``...) ⇄
numpy dtypes, shared by every front end and by error messages."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import InvalidArgument

#: V2 datatype name → numpy dtype (native byte order). BYTES and BF16 are not supported: no
#: model here takes strings, and numpy has no bfloat16.
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
#: V2 datatype name → little-endian numpy dtype (the wire byte order of raw tensors).
LITTLE_ENDIAN: dict[str, np.dtype] = {name: dtype.newbyteorder("<") for name, dtype in DATATYPES.items()}
_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}


@functools.lru_cache(maxsize=128)  # on every request's path; a miss raises (nothing cached)
def datatype_of(dtype: np.dtype | type) -> str:
    """V2 datatype name of a numpy dtype (float32 → ``FP32``)."""
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {np.dtype(dtype)} has no V2 datatype") from None


def dtype_of(datatype: str) -> np.dtype:
    """numpy dtype of a V2 datatype name; unknown or unsupported → InvalidArgument."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        known = ", ".join(DATATYPES)
        raise InvalidArgument(f"unsupported datatype {datatype!r}; this server accepts {known}") from None
