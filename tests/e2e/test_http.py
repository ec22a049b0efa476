"""The Open Inference Protocol over HTTP/REST, through real servers and real clients: Triton's
tritonclient.http (sync and aio, binary and JSON), KServe's InferenceRESTClient, curl, and raw
sockets for what no client would send. REST answers equal gRPC answers bit for bit."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_aio
from fixtures.metrics import sample
from fixtures.onnx_models import linear, save, slow
from fixtures.providers import ACCURACY_SLACK, assert_same_answers
from fixtures.servers import MODELS, ServerProcess, scrape, start_server

CARDS = {
    name: json.loads((MODELS / name / "1" / "card.json").read_text()) for name in ("fashion_softmax", "fashion_cnn")
}


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def rest(server: ServerProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=60)


def raw(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def error(status_headers_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = status_headers_body
    assert headers["content-type"] == "application/json", (status, body)
    return status, json.loads(body)["error"]


def infer_body(model: str = "profit", data: object = None, **input_fields: object) -> bytes:
    tensor = {"name": "population", "datatype": "FP32", "shape": [1, 1], "data": [35000.0] if data is None else data}
    tensor.update(input_fields)
    return json.dumps({"inputs": [tensor]}).encode()


# -- real clients ---------------------------------------------------------------------------------


def test_triton_http_client_binary_and_json_match_grpc_bit_for_bit(server: ServerProcess) -> None:
    x = images(8)
    grpc_client = triton_grpc.InferenceServerClient(server.address)
    tensor = triton_grpc.InferInput("image", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    client = rest(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("fashion_cnn") and not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    for model in ("fashion_softmax", "fashion_cnn"):
        expected = grpc_client.infer(model, [tensor]).as_numpy("probabilities")
        for binary_in in (True, False):
            for binary_out in (True, False):
                inp = triton_http.InferInput("image", list(x.shape), "UINT8")
                inp.set_data_from_numpy(x, binary_data=binary_in)
                out = triton_http.InferRequestedOutput("probabilities", binary_data=binary_out)
                got = client.infer(model, [inp], outputs=[out], request_id="r1")
                assert got.get_response()["id"] == "r1" and got.get_response()["model_version"] == "1"
                np.testing.assert_array_equal(got.as_numpy("probabilities"), expected)  # bit for bit
    metadata = client.get_model_metadata("fashion_softmax")
    assert metadata["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    config = client.get_model_config("profit")
    assert config["input"][0]["dims"] == [1] and config["max_batch_size"] >= 1
    assert {"name": "profit", "version": "1", "state": "READY", "reason": ""} in client.get_model_repository_index()


def test_triton_http_compression_both_ways(server: ServerProcess) -> None:
    x = images(4, seed=3)
    client = rest(server)
    inp = triton_http.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    plain = client.infer("fashion_softmax", [inp]).as_numpy("probabilities")
    for algorithm in ("gzip", "deflate"):
        got = client.infer(
            "fashion_softmax", [inp], request_compression_algorithm=algorithm, response_compression_algorithm=algorithm
        ).as_numpy("probabilities")
        np.testing.assert_array_equal(got, plain)


def test_triton_http_aio_concurrent(server: ServerProcess) -> None:
    batches = [images(n, seed=n) for n in (1, 3, 7, 16)]
    expected = [rest(server).infer("fashion_cnn", [_input(x)]).as_numpy("probabilities") for x in batches]

    async def run() -> list[np.ndarray]:
        client = triton_aio.InferenceServerClient(f"127.0.0.1:{server.http_port}")
        try:
            assert await client.is_server_ready()
            results = await asyncio.gather(*(client.infer("fashion_cnn", [_aio_input(x)]) for x in batches * 4))
            return [r.as_numpy("probabilities") for r in results]
        finally:
            await client.close()

    for got, want in zip(asyncio.run(run()), expected * 4):
        np.testing.assert_array_equal(got, want)


def _input(x: np.ndarray) -> triton_http.InferInput:
    tensor = triton_http.InferInput("image", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    return tensor


def _aio_input(x: np.ndarray) -> triton_aio.InferInput:
    tensor = triton_aio.InferInput("image", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)
    return tensor


KSERVE_CLIENT = """
import asyncio, json, sys
import numpy as np
from kserve import InferInput, InferRequest, InferenceRESTClient, RESTConfig

