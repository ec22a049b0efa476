"""KServe V2 tensors ⇄ numpy.

The V2 datatype ⇄ numpy mapping lives here, along with decoding of request inputs (raw bytes or
typed contents) and encoding of response outputs (raw bytes). Raw tensors are row-major and
little-endian; they go through :mod:`service.tensors` (one ``np.frombuffer`` in, one
``tobytes()`` out), shared with the typed API.
Functions take and fill protobuf messages duck-typed by their V2 field names, so this module has
no import-time dependency on the generated code.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from service.errors import InvalidArgument
from service.tensors import MAX_ELEMENTS, MAX_RANK, check_shape, from_bytes, to_bytes

#: V2 datatype string → numpy dtype (native byte order). BYTES and BF16 are not supported:
#: no model here takes strings, and numpy has no bfloat16.
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
_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DATATYPES.items()}
_LITTLE_ENDIAN: dict[str, np.dtype] = {name: dtype.newbyteorder("<") for name, dtype in DATATYPES.items()}

#: V2 datatype → the InferTensorContents field that carries it in typed form (FP16: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
#: numpy dtype of each typed field's elements as they come off the wire.
_FIELD_DTYPE: dict[str, np.dtype] = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
    "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}
_ALL_FIELDS = tuple(_FIELD_DTYPE) + ("bytes_contents",)

#: Triton-only request parameters this server does not honour; rejected rather than ignored.
_UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported by this server",
    "classification": "the classification extension is not supported; request the raw output",
}


@functools.lru_cache(maxsize=128)  # on every request's path; a miss raises (nothing cached)
def datatype_of(dtype: np.dtype | type) -> str:
    """V2 datatype string for a numpy dtype (e.g. float32 → ``FP32``)."""
    try:
        return _NAMES[np.dtype(dtype).newbyteorder("=")]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {np.dtype(dtype)} has no V2 datatype") from None


def dtype_of(datatype: str) -> np.dtype:
    """numpy dtype for a V2 datatype string; unknown or unsupported → InvalidArgument."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        known = ", ".join(DATATYPES)
        raise InvalidArgument(
            f"unsupported datatype {datatype!r}; this server accepts {known}"
        ) from None


def _shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(shape)
    if dims and len(dims) <= MAX_RANK and min(dims) > 0 and math.prod(dims) <= MAX_ELEMENTS:
        return dims  # the usual case, checked at once; anything else gets the full checks below
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"input {name!r}: shape {list(dims)} has a negative dimension")
    return check_shape(dims, f"input {name!r}")


def _check_parameters(where: str, parameters: Mapping[str, Any]) -> None:
    for key, why in _UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise InvalidArgument(f"{where}: parameter {key!r}: {why}")


def _from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    dtype = _LITTLE_ENDIAN.get(datatype)
    if dtype is not None and len(raw) == math.prod(shape) * dtype.itemsize:
        # ``shape`` is checked already (_shape): one view over the request bytes, no copy.
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(DATATYPES[datatype], copy=False)
    what = f"input {name!r} ({datatype} in raw_input_contents)"
    return from_bytes(raw, dtype_of(datatype), shape, what).astype(dtype_of(datatype), copy=False)


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> np.ndarray:
    dtype = dtype_of(datatype)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(
            f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents"
        )
    stray = [f for f in _ALL_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise InvalidArgument(
            f"input {name!r}: datatype {datatype} is carried in contents.{field}, "
            f"not contents.{stray[0]}"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: contents.{field} has {len(values)} values, but shape "
            f"{list(shape)} needs {count}"
        )
    wide = np.asarray(values, dtype=_FIELD_DTYPE[field])
    array = wide.astype(dtype, copy=False)
    if array.dtype != wide.dtype and not np.array_equal(array, wide):
        raise InvalidArgument(f"input {name!r}: contents.{field} has values out of range for {datatype}")
    return array.reshape(shape)


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    """Decode a ModelInferRequest's inputs into arrays keyed by input name.

    Either every input comes in ``raw_input_contents`` (one entry per input, in order) or every
    input comes in its typed ``contents``; mixing them, duplicate names, negative dims and
    byte/element counts that do not match the shape are InvalidArgument.
    """
    if request.parameters:
        _check_parameters("request", request.parameters)
    raw = request.raw_input_contents
    if raw:
        typed = [t.name for t in request.inputs if t.HasField("contents")]
        if typed:
            raise InvalidArgument(
                f"input {typed[0]!r} sets typed contents while the request uses "
                "raw_input_contents; use one or the other for all inputs"
            )
        if len(raw) != len(request.inputs):
            raise InvalidArgument(
                f"request has {len(request.inputs)} inputs but {len(raw)} raw_input_contents "
                "entries; they must match one to one"
            )
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in arrays:
            raise InvalidArgument(f"input {name!r} appears more than once")
        if tensor.parameters:
            _check_parameters(f"input {name!r}", tensor.parameters)
        shape = _shape(name, tensor.shape)
        if raw:
            arrays[name] = _from_raw(name, tensor.datatype, shape, raw[index])
        else:
            arrays[name] = _from_contents(name, tensor.datatype, shape, tensor.contents)
    return arrays


def requested_outputs(request: Any) -> list[str]:
    """Names of the outputs the request asks for, in order (empty = all)."""
    names: list[str] = []
    for tensor in request.outputs:
        if tensor.parameters:
            _check_parameters(f"output {tensor.name!r}", tensor.parameters)
        if tensor.name in names:
            raise InvalidArgument(f"output {tensor.name!r} is requested more than once")
        names.append(tensor.name)
    return names


def encode_outputs(response: Any, outputs: Mapping[str, np.ndarray], order: Sequence[str]) -> None:
    """Append ``outputs`` (in ``order``) to a ModelInferResponse as raw little-endian tensors."""
    for name in order:
        array = np.asarray(outputs[name])
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype_of(array.dtype)
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(to_bytes(array))
