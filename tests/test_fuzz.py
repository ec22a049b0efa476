"""Property-based fuzzing (hypothesis) of request decoding, both protocols
(``FUZZ_EXAMPLES`` sets the examples per in-process test, default 400; 3/8 of it through the server).

In process: the V2 codec (``service.codecs.v2``), the typed image decoding (``service.api.typed``),
the protobuf guard, and the model's own validation, on random datatypes, shapes, byte strings and
typed contents: the only exception allowed is InvalidArgument. Through a real server: random
requests over both protocols never answer INTERNAL or UNKNOWN, never hang, and the server stays up.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, start_server
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx_models import tiny_repository

from service.api.typed import _images
from service.codecs import v2 as codec
from service.api.v2 import _check_datatypes
from service.errors import InvalidArgument, NotFound
from service.generated.inference import grpc_service_pb2 as v2
from service.generated.serving.v1 import serving_pb2 as pb
from service.guards import _safe, _Undecodable
from service.repository import ModelRepository
from service.settings import Settings

MAX_BATCH = 8
INT64 = (-(2**63), 2**63 - 1)
FIELD_VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(*INT64),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
}
NAMES = st.one_of(st.sampled_from(["population", "image", "x", "profit", "probabilities", "y"]), st.text(max_size=8))
DATATYPES = st.one_of(st.sampled_from([*codec.DATATYPES, "BYTES", "BF16", "", "fp32"]), st.text(max_size=6))
DIMS = st.one_of(st.integers(-2, 4), st.sampled_from([28, 784, MAX_BATCH + 1]), st.integers(*INT64))
SHAPES = st.one_of(st.lists(DIMS, max_size=5), st.lists(st.integers(0, 2), min_size=30, max_size=40))


@st.composite
def tensor_bytes(draw: st.DrawFn, shape: list[int], datatype: str) -> bytes:
    """Usually the right byte count for ``shape`` (so decoding goes deeper), sometimes anything."""
    itemsize = codec.DATATYPES[datatype].itemsize if datatype in codec.DATATYPES else 4
    count = math.prod(shape) * itemsize if all(0 <= d <= 4096 for d in shape) else -1
    if 0 <= count <= 64 * 1024 and draw(st.booleans()):
        if datatype in ("FP32", "FP16", "FP64") and draw(st.booleans()):
            values = draw(st.lists(st.floats(width=16 if datatype == "FP16" else 32), min_size=count // itemsize, max_size=count // itemsize))
            return np.array(values, codec.DATATYPES[datatype].newbyteorder("<")).tobytes()
        return draw(st.binary(min_size=count, max_size=count))
    return draw(st.binary(max_size=64))


@st.composite
def infer_requests(draw: st.DrawFn) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(
        model_name=draw(st.sampled_from(["profit", "fashion_softmax", "two_inputs", "", "nope"])),
        model_version=draw(st.sampled_from(["", "1", "2", "0", "-1", "x"])),
        id=draw(st.text(max_size=4)),
    )
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        shape = draw(SHAPES)
        datatype = draw(DATATYPES)
        tensor = request.inputs.add(name=draw(NAMES), datatype=datatype, shape=shape)
        if raw:
            request.raw_input_contents.append(draw(tensor_bytes(shape, datatype)))
        elif draw(st.booleans()):
            field = draw(st.sampled_from(sorted(FIELD_VALUES)))
            getattr(tensor.contents, field).extend(draw(st.lists(FIELD_VALUES[field], max_size=20)))
        if draw(st.integers(0, 9)) == 0:
            tensor.parameters[draw(st.sampled_from(["shared_memory_region", "binary_data", "x"]))].bool_param = True
    if raw and draw(st.integers(0, 5)) == 0:
        request.raw_input_contents.append(draw(st.binary(max_size=8)))  # one too many
    for name in draw(st.lists(NAMES, max_size=2)):
        request.outputs.add(name=name)
    return request


@st.composite
def image_tensors(draw: st.DrawFn) -> pb.Tensor:
    dtype = draw(st.one_of(st.sampled_from([0, 1, 2]), st.integers(-5, 2**31 - 1)))
    shape = draw(st.one_of(SHAPES, st.tuples(st.integers(0, MAX_BATCH + 1), st.just(1), st.just(28), st.just(28)).map(list)))
    datatype = {1: "UINT8", 2: "FP32"}.get(dtype, "UINT8")
    return pb.Tensor(dtype=dtype, shape=shape, data=draw(tensor_bytes(shape, datatype)))


#: More examples for a deeper run: FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRepository]:
    repo = tiny_repository(tmp_path_factory.mktemp("fuzz") / "models")
    repository = ModelRepository(repo, Settings(model_repository=repo, provider="cpu", max_batch_size=MAX_BATCH))
    repository.load()
    yield repository
    repository.close()


@FUZZ
@given(request=infer_requests())
def test_v2_decoding_only_raises_invalid_argument(repository: ModelRepository, request: v2.ModelInferRequest) -> None:
    """The V2 adapter's steps in its order: resolve the model, check datatypes, decode, validate."""
    try:
        model = repository.get(request.model_name, request.model_version or None)
    except (InvalidArgument, NotFound):
        model = repository.get("profit")
    try:
        _check_datatypes(model, request)
    except InvalidArgument:
        pass  # decode anyway: the codec must hold on its own too
    try:
        arrays = codec.decode_inputs(request)
        outputs = codec.requested_outputs(request)
        model.validate(arrays)
        model._output_names(outputs or None)
    except InvalidArgument:
        pass


