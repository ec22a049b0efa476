"""Dynamic batching through real server processes: correctness under concurrency (every caller
gets exactly its own rows, over both protocols), splitting, backpressure, deadlines, batching off.
(The scheduler in process: tests/unit/core/test_batching.py.)"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from fixtures.onnx_models import linear, save
from fixtures.servers import MODELS, ServerProcess, free_port, sample, scrape, start_server, v2_request

from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

MAX_ROWS = 16


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """Bundled models; batches of at most 16 rows gathered for up to 2 ms, so concurrent requests
    from many clients really share batches and large ones are split."""
    metrics_port = free_port()
    overrides = {"fashion_cnn": {"max_batch_rows": MAX_ROWS, "max_queue_delay_us": 2000}}  # over config.json
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
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"request {i} got other rows")

    after = scrape(batching_server.metrics_port)  # type: ignore[attr-defined]
    labels = {"model": model, "version": "1"}
    batches = sample(after, "serving_batch_size_count", **labels) - sample(before, "serving_batch_size_count", **labels)
    rows = sample(after, "serving_batch_size_sum", **labels) - sample(before, "serving_batch_size_sum", **labels)
    assert rows == sum(sizes)  # every row computed exactly once
    assert batches < len(sizes), "no two requests were ever batched together"
    assert batches >= -(-sum(sizes) // MAX_ROWS)  # and no batch over the limit...
    assert sample(after, "serving_batch_size_bucket", le="16.0", **labels) == sample(
        after, "serving_batch_size_count", **labels
    )


def test_queue_full_and_expired_deadline_are_answered_and_counted(tmp_path: Path) -> None:
    """Queue capacity 1 and a 5 s gathering delay: the first request waits, the second finds the
    queue full (RESOURCE_EXHAUSTED at once), the first's 0.5 s deadline passes before any compute
    (DEADLINE_EXCEEDED) — nothing is ever run, and both are counted."""
    save(linear(1, [2.0], 1.0, "population", "profit"), tmp_path / "models", "profit")
    metrics_port = free_port()
    overrides = {"profit": {"queue_capacity": 1, "max_queue_delay_us": 5_000_000}}
    args = [
        "--model-repository",
        str(tmp_path / "models"),
        "--metrics-port",
        str(metrics_port),
        "--batching",
        json.dumps(overrides),
    ]
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
    args = [
        "--model-repository",
        str(MODELS),
        "--metrics-port",
        str(metrics_port),
        "--batching",
        json.dumps({"fashion_softmax": {"enabled": False, "max_batch_rows": 2}}),
    ]
    x = np.random.default_rng(3).integers(0, 256, (20, 5, 1, 28, 28), dtype=np.uint8)
    session = ort.InferenceSession(
        str(MODELS / "fashion_softmax" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
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
        np.testing.assert_allclose(
            np.frombuffer(raw, np.float32).reshape(5, 10), session.run(None, {"image": xi})[0], rtol=1e-6
        )
    labels = {"model": "fashion_softmax", "version": "1"}
    assert sample(samples, "serving_batch_size_count", **labels) == 20  # one batch per request...
    assert sample(samples, "serving_batch_size_sum", **labels) == 100  # ...unsplit (5 rows > max 2)
