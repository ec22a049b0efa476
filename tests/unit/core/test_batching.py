"""Dynamic batching (service.batching): correctness under concurrency, splitting, backpressure,
deadlines — through real server processes, plus in-process checks of the scheduler itself."""
from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from conftest import MODELS, ServerProcess, free_port, start_server
from onnx_models import linear, save
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.batching import Batcher, BatchingConfig
from service.errors import DeadlineExceeded, Internal, ResourceExhausted
from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc
from service.metrics import Metrics
from service.repository import ModelRepository
from service.settings import Settings

MAX_ROWS = 16


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the /metrics page: (name, sorted labels) → value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def v2_request(model: str, name: str, array: np.ndarray, datatype: str) -> v2.ModelInferRequest:
    tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=array.shape)
    return v2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[array.tobytes()])


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """Bundled models; batches of at most 16 rows gathered for up to 2 ms, so concurrent requests
    from many clients really share batches and large ones are split."""
    metrics_port = free_port()
    overrides = {"fashion_cnn": {"max_batch_size": MAX_ROWS, "max_queue_delay_us": 2000}}  # over config.json
    args = ["--model-repository", str(MODELS), "--batching", json.dumps(overrides), "--metrics-port", str(metrics_port)]
    with start_server(tmp_path_factory.mktemp("batching"), *args) as proc:
        proc.metrics_port = metrics_port  # type: ignore[attr-defined]
        yield proc


def test_many_concurrent_clients_each_get_exactly_their_own_rows(batching_server: ServerProcess) -> None:
    """64 concurrent clients, distinct images, 1-5 rows each plus some larger than a batch (split),
    over both protocols: every answer equals onnxruntime run on that request alone."""
    model = "fashion_cnn"
    session = ort.InferenceSession(str(MODELS / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    sizes = [int(n) for n in rng.integers(1, 6, 60)] + [MAX_ROWS + 1, 2 * MAX_ROWS + 5, 40, 3 * MAX_ROWS]
    requests = [rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8) for n in sizes]
    expected = [session.run(None, {"image": x})[0] for x in requests]
    before = scrape(batching_server.metrics_port)  # type: ignore[attr-defined]

    async def run() -> list[np.ndarray]:
        async with grpc.aio.insecure_channel(batching_server.address) as channel:
            typed, infer = pb_grpc.ModelServiceStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)

            async def one(i: int, x: np.ndarray) -> np.ndarray:
                if i % 2:
                    tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes())
                    reply = await typed.Classify(pb.ClassifyRequest(model=pb.ModelRef(name=model), images=tensor), timeout=60)
                    return np.array([r.probabilities for r in reply.results], np.float32)
                reply = await infer.ModelInfer(v2_request(model, "image", x, "UINT8"), timeout=60)
                return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(len(x), 10)

            return await asyncio.gather(*(one(i, x) for i, x in enumerate(requests)))

    answers = asyncio.run(run())
    for i, (got, want) in enumerate(zip(answers, expected)):
        assert got.shape == want.shape, f"request {i}"
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"request {i} got other rows")

    after = scrape(batching_server.metrics_port)  # type: ignore[attr-defined]
    labels = {"model": model, "version": "1"}
    batches = sample(after, "serving_batch_size_count", **labels) - sample(before, "serving_batch_size_count", **labels)
    rows = sample(after, "serving_batch_size_sum", **labels) - sample(before, "serving_batch_size_sum", **labels)
    assert rows == sum(sizes)  # every row computed exactly once
    assert batches < len(sizes), "no two requests were ever batched together"
    assert batches >= -(-sum(sizes) // MAX_ROWS)  # and no batch over the limit...
    assert sample(after, "serving_batch_size_bucket", le="16.0", **labels) == sample(after, "serving_batch_size_count", **labels)


def test_queue_full_and_expired_deadline_are_answered_and_counted(tmp_path: Path) -> None:
    """Queue capacity 1 and a 5 s gathering delay: the first request waits, the second finds the
    queue full (RESOURCE_EXHAUSTED at once), the first's 0.5 s deadline passes before any compute
    (DEADLINE_EXCEEDED) — nothing is ever run, and both are counted."""
    save(linear(1, [2.0], 1.0, "population", "profit"), tmp_path / "models", "profit")
    metrics_port = free_port()
    overrides = {"profit": {"queue_capacity": 1, "max_queue_delay_us": 5_000_000}}
    args = ["--model-repository", str(tmp_path / "models"), "--metrics-port", str(metrics_port),
            "--batching", json.dumps(overrides)]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        request = pb.PredictProfitRequest(population=[1.0])
        first = stub.PredictProfit.future(request, timeout=0.5)
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as full:
            stub.PredictProfit(request, timeout=5)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in full.value.details()
        assert time.monotonic() - started < 0.3  # refused at once, not after waiting
        with pytest.raises(grpc.RpcError) as late:
            first.result()
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.2)  # the server's side of the expiry
        samples = scrape(metrics_port)
        assert proc.health("profit") == 1  # SERVING

    model = {"model": "profit", "version": "1"}
    assert sample(samples, "serving_dropped_requests_total", reason="queue_full", **model) == 1
    assert sample(samples, "serving_dropped_requests_total", reason="deadline", **model) == 1
    assert sample(samples, "serving_batch_size_count", **model) == 0  # dropped before compute
    assert sample(samples, "serving_requests_total", protocol="typed", code="RESOURCE_EXHAUSTED", **model) == 1
    assert sample(samples, "serving_requests_total", protocol="typed", code="DEADLINE_EXCEEDED", **model) == 1
    assert sample(samples, "serving_queue_depth", **model) == 0


