"""Settings (env vars + flags), provider selection, and start-up refusals of the CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
from conftest import REPO_ROOT, free_port

from service.__main__ import parse_settings
from service.runtime import CPU, CUDA, ProviderUnavailable, Runtime, select_providers
from service.settings import BUNDLED_MODELS, Settings

HAS_CUDA = CUDA in ort.get_available_providers()


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("SERVING_")]:
        monkeypatch.delenv(var)
    settings = Settings()
    assert (settings.port, settings.provider, settings.model_repository) == (8001, "auto", BUNDLED_MODELS)
    assert settings.max_message_bytes > 4 * 1024 * 1024
    # A max batch of float32 28x28 images fits in one message.
    assert settings.max_message_bytes >= settings.max_batch_size * 28 * 28 * 4


def test_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_PORT", "9001")
    monkeypatch.setenv("SERVING_PROVIDER", "cpu")
    monkeypatch.setenv("SERVING_MAX_BATCH_SIZE", "64")
    settings = parse_settings(["--port", "9002", "--model-repository", "somewhere", "--log-level", "debug"])
    assert settings.port == 9002  # flag wins
    assert settings.provider == "cpu"  # env
    assert settings.max_batch_size == 64
    assert settings.model_repository == Path("somewhere")
    assert settings.log_level == "DEBUG"


def test_tls_settings_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key must be given together"):
        Settings(tls_cert=Path("cert.pem"))
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert"):
        Settings(tls_client_ca=Path("ca.pem"))


@pytest.mark.parametrize(
    ("choice", "available", "expected"),
    [
        ("auto", [CPU], [CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(choice: str, available: list[str], expected: list[str]) -> None:
    assert select_providers(choice, available) == expected


def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(ProviderUnavailable, match=r"'cuda' was requested but onnxruntime .* reports only \['CPUExecutionProvider'\]"):
        select_providers("cuda", [CPU])
    with pytest.raises(ProviderUnavailable):
        Runtime(Settings(provider="cuda"), available=[CPU])


def test_auto_is_cpu_here() -> None:
    runtime = Runtime(Settings(provider="auto"))
    assert runtime.providers == ([CUDA, CPU] if HAS_CUDA else [CPU])


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(free_port()), *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime reports CUDA here")
def test_server_refuses_cuda_without_gpu(tmp_path: Path) -> None:
    result = run_cli("--provider", "cuda", "--model-repository", str(tmp_path))
    assert result.returncode == 1
    assert "model-serving: error: execution provider 'cuda' was requested" in result.stderr
    assert "install onnxruntime-gpu" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime with CUDA")
def test_auto_picks_cuda_with_a_gpu() -> None:
    assert select_providers("auto", ort.get_available_providers())[0] == CUDA


def test_server_refuses_missing_repository(tmp_path: Path) -> None:
    result = run_cli("--model-repository", str(tmp_path / "nowhere"))
    assert result.returncode == 1
    assert "is not a directory" in result.stderr


def test_invalid_settings_exit_2() -> None:
    result = run_cli("--max-batch-size", "0")
    assert result.returncode == 2
    assert "max_batch_size" in result.stderr


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "model-serving"
    if not script.exists():
        pytest.skip("package not installed into this environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--model-repository" in result.stdout and "SERVING_PORT" in result.stdout
