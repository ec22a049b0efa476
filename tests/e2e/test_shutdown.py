"""Graceful shutdown through real server processes, down its failure paths: a call in flight at
SIGTERM/SIGINT, a call that outlasts the grace, open inference streams, a signal while the models
are still loading, a second signal. Every test waits on the server's own states (metrics, log
lines, health), never on a sleep. (SIGTERM under load: test_load_faults.py; the gate in process:
tests/unit/test_limits.py.)"""

from __future__ import annotations

import os
import queue
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.onnx_models import linear, save, slow, tiny_repository
from fixtures.servers import ServerProcess, start_server, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc
from service.grpc.interceptor import DRAINING_MESSAGE
from service.grpc.server import FLUSH_SECONDS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _computing(proc: ServerProcess, model: str = "slow") -> bool:
    """Whether a batch of ``model`` runs in onnxruntime now (the server's own gauge)."""
    return proc.metric("serving_batches_in_flight", model=model, version="1") >= 1


def _profit_request(rows: int) -> pb.PredictProfitRequest:
    return pb.PredictProfitRequest(model=pb.ModelRef(name="slow"), population=[0.5] * rows)


def _seconds_between(first: dict, last: dict) -> float:
    """Seconds between two log lines, by the server's own timestamps."""
    return (datetime.fromisoformat(last["ts"]) - datetime.fromisoformat(first["ts"])).total_seconds()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_call_in_flight_completes(tmp_path: Path, sig: signal.Signals) -> None:
    rows = 15_000  # many 64-row batches: the call runs for a while
    repo = tmp_path / "models"
    save(slow(), repo, "slow")
    args = ["--model-repository", str(repo), "--max-request-rows", str(rows), "--shutdown-grace-seconds", "60"]
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        future = pb_grpc.ModelServiceStub(channel).PredictProfit.future(_profit_request(rows), timeout=120)
        wait_for(lambda: _computing(proc), "the call to be computing", server=proc)

        proc.process.send_signal(sig)
        assert next(watch).status == NOT_SERVING  # health flips first
        watch.cancel()
        response = future.result()  # the call in flight still completes, with every row
        assert len(response.profit_usd) == rows
        assert proc.process.wait(60) == 0
    (drained,) = proc.log_lines("drained: stopping gRPC")
    assert drained["running_at_signal"] == 1, "the call was not running at the signal: nothing was tested"
    assert drained["still_running"] == 0
    assert proc.log_lines("shutting down") and proc.log_lines("server stopped")


def test_a_call_that_outlasts_the_grace_is_cut_off_and_the_server_exits_in_time(tmp_path: Path) -> None:
    """Grace 1 s, one onnxruntime run of many seconds (batching off: one batch): the caller gets
    UNAVAILABLE when the grace is over, the run is stopped, and the process exits within the
    grace plus gRPC's flush (it used to wait for the run to end: 20 s here)."""
    rows = 100_000  # 400 layers of 64x64 on 100,000 rows: well over the grace on any CPU
    repo = tmp_path / "models"
    save(slow(layers=400, width=64), repo, "slow")
    args = [
        "--model-repository",
        str(repo),
        "--max-request-rows",
        str(rows),
        "--dynamic-batching",
        "false",
        "--shutdown-grace-seconds",
        "1",
    ]
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:
        future = pb_grpc.ModelServiceStub(channel).PredictProfit.future(_profit_request(rows), timeout=300)
        wait_for(lambda: _computing(proc), "the call to be computing", server=proc)
        proc.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as cut:
            future.result()
        assert proc.process.wait(60) == 0
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE, cut.value.details()
    (drained,) = proc.log_lines("drained: stopping gRPC")
    assert drained["running_at_signal"] == 1 and drained["still_running"] == 1  # it outlasted the grace
    (shutting_down,) = proc.log_lines("shutting down")
    (stopped,) = proc.log_lines("server stopped")
    # The documented bound (the grace, then gRPC's flush), with a second for the run to notice.
    assert _seconds_between(shutting_down, stopped) < 1 + FLUSH_SECONDS + 1, (shutting_down, stopped)


class _Requests:
    """A request iterator for a client stream that the test feeds and closes."""

    def __init__(self) -> None:
        self._queue: queue.Queue[object] = queue.Queue()

    def send(self, request: object) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[object]:
        while (request := self._queue.get()) is not None:
            yield request


