"""The bundled, trained models/ repository through the typed API of a real server process.

A missing bundled model fails these tests (it does not skip them)."""

from __future__ import annotations

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from fixtures.providers import ACCURACY_SLACK, AUTO_PROVIDER, CPU, close_to_cpu
from fixtures.servers import MODELS, ServerProcess
from grpc_health.v1 import health_pb2

from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

FASHION_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CLASSIFIERS = ["fashion_softmax", "fashion_cnn"]
# Tensor contracts from DESIGN.md: name → ((input dtype, shape), (output dtype, shape)).
CONTRACTS = {
    "profit": (("float32", [-1, 1]), ("float32", [-1, 1])),
    "house_price": (("float32", [-1, 2]), ("float32", [-1, 1])),
    "fashion_softmax": (("uint8", [-1, 1, 28, 28]), ("float32", [-1, 10])),
    "fashion_cnn": (("uint8", [-1, 1, 28, 28]), ("float32", [-1, 10])),
}
BATCH = 1000


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.ModelServiceStub:
    return pb_grpc.ModelServiceStub(channel)


def latest_model_file(name: str):
    versions = sorted(int(p.name) for p in (MODELS / name).glob("*") if p.name.isdigit())
    assert versions, f"bundled model {name} is missing under {MODELS}"
    return MODELS / name / str(versions[-1]) / "model.onnx"


def images_tensor(images: np.ndarray) -> pb.Tensor:
    dtype = pb.DATA_TYPE_UINT8 if images.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
    return pb.Tensor(dtype=dtype, shape=list(images.shape), data=images.tobytes())


def probabilities(response: pb.ClassifyResponse) -> np.ndarray:
    return np.array([r.probabilities for r in response.results], dtype=np.float32)


def offline_probabilities(name: str, images: np.ndarray) -> np.ndarray:
    """The same model file run in-process with onnxruntime on CPU."""
    session = ort.InferenceSession(str(latest_model_file(name)), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {input_name: images[i : i + BATCH]})[0] for i in range(0, len(images), BATCH)]
    )


def test_profit_predictions(stub: pb_grpc.ModelServiceStub) -> None:
    response = stub.PredictProfit(pb.PredictProfitRequest(population=[35_000, 70_000]), timeout=10)
    assert (response.model.name, response.model.version) == ("profit", 1)
    assert list(response.profit_usd) == [pytest.approx(2798.37, abs=1), pytest.approx(44554.55, abs=1)]


def test_house_price_prediction(stub: pb_grpc.ModelServiceStub) -> None:
    request = pb.PredictHousePriceRequest(houses=[pb.House(size_sqft=1650, bedrooms=3)])
    response = stub.PredictHousePrice(request, timeout=10)
    assert response.model.name == "house_price"
    assert response.price_usd[0] == pytest.approx(293_081.46, abs=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classify_fashion_test_set(
    stub: pb_grpc.ModelServiceStub, fashion_test_set, name: str, record_property
) -> None:
    images, labels = fashion_test_set
    assert images.shape == (10_000, 1, 28, 28)
    served = []
    for start in range(0, len(images), BATCH):
        request = pb.ClassifyRequest(model=pb.ModelRef(name=name), images=images_tensor(images[start : start + BATCH]))
        response = stub.Classify(request, timeout=120)
        assert response.model.name == name
        assert all(r.label == FASHION_LABELS[r.class_index] for r in response.results)
        served.append(probabilities(response))
        top = np.array([r.class_index for r in response.results])
        np.testing.assert_array_equal(top, served[-1].argmax(axis=1))
    served_probs = np.concatenate(served)
    offline = offline_probabilities(name, images)

    server_accuracy = float((served_probs.argmax(axis=1) == labels).mean())
    offline_accuracy = float((offline.argmax(axis=1) == labels).mean())
    max_diff = float(np.abs(served_probs - offline).max())
    record_property("server_accuracy", server_accuracy)
    record_property("max_probability_diff", max_diff)
    print(f"{name}: server accuracy {server_accuracy:.4f}, offline {offline_accuracy:.4f}, max |dp| {max_diff:.2e}")
    # The server runs the bundled files on --provider auto (CUDA on a GPU host), offline is the CPU.
    assert abs(server_accuracy - offline_accuracy) <= ACCURACY_SLACK
    assert max_diff <= (1e-6 if AUTO_PROVIDER == CPU else close_to_cpu()["atol"])
    assert server_accuracy > 0.8


def test_stream_and_float32_match_unary(stub: pb_grpc.ModelServiceStub, fashion_test_set) -> None:
    images = fashion_test_set[0][:600]
    batches = [images[i : i + 200] for i in range(0, 600, 200)]
    unary = [probabilities(stub.Classify(pb.ClassifyRequest(images=images_tensor(b)), timeout=30)) for b in batches]
    requests = iter([pb.ClassifyRequest(images=images_tensor(b), request_id=str(i)) for i, b in enumerate(batches)])
    streamed = list(stub.ClassifyStream(requests, timeout=60))
    assert [r.request_id for r in streamed] == ["0", "1", "2"]
    assert all(r.model.name == "fashion_softmax" for r in streamed)  # the default classifier
    for want, got in zip(unary, streamed):
        np.testing.assert_array_equal(want, probabilities(got))
    as_float = stub.Classify(pb.ClassifyRequest(images=images_tensor(batches[0].astype(np.float32) / 255)))
    np.testing.assert_array_equal(unary[0], probabilities(as_float))


def test_metadata_of_bundled_models(stub: pb_grpc.ModelServiceStub) -> None:
    listing = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert not listing.failed
    by_name = {m.name: m for m in listing.models}
    assert set(CONTRACTS) <= set(by_name)
    expected_provider = AUTO_PROVIDER  # CUDA on a GPU host, never TensorRT (listed first by onnxruntime-gpu)
    for name, ((in_dtype, in_shape), (out_dtype, out_shape)) in CONTRACTS.items():
        meta = by_name[name]
        assert meta.execution_provider == expected_provider
        assert [(t.dtype, list(t.shape)) for t in meta.inputs] == [(in_dtype, in_shape)]
        assert [(t.dtype, list(t.shape)) for t in meta.outputs] == [(out_dtype, out_shape)]
        assert meta.metrics, f"{name} has no numeric metrics in its ONNX metadata"
        assert meta.max_batch_size >= BATCH
        assert meta.description
    for name in CLASSIFIERS:
        assert list(by_name[name].class_names) == FASHION_LABELS
        assert 0.8 < by_name[name].metrics["test_accuracy"] <= 1
    profit = by_name["profit"]
    assert (profit.inputs[0].name, profit.inputs[0].unit) == ("population", "people")
    assert (profit.outputs[0].name, profit.outputs[0].unit) == ("profit", "USD")
    assert by_name["house_price"].outputs[0].unit == "USD"


def test_health_overall_and_per_model(server: ServerProcess) -> None:
    assert server.health("") == health_pb2.HealthCheckResponse.SERVING
    for name in CONTRACTS:
        assert server.health(name) == health_pb2.HealthCheckResponse.SERVING