def test_batching_off_runs_each_request_alone(tmp_path: Path) -> None:
    metrics_port = free_port()
    args = ["--model-repository", str(MODELS), "--metrics-port", str(metrics_port),
            "--batching", json.dumps({"fashion_softmax": {"enabled": False, "max_batch_size": 2}})]
    x = np.random.default_rng(3).integers(0, 256, (20, 5, 1, 28, 28), dtype=np.uint8)
    session = ort.InferenceSession(str(MODELS / "fashion_softmax" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    with start_server(tmp_path, *args) as proc:

        async def run() -> list[bytes]:
            async with grpc.aio.insecure_channel(proc.address) as channel:
                stub = v2_grpc.GRPCInferenceServiceStub(channel)
                replies = await asyncio.gather(
                    *(stub.ModelInfer(v2_request("fashion_softmax", "image", xi, "UINT8"), timeout=30) for xi in x)
                )
                return [r.raw_output_contents[0] for r in replies]

        outputs = asyncio.run(run())
        samples = scrape(metrics_port)
    for xi, raw in zip(x, outputs):
        np.testing.assert_allclose(np.frombuffer(raw, np.float32).reshape(5, 10), session.run(None, {"image": xi})[0], rtol=1e-6)
    labels = {"model": "fashion_softmax", "version": "1"}
    assert sample(samples, "serving_batch_size_count", **labels) == 20  # one batch per request...
    assert sample(samples, "serving_batch_size_sum", **labels) == 100  # ...unsplit (5 rows > max 2)


# -- the scheduler in process ---------------------------------------------------------------


class GatedModel:
    """A fake run function: y = 2x, blocking until released, recording each batch's rows."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.fail = False

    def __call__(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        self.gate.wait(10)
        x = feeds["x"]
        self.batches.append(x[:, 0].tolist())
        if self.fail:
            raise Internal("boom")
        return {"y": x * 2}


def batcher(run: GatedModel, executor, **config) -> Batcher:
    return Batcher("test model", run, executor, BatchingConfig(**config), max_in_flight=1)


def rows(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, np.float32).reshape(-1, 1)}


def test_requests_queued_during_a_batch_form_the_next_one_and_cancellation_spares_the_others() -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = GatedModel()
    with ThreadPoolExecutor(1) as executor:
        b = batcher(model, executor, max_batch_size=8)

        async def scenario() -> list:
            first = asyncio.create_task(b.submit(rows(1), ["y"]))
            await asyncio.sleep(0.05)  # first batch [1] is running, held at the gate
            waiting = [asyncio.create_task(b.submit(rows(*v), ["y"])) for v in ([2, 3], [4], [5, 6, 7], [8])]
            await asyncio.sleep(0.05)
            waiting[1].cancel()  # a caller that went away while queued
            await asyncio.sleep(0.01)
            model.gate.set()
            return await asyncio.gather(first, *waiting, return_exceptions=True)

        results = asyncio.run(scenario())
    assert model.batches == [[1.0], [2.0, 3.0, 5.0, 6.0, 7.0, 8.0]]  # the cancelled one was never run
    assert results[0]["y"].ravel().tolist() == [2.0]
    assert results[1]["y"].ravel().tolist() == [4.0, 6.0]
    assert isinstance(results[2], asyncio.CancelledError)
    assert results[3]["y"].ravel().tolist() == [10.0, 12.0, 14.0]
    assert results[4]["y"].ravel().tolist() == [16.0]


def test_split_request_is_joined_in_order_and_errors_reach_every_caller() -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = GatedModel()
    model.gate.set()
    with ThreadPoolExecutor(2) as executor:
        b = Batcher("test model", model, executor, BatchingConfig(max_batch_size=3), max_in_flight=2)

        async def split() -> dict:
            return await b.submit(rows(*range(10)), ["y"])

        assert asyncio.run(split())["y"].ravel().tolist() == [2.0 * i for i in range(10)]
        assert sorted(len(batch) for batch in model.batches) == [1, 3, 3, 3]

        model.fail = True

        async def failing() -> list:
            return await asyncio.gather(*(b.submit(rows(i), ["y"]) for i in range(3)), return_exceptions=True)

        errors = asyncio.run(failing())
    assert all(isinstance(e, Internal) and "boom" in str(e) for e in errors)


def test_capacity_and_deadline_in_process() -> None:
    from concurrent.futures import ThreadPoolExecutor

    metrics = Metrics()
    model = GatedModel()
    with ThreadPoolExecutor(1) as executor:
        b = Batcher("test model", model, executor, BatchingConfig(queue_capacity=2), 1, metrics.for_model("m", 1))

        async def scenario() -> list:
            running = asyncio.create_task(b.submit(rows(0), ["y"]))
            await asyncio.sleep(0.05)
            queued = [asyncio.create_task(b.submit(rows(i), ["y"], timeout=t)) for i, t in ((1, 0.05), (2, 10))]
            await asyncio.sleep(0.01)
            with pytest.raises(ResourceExhausted):
                await b.submit(rows(3), ["y"])
            await asyncio.sleep(0.1)  # the first queued request expires while the batch runs
            model.gate.set()
            return await asyncio.gather(running, *queued, return_exceptions=True)

        results = asyncio.run(scenario())
    assert isinstance(results[1], DeadlineExceeded)
    assert results[2]["y"].ravel().tolist() == [4.0]
    assert model.batches == [[0.0], [2.0]]  # the expired request was not computed
    text = generate_latest(metrics.registry).decode()
    dropped = {s.labels["reason"]: s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "serving_dropped_requests_total"}
    assert dropped == {"queue_full": 1.0, "deadline": 1.0}


def test_per_model_config_file_and_setting(tmp_path: Path) -> None:
    save(linear(1, [2.0], 1.0), tmp_path, "a")
    save(linear(1, [2.0], 1.0), tmp_path, "b")
    save(linear(1, [2.0], 1.0), tmp_path, "bad")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"batching": {"max_batch_size": 8, "max_queue_delay_us": 100}}))
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"batching": {"max_batch_sise": 8}}))
    settings = Settings(provider="cpu", batch_max_size=32, batching={"a": {"max_queue_delay_us": 7}, "b": {"enabled": False}})
    repository = ModelRepository(tmp_path, settings)
    repository.load()
    try:
        assert repository.get("a").batcher.config == BatchingConfig(True, 8, 7, 512)  # file, then setting
        assert repository.get("b").batcher.config == BatchingConfig(False, 32, 0, 512)
        assert not repository.get("b").batcher.batching
        assert "max_batch_sise" in repository.failed["bad/1"]
        assert repository.get("a").batcher.expected_seconds(1) is not None  # timed at load
    finally:
        repository.close()


def test_bundled_batching_configs() -> None:
    """The bundled per-model files: the tiny softmax runs whole 256-row requests in one call, the
    CNN is split into 64-row batches (its per-row cost grows past that, and two workers share)."""
    settings = Settings(provider="cpu")
    assert BatchingConfig.resolve(settings, "fashion_softmax", MODELS / "fashion_softmax").max_batch_size == 256
    assert BatchingConfig.resolve(settings, "fashion_cnn", MODELS / "fashion_cnn").max_batch_size == 64
