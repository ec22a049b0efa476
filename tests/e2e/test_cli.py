"""The server CLI (``python -m service`` subprocesses) and its console script: refused start-ups
end with their one line and exit 1, invalid settings with one line per problem and exit 2, and
nothing (no traceback, no warning from a half-built gRPC server) comes after.
(Settings in process: tests/unit/test_settings.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import pytest
from fixtures.servers import MODELS, REPO_ROOT, free_port

from service.core.runtime import CUDA

HAS_CUDA = CUDA in ort.get_available_providers()
#: What the issue saw after the refusal: grpc's Server.__del__ after the event loop closed.
AFTERMATH = ("Traceback", "Exception ignored", "never awaited", "Event loop is closed", "Warning")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m service`` on loopback, gRPC on a port the system picks, HTTP and metrics off (later flags
    win), inherited SERVING_* variables dropped; output captured (not a terminal: JSON logs)."""
    command = [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        *args,
    ]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    full_env.update(env or {})
    return subprocess.run(command, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess, reason: str, status: int = 1) -> None:
    """Exit ``status``; the last stderr line is the one refusal line; it appears once; nothing
    after it, nothing on stdout, no traceback or warning anywhere."""
    lines = result.stderr.splitlines()
    assert result.returncode == status, result.stderr[-3000:]
    assert lines and lines[-1] == f"model-serving: error: {reason}", result.stderr[-3000:]
    assert result.stderr.count(reason) == 1, result.stderr[-3000:]
    assert result.stdout == ""
    for word in AFTERMATH:
        assert word not in result.stderr, result.stderr[-3000:]


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 held open (listening) by the test."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# -- point 2: every refused start-up: its one line and status, nothing after -----------------------


def test_missing_repository_is_one_line_exit_1() -> None:
    """The issue's case: the message, then nothing (grpc's Server.__del__ traceback was next)."""
    result = run_cli("--log-format", "text", "--model-repository", "/nonexistent")
    assert_refused(result, "model repository /nonexistent is not a directory")


def test_missing_repository_with_json_logs_is_one_json_line() -> None:
    """Not a terminal, no --log-format: the logs are JSON, and so is the refusal (its last line)."""
    result = run_cli("--model-repository", "/nonexistent", "--metrics-port", str(free_port()))
    assert result.returncode == 1
    last = json.loads(result.stderr.splitlines()[-1])
    assert (last["level"], last["reason"], last["exit_status"]) == (
        "ERROR",
        "model repository /nonexistent is not a directory",
        1,
    )
    assert last["msg"] == "refusing to start: model repository /nonexistent is not a directory"
    assert all(line.startswith("{") for line in result.stderr.splitlines()), result.stderr
    assert result.stderr.count("is not a directory") == 2  # msg and reason of that one line
    for word in AFTERMATH:
        assert word not in result.stderr


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_busy_port_is_one_line_exit_1(busy_port: int, flag: str) -> None:
    """gRPC, HTTP and metrics: whatever was created before the busy port (the gRPC server, the
    HTTP socket) is closed before the process ends."""
    what = {"--port": "gRPC", "--http-port": "HTTP", "--metrics-port": "metrics"}[flag]
    result = run_cli("--log-format", "text", "--model-repository", str(MODELS), flag, str(busy_port))
    assert_refused(result, f"cannot serve {what} on 127.0.0.1:{busy_port}: Address already in use")


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime reports CUDA here")
def test_cuda_without_gpu_is_one_line_exit_1(tmp_path: Path) -> None:
    result = run_cli("--log-format", "text", "--provider", "cuda", "--model-repository", str(tmp_path))
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith("model-serving: error: execution provider 'cuda' was requested")
    assert "install onnxruntime-gpu" in last
    assert_refused(result, last.removeprefix("model-serving: error: "))


def test_unusable_token_file_is_one_line_exit_1(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("# nothing here\n")
    result = run_cli("--log-format", "text", "--auth-token-file", str(empty), "--model-repository", str(MODELS))
    assert_refused(result, f"auth token file {empty} holds no token")


def test_unreadable_tls_file_is_one_line_exit_1(tmp_path: Path) -> None:
    result = run_cli(
        "--log-format", "text", "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")
    )
    assert_refused(result, f"cannot read TLS file {tmp_path / 'key.pem'}: No such file or directory")
    (tmp_path / "folder").mkdir()  # (the tests run as root: permissions cannot make a file unreadable)
    result = run_cli(
        "--log-format", "text", "--tls-cert", str(tmp_path / "folder"), "--tls-key", str(tmp_path / "folder")
    )
    assert_refused(result, f"cannot read TLS file {tmp_path / 'folder'}: Is a directory")


def _tls_args(files: dict[str, Path], cert: Path, key: Path, client_ca: Path | None = None) -> list[str]:
    args = ["--log-format", "text", "--model-repository", str(MODELS), "--tls-cert", str(cert), "--tls-key", str(key)]
    return args + (["--tls-client-ca", str(client_ca)] if client_ca else [])


