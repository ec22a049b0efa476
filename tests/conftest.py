"""Shared fixtures: a real server subprocess on a free loopback port, and the Fashion-MNIST test set.

``server`` (session-scoped) serves the bundled ``models/`` repository; tests that need their own
repository, flags or env use :func:`start_server` as a context manager.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from data_fixtures import fashion_files, fashion_test  # noqa: F401  (shared fixtures, re-exported to every test)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS = REPO_ROOT / "models"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    """A running ``python -m service`` subprocess."""

    address: str
    port: int
    process: subprocess.Popen
    log_path: Path
    credentials: grpc.ChannelCredentials | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def channel(self) -> grpc.Channel:
        """A new client channel (TLS when the server was started with credentials)."""
        if self.credentials is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.credentials)

    def health(self, service: str = "", timeout: float = 2.0) -> int:
        """The grpc.health.v1 status of ``service`` (raises grpc.RpcError e.g. NOT_FOUND)."""
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for exit (SIGKILL after ``timeout``); return the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _wait_serving(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()[-4000:]}")
        try:
            status = server.health(timeout=1.0)
        except grpc.RpcError:
            status = None
        if status == health_pb2.HealthCheckResponse.SERVING:
            return
        if status == health_pb2.HealthCheckResponse.NOT_SERVING and '"server started"' in server.log():
            raise RuntimeError(f"server started but is NOT_SERVING (no model loaded?):\n{server.log()[-4000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"server not SERVING after {timeout:.0f} s:\n{server.log()[-4000:]}")


@contextlib.contextmanager
def start_server(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
    timeout: float = START_TIMEOUT_S,
    credentials: grpc.ChannelCredentials | None = None,
) -> Iterator[ServerProcess]:
    """Run ``python -m service --host 127.0.0.1 --port <free> *args``; stop it on exit.

    With ``wait`` the server must reach SERVING first (checked over ``credentials`` for TLS). ``env`` is added to the environment
    (any inherited ``SERVING_*`` variables are dropped so tests see only what they set).
    """
    port = free_port()
    log_path = tmp_path / f"server-{port}.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    full_env["SERVING_METRICS_PORT"] = "0"  # no fixed metrics port: servers run side by side
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), *args]
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = ServerProcess(f"127.0.0.1:{port}", port, process, log_path, credentials)
    try:
        if wait:
            _wait_serving(server, timeout)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server over the bundled models/ repository for the whole session."""
    with start_server(tmp_path_factory.mktemp("server"), "--model-repository", str(MODELS)) as proc:
        yield proc


@pytest.fixture
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(
        server.address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    ) as ch:
        yield ch


# -- Fashion-MNIST -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fashion_test_set(fashion_test) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [10000, 1, 28, 28], labels int64 [10000]) of the Fashion-MNIST test split,
    read and checksum-verified by the training package (see tests/data_fixtures.py)."""
    return fashion_test.images, fashion_test.labels
