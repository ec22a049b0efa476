"""Where inference runs, through real servers: a long batch never runs on the event loop (health
answers while it computes), and ``inference_workers`` is how many batches of a model run at once.
Both read the server's own gauges (serving_batches_in_flight, serving_queue_depth), so no test
here depends on how fast the machine is. (The cost model in process: tests/unit/core/test_batching.py;
intra_op_threads: tests/unit/core/test_runtime.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from fixtures.onnx_models import save, slow
from fixtures.servers import ServerProcess, start_server, wait_for
from grpc_health.v1 import health_pb2

from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

#: 400 layers of 64x64 on 100,000 rows: many seconds of onnxruntime on any CPU, in one batch
#: (batching off), stopped by the server's exit (onnxruntime's terminate flag) when the test ends.
ROWS = 100_000


def _args(repo: Path, *extra: str) -> list[str]:
    save(slow(layers=400, width=64), repo, "slow")
    return ["--model-repository", str(repo), "--max-request-rows", str(ROWS), "--dynamic-batching", "false", *extra]


@contextmanager
def _long_calls(proc: ServerProcess, channel: grpc.Channel, count: int) -> Iterator[list[grpc.Future]]:
    stub = pb_grpc.ModelServiceStub(channel)
    request = pb.PredictProfitRequest(model=pb.ModelRef(name="slow"), population=[0.5] * ROWS)
    futures = [stub.PredictProfit.future(request, timeout=600) for _ in range(count)]
    try:
        yield futures
    finally:
        for future in futures:
            future.cancel()


def _gauges(proc: ServerProcess) -> tuple[float, float]:
    """(batches running in onnxruntime, requests queued) for the slow model."""
    labels = {"model": "slow", "version": "1"}
    return proc.metric("serving_batches_in_flight", **labels), proc.metric("serving_queue_depth", **labels)


def test_health_answers_while_a_long_batch_computes(tmp_path: Path) -> None:
    """The batch is expected to take far longer than inline_compute_us, so it runs on an inference
    thread: a health check is answered while the batch is still running. (Had it run on the
    event loop, the answer would only come once the batch had finished.)"""
    with start_server(tmp_path, *_args(tmp_path / "models"), metrics=True) as proc, proc.channel() as channel:
        with _long_calls(proc, channel, 1) as (call,):
            wait_for(lambda: _gauges(proc)[0] == 1, "the batch to be computing", server=proc)
            assert proc.health(timeout=30) == health_pb2.HealthCheckResponse.SERVING
            assert _gauges(proc)[0] == 1 and not call.done()  # answered while the batch still runs


@pytest.mark.parametrize("workers", [1, 2])
def test_inference_workers_is_how_many_batches_run_at_once(tmp_path: Path, workers: int) -> None:
    """Two one-batch calls to one model: with one worker the second waits in the queue while the
    first computes; with two both compute at once."""
    args = _args(tmp_path / "models", "--inference-workers", str(workers))
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:
        with _long_calls(proc, channel, 2):
            running, queued = (workers, 0) if workers == 2 else (1, 1)
            wait_for(lambda: _gauges(proc) == (running, queued), f"{running} running, {queued} queued", server=proc)
            assert _gauges(proc) == (running, queued)  # and it stays so while they compute