def test_malformed_tls_files_are_one_line_exit_1(tmp_path: Path) -> None:
    """Not a PEM file, a truncated certificate, a key that is not the certificate's, an encrypted
    key, a client CA that is no certificate: each says which file and what is wrong (gRPC itself
    only logged an error of its own and the server said the address could not be bound)."""
    from fixtures.tls import tls_files

    files = tls_files(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    truncated = tmp_path / "truncated.crt"
    truncated.write_text(files["server.crt"].read_text()[:200])
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_text(
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIBvTBXBgkqhkiG9w0BBQ0wSjApBgkqhkiG9w0BBQwwHAQI\n"
        "-----END ENCRYPTED PRIVATE KEY-----\n"
    )
    server_crt, server_key = files["server.crt"], files["server.key"]
    unusable = "(expected a PEM certificate chain and the unencrypted PEM private key that goes with it)"
    cases = [
        (_tls_args(files, garbage, server_key), f"TLS file {garbage} holds no PEM certificate"),
        (_tls_args(files, server_crt, garbage), f"TLS file {garbage} holds no PEM private key"),
        (_tls_args(files, server_key, server_crt), f"TLS file {server_crt} holds no PEM private key"),
        (_tls_args(files, truncated, server_key), f"TLS certificate {truncated} and key {server_key} cannot be used"),
        (_tls_args(files, server_crt, files["client.key"]), "KEY_VALUES_MISMATCH"),
        (_tls_args(files, server_crt, encrypted), f"and key {encrypted} cannot be used"),
        (_tls_args(files, server_crt, server_key, garbage), f"TLS file {garbage} holds no PEM certificate"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.returncode == 1, (args, result.stderr[-2000:])
        last = result.stderr.splitlines()[-1]
        assert last.startswith("model-serving: error: ") and message in last, (message, result.stderr[-2000:])
        if "cannot be used" in message and "KEY_VALUES" not in message:
            assert last.endswith(unusable)
        assert_refused(result, last.removeprefix("model-serving: error: "))  # nothing after it, no traceback
        assert "address cannot be bound" not in result.stderr and "Handshaker" not in result.stderr


def test_without_onnxruntime_says_which_extra_to_install(tmp_path: Path) -> None:
    """A server installed without the cpu or gpu extra: an ``onnxruntime`` that cannot be
    imported (a stand-in first on PYTHONPATH raises the ImportError Python gives for a missing
    module) is one line naming both extras."""
    (tmp_path / "onnxruntime.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n"
    )
    result = run_cli("--log-format", "text", env={"PYTHONPATH": str(tmp_path)})
    assert_refused(
        result,
        "onnxruntime is not installed: install the server with the extra for your hardware, "
        "pip install 'onnx-v2-serving[cpu]' (CPU) or 'onnx-v2-serving[gpu]' (CUDA)",
    )


# -- point 3: invalid settings: one line per problem, flag + env var + value + expected, exit 2 ------


def assert_settings_lines(result: subprocess.CompletedProcess, *lines: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == list(lines)
    assert result.stdout == ""
    for noise in ("pydantic", "type=", "input_value", "For further information", "Traceback"):
        assert noise not in result.stderr


def test_invalid_flags_one_line_each_exit_2() -> None:
    result = run_cli("--port", "abc", "--provider", "gpu", "--dynamic-batching", "maybe")
    assert_settings_lines(
        result,
        "model-serving: invalid --port (SERVING_PORT) 'abc': expected an integer",
        "model-serving: invalid --provider (SERVING_PROVIDER) 'gpu': expected 'auto', 'cpu' or 'cuda'",
        "model-serving: invalid --dynamic-batching (SERVING_DYNAMIC_BATCHING) 'maybe': expected true or false",
    )


def test_invalid_env_vars_and_old_spellings_exit_2() -> None:
    """Env vars get the same lines as flags; a renamed setting says which spelling was used; a
    nested value (--batching) names its path."""
    result = run_cli(
        "--max-batch-size",
        "0",
        env={
            "SERVING_METRICS_PORT": "70000",  # overridden by run_cli's flag: not reported
            "SERVING_BATCH_MAX_SIZE": "0",
            "SERVING_BATCHING": '{"fashion_cnn": {"max_batch_rows": 0}}',
            "SERVING_INLINE_COMPUTE_US": "-1",
        },
    )
    assert_settings_lines(
        result,
        "model-serving: invalid --max-request-rows (SERVING_MAX_REQUEST_ROWS, given as --max-batch-size) '0': "
        "expected at least 1",
        "model-serving: invalid --max-batch-rows (SERVING_MAX_BATCH_ROWS, given as SERVING_BATCH_MAX_SIZE) '0': "
        "expected at least 1",
        "model-serving: invalid --inline-compute-us (SERVING_INLINE_COMPUTE_US) '-1': expected at least 0",
        "model-serving: invalid --batching (SERVING_BATCHING) fashion_cnn.max_batch_rows=0: expected at least 1",
    )


def test_cross_field_error_names_the_flags_not_the_settings_dict() -> None:
    result = run_cli("--tls-cert", "cert.pem", env={"SERVING_AUTH_TOKENS": "s3cr3t"})
    assert_settings_lines(
        result,
        "model-serving: invalid settings: --tls-cert (SERVING_TLS_CERT) and --tls-key (SERVING_TLS_KEY) "
        "must be given together (given: --tls-cert='cert.pem')",
    )
    assert "s3cr3t" not in result.stderr  # pydantic printed every setting, tokens included


def test_bad_token_is_redacted() -> None:
    """A token setting's value is never printed, not even the valid part of a bad list."""
    result = run_cli(env={"SERVING_AUTH_TOKENS": "s3cr3t,bad token"})
    assert_settings_lines(
        result,
        "model-serving: invalid --auth-tokens (SERVING_AUTH_TOKENS) <redacted>: "
        "auth tokens must be non-empty printable ASCII without spaces",
    )
    assert "s3cr3t" not in result.stderr + result.stdout and "bad token" not in result.stderr


def test_unknown_flag_is_one_line_exit_2() -> None:
    result = run_cli("--no-such-flag", "1")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "model-serving: error: unrecognized arguments: --no-such-flag 1 (see model-serving --help)"
    ]


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "model-serving"
    if not script.exists():
        pytest.skip("package not installed into this environment")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--model-repository" in result.stdout and "SERVING_PORT" in result.stdout
    assert "--strict-model-loading STRICT_MODEL_LOADING, --exit-on-error STRICT_MODEL_LOADING" in result.stdout
