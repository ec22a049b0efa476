"""Load and faults through real server processes: a short soak (the full one is
``benchmarks/soak.py``), SIGTERM under load (nothing accepted is lost), and cancelled or
disconnected callers in the middle of a batch (the others in that batch are unaffected)."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from fixtures.onnx_models import linear, save, slow, tiny_repository
from fixtures.servers import MODELS, REPO_ROOT, ServerProcess, assert_sigterm_lost_nothing, start_server, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import faults
import soak

OK = grpc.StatusCode.OK
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
SERVING = health_pb2.HealthCheckResponse.SERVING


def test_short_soak(tmp_path: Path) -> None:
    repo = tiny_repository(tmp_path / "models")
    with start_server(tmp_path, "--model-repository", str(repo), "--provider", "cpu") as proc:
        result = asyncio.run(soak.soak(proc.address, proc.process.pid, requests=2000, concurrency=32, warmup=500))
        assert proc.health() == SERVING
    print(
        f"short soak: {result['ok']} ok, {result['throughput_rps']} req/s, RSS {result['rss_mib']}, growth {result['rss_growth_pct']} %"  # noqa: E501
    )
    assert result["errors"] == {}, result["first_errors"]
    assert result["mismatches"] == {} and result["ok"] == 2000
    kinds = set(result["per_kind"])
    assert len(kinds) == 6 and {k.split()[0] for k in kinds} == {"typed", "V2"}  # (no fashion_cnn here)
    # No RSS bound here: 2,000 requests after a 500-request warm-up say more about the allocator
    # than about leaks. The leak check is the full soak's (benchmarks/soak.py: 100,000 requests,
    # growth over the second half; docs/hardening.md, "Soak").


# --- SIGTERM under load ---------------------------------------------------------------------------


def test_sigterm_under_load_loses_nothing(tmp_path: Path) -> None:
    """Every call either completed (OK) or was refused with UNAVAILABLE before the server
    accepted it: the server's own request log (one line per accepted call, with its id) holds
    exactly the calls the clients saw succeed, and none of the refused ones.

    The callers are the harshest kind: after UNAVAILABLE they retry the same server every 20 ms
    until its port is gone (``benchmarks/faults.py sigterm`` runs 64 of them, and the gentler
    kinds)."""
    # The bundled CNN: the server, not the client, is the bottleneck, so calls are in flight.
    args = [
        "--model-repository",
        str(MODELS),
        "--provider",
        "cpu",
        "--log-level",
        "debug",
        "--shutdown-grace-seconds",
        "30",
    ]
    with start_server(tmp_path, *args) as proc:
        # No fixed load time: SIGTERM once every caller has had calls answered (48 in all), and
        # the callers stop once each has met the closed port.
        result = asyncio.run(
            faults.sigterm_under_load(
                proc.address,
                proc.process,
                proc.log,
                clients=24,
                seconds=0,
                model="fashion_cnn",
                images=32,
                mode="hammer",
            )
        )
    print(f"SIGTERM under load: {result}")
    assert_sigterm_lost_nothing(result, proc)
    assert result["refused_unavailable"] > 0, "no call was refused: the clients stopped too early"


def test_an_open_health_watch_does_not_hold_the_exit(tmp_path: Path) -> None:
    """A load balancer's health Watch stream stays open forever; after the drain, gRPC gets only
    a short flush (service.grpc.server.FLUSH_SECONDS), not the whole grace."""
    repo = tiny_repository(tmp_path / "models")
    args = ["--model-repository", str(repo), "--provider", "cpu", "--shutdown-grace-seconds", "60"]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == SERVING
        proc.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.process.wait(60) == 0
        with pytest.raises(grpc.RpcError) as info:
            next(watch)
        assert info.value.code() == UNAVAILABLE
    # By the server's own clock: the exit came after the short flush, not the 60 s grace (half of
    # it is the bound: a flush that waited for the stream would take all of it).
    (drained,) = proc.log_lines("drained: stopping gRPC")
    (stopped,) = proc.log_lines("server stopped")
    held = (datetime.fromisoformat(stopped["ts"]) - datetime.fromisoformat(drained["ts"])).total_seconds()
    assert held < 30, held


# --- cancelled and disconnected callers mid-batch -----------------------------------------------


def test_cancelled_and_disconnected_callers_do_not_disturb_their_batch(tmp_path: Path) -> None:
    """16 V2 calls of 1,000 rows queue for one model whose batches take up to 17,000 rows and
    gather for up to 60 s (so they stay queued until the test moves on). Three are cancelled and a
    channel carrying two more is closed: the server drops those five before any compute (counted
    as cancelled). A 17th call of 6,000 rows then fills the batch, which starts at once; one more
    caller cancels while it runs. Every caller that stayed gets exactly its own rows; the server
    stays SERVING."""
    repo = tmp_path / "models"
    path = save(slow(layers=20), repo, "slow")
    save(linear(1, [2.0], 1.0, "population", "profit"), repo, "profit")  # batches without a delay
    rows, last_rows, batch_rows = 1000, 6000, 17_000  # 11 x 1,000 + 6,000 = 17,000
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = [rows] * 16 + [last_rows]
    inputs = [np.linspace(-1, 1, n, dtype=np.float32).reshape(n, 1) * (i + 1) / 10 for i, n in enumerate(sizes)]
    expected = [session.run(["y"], {"x": x})[0] for x in inputs]
    batching = {"slow": {"max_batch_rows": batch_rows, "max_queue_delay_us": 60_000_000}}
    args = [
        "--model-repository",
        str(repo),
        "--provider",
        "cpu",
        "--log-level",
        "debug",
        "--max-request-rows",
        str(last_rows),
        "--batching",
        json.dumps(batching),
    ]

    def request(i: int) -> v2.ModelInferRequest:
        return v2.ModelInferRequest(
            model_name="slow",
            id=f"r{i}",
            raw_input_contents=[inputs[i].tobytes()],
            inputs=[v2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[sizes[i], 1])],
        )

    def metric(proc: ServerProcess, name: str, **labels: str) -> float:
        return proc.metric(name, model="slow", version="1", **labels)

    async def until(proc: ServerProcess, condition: Callable[[], bool], what: str) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(condition, what, server=proc))

    async def scenario(proc: ServerProcess) -> dict[int, object]:
        results: dict[int, object] = {}
        async with (
            grpc.aio.insecure_channel(proc.address) as staying,
            grpc.aio.insecure_channel(proc.address) as leaving,
        ):
            stay, leave = v2_grpc.GRPCInferenceServiceStub(staying), v2_grpc.GRPCInferenceServiceStub(leaving)
            calls = {i: (leave if i in (4, 5) else stay).ModelInfer(request(i), timeout=120) for i in range(16)}
            await until(proc, lambda: metric(proc, "serving_queue_depth") == 16, "16 queued")
            for i in (0, 1, 2):
                calls[i].cancel()  # while queued
            await leaving.close()  # a client that goes away with two queued calls
            await until(
                proc, lambda: metric(proc, "serving_dropped_requests_total", reason="cancelled") == 5, "5 dropped"
            )
            assert metric(proc, "serving_queue_depth") == 11
            calls[16] = stay.ModelInfer(request(16), timeout=120)  # 17,000 rows queued: the batch is full
            await until(proc, lambda: metric(proc, "serving_batches_in_flight") == 1, "the batch to run")
            calls[3].cancel()  # while its batch runs
            for i, call in calls.items():
                try:
                    response = await call
                    results[i] = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(sizes[i], 1)
                except (grpc.aio.AioRpcError, asyncio.CancelledError) as err:
                    results[i] = err.code() if isinstance(err, grpc.aio.AioRpcError) else grpc.StatusCode.CANCELLED
        return results

    with start_server(tmp_path, *args, metrics=True) as proc:
        results = asyncio.run(scenario(proc))
        assert proc.health() == SERVING
        with proc.channel() as channel:  # and it still answers
            response = pb_grpc.ModelServiceStub(channel).PredictProfit(
                pb.PredictProfitRequest(population=[3.0]), timeout=30
            )
        assert list(response.profit_usd) == [7.0]
        batches = metric(proc, "serving_batch_size_count")
        computed_rows = metric(proc, "serving_batch_size_sum")

    assert [results[i] for i in (0, 1, 2, 4, 5)] == [grpc.StatusCode.CANCELLED] * 5, results
    for i in range(6, 17):  # every caller that stayed got exactly its own rows
        assert isinstance(results[i], np.ndarray), (i, results[i])
        np.testing.assert_allclose(results[i], expected[i], rtol=1e-5, atol=1e-5, err_msg=str(i))
    # The one cancelled while running: cancelled, or (had its answer already left) its own rows.
    assert results[3] == grpc.StatusCode.CANCELLED or np.allclose(results[3], expected[3], rtol=1e-5, atol=1e-5)
    assert batches == 1 and computed_rows == batch_rows  # one batch: the 12 that were queued together
    served = {line["request_id"]: line["code"] for line in proc.log_lines("request") if line.get("request_id")}
    assert all(served[f"r{i}"] == "OK" for i in range(6, 17)), served
    assert all(served.get(f"r{i}", "CANCELLED") == "CANCELLED" for i in (0, 1, 2, 4, 5)), served
    log = proc.log()
    assert "Traceback" not in log and '"level": "ERROR"' not in log
