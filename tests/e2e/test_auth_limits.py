"""Security settings and limits through real server processes: bearer tokens (list, file,
rotation, a file deleted at run time, duplicate entries, unary calls and streams of both
protocols), TLS together with tokens, a plaintext client against TLS, and the concurrency limits
(max_concurrent_requests per call and per stream message, max_inference_streams). (Mutual TLS:
test_server.py; message and metadata size limits: test_bad_requests.py; tokens and the call gate
in process: tests/unit/test_security.py, tests/unit/test_limits.py.)"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.onnx_models import image_classifier, linear, save
from fixtures.servers import REPO_ROOT, ServerProcess, start_server, wait_for
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


def _accepted(channel: grpc.Channel, token: str) -> bool:
    """Whether ``token`` is accepted now (False: UNAUTHENTICATED, any other failure raises)."""
    try:
        return _profit(channel, token) == 7.0
    except grpc.RpcError as err:
        if err.code() != UNAUTHENTICATED:
            raise
        return False


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
        v2_stream = v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
        assert _code(lambda: list(v2_stream(iter([_v2_request()]), timeout=10)))[0] == UNAUTHENTICATED
        wrong = [("authorization", "Bearer wrong")]
        assert _code(lambda: list(v2_stream(iter([_v2_request()]), timeout=10, metadata=wrong))) == (
            UNAUTHENTICATED,
            "invalid bearer token",
        )
        # Two authorization entries, even if one is valid: which one counts would be a guess.
        two = [("authorization", f"Bearer {ENV_TOKEN}"), ("authorization", "Bearer wrong")]
        stub = pb_grpc.ModelServiceStub(channel)
        duplicate = lambda: stub.PredictProfit(pb.PredictProfitRequest(population=[3]), timeout=10, metadata=two)  # noqa: E731
        assert _code(duplicate) == (UNAUTHENTICATED, "more than one authorization metadata entry")
        meta = v2_grpc.GRPCInferenceServiceStub(channel).ServerLive
        assert _code(lambda: meta(v2.ServerLiveRequest(), timeout=10))[0] == UNAUTHENTICATED

        assert _profit(channel, ENV_TOKEN) == 7.0
        assert _profit(channel, FILE_TOKEN) == 7.0
        assert _profit(channel, header=f"bearer {FILE_TOKEN}") == 7.0  # the scheme is case-insensitive
        assert _v2_profit(channel, ENV_TOKEN) == 7.0
        good = [("authorization", f"Bearer {FILE_TOKEN}")]
        answer = next(v2_stream(iter([_v2_request()]), timeout=10, metadata=good))
        assert answer.error_message == "" and np.frombuffer(answer.infer_response.raw_output_contents[0], "<f4")[0] == 7
        with ServingClient(proc.address, token=FILE_TOKEN, insecure_token=True) as client:
            assert client.predict_profit([3]).tolist() == [7.0]

        # Rotation: a new file replaces the old tokens within about a second, no restart.
        new = tmp_path / "tokens.new"
        new.write_text("rotated-token\n")
        new.replace(token_file)
        wait_for(lambda: _accepted(channel, "rotated-token"), "the rotated token accepted", server=proc)
        assert _code(lambda: _profit(channel, FILE_TOKEN))[0] == UNAUTHENTICATED
        assert _profit(channel, ENV_TOKEN) == 7.0  # tokens from the settings stay

        # An emptied file fails closed: its tokens stop working (those from the settings stay).
        token_file.write_text("\n# nothing\n")
        wait_for(lambda: not _accepted(channel, "rotated-token"), "the emptied file's token refused", server=proc)
        assert _profit(channel, ENV_TOKEN) == 7.0
    log = proc.log()
    assert '"call refused: UNAUTHENTICATED"' in log and '"auth token file reloaded"' in log
    assert log.count('"auth token file unusable: its tokens are refused until it is fixed"') == 1
    assert ENV_TOKEN not in log and FILE_TOKEN not in log and "rotated-token" not in log


def test_a_token_file_deleted_at_run_time(tmp_path: Path) -> None:
    """Fail closed: the file's tokens are refused once it is gone (checked at most once a second),
    one ERROR line says so however many calls come in meanwhile (it was once logged every
    second), and the tokens work again once the file is back."""
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{FILE_TOKEN}\n")
    args = ["--model-repository", str(_repo(tmp_path)), "--auth-token-file", str(token_file)]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel:
        assert _profit(channel, FILE_TOKEN) == 7.0
        token_file.unlink()

        def refused() -> bool:
            return not _accepted(channel, FILE_TOKEN)

        wait_for(refused, "the deleted file's token refused", server=proc)
        (unusable,) = proc.wait_log("auth token file unusable: its tokens are refused until it is fixed")
        assert unusable["level"] == "ERROR" and "No such file or directory" in unusable["error"]
        assert all(refused() for _ in range(20))  # more calls, more rechecks of the missing file...
        token_file.write_text(f"{FILE_TOKEN}\n")  # ...then it is back
        wait_for(lambda: not refused(), "the restored file's token accepted", server=proc)
        proc.wait_log("auth token file reloaded")
    assert len(proc.log_lines("auth token file unusable: its tokens are refused until it is fixed")) == 1
    assert FILE_TOKEN not in proc.log()


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
        with grpc.insecure_channel(proc.address) as plain:
            code, _ = _code(lambda: _profit(plain, "s3cret-token"))
        assert code == grpc.StatusCode.UNAVAILABLE  # fails cleanly: a hang would be DEADLINE_EXCEEDED
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


# -- the concurrency limits -------------------------------------------------------------------------
#
# A model whose batches gather for 60 s ("held") keeps a call running for as long as the test
# wants, whatever the machine's speed: the queue-depth gauge says when it is in, and cancelling
# the call frees its place. "profit" answers at once.


def _limits_repo(tmp_path: Path) -> list[str]:
    repo = tmp_path / "models"
    for name in ("held", "profit"):
        save(linear(1, [2.0], 1.0, "population", "profit"), repo, name)
    labels = json.dumps([f"class{i}" for i in range(10)])
    save(image_classifier(0), repo, "fashion_softmax", class_names=labels)
    batching = json.dumps({"held": {"max_queue_delay_us": 60_000_000}})
    return ["--model-repository", str(repo), "--batching", batching]


@contextlib.contextmanager
def _held_call(proc: ServerProcess, channel: grpc.Channel, count: int = 1) -> Iterator[list[grpc.Future]]:
    """``count`` calls to "held", in the server and queued (each holds a place) until the block ends."""
    stub = pb_grpc.ModelServiceStub(channel)
    request = pb.PredictProfitRequest(model=pb.ModelRef(name="held"), population=[1.0])
    futures = [stub.PredictProfit.future(request, timeout=300) for _ in range(count)]
    try:
        wait_for(
            lambda: proc.metric("serving_queue_depth", model="held", version="1") == count, "held calls", server=proc
        )
        yield futures
    finally:
        for future in futures:
            future.cancel()


def _classify_request() -> pb.ClassifyRequest:
    images = np.zeros((1, 1, 28, 28), np.uint8)
    return pb.ClassifyRequest(
        model=pb.ModelRef(name="fashion_softmax"),
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, data=images.tobytes()),
    )


def _v2_request() -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name="profit",
        inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
        raw_input_contents=[np.float32(3).tobytes()],
    )


class _Stream:
    """A client stream the test feeds message by message (typed ClassifyStream or V2 ModelStreamInfer)."""

    def __init__(self, channel: grpc.Channel, kind: str, metadata: list[tuple[str, str]] | None = None) -> None:
        self._queue: queue.Queue[object] = queue.Queue()
        requests = iter(self._queue.get, None)
        if kind == "typed":
            self.message: object = _classify_request()
            self.responses = pb_grpc.ModelServiceStub(channel).ClassifyStream(requests, timeout=120, metadata=metadata)
        else:
            self.message = _v2_request()
            self.responses = v2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                requests, timeout=120, metadata=metadata
            )

    def ask(self) -> object:
        """Send one message, return its answer (raises the stream's error)."""
        self._queue.put(self.message)
        return next(self.responses)

    def close(self) -> None:
        self._queue.put(None)


@pytest.fixture
def streams() -> Iterator[list[_Stream]]:
    opened: list[_Stream] = []
    yield opened
    for stream in opened:
        stream.close()


def test_calls_over_max_concurrent_requests_are_refused_on_both_protocols(tmp_path: Path) -> None:
    args = _limits_repo(tmp_path)
    with start_server(tmp_path, *args, "--max-concurrent-requests", "2", metrics=True) as proc:
        with proc.channel() as channel, _held_call(proc, channel, 2) as held:
            assert proc.health() == SERVING  # health checks are never counted nor refused
            code, details = _code(lambda: _profit(channel))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "2 calls in progress, its max_concurrent_requests limit" in details
            assert _code(lambda: _v2_profit(channel))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert not any(f.done() for f in held)  # the admitted ones still wait their turn
        with proc.channel() as channel:  # their places are free again
            wait_for(lambda: proc.metric("serving_queue_depth", model="held", version="1") == 0, "cancelled")
            assert _profit(channel) == 7.0 and _v2_profit(channel) == 7.0


@pytest.mark.parametrize("kind", ["typed", "v2"])
def test_an_idle_stream_takes_no_place_but_each_message_takes_one(
    tmp_path: Path, kind: str, streams: list[_Stream]
) -> None:
    """max_concurrent_requests 1: an open stream waiting for its next message leaves the one place
    to other callers; a message that arrives while the place is taken ends its stream with
    RESOURCE_EXHAUSTED."""
    args = _limits_repo(tmp_path)
    with start_server(tmp_path, *args, "--max-concurrent-requests", "1", metrics=True) as proc:
        with proc.channel() as channel:
            idle = _Stream(channel, kind)
            streams.append(idle)
            assert idle.ask() is not None  # answered; now idle
            assert _profit(channel) == 7.0  # the idle stream held nothing
            with _held_call(proc, channel):
                code, details = _code(idle.ask)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "max_concurrent_requests" in details


@pytest.mark.parametrize("kind", ["typed", "v2"])
def test_streams_over_max_inference_streams_are_refused(tmp_path: Path, kind: str, streams: list[_Stream]) -> None:
    args = _limits_repo(tmp_path)
    with start_server(tmp_path, *args, "--max-inference-streams", "1") as proc, proc.channel() as channel:
        first = _Stream(channel, kind)
        streams.append(first)
        assert first.ask() is not None  # open (and idle)
        second = _Stream(channel, "v2" if kind == "typed" else "typed")  # the cap is for both kinds
        streams.append(second)
        code, details = _code(second.ask)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "too many inference streams: 1 open, the max_inference_streams limit" in details
        assert _profit(channel) == 7.0  # unary calls are not streams
        first.close()
        wait_for(lambda: _stream_answers(channel, kind), "the closed stream's place back", server=proc)


def _stream_answers(channel: grpc.Channel, kind: str) -> bool:
    stream = _Stream(channel, kind)
    try:
        stream.ask()
        return True
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        return False
    finally:
        stream.close()


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
