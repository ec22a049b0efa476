"""Start-up refusals of the server CLI (``python -m service`` subprocesses) and its console script.
(Settings themselves: tests/unit/test_settings.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from fixtures.servers import REPO_ROOT, free_port

from service.core.runtime import CUDA

HAS_CUDA = CUDA in ort.get_available_providers()


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime reports CUDA here")
def test_server_refuses_cuda_without_gpu(tmp_path: Path) -> None:
    result = run_cli("--provider", "cuda", "--model-repository", str(tmp_path))
    assert result.returncode == 1
    assert "model-serving: error: execution provider 'cuda' was requested" in result.stderr
    assert "install onnxruntime-gpu" in result.stderr


def test_server_refuses_missing_repository(tmp_path: Path) -> None:
    result = run_cli("--model-repository", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "is not a directory" in result.stderr


def test_invalid_settings_exit_2() -> None:
    result = run_cli("--max-batch-size", "0")  # the old flag: the setting is max_request_rows now
    assert result.returncode == 2
    assert "max_request_rows" in result.stderr


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "model-serving"
    if not script.exists():
        pytest.skip("package not installed into this environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--model-repository" in result.stdout and "SERVING_PORT" in result.stdout
