"""Bad requests, table-driven, against a real server over both protocols (raw gRPC, so requests
can be malformed below the protobuf level too). Each must get the right status and a message that
says what was wrong; afterwards the server must still be healthy and answer good requests.

The count of distinct bad requests is asserted (>= 40) so the table cannot quietly shrink.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from fixtures.onnx_models import tiny_repository
from fixtures.servers import ServerProcess, start_server
from grpc_health.v1 import health_pb2

from service.errors import MAX_MESSAGE_CHARS
from service.generated.inference import grpc_service_pb2 as v2
from service.generated.serving.v1 import serving_pb2 as pb

MAX_BATCH = 16
MAX_MESSAGE = 4 * 1024 * 1024
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
TYPED = "/serving.v1.ModelService/"
V2 = "/inference.GRPCInferenceService/"


@dataclass(frozen=True)
class Case:
    """One bad call: method, request (a message or raw bytes), the expected code and a fragment of
    the expected message. ``stream``: the request is sent on a stream (after ``before``)."""

    method: str
    request: object
    code: grpc.StatusCode
    message: str
    metadata: tuple[tuple[str, str], ...] = ()
    stream: bool = False
    before: tuple[object, ...] = field(default_factory=tuple)


def image(
    n: int = 1, dtype: int = pb.DATA_TYPE_UINT8, shape: list[int] | None = None, data: bytes | None = None
) -> pb.Tensor:
    shape = [n, 1, 28, 28] if shape is None else shape
    if data is None:
        size = math.prod(d for d in shape if d >= 0) if shape else 0
        data = bytes(size) if dtype != pb.DATA_TYPE_FLOAT32 else np.zeros(size, "<f4").tobytes()
    return pb.Tensor(dtype=dtype, shape=shape, data=data)


def floats(*values: float) -> bytes:
    return np.array(values, "<f4").tobytes()


def classify(**kwargs: object) -> Case:
    code, message = kwargs.pop("expect")  # type: ignore[misc]
    return Case(TYPED + "Classify", pb.ClassifyRequest(**kwargs), code, message)


def infer(inputs: list[dict], raw: list[bytes] | None = None, expect=(INVALID, ""), **kwargs: object) -> Case:
    request = v2.ModelInferRequest(**kwargs)
    for spec in inputs:
        tensor = request.inputs.add(name=spec["name"], datatype=spec.get("datatype", "FP32"), shape=spec["shape"])
        for key, value in spec.get("contents", {}).items():
            getattr(tensor.contents, key).extend(value)
        for key in spec.get("parameters", ()):
            tensor.parameters[key].bool_param = True
    request.raw_input_contents.extend(raw or [])
    return Case(V2 + "ModelInfer", request, *expect)


def profit_input(shape=(1, 1), **extra: object) -> dict:
    return {"name": "population", "shape": list(shape), **extra}


# Hand-made wire bytes: protobuf refuses to build these, a hostile client does not.
BAD_UTF8 = b"\xc3\x28"
MODELREF_BAD_NAME = b"\x0a" + bytes([2 + len(BAD_UTF8)]) + b"\x0a" + bytes([len(BAD_UTF8)]) + BAD_UTF8
V2_BAD_NAME = b"\x0a" + bytes([len(BAD_UTF8)]) + BAD_UTF8
GOOD_CLASSIFY = pb.ClassifyRequest(images=image(1)).SerializeToString()
GOOD_INFER = v2.ModelInferRequest(
    model_name="profit",
    inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
    raw_input_contents=[floats(1.0)],
).SerializeToString()
HUGE_NAME = "m" * 50_000  # far over the status message limit, under the request size limit

CASES: dict[str, Case] = {
    # --- typed API: Classify ------------------------------------------------------------------
    "typed: no images tensor": classify(expect=(INVALID, "images.dtype must be DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32")),
    "typed: dtype unspecified": classify(
        images=image(1, dtype=pb.DATA_TYPE_UNSPECIFIED), expect=(INVALID, "got DATA_TYPE_UNSPECIFIED")
    ),
    "typed: dtype not in the enum": classify(images=image(1, dtype=99), expect=(INVALID, "got 99")),
    "typed: rank 3 images": classify(
        images=image(shape=[2, 28, 28]), expect=(INVALID, "expects shape [N, 1, 28, 28], got [2, 28, 28]")
    ),
    "typed: wrong image size": classify(
        images=image(shape=[1, 1, 27, 29]), expect=(INVALID, "expects shape [N, 1, 28, 28], got [1, 1, 27, 29]")
    ),
    "typed: truncated raw bytes": classify(
        images=image(2, data=bytes(2 * 784 - 1)), expect=(INVALID, "needs 1568 bytes (1568 x 1), got 1567")
    ),
    "typed: extra raw bytes": classify(images=image(2, data=bytes(2 * 784 + 3)), expect=(INVALID, "got 1571")),
    "typed: float32 bytes not a multiple of 4": classify(
        images=image(1, pb.DATA_TYPE_FLOAT32, data=bytes(784 * 4 - 2)), expect=(INVALID, "needs 3136 bytes")
    ),
    "typed: empty batch": classify(images=image(0), expect=(INVALID, "empty batch")),
    "typed: scalar shape": classify(images=image(shape=[], data=b"\x00"), expect=(INVALID, "expects shape")),
    "typed: negative dimension": classify(
        images=image(shape=[-1, 1, 28, 28], data=b""), expect=(INVALID, "dimensions must be >= 0")
    ),
    "typed: enormous dimensions": classify(
        images=image(shape=[2**40, 2**40, 1, 1], data=b""), expect=(INVALID, "far too large")
    ),
    "typed: zero-size but enormous": classify(
        images=image(shape=[0, 2**62, 28, 28], data=b""), expect=(INVALID, "far too large")
    ),
    "typed: 40 dimensions": classify(
        images=image(shape=[1] * 40, data=b"\x00"), expect=(INVALID, "at most 32 dimensions")
    ),
    "typed: NaN pixel": classify(
        images=image(1, pb.DATA_TYPE_FLOAT32, data=floats(*[0.5] * 783, math.nan)), expect=(INVALID, "NaN/inf")
    ),
    "typed: inf pixel": classify(
        images=image(1, pb.DATA_TYPE_FLOAT32, data=floats(math.inf, *[0.5] * 783)), expect=(INVALID, "NaN/inf")
    ),
    "typed: pixel above 1": classify(
        images=image(1, pb.DATA_TYPE_FLOAT32, data=floats(1.5, *[0.5] * 783)), expect=(INVALID, "must be in [0, 1]")
    ),
    "typed: batch over the max": classify(
        images=image(MAX_BATCH + 1), expect=(INVALID, f"over the maximum of {MAX_BATCH}")
    ),
    "typed: unknown model": classify(
        model=pb.ModelRef(name="no_such_model"), images=image(1), expect=(NOT_FOUND, "model 'no_such_model' not found")
    ),
    "typed: unknown version": classify(
        model=pb.ModelRef(name="fashion_softmax", version=9),
        images=image(1),
        expect=(NOT_FOUND, "version 9 of model 'fashion_softmax' not found"),
    ),
    "typed: negative version": classify(
        model=pb.ModelRef(name="fashion_softmax", version=-1),
        images=image(1),
        expect=(INVALID, "model.version must be >= 0"),
    ),
    "typed: model that failed to load": classify(
        model=pb.ModelRef(name="broken"), images=image(1), expect=(NOT_FOUND, "failed to load")
    ),
    "typed: not an image classifier": classify(
        model=pb.ModelRef(name="profit"), images=image(1), expect=(INVALID, "is not an image classifier")
    ),
    "typed: top_k above the class count": classify(
        images=image(1), top_k=11, expect=(INVALID, "top_k must be at most 10")
    ),
    "typed: odd unicode model name": classify(
        model=pb.ModelRef(name="模型\x00\n\u202e"), images=image(1), expect=(NOT_FOUND, "not found")
    ),
    "typed: 50 kB model name": classify(
        model=pb.ModelRef(name=HUGE_NAME), images=image(1), expect=(NOT_FOUND, "(truncated)")
    ),
    # --- typed API: regression, metadata -------------------------------------------------------
    "typed: profit, no rows": Case(TYPED + "PredictProfit", pb.PredictProfitRequest(), INVALID, "empty batch"),
    "typed: profit, NaN": Case(
        TYPED + "PredictProfit",
        pb.PredictProfitRequest(population=[1.0, math.nan]),
        INVALID,
        "NaN/inf value(s), the first at index (1, 0)",
    ),
    "typed: profit, inf": Case(
        TYPED + "PredictProfit", pb.PredictProfitRequest(population=[-math.inf]), INVALID, "NaN/inf"
    ),
    "typed: profit, batch over the max": Case(
        TYPED + "PredictProfit",
        pb.PredictProfitRequest(population=[1.0] * (MAX_BATCH + 1)),
        INVALID,
        "over the maximum",
    ),
    "typed: profit on an image model": Case(
        TYPED + "PredictProfit",
        pb.PredictProfitRequest(model=pb.ModelRef(name="fashion_softmax"), population=[1.0]),
        INVALID,
        "input 'image' of model 'fashion_softmax' version 2 has datatype UINT8, got FP32",
    ),
    "typed: house price, no rows": Case(
        TYPED + "PredictHousePrice", pb.PredictHousePriceRequest(), INVALID, "empty batch"
    ),
    "typed: house price, NaN bedrooms": Case(
        TYPED + "PredictHousePrice",
        pb.PredictHousePriceRequest(houses=[pb.House(size_sqft=1000, bedrooms=math.nan)]),
        INVALID,
        "NaN/inf",
    ),
    "typed: metadata without a name": Case(
        TYPED + "GetModelMetadata", pb.GetModelMetadataRequest(), INVALID, "model.name is required"
    ),
    "typed: metadata, unknown model": Case(
        TYPED + "GetModelMetadata",
        pb.GetModelMetadataRequest(model=pb.ModelRef(name="nope")),
        NOT_FOUND,
        "model 'nope' not found",
    ),
    "typed: list, unknown model": Case(
        TYPED + "ListModels", pb.ListModelsRequest(name="nope"), NOT_FOUND, "model 'nope' not found"
    ),
    # --- typed API: below protobuf -------------------------------------------------------------
    "typed: invalid UTF-8 model name": Case(
        TYPED + "Classify", MODELREF_BAD_NAME, INVALID, "not a valid serving.v1.ClassifyRequest"
    ),
    "typed: invalid UTF-8 request_id": Case(
        TYPED + "Classify", GOOD_CLASSIFY + b"\x22\x02\xff\xfe", INVALID, "not a valid serving.v1.ClassifyRequest"
    ),
    "typed: truncated message": Case(
        TYPED + "Classify", GOOD_CLASSIFY[:-10], INVALID, "not a valid serving.v1.ClassifyRequest"
    ),
    "typed: garbage bytes": Case(
        TYPED + "PredictProfit", b"\xff" * 64, INVALID, "not a valid serving.v1.PredictProfitRequest"
    ),
    "typed: message over the largest request a model accepts": classify(
        images=image(shape=[1, 200_000], data=bytes(200_000)),
        expect=(EXHAUSTED, "larger than any request the server accepts"),
    ),
    "typed: message over max_message_bytes": classify(
        images=image(shape=[1, MAX_MESSAGE + 1], data=bytes(MAX_MESSAGE + 1)), expect=(EXHAUSTED, "")
    ),
    "typed: 20 kB metadata value": Case(
        TYPED + "Classify", GOOD_CLASSIFY, EXHAUSTED, "metadata", metadata=(("x-big", "a" * 20_000),)
    ),
    "typed: 600 metadata entries": Case(  # gRPC core refuses it; since grpcio 1.82 with no message
        TYPED + "Classify",
        GOOD_CLASSIFY,
        EXHAUSTED,
        "",
        metadata=tuple((f"x-h{i}", "v" * 30) for i in range(600)),
    ),
    "typed: unknown method": Case(TYPED + "Nope", b"", grpc.StatusCode.UNIMPLEMENTED, ""),
    "typed: stream, second batch bad": Case(
        TYPED + "ClassifyStream",
        pb.ClassifyRequest(images=image(1, dtype=7), request_id="b1"),
        INVALID,
        "batch 1 (request_id 'b1')",
        stream=True,
        before=(pb.ClassifyRequest(images=image(1)),),
    ),
    "typed: stream, undecodable message": Case(
        TYPED + "ClassifyStream",
        b"\x12\xff\xff",
        INVALID,
        "not a valid serving.v1.ClassifyRequest",
        stream=True,
        before=(pb.ClassifyRequest(images=image(1)),),
    ),
    # --- V2: model and version -----------------------------------------------------------------
    "v2: no model name": infer([profit_input()], [floats(1)], expect=(INVALID, "a model name is required")),
    "v2: unknown model": infer(
        [profit_input()], [floats(1)], model_name="nope", expect=(NOT_FOUND, "model 'nope' not found")
    ),
    "v2: unknown version": infer(
        [profit_input()], [floats(1)], model_name="profit", model_version="7", expect=(NOT_FOUND, "version 7")
    ),
    "v2: version not an integer": infer(
        [profit_input()],
        [floats(1)],
        model_name="profit",
        model_version="latest",
        expect=(INVALID, "must be an integer, got 'latest'"),
    ),
    "v2: model that failed to load": infer(
        [profit_input()], [floats(1)], model_name="broken", expect=(NOT_FOUND, "failed to load")
    ),
    "v2: 50 kB model name": infer(
        [profit_input()], [floats(1)], model_name=HUGE_NAME, expect=(NOT_FOUND, "(truncated)")
    ),
    # --- V2: inputs ----------------------------------------------------------------------------
    "v2: no inputs": infer([], model_name="profit", expect=(INVALID, "expects inputs ['population'], got []")),
    "v2: unknown input name": infer(
        [{"name": "pop", "shape": [1, 1]}], [floats(1)], model_name="profit", expect=(INVALID, "has no input 'pop'")
    ),
    "v2: duplicate input": infer(
        [profit_input(), profit_input()],
        [floats(1), floats(1)],
        model_name="profit",
        expect=(INVALID, "appears more than once"),
    ),
    "v2: wrong datatype": infer(
        [profit_input(datatype="FP64")],
        [np.ones(1).tobytes()],
        model_name="profit",
        expect=(INVALID, "has datatype FP32, got FP64"),
    ),
    "v2: BYTES datatype": infer(
        [profit_input(datatype="BYTES")], [b"abcd"], model_name="profit", expect=(INVALID, "got BYTES")
    ),
    "v2: empty datatype": infer(
        [profit_input(datatype="")], [floats(1)], model_name="profit", expect=(INVALID, "got (empty)")
    ),
    "v2: truncated raw bytes": infer(
        [profit_input((2, 1))],
        [floats(1)[:-1] + floats(2)],
        model_name="profit",
        expect=(INVALID, "needs 8 bytes (2 x 4), got 7"),
    ),
    "v2: extra raw bytes": infer([profit_input()], [floats(1, 2)], model_name="profit", expect=(INVALID, "got 8")),
    "v2: negative dimension": infer(
        [profit_input((-1, 1))], [b""], model_name="profit", expect=(INVALID, "dimensions must be >= 0")
    ),
    "v2: enormous dimensions": infer(
        [profit_input((2**62, 2**62))], [b""], model_name="profit", expect=(INVALID, "far too large")
    ),
    "v2: 33 dimensions": infer(
        [profit_input((1,) * 33)], [floats(1)], model_name="profit", expect=(INVALID, "at most 32 dimensions")
    ),
    "v2: wrong rank": infer(
        [profit_input((1,))], [floats(1)], model_name="profit", expect=(INVALID, "expects shape [N, 1], got [1]")
    ),
    "v2: wrong static dimension": infer(
        [profit_input((1, 2))],
        [floats(1, 2)],
        model_name="profit",
        expect=(INVALID, "expects shape [N, 1], got [1, 2]"),
    ),
    "v2: empty batch": infer([profit_input((0, 1))], [b""], model_name="profit", expect=(INVALID, "empty batch")),
    "v2: batch over the max": infer(
        [profit_input((MAX_BATCH + 1, 1))],
        [floats(*[1] * (MAX_BATCH + 1))],
        model_name="profit",
        expect=(INVALID, "over the maximum"),
    ),
    "v2: NaN in raw": infer([profit_input()], [floats(math.nan)], model_name="profit", expect=(INVALID, "NaN/inf")),
    "v2: inf in contents": infer(
        [profit_input(contents={"fp32_contents": [math.inf]})], model_name="profit", expect=(INVALID, "NaN/inf")
    ),
    "v2: more raw entries than inputs": infer(
        [profit_input()], [floats(1), floats(1)], model_name="profit", expect=(INVALID, "must match one to one")
    ),
    "v2: raw and typed contents mixed": infer(
        [profit_input(contents={"fp32_contents": [1.0]})],
        [floats(1)],
        model_name="profit",
        expect=(INVALID, "use one or the other"),
    ),
    "v2: contents count off": infer(
        [profit_input(contents={"fp32_contents": [1.0, 2.0]})],
        model_name="profit",
        expect=(INVALID, "has 2 values, but shape [1, 1] needs 1"),
    ),
    "v2: contents in the wrong field": infer(
        [profit_input(contents={"int_contents": [1]})],
        model_name="profit",
        expect=(INVALID, "carried in contents.fp32_contents, not contents.int_contents"),
    ),
    "v2: uint8 contents out of range": infer(
        [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [1, 1, 28, 28],
                "contents": {"uint_contents": [300] + [0] * 783},
            }
        ],
        model_name="fashion_softmax",
        expect=(INVALID, "out of range for UINT8"),
    ),
    "v2: shared memory parameter": infer(
        [profit_input(parameters=["shared_memory_region"])],
        [floats(1)],
        model_name="profit",
        expect=(INVALID, "shared memory is not supported"),
    ),
    # --- V2: outputs, other RPCs ---------------------------------------------------------------
    "v2: unknown output": Case(
        V2 + "ModelInfer",
        v2.ModelInferRequest(
            model_name="profit",
            inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[floats(1)],
            outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="nope")],
        ),
        INVALID,
        "got a request for ['nope']",
    ),
    "v2: duplicate output": Case(
        V2 + "ModelInfer",
        v2.ModelInferRequest(
            model_name="profit",
            inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[floats(1)],
            outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name="profit")] * 2,
        ),
        INVALID,
        "requested more than once",
    ),
    "v2: metadata, unknown model": Case(
        V2 + "ModelMetadata", v2.ModelMetadataRequest(name="nope"), NOT_FOUND, "model 'nope' not found"
    ),
    "v2: config, unknown version": Case(
        V2 + "ModelConfig", v2.ModelConfigRequest(name="profit", version="3"), NOT_FOUND, "version 3"
    ),
    "v2: ready, version not an integer": Case(
        V2 + "ModelReady", v2.ModelReadyRequest(name="profit", version="x"), INVALID, "integer"
    ),
    "v2: index of another repository": Case(
        V2 + "RepositoryIndex",
        v2.RepositoryIndexRequest(repository_name="other"),
        INVALID,
        "unknown repository 'other'",
    ),
    "v2: model load while model control is off": Case(
        V2 + "RepositoryModelLoad",
        v2.RepositoryModelLoadRequest(model_name="profit"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "--allow-model-control",
    ),
    # --- V2: below protobuf --------------------------------------------------------------------
    "v2: invalid UTF-8 model name": Case(
        V2 + "ModelInfer", V2_BAD_NAME, INVALID, "not a valid inference.ModelInferRequest"
    ),
    "v2: truncated message": Case(
        V2 + "ModelInfer", GOOD_INFER[:-3], INVALID, "not a valid inference.ModelInferRequest"
    ),
    "v2: stream, undecodable message": Case(
        V2 + "ModelStreamInfer", b"\x0a\x05ab", INVALID, "not a valid inference.ModelInferRequest", stream=True
    ),
    "v2: odd binary metadata is fine, bad token-less auth header too": Case(
        V2 + "ModelInfer",
        GOOD_INFER,
        grpc.StatusCode.OK,
        "",
        metadata=(("x-odd-bin", b"\x00\xff\x10"), ("authorization", "Basic Zm9vOmJhcg==")),
    ),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("bad")
    repo = tiny_repository(tmp / "models")
    args = [
        "--model-repository",
        str(repo),
        "--max-request-rows",
        str(MAX_BATCH),
        "--provider",
        "cpu",
        "--max-message-bytes",
        str(MAX_MESSAGE),
    ]
    with start_server(tmp, *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def channel(tiny: ServerProcess) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]  # let oversize requests leave the client
    with grpc.insecure_channel(tiny.address, options=options) as ch:
        yield ch


def _bytes(message: object) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()  # type: ignore[union-attr]


def call(channel: grpc.Channel, case: Case) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send ``case`` as raw bytes; return (code, details, response bytes)."""
    identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    try:
        if case.stream:
            stream = channel.stream_stream(case.method, request_serializer=identity, response_deserializer=identity)
            requests = [_bytes(r) for r in (*case.before, case.request)]
            return grpc.StatusCode.OK, "", list(stream(iter(requests), timeout=10, metadata=case.metadata))
        unary = channel.unary_unary(case.method, request_serializer=identity, response_deserializer=identity)
        return grpc.StatusCode.OK, "", [unary(_bytes(case.request), timeout=10, metadata=case.metadata)]
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []


