"""KServe V2 protobuf messages ⇄ the data plane's tensors.

A ``ModelInferRequest``'s inputs become :class:`~service.core.dataplane.RequestTensor` objects
(name, datatype, shape) whose payload — one entry of ``raw_input_contents`` or the typed
``contents`` — is turned into an array only after the data plane admitted the request. Raw
tensors are row-major and little-endian: one ``np.frombuffer`` view in, one ``tobytes()`` out.
Functions take and fill protobuf messages duck-typed by their V2 field names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..core.dataplane import RequestTensor
from ..core.datatypes import DATATYPES, LITTLE_ENDIAN, datatype_of, dtype_of
from ..core.tensors import check_shape, from_bytes, to_bytes
from ..errors import InvalidArgument
from ..v2_common import check_inference_parameters

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
_ALL_FIELDS = (*_FIELD_DTYPE, "bytes_contents")

__all__ = ["DATATYPES", "datatype_of", "decode_inputs", "encode_outputs", "request_tensors", "requested_outputs"]


def _from_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    dtype = LITTLE_ENDIAN[datatype]  # admitted: a datatype the model takes
    if len(raw) == math.prod(shape) * dtype.itemsize:
        # The shape is admitted already: one view over the request bytes, no copy.
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(DATATYPES[datatype], copy=False)
    what = f"input {name!r} ({datatype} in raw_input_contents)"
    return from_bytes(raw, dtype, shape, what).astype(DATATYPES[datatype], copy=False)


def _from_contents(name: str, datatype: str, shape: tuple[int, ...], contents: Any) -> np.ndarray:
    dtype = dtype_of(datatype)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(f"input {name!r}: {datatype} has no typed contents field; send it in raw_input_contents")
    stray = [f for f in _ALL_FIELDS if f != field and len(getattr(contents, f))]
    if stray:
        raise InvalidArgument(
            f"input {name!r}: datatype {datatype} is carried in contents.{field}, not contents.{stray[0]}"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidArgument(
            f"input {name!r}: contents.{field} has {len(values)} values, but shape {list(shape)} needs {count}"
        )
    wide = np.asarray(values, dtype=_FIELD_DTYPE[field])
    array = wide.astype(dtype, copy=False)
    if array.dtype != wide.dtype and not np.array_equal(array, wide):
        raise InvalidArgument(f"input {name!r}: contents.{field} has values out of range for {datatype}")
    return array.reshape(shape)


def request_tensors(request: Any) -> list[RequestTensor]:
    """A ModelInferRequest's inputs as declared, payloads not yet decoded.

    Either every input comes in ``raw_input_contents`` (one entry per input, in order) or every
    input comes in its typed ``contents``; mixing them, or a count that does not match, is
    InvalidArgument (checked here: it costs nothing)."""
    if request.parameters:
        check_inference_parameters("request", request.parameters)
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
    tensors: list[RequestTensor] = []
    for index, tensor in enumerate(request.inputs):
        if tensor.parameters:
            check_inference_parameters(f"input {tensor.name!r}", tensor.parameters)
        name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
        if raw:
            payload = raw[index]
            decode = lambda n=name, d=datatype, s=shape, p=payload: _from_raw(n, d, s, p)  # noqa: E731
        else:
            contents = tensor.contents
            decode = lambda n=name, d=datatype, s=shape, c=contents: _from_contents(n, d, s, c)  # noqa: E731
        tensors.append(RequestTensor(name, datatype, shape, decode))
    return tensors


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    """Every input decoded without a model's contract (tests and tools; the server admits first).
    Shapes are checked, datatypes must be known."""
    arrays: dict[str, np.ndarray] = {}
    for tensor in request_tensors(request):
        if tensor.name in arrays:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        dtype_of(tensor.datatype)
        check_shape(tensor.shape, f"input {tensor.name!r}")
        arrays[tensor.name] = tensor.decode()
    return arrays


def requested_outputs(request: Any) -> list[str]:
    """Names of the outputs the request asks for, in order (empty = all)."""
    names: list[str] = []
    for tensor in request.outputs:
        if tensor.parameters:
            check_inference_parameters(f"output {tensor.name!r}", tensor.parameters)
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
