"""V2 tensor codec (service.grpc.v2_codec): raw and typed decoding, raw encoding, and the errors it raises.

Requests and responses are built with tritonclient's own message classes (the codec is
duck-typed over the V2 field names), so this also checks we read what Triton's client writes.
"""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from service.core.datatypes import DATATYPES
from service.errors import InvalidArgument
from service.grpc import v2_codec as codec


def _raw_request(**arrays: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=codec.datatype_of(array.dtype), shape=array.shape)
        request.raw_input_contents.append(array.tobytes())
    return request


@pytest.mark.parametrize("datatype", sorted(codec.DATATYPES))
def test_datatype_mapping_agrees_with_tritonclient(datatype: str) -> None:
    dtype = codec.dtype_of(datatype)
    assert np.dtype(triton_to_np_dtype(datatype)) == dtype
    assert np_to_triton_dtype(dtype) == datatype == codec.datatype_of(dtype)


@pytest.mark.parametrize("datatype", sorted(codec.DATATYPES))
def test_raw_round_trip_every_datatype(datatype: str) -> None:
    array = (np.arange(24) % 7).astype(codec.dtype_of(datatype)).reshape(2, 3, 4)
    (decoded,) = codec.decode_inputs(_raw_request(x=array)).values()
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)

    response = pb.ModelInferResponse()
    codec.encode_outputs(response, {"y": array, "z": array[:1]}, ["z", "y"])
    assert [o.name for o in response.outputs] == ["z", "y"]
    assert response.outputs[1].datatype == datatype and list(response.outputs[1].shape) == [2, 3, 4]
    assert response.raw_output_contents[1] == array.tobytes()


def test_raw_is_little_endian_both_ways() -> None:
    big = np.array([[1.5, -2.0]], dtype=">f4")
    response = pb.ModelInferResponse()
    codec.encode_outputs(response, {"y": big}, ["y"])
    assert response.outputs[0].datatype == "FP32"
    assert response.raw_output_contents[0] == big.astype("<f4").tobytes()
    (decoded,) = codec.decode_inputs(_raw_request(x=big.astype("<f4"))).values()
    assert decoded.dtype == np.float32 and decoded.dtype.isnative


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", [1.5, -2.25, 3.0, 0.0]),
        ("FP64", "fp64_contents", [1.5, -2.25, 3.0, 1e300]),
        ("UINT8", "uint_contents", [0, 1, 254, 255]),
        ("INT8", "int_contents", [-128, -1, 0, 127]),
        ("INT64", "int64_contents", [-(2**40), 0, 1, 2**40]),
        ("UINT64", "uint64_contents", [0, 1, 2, 2**63]),
        ("BOOL", "bool_contents", [True, False, False, True]),
    ],
)
def test_typed_contents(datatype: str, field: str, values: list[object]) -> None:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    getattr(tensor.contents, field).extend(values)
    decoded = codec.decode_inputs(request)["x"]
    expected = np.array(values, dtype=codec.dtype_of(datatype)).reshape(2, 2)
    assert decoded.dtype == expected.dtype
    np.testing.assert_array_equal(decoded, expected)


def _typed(datatype: str, shape: list[int], **contents: list[object]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest()
    tensor = request.inputs.add(name="x", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def _byte_mismatch() -> pb.ModelInferRequest:
    request = _raw_request(x=np.zeros((2, 3), np.float32))
    request.inputs[0].shape[:] = [2, 4]
    return request


def _both() -> pb.ModelInferRequest:
    request = _raw_request(x=np.zeros((1, 2), np.float32))
    request.inputs[0].contents.fp32_contents.extend([0.0, 0.0])
    return request


def _count_mismatch() -> pb.ModelInferRequest:
    request = _raw_request(x=np.zeros((1, 2), np.float32))
    request.raw_input_contents.append(b"")
    return request


def _duplicate() -> pb.ModelInferRequest:
    request = _raw_request(x=np.zeros((1, 2), np.float32))
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.zeros((1, 2), np.float32).tobytes())
    return request


def _shared_memory() -> pb.ModelInferRequest:
    request = _raw_request(x=np.zeros((1, 2), np.float32))
    request.inputs[0].parameters["shared_memory_region"].string_param = "r0"
    return request


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_byte_mismatch, r"FP32 in raw_input_contents.*needs 32 bytes.*got 24"),
        (_both, "one or the other"),
        (_count_mismatch, "one to one"),
        (_duplicate, "more than once"),
        (_shared_memory, "shared memory"),
        (lambda: _typed("FP32", [2], fp32_contents=[1.0]), "needs 2"),
        (lambda: _typed("FP32", [1], int_contents=[1]), "contents.fp32_contents"),
        (lambda: _typed("UINT8", [1], uint_contents=[256]), "out of range"),
        (lambda: _typed("FP16", [1]), "raw_input_contents"),
        (lambda: _typed("BYTES", [1], bytes_contents=[b"a"]), "unsupported datatype"),
        (lambda: _typed("FP32", [-1], fp32_contents=[1.0]), "dimensions must be >= 0"),
    ],
)
def test_bad_inputs_are_invalid_argument(build: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.decode_inputs(build())  # type: ignore[operator]


def test_requested_outputs() -> None:
    request = pb.ModelInferRequest()
    assert codec.requested_outputs(request) == []
    request.outputs.add(name="b")
    request.outputs.add(name="a")
    assert codec.requested_outputs(request) == ["b", "a"]
    request.outputs.add(name="a")
    with pytest.raises(InvalidArgument, match="more than once"):
        codec.requested_outputs(request)
    request = pb.ModelInferRequest()
    request.outputs.add(name="p").parameters["classification"].int64_param = 3
    with pytest.raises(InvalidArgument, match="classification"):
        codec.requested_outputs(request)


def test_request_tensors_declare_and_decode_later() -> None:
    """What the server hands the data plane: names, datatypes and shapes as declared (even ones
    admission will refuse), payloads turned into arrays only by decode()."""
    request = _raw_request(x=np.arange(6, dtype=np.float32).reshape(2, 3))
    request.inputs.add(name="y", datatype="NOPE", shape=[-5])
    request.raw_input_contents.append(b"junk")
    x, y = codec.request_tensors(request)
    assert (x.name, x.datatype, x.shape) == ("x", "FP32", (2, 3))
    assert (y.name, y.datatype, y.shape) == ("y", "NOPE", (-5,))
    np.testing.assert_array_equal(x.decode(), np.arange(6, dtype=np.float32).reshape(2, 3))


def test_every_datatype_but_fp16_has_a_contents_field() -> None:
    assert set(codec.CONTENTS_FIELD) == set(DATATYPES) - {"FP16"}
