"""``--workers 2`` through real processes: a supervisor and two worker servers on one port.

Connections are spread by the kernel (SO_REUSEPORT hashes each connection), so the tests open
many connections — 64, where the chance that all land on one of two workers is 2^-63 — and read
which worker answered from the supervisor's ``serving_worker_requests_total{worker}``. They wait
on log lines, health and metrics, never on time.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.metrics import sample
from fixtures.onnx_models import linear, save, tiny_repository
from fixtures.servers import (
    MODELS,
    REPO_ROOT,
    ServerProcess,
    assert_sigterm_lost_nothing,
    scrape,
    start_server,
    v2_request,
    wait_for,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import faults

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CONNECTIONS = 64
WAIT_S = 60.0


def connections(proc: ServerProcess, count: int = CONNECTIONS) -> Iterator[grpc.Channel]:
    """``count`` channels, each its own TCP connection (no shared subchannel)."""
    with ExitStack() as stack:
        channels = [
            stack.enter_context(grpc.insecure_channel(proc.address, options=[("grpc.use_local_subchannel_pool", 1)]))
            for _ in range(count)
        ]
        yield from channels


def profit_request() -> v2.ModelInferRequest:
    return v2_request("profit", "population", np.array([[35000.0]], np.float32), "FP32")


def per_worker(proc: ServerProcess) -> dict[str, float]:
    samples = scrape(proc.metrics_port)
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in samples.items()
        if name == "serving_worker_requests_total"
    }


def worker_pids(proc: ServerProcess) -> list[int]:
    return proc.log_lines("listening")[0]["worker_pids"]


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("workers")
    args = ["--model-repository", str(MODELS), "--provider", "cpu", "--workers", "2"]
    with start_server(tmp, *args, metrics=True) as proc:
        yield proc


def test_one_listening_line_with_the_real_ports(two_workers: ServerProcess) -> None:
    (line,) = two_workers.log_lines("listening")
    assert line["grpc_port"] == two_workers.port and line["workers"] == 2
    assert line["http_port"] == two_workers.http_port and line["metrics_port"] == two_workers.metrics_port
    assert len(set(line["worker_pids"])) == 2 and two_workers.process.pid not in line["worker_pids"]
    (started,) = two_workers.log_lines("server started")
    assert started["workers"] == 2 and started["ready"] and started["address"].endswith(f":{two_workers.port}")
    assert started["gc_frozen_objects"] > 10_000  # the workers froze their start-up heap (gc_freeze)
    # each worker's own lines say which worker wrote them
    loaded = two_workers.log_lines("model loaded")
    assert sorted({(entry["worker"], entry["model"]) for entry in loaded}) == sorted(
        (w, m) for w in (0, 1) for m in ("fashion_cnn", "fashion_softmax", "house_price", "profit")
    )


def test_connections_reach_both_workers_and_metrics_add_up(two_workers: ServerProcess) -> None:
    before = scrape(two_workers.metrics_port)
    workers_before = per_worker(two_workers)
    for channel in connections(two_workers):
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(2):
            reply = stub.ModelInfer(profit_request(), timeout=30)
            assert reply.model_name == "profit"
    # HTTP connections (urllib opens one per request) are spread too
    body = json.dumps(
        {"inputs": [{"name": "population", "datatype": "FP32", "shape": [1, 1], "data": [35000.0]}]}
    ).encode()
    for _ in range(16):
        request = urllib.request.Request(
            f"http://127.0.0.1:{two_workers.http_port}/v2/models/profit/infer",
            body,
            {"Content-Type": "application/json"},
        )
        assert json.loads(urllib.request.urlopen(request, timeout=30).read())["model_name"] == "profit"

    after = scrape(two_workers.metrics_port)
    workers_after = per_worker(two_workers)
    answered = {w: workers_after[w] - workers_before.get(w, 0.0) for w in workers_after}
    assert set(answered) == {"0", "1"}
    assert all(count > 0 for count in answered.values()), answered  # both workers served
    calls = 2 * CONNECTIONS + 16
    assert sum(answered.values()) == calls

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    ok = {"model": "profit", "version": "1", "code": "OK"}
    # the sums over workers
    assert delta("serving_requests_total", protocol="v2", **ok) == 2 * CONNECTIONS
    assert delta("serving_requests_total", protocol="http", **{**ok, "code": "200"}) == 16
    latency = {"model": "profit", "version": "1"}
    assert delta("serving_request_duration_seconds_count", protocol="v2", **latency) == 2 * CONNECTIONS
    assert delta("serving_request_duration_seconds_count", protocol="http", **latency) == 16
    assert delta("serving_queue_wait_seconds_count", model="profit", version="1") == calls
    assert delta("serving_batch_size_sum", model="profit", version="1") == calls  # one row each
    assert sample(after, "serving_workers") == 2
    assert sample(after, "serving_worker_up", worker="0") == sample(after, "serving_worker_up", worker="1") == 1
    assert sample(after, "serving_model_loaded", model="profit", version="1") == 1  # loaded everywhere, not 2
    assert sample(after, "serving_queue_depth", model="profit", version="1") == 0


def test_a_foreign_server_on_the_port_still_fails(two_workers: ServerProcess) -> None:
    """Only the supervisor's own workers share the port."""
    port = two_workers.port
    for workers in ("1", "2"):
        command = [
            *(sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)),
            *("--http-port", "0", "--metrics-port", "0", "--log-format", "text", "--workers", workers),
            *("--model-repository", str(MODELS), "--provider", "cpu"),
        ]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        last = f"model-serving: error: cannot serve gRPC on 127.0.0.1:{port}: Address already in use"
        assert result.stderr.splitlines()[-1] == last
    for http in (False, True):  # a plain listener without SO_REUSEPORT, on either port
        with socket.socket() as sock, pytest.raises(OSError) as info:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", two_workers.http_port if http else port))
            sock.listen()
        assert info.value.errno == 98  # EADDRINUSE
    assert two_workers.health() == SERVING  # the running server is untouched


