"""Dynamic batching through real server processes: correctness under concurrency (every caller
gets exactly its own rows, over both protocols), splitting, backpressure, deadlines, batching off.
(The scheduler in process: tests/unit/core/test_batching.py.)"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from fixtures.metrics import sample
from fixtures.onnx_models import linear, save
from fixtures.providers import AUTO_PROVIDER, CPU, close_to_cpu
from fixtures.servers import MODELS, ServerProcess, scrape, start_server, v2_request, wait_for

from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

MAX_ROWS = 16


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """Bundled models; batches of at most 16 rows gathered for up to 2 ms, so concurrent requests
    from many clients really share batches and large ones are split."""
    overrides = {"fashion_cnn": {"max_batch_rows": MAX_ROWS, "max_queue_delay_us": 2000}}  # over config.json
    args = ["--model-repository", str(MODELS), "--batching", json.dumps(overrides)]
    with start_server(tmp_path_factory.mktemp("batching"), *args, metrics=True) as proc:
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
    before = scrape(batching_server.metrics_port)

    async def run() -> list[np.ndarray]:
        async with grpc.aio.insecure_channel(batching_server.address) as channel:
            typed, infer = pb_grpc.ModelServiceStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)

            async def one(i: int, x: np.ndarray) -> np.ndarray:
                if i % 2:
                    tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes())
                    reply = await typed.Classify(
                        pb.ClassifyRequest(model=pb.ModelRef(name=model), images=tensor), timeout=60
                    )
                    return np.array([r.probabilities for r in reply.results], np.float32)
                reply = await infer.ModelInfer(v2_request(model, "image", x, "UINT8"), timeout=60)
                return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(len(x), 10)

            return await asyncio.gather(*(one(i, x) for i, x in enumerate(requests)))

    answers = asyncio.run(run())
    for i, (got, want) in enumerate(zip(answers, expected)):
        assert got.shape == want.shape, f"request {i}"
        np.testing.assert_allclose(got, want, err_msg=f"request {i} got other rows", **close_to_cpu())

    after = scrape(batching_server.metrics_port)
    labels = {"model": model, "version": "1"}
    batches = sample(after, "serving_batch_size_count", **labels) - sample(before, "serving_batch_size_count", **labels)
    rows = sample(after, "serving_batch_size_sum", **labels) - sample(before, "serving_batch_size_sum", **labels)
    assert rows == sum(sizes)  # every row computed exactly once
    assert batches < len(sizes), "no two requests were ever batched together"
    assert batches >= -(-sum(sizes) // MAX_ROWS)  # and no batch over the limit...
    assert sample(after, "serving_batch_size_bucket", le="16.0", **labels) == sample(
        after, "serving_batch_size_count", **labels
    )


def test_queue_full_expired_deadline_and_cancelled_are_answered_and_counted(tmp_path: Path) -> None:
    """Batches gather for 60 s, so queued requests stay queued until the test acts. ``full`` has
    room for one request: the second finds it full (RESOURCE_EXHAUSTED at once, while the first
    still waits). In ``late`` a request's deadline passes in the queue (DEADLINE_EXCEEDED). The
    first is then cancelled by its caller. Nothing is ever computed, and each drop is counted
    under its reason."""
    repo = tmp_path / "models"
    for name in ("full", "late"):
        save(linear(1, [2.0], 1.0, "population", "profit"), repo, name)
    overrides = {
        "full": {"queue_capacity": 1, "max_queue_delay_us": 60_000_000},
        "late": {"max_queue_delay_us": 60_000_000},
    }
    args = ["--model-repository", str(repo), "--batching", json.dumps(overrides)]

    def request(model: str) -> pb.PredictProfitRequest:
        return pb.PredictProfitRequest(model=pb.ModelRef(name=model), population=[1.0])

    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:

        def count(name: str, model: str, **labels: str) -> float:
            return proc.metric(name, model=model, version="1", **labels)

        stub = pb_grpc.ModelServiceStub(channel)
        first = stub.PredictProfit.future(request("full"), timeout=300)
        wait_for(lambda: count("serving_queue_depth", "full") == 1, "the first request queued", server=proc)
        with pytest.raises(grpc.RpcError) as full:
            stub.PredictProfit(request("full"), timeout=60)
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in full.value.details()
        assert not first.done() and count("serving_queue_depth", "full") == 1  # refused, not queued behind it

        # A deadline that passes in the queue. It must be queued before it passes: observed by
        # the gauge; a machine too slow for that gets a longer deadline on the next try.
        for deadline in (1.0, 2.0, 4.0, 8.0, 16.0):
            late = stub.PredictProfit.future(request("late"), timeout=deadline)
            queued = False
            while not late.done() and not queued:
                queued = count("serving_queue_depth", "late") == 1
            with pytest.raises(grpc.RpcError) as expired:
                late.result()
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            if queued:
                break
        assert queued, "no request reached the queue before its deadline, even with 16 s"
        wait_for(lambda: count("serving_dropped_requests_total", "late", reason="deadline") >= 1, "the expiry counted")

        first.cancel()
        wait_for(lambda: count("serving_dropped_requests_total", "full", reason="cancelled") == 1, "the cancel counted")
        samples = scrape(proc.metrics_port)
        assert proc.health("full") == 1 and proc.health("late") == 1  # SERVING

    full_model, late_model = {"model": "full", "version": "1"}, {"model": "late", "version": "1"}
    assert sample(samples, "serving_dropped_requests_total", reason="queue_full", **full_model) == 1
    assert sample(samples, "serving_dropped_requests_total", reason="cancelled", **full_model) == 1
    attempts = sample(samples, "serving_requests_total", protocol="typed", code="DEADLINE_EXCEEDED", **late_model)
    assert attempts >= 1
    assert sample(samples, "serving_dropped_requests_total", reason="deadline", **late_model) == attempts
    assert sample(samples, "serving_requests_total", protocol="typed", code="RESOURCE_EXHAUSTED", **full_model) == 1
    for model in (full_model, late_model):
        assert sample(samples, "serving_batch_size_count", **model) == 0  # dropped before compute
        assert sample(samples, "serving_queue_depth", **model) == 0


def test_batching_off_runs_each_request_alone(tmp_path: Path) -> None:
    args = [
        "--model-repository",
        str(MODELS),
        "--batching",
        json.dumps({"fashion_softmax": {"enabled": False, "max_batch_rows": 2}}),
    ]
    x = np.random.default_rng(3).integers(0, 256, (20, 5, 1, 28, 28), dtype=np.uint8)
    session = ort.InferenceSession(
        str(MODELS / "fashion_softmax" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    with start_server(tmp_path, *args, metrics=True) as proc:

        async def run() -> list[bytes]:
            async with grpc.aio.insecure_channel(proc.address) as channel:
                stub = v2_grpc.GRPCInferenceServiceStub(channel)
                replies = await asyncio.gather(
                    *(stub.ModelInfer(v2_request("fashion_softmax", "image", xi, "UINT8"), timeout=30) for xi in x)
                )
                return [r.raw_output_contents[0] for r in replies]

        outputs = asyncio.run(run())
        samples = scrape(proc.metrics_port)
    for xi, raw in zip(x, outputs):
        np.testing.assert_allclose(
            np.frombuffer(raw, np.float32).reshape(5, 10),
            session.run(None, {"image": xi})[0],
            **({"rtol": 1e-6} if AUTO_PROVIDER == CPU else close_to_cpu()),  # the server: --provider auto
        )
    labels = {"model": "fashion_softmax", "version": "1"}
    assert sample(samples, "serving_batch_size_count", **labels) == 20  # one batch per request...
    assert sample(samples, "serving_batch_size_sum", **labels) == 100  # ...unsplit (5 rows > max 2)


def test_the_bundled_batching_configs_take_effect(server_with_metrics: ServerProcess) -> None:
    """models/<name>/config.json, seen in what the server computes: fashion_softmax runs a
    256-row request as one batch, fashion_cnn splits 200 rows into batches of at most 64."""
    images = np.random.default_rng(5).integers(0, 256, (256, 1, 28, 28), dtype=np.uint8)
    counts = {}
    with server_with_metrics.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        for model, n in (("fashion_softmax", 256), ("fashion_cnn", 200)):
            labels = {"model": model, "version": "1"}
            before = [
                server_with_metrics.metric(k, **labels) for k in ("serving_batch_size_count", "serving_batch_size_sum")
            ]
            stub.ModelInfer(v2_request(model, "image", images[:n], "UINT8"), timeout=60)
            after = [
                server_with_metrics.metric(k, **labels) for k in ("serving_batch_size_count", "serving_batch_size_sum")
            ]
            counts[model] = (after[0] - before[0], after[1] - before[1])
    assert counts == {"fashion_softmax": (1, 256), "fashion_cnn": (4, 200)}  # 64 + 64 + 64 + 8


@pytest.fixture(scope="module")
def server_with_metrics(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """The bundled models with their own config.json files, nothing overridden."""
    with start_server(tmp_path_factory.mktemp("bundled"), "--model-repository", str(MODELS), metrics=True) as proc:
        yield proc
