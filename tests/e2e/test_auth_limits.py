"""Security settings through real server processes: bearer tokens (list, file, rotation), TLS
together with tokens, a plaintext client against TLS, and the concurrent-request limit.
(Mutual TLS: test_server.py; message and metadata size limits: test_bad_requests.py; tokens and
the call gate in process: tests/unit/test_security.py, tests/unit/test_limits.py.)"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.onnx_models import linear, save, slow
from fixtures.servers import REPO_ROOT, start_server
from fixtures.tls import tls_files
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.client import ServingClient
from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SERVING = health_pb2.HealthCheckResponse.SERVING
ENV_TOKEN = "env-token-0123456789"
FILE_TOKEN = "file-token-abcdef"


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    save(linear(1, [2.0], 1.0, "population", "profit"), repo, "profit")
    return repo


def _profit(channel: grpc.Channel, token: str | None = None, header: str | None = None) -> float:
    metadata = [("authorization", header if header is not None else f"Bearer {token}")] if token or header else []
    stub = pb_grpc.ModelServiceStub(channel)
    return stub.PredictProfit(pb.PredictProfitRequest(population=[3]), timeout=10, metadata=metadata).profit_usd[0]


def _v2_profit(channel: grpc.Channel, token: str | None = None) -> float:
    request = v2.ModelInferRequest(
        model_name="profit",
        inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[np.float32(3).tobytes()],
    )
    metadata = [("authorization", f"Bearer {token}")] if token else []
    response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10, metadata=metadata)
    return float(np.frombuffer(response.raw_output_contents[0], "<f4")[0])


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_bearer_tokens(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# rotated monthly\n\n{FILE_TOKEN}\n")
    args = ["--model-repository", str(_repo(tmp_path)), "--auth-token-file", str(token_file)]
    with start_server(tmp_path, *args, env={"SERVING_AUTH_TOKENS": ENV_TOKEN}) as proc, proc.channel() as channel:
        # Health and reflection need no token (probes, grpcurl list).
        assert proc.health() == SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "serving.v1.ModelService" in {s.name for s in listed.list_services_response.service}

        # Everything else does, on both protocols and on streams.
        assert _code(lambda: _profit(channel)) == (
            UNAUTHENTICATED,
            "missing 'authorization: Bearer <token>' metadata: this server requires a bearer token",
        )
        assert _code(lambda: _v2_profit(channel))[0] == UNAUTHENTICATED
        assert _code(lambda: _profit(channel, "wrong")) == (UNAUTHENTICATED, "invalid bearer token")
        assert _code(lambda: _profit(channel, ENV_TOKEN[:-1]))[1] == "invalid bearer token"
        assert (
            _code(lambda: _profit(channel, header="Basic Zm9vOmJhcg=="))[1]
            == "the authorization metadata must be 'Bearer <token>'"
        )
        assert _code(lambda: _profit(channel, header="Bearer "))[0] == UNAUTHENTICATED
        stream = pb_grpc.ModelServiceStub(channel).ClassifyStream(iter([pb.ClassifyRequest()]), timeout=10)
        assert _code(lambda: list(stream))[0] == UNAUTHENTICATED
        meta = v2_grpc.GRPCInferenceServiceStub(channel).ServerLive
        assert _code(lambda: meta(v2.ServerLiveRequest(), timeout=10))[0] == UNAUTHENTICATED

        assert _profit(channel, ENV_TOKEN) == 7.0
        assert _profit(channel, FILE_TOKEN) == 7.0
        assert _profit(channel, header=f"bearer {FILE_TOKEN}") == 7.0  # the scheme is case-insensitive
        assert _v2_profit(channel, ENV_TOKEN) == 7.0
        with ServingClient(proc.address, token=FILE_TOKEN, insecure_token=True) as client:
            assert client.predict_profit([3]).tolist() == [7.0]

        # Rotation: a new file replaces the old tokens within about a second, no restart.
        new = tmp_path / "tokens.new"
        new.write_text("rotated-token\n")
        new.replace(token_file)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if _profit(channel, "rotated-token") == 7.0:
                    break
            except grpc.RpcError:
                time.sleep(0.1)
        assert _profit(channel, "rotated-token") == 7.0
        assert _code(lambda: _profit(channel, FILE_TOKEN))[0] == UNAUTHENTICATED
        assert _profit(channel, ENV_TOKEN) == 7.0  # tokens from the settings stay

        # An emptied file fails closed: its tokens stop working (those from the settings stay).
        token_file.write_text("\n# nothing\n")
        deadline = time.monotonic() + 10
        while True:
            try:
                _profit(channel, "rotated-token")
            except grpc.RpcError as exc:
                assert exc.code() == UNAUTHENTICATED
                break
            assert time.monotonic() < deadline, "the emptied token file still lets its old token in"
        assert _profit(channel, ENV_TOKEN) == 7.0
    log = proc.log()
    assert '"call refused: UNAUTHENTICATED"' in log and '"auth token file reloaded"' in log
    assert log.count('"auth token file unusable: its tokens are refused until it is fixed"') == 1
    assert ENV_TOKEN not in log and FILE_TOKEN not in log and "rotated-token" not in log


def test_tls_with_a_token_and_a_plaintext_client(tmp_path: Path) -> None:
    files = tls_files(tmp_path)
    tls = grpc.ssl_channel_credentials(files["ca.crt"].read_bytes())
    args = [
        "--model-repository",
        str(_repo(tmp_path)),
        "--tls-cert",
        str(files["server.crt"]),
        "--tls-key",
        str(files["server.key"]),
        "--auth-tokens",
        "s3cret-token",
    ]
    with start_server(tmp_path, *args, credentials=tls) as proc:
        with proc.channel() as channel:
            assert _profit(channel, "s3cret-token") == 7.0
            assert _code(lambda: _profit(channel))[0] == UNAUTHENTICATED
        start = time.monotonic()
        with grpc.insecure_channel(proc.address) as plain:
            code, _ = _code(lambda: _profit(plain, "s3cret-token"))
        assert code == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 10  # fails cleanly, no hang
        with ServingClient(proc.address, root_certificates=files["ca.crt"], token="s3cret-token") as client:
            assert client.predict_profit([3]).tolist() == [7.0]
        assert proc.health() == SERVING  # the plaintext attempt did not hurt
    assert '"tls": true' in proc.log() and '"auth": true' in proc.log()


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read auth token file"), ("\n# only comments\n", "holds no token"), ("two words\n", "spaces")],
    ids=["missing", "empty", "spaces"],
)
def test_a_bad_token_file_refuses_to_start(tmp_path: Path, content: str | None, message: str) -> None:
    token_file = tmp_path / "tokens"
    if content is not None:
        token_file.write_text(content)
    command = [
        sys.executable,
        "-m",
        "service",
        "--port",
        "0",
        "--model-repository",
        str(_repo(tmp_path)),
        "--auth-token-file",
        str(token_file),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and message in result.stderr


def test_bad_inline_tokens_are_a_settings_error(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "service", "--port", "0", "--auth-tokens", "has space"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "printable ASCII without spaces" in result.stderr


def test_max_concurrent_requests(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    save(slow(), repo, "slow")
    rows = 4000  # ~0.4 s per call on an idle core
    args = ["--model-repository", str(repo), "--max-concurrent-requests", "2", "--max-request-rows", str(rows)]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        request = pb.PredictProfitRequest(model=pb.ModelRef(name="slow"), population=[0.5] * rows)
        # gRPC frees a slot when the server task ends, a moment after the client got its answer
        # (here: the start-up health checks).
        time.sleep(0.5)
        running = [stub.PredictProfit.future(request, timeout=60) for _ in range(2)]
        time.sleep(0.2)
        assert not any(f.done() for f in running)
        assert proc.health() == SERVING  # health checks are never counted nor refused
        code, details = _code(lambda: stub.PredictProfit(request, timeout=60))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert all(len(f.result().profit_usd) == rows for f in running)  # the admitted ones finish
        assert len(stub.PredictProfit(request, timeout=60).profit_usd) == rows  # and room is back


ADMIN_TOKEN = "admin-token-0123456789"


def _http_control(proc, action: str, token: str | None) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{proc.http_port}/v2/repository/models/profit/{action}",
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_model_control_needs_an_admin_token(tmp_path: Path) -> None:
    args = ["--model-repository", str(_repo(tmp_path)), "--allow-model-control", "true"]
    env = {"SERVING_AUTH_TOKENS": ENV_TOKEN, "SERVING_ADMIN_TOKENS": ADMIN_TOKEN}
    with start_server(tmp_path, *args, env=env) as proc, proc.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        unload = v2.RepositoryModelUnloadRequest(model_name="profit")
        load = v2.RepositoryModelLoadRequest(model_name="profit")

        def bearer(token: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {token}")]

        # An inference token: PERMISSION_DENIED on both protocols, and the model keeps serving.
        code, details = _code(lambda: stub.RepositoryModelUnload(unload, metadata=bearer(ENV_TOKEN), timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "load or unload" in details
        assert _http_control(proc, "unload", ENV_TOKEN) == 403
        assert _code(lambda: stub.RepositoryModelUnload(unload, timeout=30))[0] == UNAUTHENTICATED
        assert _http_control(proc, "unload", None) == 401
        assert _v2_profit(channel, ENV_TOKEN) == 7.0
        assert ENV_TOKEN not in proc.log() and ADMIN_TOKEN not in proc.log()

        # The admin token may, over either protocol, and may run inference too.
        stub.RepositoryModelUnload(unload, metadata=bearer(ADMIN_TOKEN), timeout=30)
        ready = v2.ModelReadyRequest(name="profit")
        assert not stub.ModelReady(ready, metadata=bearer(ENV_TOKEN), timeout=10).ready
        stub.RepositoryModelLoad(load, metadata=bearer(ADMIN_TOKEN), timeout=60)
        assert stub.ModelReady(ready, metadata=bearer(ENV_TOKEN), timeout=10).ready
        assert _http_control(proc, "unload", ADMIN_TOKEN) == 200
        assert _http_control(proc, "load", ADMIN_TOKEN) == 200
        assert _v2_profit(channel, ADMIN_TOKEN) == 7.0


def test_with_auth_on_and_no_admin_token_nobody_controls_models(tmp_path: Path) -> None:
    args = ["--model-repository", str(_repo(tmp_path)), "--allow-model-control", "true"]
    with start_server(tmp_path, *args, env={"SERVING_AUTH_TOKENS": ENV_TOKEN}) as proc, proc.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        unload = v2.RepositoryModelUnloadRequest(model_name="profit")
        metadata = [("authorization", f"Bearer {ENV_TOKEN}")]
        code, details = _code(lambda: stub.RepositoryModelUnload(unload, metadata=metadata, timeout=30))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "none is configured" in details
        assert _v2_profit(channel, ENV_TOKEN) == 7.0


def test_an_exposed_server_says_so(tmp_path: Path) -> None:
    """Binding every interface without TLS or tokens is allowed, and logged as a warning."""
    with start_server(tmp_path, "--host", "0.0.0.0", "--model-repository", str(_repo(tmp_path))) as proc:
        log = proc.log()  # logged before the models load, so before SERVING
    assert "listening on a non-loopback address without TLS and bearer tokens" in log
    with start_server(tmp_path, "--model-repository", str(_repo(tmp_path))) as quiet:
        assert "non-loopback" not in quiet.log()


def test_many_calls_at_once_on_one_new_connection(tmp_path: Path) -> None:
    """200 calls sent at once on a fresh channel, under max_concurrent_requests: each is answered.
    (With --max-streams-per-connection 100, the calls the client sent before it read the server's
    SETTINGS were reset, REFUSED_STREAM → UNAVAILABLE, which gRPC clients do not retry.)"""
    with start_server(tmp_path, "--model-repository", str(_repo(tmp_path))) as proc, proc.channel() as channel:
        request = v2.ModelInferRequest(
            model_name="profit",
            inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[np.float32(3).tobytes()],
        )
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(request, timeout=60) for _ in range(200)]
        assert [call.code() for call in calls] == [grpc.StatusCode.OK] * 200
        assert {float(np.frombuffer(c.result().raw_output_contents[0], "<f4")[0]) for c in calls} == {7.0}