def test_model_control_reaches_every_worker(tmp_path: Path) -> None:
    args = ["--model-repository", str(MODELS), "--provider", "cpu", "--workers", "2", "--allow-model-control", "true"]
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as control:
        stub = v2_grpc.GRPCInferenceServiceStub(control)
        stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="profit"), timeout=60)
        # answered only once every worker has unloaded it: no connection reaches it any more
        before = per_worker(proc)
        for channel in connections(proc):
            with pytest.raises(grpc.RpcError) as info:
                v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(profit_request(), timeout=30)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # health agrees on every connection, whichever worker it reached
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest(service="profit"), timeout=30).status == NOT_SERVING
            assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status == SERVING
        after = per_worker(proc)
        assert all(after[w] > before.get(w, 0.0) for w in ("0", "1")), (before, after)
        assert sample(scrape(proc.metrics_port), "serving_model_loaded", model="profit", version="1") == 0

        stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="profit"), timeout=60)
        before = per_worker(proc)
        for channel in connections(proc):
            assert (
                v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(profit_request(), timeout=30).model_name
                == "profit"
            )
        after = per_worker(proc)
        assert all(after[w] > before[w] for w in ("0", "1")), (before, after)
        # a load that fails fails for the caller, as with one process
        with pytest.raises(grpc.RpcError) as info:
            stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="no_such_model"), timeout=60)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    requested = proc.log_lines("model unloaded by every worker")
    assert len(requested) == 1 and requested[0]["workers"] == 2


