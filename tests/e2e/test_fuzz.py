"""Property-based fuzzing (hypothesis) of request decoding through a real server, both
protocols: random requests and random bytes never answer INTERNAL or UNKNOWN, never hang, and the
server stays up. (In process: tests/unit/grpc/test_fuzz.py; ``FUZZ_EXAMPLES`` sets the examples,
3/8 of it here.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fixtures.fuzzing import EXAMPLES, MAX_BATCH, image_tensors, infer_requests
from fixtures.onnx_models import tiny_repository
from fixtures.servers import ServerProcess, start_server
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.generated.inference import grpc_service_pb2 as v2
from service.generated.serving.v1 import serving_pb2 as pb

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
    args = ["--model-repository", str(repo), "--max-request-rows", str(MAX_BATCH), "--provider", "cpu"]
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


SERVER_FUZZ = settings(
    max_examples=max(EXAMPLES * 3 // 8, 1),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _still_healthy(server: ServerProcess) -> None:
    """After a property: the server is up, SERVING, and logged no traceback (each test checks its
    own aftermath; none relies on running after the others)."""
    assert server.process.poll() is None
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in server.log()


def test_server_v2_requests(fuzz_server: ServerProcess, fuzz_channel: grpc.Channel) -> None:
    @SERVER_FUZZ
    @given(request=infer_requests())
    def prop(request: v2.ModelInferRequest) -> None:
        _send(fuzz_channel, METHODS[0][0], request.SerializeToString())

    prop()
    _still_healthy(fuzz_server)


def test_server_typed_requests(fuzz_server: ServerProcess, fuzz_channel: grpc.Channel) -> None:
    @SERVER_FUZZ
    @given(
        tensor=image_tensors(),
        top_k=st.integers(0, 12),
        population=st.lists(st.floats(width=32), max_size=MAX_BATCH + 2),
        version=st.integers(-2, 3),
    )
    def prop(tensor: pb.Tensor, top_k: int, population: list[float], version: int) -> None:
        ref = pb.ModelRef(name="fashion_softmax", version=version)
        request = pb.ClassifyRequest(model=ref, images=tensor, top_k=top_k)
        _send(fuzz_channel, METHODS[1][0], request.SerializeToString())
        _send(fuzz_channel, METHODS[2][0], pb.PredictProfitRequest(population=population).SerializeToString())
        houses = [pb.House(size_sqft=p, bedrooms=-p) for p in population]
        _send(fuzz_channel, METHODS[3][0], pb.PredictHousePriceRequest(houses=houses).SerializeToString())

    prop()
    _still_healthy(fuzz_server)


def test_server_random_bytes(fuzz_server: ServerProcess, fuzz_channel: grpc.Channel) -> None:
    @SERVER_FUZZ
    @given(data=st.binary(max_size=512), method=st.sampled_from([m for m, _ in METHODS]))
    def prop(data: bytes, method: str) -> None:
        _send(fuzz_channel, method, data)

    prop()
    _still_healthy(fuzz_server)
