"""Typed API through a real server process over a tiny generated repository: versions, errors,
streaming, health, reflection and request logs. (Bundled trained models: test_bundled_models.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from fixtures.onnx_models import tiny_repository
from fixtures.servers import ServerProcess, start_server
from grpc_health.v1 import health_pb2

from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

MAX_BATCH = 16
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("tiny")
    repo = tiny_repository(tmp / "models")
    args = ["--model-repository", str(repo), "--max-request-rows", str(MAX_BATCH), "--log-level", "debug"]
    with start_server(tmp, *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def stub(tiny: ServerProcess) -> Iterator[pb_grpc.ModelServiceStub]:
    with grpc.insecure_channel(tiny.address) as channel:
        yield pb_grpc.ModelServiceStub(channel)


def images_tensor(images: np.ndarray, dtype: int | None = None, shape=None, data: bytes | None = None) -> pb.Tensor:
    if dtype is None:
        dtype = pb.DATA_TYPE_UINT8 if images.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
    return pb.Tensor(
        dtype=dtype,
        shape=list(images.shape if shape is None else shape),
        data=images.tobytes() if data is None else data,
    )


def random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def test_classify_defaults_to_latest_fashion_softmax(stub: pb_grpc.ModelServiceStub) -> None:
    images = random_images(5)
    response = stub.Classify(pb.ClassifyRequest(images=images_tensor(images), top_k=3, request_id="r1"))
    assert (response.model.name, response.model.version, response.request_id) == ("fashion_softmax", 2, "r1")
    assert len(response.results) == 5
    for result in response.results:
        probs = np.array(result.probabilities)
        assert probs.shape == (10,) and probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert result.class_index == int(np.argmax(probs))
        assert result.label == f"class{result.class_index}"
        assert [s.index for s in result.top_k] == list(np.argsort(-probs, kind="stable")[:3])
        assert result.top_k[0].probability == pytest.approx(probs.max())


def test_classify_version_and_float32_input(stub: pb_grpc.ModelServiceStub) -> None:
    images = random_images(4, seed=1)
    v1 = pb.ModelRef(name="fashion_softmax", version=1)
    as_uint8 = stub.Classify(pb.ClassifyRequest(model=v1, images=images_tensor(images)))
    as_float = stub.Classify(pb.ClassifyRequest(model=v1, images=images_tensor(images.astype(np.float32) / 255)))
    assert as_uint8.model.version == 1
    assert [list(r.probabilities) for r in as_uint8.results] == [list(r.probabilities) for r in as_float.results]
    latest = stub.Classify(pb.ClassifyRequest(images=images_tensor(images)))
    assert [list(r.probabilities) for r in latest.results] != [list(r.probabilities) for r in as_uint8.results]


def test_predict_profit_and_house_price(stub: pb_grpc.ModelServiceStub) -> None:
    profit = stub.PredictProfit(pb.PredictProfitRequest(population=[35000, 70000]))
    assert profit.model.name == "profit"
    assert list(profit.profit_usd) == pytest.approx([35000 * 1.193 - 38958, 70000 * 1.193 - 38958], abs=0.1)
    house = stub.PredictHousePrice(pb.PredictHousePriceRequest(houses=[pb.House(size_sqft=1650, bedrooms=3)]))
    assert house.model.name == "house_price"
    assert house.price_usd[0] == pytest.approx(139.2 * 1650 - 8738.0 * 3 + 89597.9, abs=0.1)


def test_classify_stream(stub: pb_grpc.ModelServiceStub) -> None:
    batches = [random_images(n, seed=n) for n in (3, 16, 1)]
    requests = [pb.ClassifyRequest(images=images_tensor(b), request_id=str(i)) for i, b in enumerate(batches)]
    responses = list(stub.ClassifyStream(iter(requests)))
    assert [r.request_id for r in responses] == ["0", "1", "2"]
    for batch, response in zip(batches, responses):
        unary = stub.Classify(pb.ClassifyRequest(images=images_tensor(batch)))
        assert [list(r.probabilities) for r in response.results] == [list(r.probabilities) for r in unary.results]


def test_classify_stream_stops_at_first_bad_batch(stub: pb_grpc.ModelServiceStub) -> None:
    good = pb.ClassifyRequest(images=images_tensor(random_images(2)), request_id="ok")
    bad = pb.ClassifyRequest(images=images_tensor(random_images(2), shape=[2, 28, 28, 1]), request_id="bad")
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for response in stub.ClassifyStream(iter([good, bad, good])):
            received.append(response.request_id)
    assert received == ["ok"]
    assert info.value.code() == INVALID
    assert "batch 1 (request_id 'bad')" in info.value.details()
    assert "expects shape [N, 1, 28, 28], got [2, 28, 28, 1]" in info.value.details()


IMG = random_images(2)
F32 = IMG.astype(np.float32) / 255
NAN_IMG = F32.copy()
NAN_IMG[1, 0, 3, 4] = np.nan

ERROR_CASES = {
    "wrong shape": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(IMG, shape=[2, 784])),
        INVALID,
        ["expects shape [N, 1, 28, 28], got [2, 784]"],
    ),
    "wrong dtype (unspecified)": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(IMG, dtype=pb.DATA_TYPE_UNSPECIFIED)),
        INVALID,
        ["must be DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32, got DATA_TYPE_UNSPECIFIED"],
    ),
    "wrong dtype (unknown enum)": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(IMG, dtype=7)),
        INVALID,
        ["must be DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32, got 7"],
    ),
    "byte length": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(IMG, data=IMG.tobytes()[:-1])),
        INVALID,
        ["shape [2, 1, 28, 28] of uint8 needs 1568 bytes", "got 1567"],
    ),
    "byte length float32": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(F32, data=IMG.tobytes())),
        INVALID,
        ["of float32 needs 6272 bytes", "got 1568"],
    ),
    "negative dim": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(IMG, shape=[-2, 1, 28, 28])),
        INVALID,
        ["dimensions must be >= 0, got shape [-2, 1, 28, 28]"],
    ),
    "empty image batch": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(IMG[:0])),
        INVALID,
        ["empty batch"],
    ),
    "empty profit batch": ("PredictProfit", pb.PredictProfitRequest(), INVALID, ["empty batch"]),
    "batch over max": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(random_images(MAX_BATCH + 1))),
        INVALID,
        [f"batch of {MAX_BATCH + 1}, over the maximum of {MAX_BATCH}"],
    ),
    "NaN population": (
        "PredictProfit",
        pb.PredictProfitRequest(population=[1.0, float("nan")]),
        INVALID,
        ["expects finite numbers, got 1 NaN/inf value(s), the first at index (1, 0)"],
    ),
    "inf house size": (
        "PredictHousePrice",
        pb.PredictHousePriceRequest(houses=[pb.House(size_sqft=float("inf"), bedrooms=3)]),
        INVALID,
        ["expects finite numbers", "index (0, 0)"],
    ),
    "NaN pixel": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(NAN_IMG)),
        INVALID,
        [
            "images expects float32 pixels as finite numbers in [0, 1], got 1 NaN/inf value(s), the first at index (1, 0, 3, 4)"  # noqa: E501
        ],
    ),
    "float pixel out of range": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(F32 * 255)),
        INVALID,
        ["float32 pixels must be in [0, 1], got values from 0.0 to 255.0"],
    ),
    "top_k too large": (
        "Classify",
        pb.ClassifyRequest(images=images_tensor(IMG), top_k=11),
        INVALID,
        ["top_k must be at most 10", "got 11"],
    ),
    "not a classifier": (
        "Classify",
        pb.ClassifyRequest(model=pb.ModelRef(name="profit"), images=images_tensor(IMG)),
        INVALID,
        ["model 'profit' version 1 is not an image classifier"],
    ),
    "profit model given house rows": (
        "PredictHousePrice",
        pb.PredictHousePriceRequest(model=pb.ModelRef(name="profit"), houses=[pb.House(size_sqft=1, bedrooms=1)]),
        INVALID,
        ["expects shape [N, 1], got [1, 2]"],
    ),
    "negative version": (
        "PredictProfit",
        pb.PredictProfitRequest(model=pb.ModelRef(name="profit", version=-1), population=[1]),
        INVALID,
        ["model.version must be >= 0 (0 = latest), got -1"],
    ),
    "unknown model": (
        "Classify",
        pb.ClassifyRequest(model=pb.ModelRef(name="nope"), images=images_tensor(IMG)),
        NOT_FOUND,
        ["model 'nope' not found; available models: ['fashion_softmax', 'house_price', 'profit']"],
    ),
    "unknown version": (
        "Classify",
        pb.ClassifyRequest(model=pb.ModelRef(name="fashion_softmax", version=7), images=images_tensor(IMG)),
        NOT_FOUND,
        ["version 7 of model 'fashion_softmax' not found; available versions: [1, 2]"],
    ),
    "model that failed to load": (
        "PredictProfit",
        pb.PredictProfitRequest(model=pb.ModelRef(name="broken"), population=[1]),
        NOT_FOUND,
        ["model 'broken' not found (failed to load:", "Protobuf parsing failed"],
    ),
    "metadata of unknown model": (
        "GetModelMetadata",
        pb.GetModelMetadataRequest(model=pb.ModelRef(name="nope")),
        NOT_FOUND,
        ["model 'nope' not found"],
    ),
    "metadata without a name": (
        "GetModelMetadata",
        pb.GetModelMetadataRequest(),
        INVALID,
        ["model.name is required"],
    ),
    "list unknown model": ("ListModels", pb.ListModelsRequest(name="nope"), NOT_FOUND, ["model 'nope' not found"]),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_errors_then_keeps_serving(stub: pb_grpc.ModelServiceStub, tiny: ServerProcess, case: str) -> None:
    method, request, code, fragments = ERROR_CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, method)(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()
    # Still serving, for this and every other method.
    assert tiny.health() == health_pb2.HealthCheckResponse.SERVING
    assert len(stub.Classify(pb.ClassifyRequest(images=images_tensor(IMG))).results) == 2
    assert len(stub.PredictProfit(pb.PredictProfitRequest(population=[1, 2])).profit_usd) == 2


def test_list_models_and_metadata(stub: pb_grpc.ModelServiceStub) -> None:
    listing = stub.ListModels(pb.ListModelsRequest())
    assert [(m.name, m.version) for m in listing.models] == [
        ("fashion_softmax", 1),
        ("fashion_softmax", 2),
        ("house_price", 1),
        ("profit", 1),
    ]
    assert list(listing.failed) == ["broken/1"]
    only = stub.ListModels(pb.ListModelsRequest(name="fashion_softmax"))
    assert [m.version for m in only.models] == [1, 2]
    meta = stub.GetModelMetadata(pb.GetModelMetadataRequest(model=pb.ModelRef(name="fashion_softmax")))
    assert (meta.name, meta.version, list(meta.versions)) == ("fashion_softmax", 2, [1, 2])
    assert meta.platform == "onnxruntime"
    assert meta.execution_provider == "CPUExecutionProvider"
    assert [(t.name, t.dtype, list(t.shape)) for t in meta.inputs] == [("image", "uint8", [-1, 1, 28, 28])]
    assert [(t.name, t.dtype, list(t.shape)) for t in meta.outputs] == [("probabilities", "float32", [-1, 10])]
    assert list(meta.class_names) == [f"class{i}" for i in range(10)]
    assert dict(meta.metrics) == {"accuracy": pytest.approx(0.84)}
    assert meta.max_batch_size == MAX_BATCH
    profit = stub.GetModelMetadata(pb.GetModelMetadataRequest(model=pb.ModelRef(name="profit")))
    assert [(t.name, t.unit) for t in [*profit.inputs, *profit.outputs]] == [
        ("population", "people"),
        ("profit", "USD"),
    ]
    assert json.loads(profit.properties["inputs"])[0]["unit"] == "people"
    assert dict(profit.metrics) == {"rmse_usd": 3000.0}
    assert profit.description == "profit from population"


def test_health_per_model(tiny: ServerProcess) -> None:
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert tiny.health("") == serving
    assert tiny.health("serving.v1.ModelService") == serving
    for name in ("fashion_softmax", "house_price", "profit"):
        assert tiny.health(name) == serving
    assert tiny.health("broken") == not_serving
    with pytest.raises(grpc.RpcError) as info:
        tiny.health("nope")
    assert info.value.code() == NOT_FOUND


def test_one_debug_log_line_per_request(stub: pb_grpc.ModelServiceStub, tiny: ServerProcess) -> None:
    stub.PredictProfit(pb.PredictProfitRequest(population=[1, 2, 3]), metadata=[("x-test", "log-line")])
    with pytest.raises(grpc.RpcError):
        stub.Classify(pb.ClassifyRequest(model=pb.ModelRef(name="log-probe")))
    lines = [json.loads(line) for line in tiny.log().splitlines() if line.startswith("{")]
    requests = [r for r in lines if r["msg"] == "request"]
    ok = [r for r in requests if r["method"] == "/serving.v1.ModelService/PredictProfit" and r.get("batch") == 3]
    assert ok and ok[-1]["code"] == "OK" and ok[-1]["model"] == "profit" and ok[-1]["ms"] >= 0
    assert any(r["code"] == "NOT_FOUND" and r["method"].endswith("/Classify") for r in requests)
    startup = next(r for r in lines if r["msg"] == "server started")
    assert startup["models"] == {"fashion_softmax": [1, 2], "house_price": [1], "profit": [1]}
    assert startup["providers"] == ["CPUExecutionProvider"]
    assert startup["address"] == tiny.address
    assert "broken/1" in startup["failed"]
    # A start-up load failure is the registry's one "model rejected" line (first round = startup).
    rejected = [r for r in lines if r["msg"] == "model rejected"]
    assert [(r["model"], r["version"], r["trigger"]) for r in rejected] == [("broken", 1, "startup")]
    assert "Protobuf parsing failed" in rejected[0]["error"] and rejected[0]["level"] == "ERROR"
    assert not [r for r in lines if r["msg"] == "model failed to load"]