def test_hot_reload_reaches_every_worker(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    save(linear(1, [1.0], 0.0, "population", "profit"), repo, "profit", 1)
    args = ["--model-repository", str(repo), "--provider", "cpu", "--workers", "2", "--reload-interval-seconds", "0.2"]
    with start_server(tmp_path, *args, metrics=True) as proc:
        staging = tmp_path / "staging"
        save(linear(1, [2.0], 0.0, "population", "profit"), staging, "profit", 2)
        os.rename(staging / "profit" / "2", repo / "profit" / "2")

        def both_loaded_v2() -> bool:
            return {e["worker"] for e in proc.log_lines("model loaded") if e["version"] == 2} == {0, 1}

        wait_for(both_loaded_v2, "version 2 loaded by both workers", server=proc)
        before = per_worker(proc)
        for channel in connections(proc):
            reply = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(profit_request(), timeout=30)
            assert reply.model_version == "2"
            assert np.frombuffer(reply.raw_output_contents[0], np.float32)[0] == 70000.0
        after = per_worker(proc)
        assert all(after[w] > before.get(w, 0.0) for w in ("0", "1"))


def test_sigterm_drains_every_worker_and_loses_nothing(tmp_path: Path) -> None:
    args = ["--model-repository", str(MODELS), "--provider", "cpu", "--workers", "2", "--log-level", "debug"]
    with start_server(tmp_path, *args, "--shutdown-grace-seconds", "30") as proc:
        result = asyncio.run(
            faults.sigterm_under_load(
                proc.address,
                proc.process,
                proc.log,
                clients=24,
                seconds=1.5,
                model="fashion_cnn",
                images=32,
                mode="hammer",
                own_connections=True,
            )
        )
    print(f"SIGTERM under load, 2 workers: {result}")
    assert_sigterm_lost_nothing(result, proc)
    drained = proc.log_lines("drained: stopping gRPC")
    assert sorted(entry["worker"] for entry in drained) == [0, 1]  # every worker drained
    assert all(entry["with_every_worker"] is True for entry in drained)  # and they stopped together
    served_by = {entry["worker"] for entry in proc.log_lines("request")}
    assert served_by == {0, 1}


def test_a_worker_sent_sigterm_alone_drains_without_waiting_and_is_restarted(tmp_path: Path) -> None:
    args = ["--model-repository", str(MODELS), "--provider", "cpu", "--workers", "2"]
    with start_server(tmp_path, *args, "--shutdown-grace-seconds", "60") as proc:
        pids = worker_pids(proc)
        os.kill(pids[0], signal.SIGTERM)
        wait_for(lambda: proc.log_lines("worker restarted"), "the worker restarted", server=proc)
        (drained,) = proc.log_lines("drained: stopping gRPC")
        # Its sibling was not stopping: it stopped alone instead of waiting out its 60 s of grace.
        assert drained["worker"] == 0 and drained["with_every_worker"] is False
        assert drained["waited_for_workers_seconds"] < 30
        (exited,) = proc.log_lines("worker exited")
        assert exited["worker"] == 0 and exited["exit"] == "exit status 0"
        assert proc.health() == SERVING
        assert proc.stop() == 0
        together = proc.log_lines("drained: stopping gRPC")[1:]
        assert sorted(e["worker"] for e in together) == [0, 1] and all(e["with_every_worker"] for e in together)


def test_a_killed_worker_is_restarted(tmp_path: Path) -> None:
    args = ["--model-repository", str(MODELS), "--provider", "cpu", "--workers", "2"]
    with start_server(tmp_path, *args, metrics=True) as proc:
        pids = worker_pids(proc)
        os.kill(pids[1], signal.SIGKILL)
        wait_for(lambda: proc.log_lines("worker restarted"), "the worker restarted", server=proc)
        (exited,) = proc.log_lines("worker exited")
        assert exited["worker"] == 1 and exited["pid"] == pids[1] and exited["exit"] == "signal SIGKILL"
        (restarted,) = proc.log_lines("worker restarted")
        assert restarted["worker"] == 1 and restarted["pid"] not in pids and restarted["restarts"] == 1
        samples = scrape(proc.metrics_port)
        assert sample(samples, "serving_worker_restarts_total", worker="1") == 1
        assert sample(samples, "serving_worker_restarts_total", worker="0") == 0
        assert sample(samples, "serving_worker_up", worker="1") == 1
        assert proc.health() == SERVING
        before = per_worker(proc)
        for channel in connections(proc):
            v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(profit_request(), timeout=30)
        after = per_worker(proc)
        assert all(after[w] > before[w] for w in ("0", "1")), (before, after)  # the new worker serves
        assert proc.stop() == 0


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (the server and its workers inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.mark.parametrize("case", ["strict", "cuda"])
def test_start_up_fails_cleanly_when_a_worker_cannot_start(tmp_path: Path, case: str) -> None:
    """The server refuses with the reason one process would give; no worker is left behind."""
    marker = f"WORKERS_TEST_{uuid.uuid4().hex}"
    if case == "strict":
        args = ["--model-repository", str(tiny_repository(tmp_path / "models")), "--strict-model-loading", "true"]
        expected = "model-serving: error: strict model loading: 1 model version failed to load: broken/1: "
    else:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            pytest.skip("CUDA is available here: the cuda provider does not refuse")
        args = ["--model-repository", str(MODELS), "--provider", "cuda"]
        expected = "model-serving: error: execution provider 'cuda' was requested"
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"]
    command += ["--metrics-port", "0", "--log-format", "text", "--workers", "2", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")} | {marker: "1"}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines()[-1].startswith(expected), result.stderr
    assert _processes_with(marker) == []


def test_sigterm_during_start_up_stops_every_worker(tmp_path: Path) -> None:
    """Stopped while the workers load: exit 0 as one process would, nothing left behind."""
    marker = f"WORKERS_TEST_{uuid.uuid4().hex}"
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"]
    command += ["--metrics-port", "0", "--workers", "2", "--provider", "cpu", "--model-repository", str(MODELS)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")} | {marker: "1"}
    with open(log_path, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT_S
        while '"msg": "execution providers selected"' not in log_path.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)  # a worker is loading its models now
        assert process.wait(WAIT_S) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert '"msg": "server stopped"' in log_path.read_text()
    assert _processes_with(marker) == []