@FUZZ
@given(tensor=image_tensors(), model=st.sampled_from(["fashion_softmax", "fashion_softmax_float"]))
def test_typed_image_decoding_only_raises_invalid_argument(repository: ModelRepository, tensor: pb.Tensor, model: str) -> None:
    want = np.dtype(np.uint8) if model == "fashion_softmax" else np.dtype(np.float32)
    try:
        images = _images(tensor, want)
        assert images.dtype == want
        repository.get("fashion_softmax").validate({"image": images})
    except InvalidArgument:
        pass


@FUZZ
@given(data=st.binary(max_size=256), message=st.sampled_from([v2.ModelInferRequest, pb.ClassifyRequest, pb.PredictProfitRequest]))
def test_the_protobuf_guard_never_raises(data: bytes, message: type) -> None:
    result = _safe(message.FromString)(data)
    assert isinstance(result, (message, _Undecodable))


# --- through a real server ------------------------------------------------------------------------

BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
METHODS = [
    ("/inference.GRPCInferenceService/ModelInfer", v2.ModelInferResponse),
    ("/serving.v1.ModelService/Classify", pb.ClassifyResponse),
    ("/serving.v1.ModelService/PredictProfit", pb.PredictProfitResponse),
    ("/serving.v1.ModelService/PredictHousePrice", pb.PredictHousePriceResponse),
]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("fuzzserver")
    repo = tiny_repository(tmp / "models")
    args = ["--model-repository", str(repo), "--max-batch-size", str(MAX_BATCH), "--provider", "cpu"]
    with start_server(tmp, *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def fuzz_channel(fuzz_server: ServerProcess) -> Iterator[grpc.Channel]:
    with fuzz_server.channel() as channel:
        yield channel


def _send(channel: grpc.Channel, method: str, data: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(data, timeout=10)
    except grpc.RpcError as err:
        assert err.code() not in BAD_CODES, (method, err.code(), err.details())
        return err.code()
    return grpc.StatusCode.OK


SERVER_FUZZ = settings(max_examples=max(EXAMPLES * 3 // 8, 1), deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SERVER_FUZZ
@given(request=infer_requests())
def test_server_v2_requests(fuzz_channel: grpc.Channel, request: v2.ModelInferRequest) -> None:
    _send(fuzz_channel, METHODS[0][0], request.SerializeToString())


@SERVER_FUZZ
@given(
    tensor=image_tensors(),
    top_k=st.integers(0, 12),
    population=st.lists(st.floats(width=32), max_size=MAX_BATCH + 2),
    version=st.integers(-2, 3),
)
def test_server_typed_requests(fuzz_channel: grpc.Channel, tensor: pb.Tensor, top_k: int, population: list[float], version: int) -> None:
    ref = pb.ModelRef(name="fashion_softmax", version=version)
    _send(fuzz_channel, METHODS[1][0], pb.ClassifyRequest(model=ref, images=tensor, top_k=top_k).SerializeToString())
    _send(fuzz_channel, METHODS[2][0], pb.PredictProfitRequest(population=population).SerializeToString())
    houses = [pb.House(size_sqft=p, bedrooms=-p) for p in population]
    _send(fuzz_channel, METHODS[3][0], pb.PredictHousePriceRequest(houses=houses).SerializeToString())


@SERVER_FUZZ
@given(data=st.binary(max_size=512), method=st.sampled_from([m for m, _ in METHODS]))
def test_server_random_bytes(fuzz_channel: grpc.Channel, data: bytes, method: str) -> None:
    _send(fuzz_channel, method, data)


def test_the_fuzzed_server_is_still_healthy(fuzz_server: ServerProcess) -> None:
    assert fuzz_server.process.poll() is None
    assert fuzz_server.health() == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in fuzz_server.log()