def test_the_table_is_big_enough() -> None:
    bad = [c for c in CASES.values() if c.code != grpc.StatusCode.OK]
    assert len(bad) >= 40, len(bad)
    assert len({(c.method, _bytes(c.request), c.metadata) for c in CASES.values()}) == len(CASES)  # all distinct


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request(channel: grpc.Channel, name: str) -> None:
    case = CASES[name]
    code, details, _ = call(channel, case)
    assert code == case.code, f"{name}: {code} {details}"
    assert case.message in details, f"{name}: {details!r}"
    if code != EXHAUSTED:  # (gRPC's own limit messages list the headers)
        assert len(details) <= MAX_MESSAGE_CHARS
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def test_v2_stream_reports_a_bad_request_and_goes_on(channel: grpc.Channel) -> None:
    bad = v2.ModelInferRequest(
        model_name="profit",
        id="bad",
        inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[floats(math.nan)],
    )
    good = v2.ModelInferRequest.FromString(GOOD_INFER)
    good.id = "good"
    code, _, responses = call(
        channel, Case(V2 + "ModelStreamInfer", good, grpc.StatusCode.OK, "", stream=True, before=(bad,))
    )
    assert code == grpc.StatusCode.OK
    first, second = (v2.ModelStreamInferResponse.FromString(r) for r in responses)
    assert "NaN/inf" in first.error_message and first.infer_response.id == "bad"
    assert not second.error_message and second.infer_response.id == "good"


def test_server_is_healthy_after_every_bad_request(tiny: ServerProcess, channel: grpc.Channel) -> None:
    for case in CASES.values():  # once more, all in a row
        call(channel, case)
    assert tiny.process.poll() is None
    assert tiny.health() == health_pb2.HealthCheckResponse.SERVING
    code, _, [raw] = call(channel, Case(V2 + "ModelInfer", GOOD_INFER, grpc.StatusCode.OK, ""))
    assert code == grpc.StatusCode.OK
    response = v2.ModelInferResponse.FromString(raw)
    assert struct.unpack("<f", response.raw_output_contents[0])[0] == pytest.approx(1.193 - 38958.0)
    code, _, [raw] = call(channel, Case(TYPED + "Classify", GOOD_CLASSIFY, grpc.StatusCode.OK, ""))
    assert len(pb.ClassifyResponse.FromString(raw).results) == 1
    log = tiny.log()
    assert "Traceback" not in log and "Unexpected" not in log
