"""Start-up with models that fail to load, or none (``python -m service`` subprocesses): a warning
that names each failed version and why, not ready while nothing is loaded; with strict model
loading (``--strict-model-loading`` / Triton's ``--exit-on-error``) either one stops start-up
with its line and exit 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fixtures.servers import MODELS, REPO_ROOT, START_TIMEOUT_S, ServerProcess, start_server
from grpc_health.v1 import health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BROKEN_REASON = "Protobuf parsing failed"


@pytest.fixture
def partial(tmp_path: Path) -> Path:
    """A repository where ``profit`` loads and ``broken`` version 1 does not."""
    repo = tmp_path / "partial"
    (repo / "profit" / "1").mkdir(parents=True)
    (repo / "profit" / "1" / "model.onnx").write_bytes((MODELS / "profit" / "1" / "model.onnx").read_bytes())
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    return repo


def records(proc: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in proc.log().splitlines() if line.startswith("{")]


def wait_started(proc: ServerProcess) -> list[dict]:
    """The log records once the start-up line is written (the server is not SERVING here)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not any(r["msg"] == "server started" for r in records(proc)):
        assert proc.process.poll() is None, proc.log()[-3000:]
        assert time.monotonic() < deadline, proc.log()[-3000:]
        time.sleep(0.05)
    return records(proc)


def http_ready(proc: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/v2/health/ready", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def run_strict(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0"]
    command += ["--http-port", "0", "--metrics-port", "0", "--log-format", "text", *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    full_env.update(env or {})
    return subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=120)


def test_empty_repository_warns_and_is_not_ready(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with start_server(tmp_path, "--model-repository", str(empty), wait=False) as proc:
        lines = wait_started(proc)
        assert proc.health() == NOT_SERVING
        assert http_ready(proc) == 503
    assert proc.process.returncode == 0
    warning = next(r for r in lines if r["msg"] == "no model loaded: not ready")
    assert (warning["level"], warning["root"], warning["empty"]) == ("WARNING", str(empty), True)
    started = next(r for r in lines if r["msg"] == "server started")
    assert (started["ready"], started["models"], started["strict_model_loading"]) == (False, {}, False)


def test_failed_model_is_a_warning_naming_version_and_reason(tmp_path: Path, partial: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(partial)) as proc:  # waits for SERVING
        lines = records(proc)
        assert proc.health("profit") == SERVING and proc.health("broken") == NOT_SERVING
        assert http_ready(proc) == 200
    warning = next(r for r in lines if r["msg"] == "models failed to load")
    assert warning["level"] == "WARNING" and list(warning["failed"]) == ["broken/1"]
    assert BROKEN_REASON in warning["failed"]["broken/1"] and warning["serving"] == {"profit": [1]}


def test_strict_model_loading_refuses_a_failed_model(partial: Path) -> None:
    result = run_strict("--strict-model-loading", "true", "--model-repository", str(partial))
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.splitlines()[-1]
    assert last.startswith("model-serving: error: strict model loading: 1 model version failed to load: broken/1: ")
    assert BROKEN_REASON in last
    assert "Traceback" not in result.stderr and "never awaited" not in result.stderr
    assert "server started" not in result.stderr


def test_strict_model_loading_triton_spelling_refuses_an_empty_repository(tmp_path: Path) -> None:
    result = run_strict("--exit-on-error", "true", "--model-repository", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"model-serving: error: strict model loading: model repository {tmp_path} holds no model"
    )


def test_strict_model_loading_starts_when_every_model_loads(tmp_path: Path) -> None:
    """The container's setting (SERVING_STRICT_MODEL_LOADING=true) with the bundled models."""
    env = {"SERVING_STRICT_MODEL_LOADING": "true"}
    with start_server(tmp_path, "--model-repository", str(MODELS), env=env) as proc:
        started = next(r for r in records(proc) if r["msg"] == "server started")
    assert started["strict_model_loading"] is True and started["failed"] == {} and started["ready"] is True
    assert proc.process.returncode == 0