def test_open_inference_streams_at_sigterm(tmp_path: Path) -> None:
    """An idle ClassifyStream ends UNAVAILABLE as soon as the drain starts (it holds nothing and
    does not hold the exit); a ModelStreamInfer whose message is being computed gets that answer,
    then ends UNAVAILABLE too."""
    rows = 15_000
    repo = tiny_repository(tmp_path / "models")
    save(slow(), repo, "slow")
    args = ["--model-repository", str(repo), "--max-request-rows", str(rows), "--shutdown-grace-seconds", "60"]
    images = np.zeros((2, 1, 28, 28), np.uint8)
    classify = pb.ClassifyRequest(
        model=pb.ModelRef(name="fashion_softmax"),
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, data=images.tobytes()),
    )
    x = np.full((rows, 1), 0.5, np.float32)
    infer = v2.ModelInferRequest(
        model_name="slow",
        id="slow-1",
        inputs=[v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=x.shape)],
        raw_input_contents=[x.tobytes()],
    )
    typed_requests, v2_requests = _Requests(), _Requests()
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:
        try:
            typed = pb_grpc.ModelServiceStub(channel).ClassifyStream(iter(typed_requests), timeout=120)
            streamed = v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(v2_requests), timeout=120)
            typed_requests.send(classify)
            assert len(next(typed).results) == 2  # answered; now idle, waiting for its next message
            v2_requests.send(infer)
            wait_for(lambda: _computing(proc), "the stream's message to be computing", server=proc)

            proc.process.send_signal(signal.SIGTERM)
            answer = next(streamed)  # the message being computed is answered...
            assert answer.error_message == "" and answer.infer_response.id == "slow-1"
            assert len(answer.infer_response.raw_output_contents[0]) == rows * 4
            ends = {}
            for name, stream in (("typed", typed), ("v2", streamed)):
                with pytest.raises(grpc.RpcError) as ended:
                    next(stream)
                ends[name] = (ended.value.code(), ended.value.details())
            assert proc.process.wait(60) == 0  # no stream held the exit for the 60 s grace
        finally:
            typed_requests.close()
            v2_requests.close()
    # ...and both streams end UNAVAILABLE, from the drain (not CANCELLED by gRPC's stop).
    assert ends == {name: (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE) for name in ("typed", "v2")}
    (drained,) = proc.log_lines("drained: stopping gRPC")
    assert drained["running_at_signal"] == 1  # the message being computed; the idle stream is no call
    assert drained["still_running"] == 0


def test_sigterm_while_the_models_are_still_loading(tmp_path: Path) -> None:
    """The model file is a FIFO: loading blocks in onnxruntime's read until the test writes the
    bytes, so the signal certainly arrives mid-load. The load finishes, and the server stops
    cleanly (exit 0, "server stopped") instead of dying on the signal or serving on."""
    source = save(linear(1, [2.0], 1.0, "population", "profit"), tmp_path / "source", "profit")
    repo = tmp_path / "models"
    fifo = repo / "profit" / "1" / "model.onnx"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    args = ["--model-repository", str(repo), "--provider", "cpu"]
    with start_server(tmp_path, *args, http=False, listening=False) as proc:
        # Signal handlers are installed before the registry exists (service.app.serve).
        proc.wait_log("execution providers selected")
        assert not proc.log_lines("model loaded")
        proc.process.send_signal(signal.SIGTERM)
        with open(fifo, "wb") as writer:  # opens once onnxruntime reads
            writer.write(source.read_bytes())
        assert proc.process.wait(60) == 0
    log = proc.log()
    order = [m for m in ("model loaded", "shutting down", "server stopped") if f'"msg": "{m}"' in log]
    assert order == ["model loaded", "shutting down", "server stopped"], log[-3000:]
    assert log.index('"model loaded"') < log.index('"shutting down"') < log.index('"server stopped"')
    assert "Traceback" not in log and '"level": "ERROR"' not in log


def test_a_second_signal_does_not_cut_the_drain_short(tmp_path: Path) -> None:
    """SIGTERM, then SIGTERM and SIGINT again while a call is in flight (an impatient operator):
    the drain goes on, the call completes, one shutdown, exit 0."""
    rows = 15_000
    repo = tmp_path / "models"
    save(slow(), repo, "slow")
    args = ["--model-repository", str(repo), "--max-request-rows", str(rows), "--shutdown-grace-seconds", "60"]
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:
        future = pb_grpc.ModelServiceStub(channel).PredictProfit.future(_profit_request(rows), timeout=120)
        wait_for(lambda: _computing(proc), "the call to be computing", server=proc)
        proc.process.send_signal(signal.SIGTERM)
        proc.wait_log("shutting down")
        proc.process.send_signal(signal.SIGTERM)
        proc.process.send_signal(signal.SIGINT)
        assert len(future.result().profit_usd) == rows
        assert proc.process.wait(60) == 0
    assert len(proc.log_lines("shutting down")) == 1 and len(proc.log_lines("server stopped")) == 1
    (drained,) = proc.log_lines("drained: stopping gRPC")
    assert drained["running_at_signal"] == 1 and drained["still_running"] == 0