async def main(base, images):
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        tensor = InferInput("image", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        response = await client.infer(base, InferRequest("fashion_softmax", [tensor]), model_name="fashion_softmax")
        return {"ready": await client.is_server_ready(base),
                "model_ready": await client.is_model_ready(base, "fashion_softmax"),
                "unknown_ready": await client.is_model_ready(base, "nope"),
                "probabilities": response.outputs[0].as_numpy().tolist()}
    finally:
        await client.close()

images = np.asarray(json.loads(sys.argv[2]), dtype=np.uint8)
print(json.dumps(asyncio.run(main(sys.argv[1], images))))
"""


def test_kserve_rest_client(server: ServerProcess) -> None:
    """KServe's SDK in a process of its own (its generated protos and tritonclient's both claim the
    'inference' package in protobuf's default pool, so they cannot share one)."""
    x = images(2, seed=5)
    out = subprocess.run(
        [sys.executable, "-c", KSERVE_CLIENT, f"http://127.0.0.1:{server.http_port}", json.dumps(x.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["ready"] and result["model_ready"] and not result["unknown_ready"]
    expected = rest(server).infer("fashion_softmax", [_input(x)]).as_numpy("probabilities")
    np.testing.assert_array_equal(np.asarray(result["probabilities"], np.float32).reshape(expected.shape), expected)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server: ServerProcess) -> None:
    base = f"http://127.0.0.1:{server.http_port}"

    def curl(*args: str) -> tuple[int, dict]:
        out = subprocess.run(
            ["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        body, _, code = out.rpartition("\n")
        return int(code), json.loads(body)

    assert curl(f"{base}/v2/health/live") == (200, {"live": True})
    code, answer = curl(
        "-X",
        "POST",
        f"{base}/v2/models/profit/infer",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps({"inputs": [{"name": "population", "datatype": "FP32", "shape": [2, 1], "data": [35000, 70000]}]}),
    )
    assert code == 200 and answer["outputs"][0]["shape"] == [2, 1]
    a, b = 1.19303364, -3.89578088  # the closed-form fit in the card's units: 10,000 people → $10,000
    assert answer["outputs"][0]["data"] == pytest.approx([(a * 3.5 + b) * 1e4, (a * 7.0 + b) * 1e4], abs=1.0)
    assert curl(f"{base}/v2/models/nope")[0] == 404


def test_ten_thousand_images_give_the_card_accuracy_and_grpc_answers(server: ServerProcess, fashion_test_set) -> None:
    x, labels = fashion_test_set
    client = rest(server)
    grpc_client = triton_grpc.InferenceServerClient(server.address)
    for model, card in CARDS.items():
        parts = []
        for start in range(0, len(x), 1000):
            parts.append(client.infer(model, [_input(x[start : start + 1000])]).as_numpy("probabilities"))
        probabilities = np.concatenate(parts)
        accuracy = float((probabilities.argmax(axis=1) == labels).mean())
        # The card's accuracy was measured on the CPU; the server runs on --provider auto.
        assert accuracy == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-4 + ACCURACY_SLACK), model
        tensor = triton_grpc.InferInput("image", [500, 1, 28, 28], "UINT8")
        tensor.set_data_from_numpy(x[:500])
        assert_same_answers(grpc_client.infer(model, [tensor]).as_numpy("probabilities"), probabilities[:500])


# -- malformed requests ---------------------------------------------------------------------------

BAD: dict[str, tuple[str, str, bytes, dict[str, str], int, str]] = {
    "not JSON": ("POST", "/v2/models/profit/infer", b"{nope", {}, 400, "not valid JSON"),
    "JSON array": ("POST", "/v2/models/profit/infer", b"[1]", {}, 400, "must be a JSON object"),
    "no inputs": ("POST", "/v2/models/profit/infer", b"{}", {}, 400, "needs 'inputs'"),
    "empty inputs": (
        "POST",
        "/v2/models/profit/infer",
        b'{"inputs": []}',
        {},
        400,
        "expects inputs ['population'], got []",
    ),
    "unknown input": ("POST", "/v2/models/profit/infer", infer_body(name="pop"), {}, 400, "has no input 'pop'"),
    "duplicate input": (
        "POST",
        "/v2/models/profit/infer",
        json.dumps({"inputs": [json.loads(infer_body())["inputs"][0]] * 2}).encode(),
        {},
        400,
        "appears more than once",
    ),
    "wrong datatype": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(datatype="FP64"),
        {},
        400,
        "has datatype FP32, got FP64",
    ),
    "unknown datatype": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(datatype="BF16"),
        {},
        400,
        "has datatype FP32, got BF16",
    ),
    "datatype not a string": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(datatype=7),
        {},
        400,
        "datatype must be a string",
    ),
    "wrong shape": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(shape=[1, 2], data=[1, 2]),
        {},
        400,
        "expects shape [N, 1], got [1, 2]",
    ),
    "negative dimension": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(shape=[-1, 1]),
        {},
        400,
        "dimensions must be >= 0",
    ),
    "shape of strings": ("POST", "/v2/models/profit/infer", infer_body(shape=["1", "1"]), {}, 400, "list of integers"),
    "data count off": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(shape=[2, 1], data=[1.0]),
        {},
        400,
        "has 1 values, but shape [2, 1] needs 2",
    ),
    "data of strings": ("POST", "/v2/models/profit/infer", infer_body(data=["a"]), {}, 400, "must be numbers"),
    "ragged data": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(shape=[2, 1], data=[[1.0], [2.0, 3.0]]),
        {},
        400,
        "not a regular",
    ),
    "NaN literal": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(data=[float("nan")]),
        {},
        400,
        "not valid JSON",
    ),
    "overflows FP32": ("POST", "/v2/models/profit/infer", infer_body(data=[1e39]), {}, 400, "finite numbers"),
    "empty batch": ("POST", "/v2/models/profit/infer", infer_body(shape=[0, 1], data=[]), {}, 400, "empty batch"),
    "unknown output": (
        "POST",
        "/v2/models/profit/infer",
        json.dumps({**json.loads(infer_body()), "outputs": [{"name": "nope"}]}).encode(),
        {},
        400,
        "got a request for ['nope']",
    ),
    "missing data": (
        "POST",
        "/v2/models/profit/infer",
        json.dumps({"inputs": [{"name": "population", "datatype": "FP32", "shape": [1, 1]}]}).encode(),
        {},
        400,
        "neither data nor a binary_data_size",
    ),
    "header length past the body": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(),
        {"Inference-Header-Content-Length": "9999"},
        400,
        "longer than the",
    ),
    "header length not a number": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(),
        {"Inference-Header-Content-Length": "x"},
        400,
        "non-negative integer",
    ),
    "binary size past the body": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(data=None, parameters={"binary_data_size": 400}),
        {},
        400,
        "both data and binary_data_size",
    ),
    "bytes after the JSON": (
        "POST",
        "/v2/models/profit/infer",
        infer_body() + b"junk",
        {"Inference-Header-Content-Length": str(len(infer_body()))},
        400,
        "4 bytes after the JSON",
    ),
    "wrong content type": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(),
        {"Content-Type": "text/xml"},
        415,
        "not accepted",
    ),
    "unknown encoding": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(),
        {"Content-Encoding": "br"},
        415,
        "not supported",
    ),
    "not gzip": (
        "POST",
        "/v2/models/profit/infer",
        infer_body(),
        {"Content-Encoding": "gzip"},
        400,
        "cannot be decompressed",
    ),
    "unknown model": ("POST", "/v2/models/nope/infer", infer_body(), {}, 404, "model 'nope' not found"),
    "unknown version": (
        "POST",
        "/v2/models/profit/versions/9/infer",
        infer_body(),
        {},
        404,
        "version 9 of model 'profit' not found",
    ),
    "version not a number": ("GET", "/v2/models/profit/versions/x", b"", {}, 400, "must be an integer"),
    "unknown path": ("GET", "/v2/nothing", b"", {}, 404, "no endpoint"),
    "wrong method": ("GET", "/v2/models/profit/infer", b"", {}, 405, "use POST"),
    "shared memory": (
        "POST",
        "/v2/models/profit/infer",
        json.dumps({**json.loads(infer_body()), "parameters": {"shared_memory_region": "r"}}).encode(),
        {},
        400,
        "shared memory is not supported",
    ),
    "model control off": ("POST", "/v2/repository/models/profit/unload", b"", {}, 409, "model control is off"),
    "index body not an object": ("POST", "/v2/repository/index", b"[]", {}, 400, "must be a JSON object"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_malformed_request(server: ServerProcess, name: str) -> None:
    method, path, body, headers, status, message = BAD[name]
    headers = {"Content-Type": "application/json", **headers}
    got = error(raw(server, method, path, body, headers))
    assert got[0] == status and message in got[1], got


def test_body_limits(server: ServerProcess) -> None:
    """413 before reading a body announced too large, for chunked bodies past the limit, and for a
    gzip body that inflates past it; then the server still answers."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:  # announced, never sent
        sock.sendall(
            b"POST /v2/models/profit/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8388608\r\n\r\n"
        )
        answer = _read_all(sock)
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower(), answer[:300]
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /v2/models/profit/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
        )
        chunk = b"1" * 65536
        answer = b""
        try:
            for _ in range(200):  # 12.8 MB, far over what a profit request can need
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MB of spaces in ~64 KB
    status, message = error(
        raw(
            server,
            "POST",
            "/v2/models/profit/infer",
            bomb,
            {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    )
    assert status == 413 and "decompressed body" in message
    assert raw(server, "GET", "/v2/health/ready")[0] == 200


def test_metrics_count_http_requests(tmp_path: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(MODELS), metrics=True) as proc:
        client = rest(proc)
        for _ in range(3):
            client.infer("fashion_softmax", [_input(images(2))])
        assert (
            raw(proc, "POST", "/v2/models/fashion_softmax/infer", b"{}", {"Content-Type": "application/json"})[0] == 400
        )
        samples = scrape(proc.metrics_port)
        labels = {"protocol": "http", "model": "fashion_softmax", "version": "1"}
        assert sample(samples, "serving_requests_total", code="200", **labels) == 3
        assert sample(samples, "serving_requests_total", code="400", **labels) == 1
        assert sample(samples, "serving_request_duration_seconds_count", **labels) == 4


def test_request_log_lines(tmp_path: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(MODELS), "--log-level", "debug") as proc:
        rest(proc).infer("profit", [_profit_input()], request_id="abc")
        assert raw(proc, "GET", "/v2/models/nope")[0] == 404
    lines = [json.loads(line) for line in proc.log().splitlines() if '"msg": "request"' in line]
    ok = [r for r in lines if r.get("request_id") == "abc"]
    assert ok and ok[0]["method"] == "POST /v2/models/profit/infer" and ok[0]["code"] == "200" and ok[0]["batch"] == 1
    assert any(r["code"] == "404" and r["method"] == "GET /v2/models/nope" for r in lines)


def _profit_input(value: float = 35000.0) -> triton_http.InferInput:
    tensor = triton_http.InferInput("population", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[value]], np.float32))
    return tensor


def test_openapi_document_is_valid(server: ServerProcess) -> None:
    from openapi_spec_validator import validate

    _status, _headers, body = raw(server, "GET", "/v2/openapi.json")
    document = json.loads(body)
    validate(document)
    assert {"/v2/health/ready", "/v2/models/{model}/infer", "/v2/repository/index"} <= set(document["paths"])


# -- auth, limits, timeouts, drain --------------------------------------------------------------


def test_bearer_tokens(tmp_path: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(MODELS), "--auth-tokens", "s3cr3t") as proc:
        assert raw(proc, "GET", "/v2/health/ready")[0] == 200  # probes need no token
        assert raw(proc, "GET", "/v2/openapi.json")[0] == 200
        status, headers, body = raw(proc, "GET", "/v2/models/profit")
        assert status == 401 and headers["www-authenticate"].startswith("Bearer") and b"missing" in body
        assert error(raw(proc, "GET", "/v2/models/profit", headers={"Authorization": "Bearer nope"})) == (
            401,
            "invalid bearer token",
        )
        assert error(raw(proc, "GET", "/v2/models/profit", headers={"Authorization": "Basic czNjcjN0"}))[0] == 401
        assert raw(proc, "GET", "/v2/models/profit", headers={"Authorization": "Bearer s3cr3t"})[0] == 200
        client = triton_http.InferenceServerClient(f"127.0.0.1:{proc.http_port}")
        result = client.infer("profit", [_profit_input()], headers={"Authorization": "Bearer s3cr3t"})
        assert result.as_numpy("profit").shape == (1, 1)
    assert "s3cr3t" not in proc.log()


def test_busy_server_answers_429(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    save(slow(), repo, "slow")
    args = [
        "--model-repository",
        str(repo),
        "--max-concurrent-requests",
        "1",
        "--provider",
        "cpu",
        "--max-request-rows",
        "20000",
    ]
    with start_server(tmp_path, *args, metrics=True) as proc:
        heavy = json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [20000, 1], "data": [0.5] * 20000}]}
        ).encode()
        result: list[int] = []
        thread = threading.Thread(
            target=lambda: result.append(
                raw(proc, "POST", "/v2/models/slow/infer", heavy, {"Content-Type": "application/json"}, timeout=120)[0]
            )
        )
        thread.start()
        _wait_in_flight(proc, "slow", result)
        status, headers, body = raw(proc, "GET", "/v2/models/slow")
        assert raw(proc, "GET", "/v2/health/ready")[0] == 200  # health is never refused
        thread.join(120)
        assert status == 429 and headers["retry-after"] == "1" and b"max_concurrent_requests" in body
        assert result == [200]


def test_slow_clients_get_408(tmp_path: Path) -> None:
    args = [
        "--model-repository",
        str(MODELS),
        "--http-header-timeout-seconds",
        "0.5",
        "--http-body-timeout-seconds",
        "0.5",
    ]
    with start_server(tmp_path, *args) as proc:
        with socket.create_connection(("127.0.0.1", proc.http_port), timeout=30) as sock:  # slowloris
            sock.sendall(b"POST /v2/models/profit/infer HTTP/1.1\r\nHost: x\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 408")
        with socket.create_connection(("127.0.0.1", proc.http_port), timeout=30) as sock:  # idle, never sends
            assert _read_all(sock).startswith(b"HTTP/1.1 408")
        with socket.create_connection(("127.0.0.1", proc.http_port), timeout=30) as sock:  # body never completes
            sock.sendall(
                b"POST /v2/models/profit/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            answer = _read_all(sock)
            assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.5 s" in answer
        with socket.create_connection(("127.0.0.1", proc.http_port), timeout=30) as sock:  # headers too large
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
            assert _read_all(sock).startswith(b"HTTP/1.1 431")
        assert raw(proc, "GET", "/v2/health/ready")[0] == 200


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_tls(tmp_path: Path) -> None:
    from fixtures.tls import tls_files

    files = tls_files(tmp_path)
    args = [
        "--model-repository",
        str(MODELS),
        "--tls-cert",
        str(files["server.crt"]),
        "--tls-key",
        str(files["server.key"]),
    ]
    import grpc

    credentials = grpc.ssl_channel_credentials(files["ca.crt"].read_bytes())
    with start_server(tmp_path, *args, credentials=credentials) as proc:
        context = ssl.create_default_context(cafile=str(files["ca.crt"]))
        connection = http.client.HTTPSConnection("127.0.0.1", proc.http_port, context=context, timeout=30)
        connection.request("GET", "/v2/health/ready")
        assert connection.getresponse().status == 200
        connection.close()
        with socket.create_connection(("127.0.0.1", proc.http_port), timeout=10) as sock:  # plaintext to TLS
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not _read_all(sock).startswith(b"HTTP/1.1 200")


def test_http_can_be_turned_off(tmp_path: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(MODELS), http=False) as proc:
        assert proc.http_port is None and '"http_port": null' in proc.log()


def _in_flight(proc: ServerProcess, model: str) -> bool:
    samples = scrape(proc.metrics_port)
    labels = {"model": model, "version": "1"}
    return sample(samples, "serving_batches_in_flight", **labels) + sample(samples, "serving_queue_depth", **labels) > 0


def _wait_in_flight(proc: ServerProcess, model: str, done: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not _in_flight(proc, model):
        assert not done, "the slow request finished before it was seen running"
        assert time.monotonic() < deadline, "the slow request never started"
        time.sleep(0.01)


def test_sigterm_drains_http(tmp_path: Path) -> None:
    """In-flight REST requests finish; once draining, new ones get 503 with Connection: close."""
    repo = tmp_path / "models"
    save(slow(), repo, "slow")
    save(linear(1, [2.0], 1.0, "population", "profit"), repo, "profit")
    args = [
        "--model-repository",
        str(repo),
        "--provider",
        "cpu",
        "--max-request-rows",
        "20000",
        "--shutdown-grace-seconds",
        "60",
    ]
    with start_server(tmp_path, *args, metrics=True) as proc:
        heavy = json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [20000, 1], "data": [0.5] * 20000}]}
        ).encode()
        result: list[int] = []
        thread = threading.Thread(
            target=lambda: result.append(
                raw(proc, "POST", "/v2/models/slow/infer", heavy, {"Content-Type": "application/json"}, timeout=120)[0]
            )
        )
        connection = http.client.HTTPConnection("127.0.0.1", proc.http_port, timeout=30)
        connection.request("GET", "/v2/health/live")
        connection.getresponse().read()  # a keep-alive connection opened before the signal
        thread.start()
        _wait_in_flight(proc, "slow", result)
        proc.process.send_signal(signal.SIGTERM)
        refused = None
        deadline = time.monotonic() + 60
        while refused is None and time.monotonic() < deadline:
            connection.request(
                "POST",
                "/v2/models/profit/infer",
                body=infer_body(data=[1.0]),
                headers={"Content-Type": "application/json"},
            )
            response = connection.getresponse()
            response.read()
            if response.status == 503:
                refused = response
            else:
                assert response.status == 200
        thread.join(120)
        assert refused is not None and refused.getheader("connection") == "close"
        assert result == [200]  # the request in flight at the signal finished
        assert proc.process.wait(60) == 0
