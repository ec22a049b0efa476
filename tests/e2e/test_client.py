"""service.client against the real server (``server`` subprocess): numpy in, numpy out; errors
carry the gRPC status; a client certificate and a token over mutual TLS; the container health
probe's exit status. (Retries, deadlines and the stream window against an in-process fake:
tests/unit/test_client.py; retries across a draining replica: tests/e2e/test_deploy_commands.py.)"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.onnx_models import linear, save
from fixtures.servers import ServerProcess, closed_port, start_server
from fixtures.tls import tls_files

from service import healthcheck
from service.client import (
    NO_RETRY,
    Classification,
    InvalidArgumentError,
    NotFoundError,
    RpcError,
    ServingClient,
    UnavailableError,
    as_images,
    connect,
)

rng = np.random.default_rng(6)
IMAGES = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)


# -- against the real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(server: ServerProcess):
    with connect(server.address, timeout=20) as c:
        yield c


def test_classify_numpy_in_numpy_out(client: ServingClient) -> None:
    result = client.classify(IMAGES)
    assert isinstance(result, Classification) and len(result) == 10
    assert result.probabilities.dtype == np.float32 and result.probabilities.shape == (10, 10)
    assert result.class_index.dtype == np.int64
    np.testing.assert_array_equal(result.class_index, result.probabilities.argmax(axis=1))
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-5)
    names = client.metadata(result.model).class_names
    assert result.labels == [names[i] for i in result.class_index]
    assert (result.model, result.version) == ("fashion_softmax", 1)
    # [N, 1, 28, 28], float32 0-1 pixels, and batches split client-side all agree.
    same = client.classify(IMAGES[:, None], batch_size=3)
    np.testing.assert_array_equal(same.probabilities, result.probabilities)
    floats = client.classify(IMAGES.astype(np.float32) / 255)
    np.testing.assert_array_equal(floats.class_index, result.class_index)
    one = client.classify(IMAGES[4])
    np.testing.assert_array_equal(one.probabilities[0], result.probabilities[4])


def test_classify_stream_matches_unary(client: ServingClient) -> None:
    whole = client.classify(IMAGES)
    parts = list(client.classify_stream((IMAGES[i : i + 3] for i in range(0, 10, 3)), max_in_flight=2))
    assert [len(p) for p in parts] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate([p.probabilities for p in parts]), whole.probabilities)


def test_regression_and_metadata(client: ServingClient) -> None:
    profit = client.predict_profit([35_000, 70_000])
    assert profit.dtype == np.float32
    np.testing.assert_allclose(profit, [2798.37, 44554.55], atol=1.0)
    np.testing.assert_allclose(client.predict_house_price([[1650, 3]]), [293081.46], atol=1.0)
    info = client.metadata("fashion_softmax")
    assert info.inputs[0].dtype == "uint8" and info.inputs[0].shape == (-1, 1, 28, 28)
    assert len(info.class_names) == 10 and info.max_batch_size >= 1
    models, failed = client.list_models()
    assert {"fashion_softmax", "profit"} <= {m.name for m in models} and failed == {}
    assert client.health() == "SERVING" and client.health("profit") == "SERVING"


def test_errors_carry_the_grpc_status(client: ServingClient) -> None:
    with pytest.raises(InvalidArgumentError) as bad_shape:
        client.classify(np.zeros((2, 5, 5), np.uint8))
    err = bad_shape.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.method == "Classify" and err.attempts == 1
    assert "expects shape [N, 1, 28, 28], got [2, 1, 5, 5]" in err.details and "INVALID_ARGUMENT" in str(err)
    with pytest.raises(NotFoundError, match="not found"):
        client.classify(IMAGES, model="no_such_model")
    with pytest.raises(NotFoundError, match="no health status"):
        client.health("no_such_model")
    with pytest.raises(TypeError, match="uint8"):
        as_images(np.zeros((1, 28, 28), np.int32))


# -- the container health probe --------------------------------------------------------------------


def test_healthcheck_exit_status(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--address", server.address]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert healthcheck.main(["--address", server.address, "--service", "fashion_softmax"]) == 0
    assert healthcheck.main(["--address", server.address, "--service", "no_such_model"]) == 1
    with closed_port() as port:  # nobody listens there
        assert healthcheck.main(["--address", f"127.0.0.1:{port}", "--timeout", "1"]) == 1
    assert "unhealthy" in capsys.readouterr().out


def test_client_certificate_and_token_against_the_real_server(tmp_path: Path) -> None:
    """Mutual TLS plus a bearer token, as connect() sets them up: the server's CA, the client's
    certificate and key, the token. Without the certificate the handshake fails (UNAVAILABLE, not
    retried into a hang); with a wrong token the call is UNAUTHENTICATED."""
    files = tls_files(tmp_path)
    repo = tmp_path / "models"
    save(linear(1, [2.0], 1.0, "population", "profit"), repo, "profit")
    args = ["--model-repository", str(repo), "--auth-tokens", "client-token"]
    args += ["--tls-cert", str(files["server.crt"]), "--tls-key", str(files["server.key"])]
    args += ["--tls-client-ca", str(files["ca.crt"])]
    mtls = {
        "root_certificates": files["ca.crt"],
        "certificate_chain": files["client.crt"],
        "private_key": files["client.key"],
    }
    probe = grpc.ssl_channel_credentials(*(files[k].read_bytes() for k in ("ca.crt", "client.key", "client.crt")))
    with start_server(tmp_path, *args, credentials=probe) as proc:
        with connect(proc.address, token="client-token", timeout=20, **mtls) as client:
            np.testing.assert_array_equal(client.predict_profit([3.0, 4.0]), [7.0, 9.0])
            assert client.health() == "SERVING"
        with connect(proc.address, token="wrong", timeout=20, **mtls) as client:
            with pytest.raises(RpcError) as wrong:
                client.predict_profit([3.0])
        assert wrong.value.code == grpc.StatusCode.UNAUTHENTICATED
        without = {"root_certificates": files["ca.crt"]}
        with connect(proc.address, token="client-token", timeout=20, retry=NO_RETRY, **without) as client:
            with pytest.raises(UnavailableError):
                client.predict_profit([3.0])
        assert proc.health() == 1  # SERVING: the refused handshake did not hurt it
