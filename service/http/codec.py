"""Open Inference Protocol REST bodies ⇄ the data plane's tensors.

Requests are JSON (``$inference_request``), optionally followed by Triton's binary tensor data:
the ``Inference-Header-Content-Length`` header gives the JSON's length, and each input with a
``binary_data_size`` parameter takes that many bytes, in input order, from what follows. Inputs
become :class:`~service.core.dataplane.RequestTensor` objects (declared name, datatype, shape);
their payload — a slice of the body viewed with numpy, or the JSON ``data`` list — becomes an array
only after the data plane admitted the request. Responses are JSON, with outputs as binary data
when the request asks for it (``binary_data`` per output, ``binary_data_output`` for all).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from ..core.dataplane import RequestTensor
from ..core.datatypes import DATATYPES, LITTLE_ENDIAN, datatype_of
from ..errors import InvalidArgument
from ..v2_common import check_inference_parameters

HEADER_LENGTH = "inference-header-content-length"


def dumps(value: object) -> bytes:
    """A JSON body (numpy arrays as lists; float32 values in their shortest round-trip form)."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


def loads(data: bytes | memoryview, what: str = "the request body") -> Any:
    """JSON → Python; InvalidArgument (never a crash) for anything that is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:  # also invalid UTF-8, and nesting past 1024 levels
        raise InvalidArgument(f"{what} is not valid JSON: {exc}") from None


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _string(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {json.dumps(value)[:80]}")
    return value


def _shape(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidArgument(f"{what} must be a list of integers, got {json.dumps(value)[:80]}")
    return tuple(value)


def _parameters(item: Mapping[str, Any], what: str) -> dict[str, Any]:
    return _object(item.get("parameters", {}), f"{what}.parameters")


@dataclass
class InferRequest:
    """A parsed inference request: the tensors to admit, the outputs asked for and how."""

    id: str
    inputs: list[RequestTensor]
    outputs: list[str]
    binary_outputs: dict[str, bool] = field(default_factory=dict)  # output name → send as binary
    binary_default: bool = False  # binary_data_output


def _json_decoder(name: str, datatype: str, shape: tuple[int, ...], data: object) -> Any:
    def decode() -> np.ndarray:
        return json_tensor(name, datatype, shape, data)

    return decode


def _binary_decoder(name: str, datatype: str, shape: tuple[int, ...], body: bytes, offset: int, size: int) -> Any:
    def decode() -> np.ndarray:
        dtype = LITTLE_ENDIAN[datatype]  # admitted: a datatype the model takes
        count = math.prod(shape)
        if size != count * dtype.itemsize:
            raise InvalidArgument(
                f"input {name!r}: binary_data_size is {size} bytes, but shape {list(shape)} of {datatype} "
                f"needs {count * dtype.itemsize} ({count} x {dtype.itemsize})"
            )
        array = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
        return array.astype(DATATYPES[datatype], copy=False)

    return decode


def json_tensor(name: str, datatype: str, shape: tuple[int, ...], data: object) -> np.ndarray:
    """The JSON ``data`` of an input (flat or nested lists, row-major) as an array of ``shape``."""
    want = DATATYPES[datatype]  # admitted: a datatype the model takes
    if not isinstance(data, list):
        raise InvalidArgument(f"input {name!r}: data must be a list, got {type(data).__name__}")
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidArgument(f"input {name!r}: data is not a regular (rectangular) list: {exc}") from None
    count = math.prod(shape)
    if values.size != count:
        raise InvalidArgument(f"input {name!r}: data has {values.size} values, but shape {list(shape)} needs {count}")
    kind = values.dtype.kind
    if count and want.kind == "b" and kind != "b":
        raise InvalidArgument(f"input {name!r}: {datatype} data must be true/false, got {values.dtype.name} values")
    if count and want.kind in "iu" and kind not in "iu":
        raise InvalidArgument(f"input {name!r}: {datatype} data must be integers, got {values.dtype.name} values")
    if count and want.kind == "f" and kind not in "iuf":
        raise InvalidArgument(f"input {name!r}: {datatype} data must be numbers, got {values.dtype.name} values")
    array = values.astype(want)
    if want.kind in "iu" and not np.array_equal(array, values):
        raise InvalidArgument(f"input {name!r}: data has values out of range for {datatype}")
    return array.reshape(shape)


def parse_infer(body: bytes, header_length: int | None) -> InferRequest:
    """A request body (JSON, or JSON + binary tensors) as an :class:`InferRequest`."""
    end = len(body) if header_length is None else header_length
    if end > len(body):
        raise InvalidArgument(
            f"Inference-Header-Content-Length is {header_length}, longer than the {len(body)}-byte body"
        )
    request = _object(loads(memoryview(body)[:end]), "the inference request")
    parameters = _parameters(request, "request")
    if parameters:
        check_inference_parameters("request", parameters)
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidArgument(f"id must be a string, got {json.dumps(request_id)[:80]}")
    inputs = request.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("the inference request needs 'inputs': a list of input tensors")
    tensors: list[RequestTensor] = []
    offset = end
    for index, item in enumerate(inputs):
        where = f"inputs[{index}]"
        item = _object(item, where)
        name = _string(item.get("name"), f"{where}.name")
        datatype = _string(item.get("datatype"), f"input {name!r}: datatype")
        shape = _shape(item.get("shape"), f"input {name!r}: shape")
        item_parameters = _parameters(item, f"input {name!r}")
        if item_parameters:
            check_inference_parameters(f"input {name!r}", item_parameters)
        size = item_parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in item:
                raise InvalidArgument(f"input {name!r} has both data and binary_data_size; send one")
            if offset + size > len(body):
                raise InvalidArgument(
                    f"input {name!r}: binary_data_size {size} goes past the end of the body "
                    f"({len(body) - offset} bytes of binary data left)"
                )
            decode = _binary_decoder(name, datatype, shape, body, offset, size)
            offset += size
        elif "data" in item:
            decode = _json_decoder(name, datatype, shape, item["data"])
        else:
            raise InvalidArgument(f"input {name!r} has neither data nor a binary_data_size parameter")
        tensors.append(RequestTensor(name, datatype, shape, decode))
    if offset != len(body):
        raise InvalidArgument(
            f"the body has {len(body) - offset} bytes after the JSON and the binary inputs it announces"
        )
    outputs: list[str] = []
    binary: dict[str, bool] = {}
    requested = request.get("outputs", [])
    if not isinstance(requested, list):
        raise InvalidArgument("'outputs' must be a list of {name, parameters} objects")
    for index, item in enumerate(requested):
        item = _object(item, f"outputs[{index}]")
        name = _string(item.get("name"), f"outputs[{index}].name")
        if name in outputs:
            raise InvalidArgument(f"output {name!r} is requested more than once")
        output_parameters = _parameters(item, f"output {name!r}")
        if output_parameters:
            check_inference_parameters(f"output {name!r}", output_parameters)
        if "binary_data" in output_parameters:
            binary[name] = bool(output_parameters["binary_data"])
        outputs.append(name)
    return InferRequest(request_id, tensors, outputs, binary, bool(parameters.get("binary_data_output", False)))


def encode_infer(
    model_name: str, version: str, request: InferRequest, outputs: Mapping[str, np.ndarray], order: Sequence[str]
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary outputs follow it (else None)."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name in order:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if request.binary_outputs.get(name, request.binary_default):
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = np.ascontiguousarray(array).reshape(-1)
        described.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": described}
    if request.id:
        response["id"] = request.id
    head = dumps(response)
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
