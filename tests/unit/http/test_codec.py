"""The REST codec in process: JSON and Triton's binary tensors in, both out; every malformed body
is InvalidArgument with a message, never a crash."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from service.errors import InvalidArgument, RequestTooLarge
from service.http import codec
from service.http.api import inflate, route


def body(header: dict, *blobs: bytes) -> tuple[bytes, int | None]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), (len(head) if blobs else None)


def test_json_inputs_decode_after_admission_only() -> None:
    data, length = body(
        {"id": "7", "inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4.5]]}]}
    )
    request = codec.parse_infer(data, length)
    assert request.id == "7" and request.outputs == [] and not request.binary_default
    (tensor,) = request.inputs
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", "FP32", (2, 2))
    np.testing.assert_array_equal(tensor.decode(), np.array([[1, 2], [3, 4.5]], np.float32))


def test_binary_inputs_are_views_of_the_body_in_order() -> None:
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([[1], [0]], np.uint8)
    data, length = body(
        {
            "inputs": [
                {"name": "a", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": a.nbytes}},
                {"name": "b", "datatype": "UINT8", "shape": [2, 1], "parameters": {"binary_data_size": b.nbytes}},
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
            "parameters": {"binary_data_output": False},
        },
        a.tobytes(),
        b.tobytes(),
    )
    request = codec.parse_infer(data, length)
    first, second = (t.decode() for t in request.inputs)
    np.testing.assert_array_equal(first, a)
    np.testing.assert_array_equal(second, b)
    assert not first.flags.owndata  # a view over the request body, no copy
    assert request.outputs == ["y", "z"] and request.binary_outputs == {"y": True}


@pytest.mark.parametrize(
    ("header", "blob", "message"),
    [
        ([1, 2], b"", "must be a JSON object"),
        ({"inputs": "x"}, b"", "needs 'inputs'"),
        (
            {"inputs": [{"name": 3, "datatype": "FP32", "shape": [1], "data": [1]}]},
            b"",
            "inputs[0].name must be a string",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1.5], "data": [1]}]},
            b"",
            "shape must be a list of integers",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [True], "data": [1]}]},
            b"",
            "shape must be a list of integers",
        ),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}, b"", "neither data nor a binary_data_size"),
        (
            {
                "inputs": [
                    {"name": "x", "datatype": "FP32", "shape": [1], "data": [1], "parameters": {"binary_data_size": 4}}
                ]
            },
            b"\0" * 4,
            "both data and binary_data_size",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": -1}}]},
            b"\0",
            "non-negative integer",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]},
            b"\0" * 4,
            "goes past the end of the body",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]},
            b"\0" * 6,
            "2 bytes after the JSON",
        ),
        ({"inputs": [], "outputs": [{"name": "y"}, {"name": "y"}]}, b"", "requested more than once"),
        ({"inputs": [], "outputs": {"name": "y"}}, b"", "'outputs' must be a list"),
        ({"inputs": [], "parameters": []}, b"", "request.parameters must be a JSON object"),
        ({"inputs": [], "parameters": {"shared_memory_region": "r"}}, b"", "shared memory is not supported"),
        ({"inputs": [], "id": 5}, b"", "id must be a string"),
    ],
)
def test_malformed_bodies_are_invalid_argument(header: object, blob: bytes, message: str) -> None:
    head = json.dumps(header).encode()
    with pytest.raises(InvalidArgument, match=message.replace("[", r"\[").replace("]", r"\]")):
        codec.parse_infer(head + blob, len(head) if blob else None)


def test_not_json_and_a_header_length_past_the_body() -> None:
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        codec.parse_infer(b'{"inputs": [', None)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        codec.parse_infer(b"\xff\xfe", None)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        codec.parse_infer(b"[" * 100_000 + b"]" * 100_000, None)  # nested past the recursion limit
    with pytest.raises(InvalidArgument, match="longer than the 2-byte body"):
        codec.parse_infer(b"{}", 10)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT8", [1, 300], "out of range for UINT8"),
        ("UINT8", [1.5, 2], "must be integers"),
        ("BOOL", [1, 0], "must be true/false"),
        ("FP32", ["a", "b"], "must be numbers"),
        ("FP32", [[1, 2], [3]], "not a regular"),
        ("FP32", [1, 2, 3], "has 3 values, but shape \\[2\\] needs 2"),
        ("FP32", 5, "data must be a list"),
    ],
)
def test_json_data_is_checked_against_its_datatype(datatype: str, data: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        codec.json_tensor("x", datatype, (2,), data)


def test_binary_size_must_match_the_admitted_shape() -> None:
    data, length = body(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 4}}]}, b"\0" * 4
    )
    (tensor,) = codec.parse_infer(data, length).inputs
    with pytest.raises(InvalidArgument, match="binary_data_size is 4 bytes, but shape \\[2\\] of FP32 needs 8"):
        tensor.decode()


def test_responses_json_and_binary() -> None:
    out = {"y": np.array([[0.5, 0.25]], np.float32), "z": np.array([[1], [2]], np.int64)}
    plain = codec.InferRequest("r", [], [])
    payload, length = codec.encode_infer("m", "1", plain, out, ["y"])
    assert length is None
    assert json.loads(payload) == {
        "model_name": "m",
        "model_version": "1",
        "id": "r",
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [0.5, 0.25]}],
    }
    binary = codec.InferRequest("", [], [], {"z": False}, binary_default=True)
    payload, length = codec.encode_infer("m", "1", binary, out, ["y", "z"])
    header = json.loads(payload[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 8} and header["outputs"][1]["data"] == [1, 2]
    assert np.frombuffer(payload[length:], "<f4").tolist() == [0.5, 0.25]


def test_inflate_is_bounded() -> None:
    assert inflate(zlib.compress(b"x" * 100), "deflate", 100) == b"x" * 100
    bomb = zlib.compress(b"\0" * 10_000_000)  # ~10 KB that would inflate to 10 MB
    with pytest.raises(RequestTooLarge, match="over 1000 bytes"):
        inflate(bomb, "deflate", 1000)
    with pytest.raises(InvalidArgument, match="cannot be decompressed"):
        inflate(b"not gzip", "gzip", 1000)
    with pytest.raises(InvalidArgument, match="truncated"):
        inflate(zlib.compress(b"x" * 100)[:-6], "deflate", 1000)


def test_routes() -> None:
    assert route("GET", "/v2") == ("server_metadata", {})
    assert route("GET", "/v2/models/m/versions/3/ready") == ("model_ready", {"model": "m", "version": "3"})
    assert route("POST", "/v2/models/m/infer") == ("infer", {"model": "m"})
    assert route("HEAD", "/v2/health/ready") == ("ready", {})
    not_allowed = route("GET", "/v2/models/m/infer")
    assert not isinstance(not_allowed, tuple) and not_allowed.status == 405 and ("allow", "POST") in not_allowed.headers
    missing = route("GET", "/v1/models/m")
    assert not isinstance(missing, tuple) and missing.status == 404 and b"openapi.json" in missing.body
