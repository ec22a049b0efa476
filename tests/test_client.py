"""service.client: numpy in/out against the real server; retries, deadlines, errors, TLS and token
against an in-process fake (tests/fake_serving.py); the container health probe."""
from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from conftest import ServerProcess, free_port
from fake_serving import CLASSES, FakeModelService, fake_probabilities, fake_server, tls_files
from service import healthcheck
from service.client import (
    NO_RETRY,
    Classification,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    RpcError,
    ServingClient,
    UnavailableError,
    as_images,
    connect,
)

FAST_RETRY = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)
rng = np.random.default_rng(6)
IMAGES = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)


@pytest.fixture
def fake() -> FakeModelService:
    return FakeModelService()


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


def test_unreachable_server_fails_with_unavailable_within_the_deadline() -> None:
    started = time.monotonic()
    with connect(f"127.0.0.1:{free_port()}", timeout=2.0, retry=FAST_RETRY) as c:
        with pytest.raises(UnavailableError) as info:
            c.predict_profit([1.0])
    assert info.value.attempts == 4 and time.monotonic() - started < 2.0


# -- retries, deadlines, metadata (fake server) ----------------------------------------------------


def test_unavailable_is_retried_then_succeeds(fake: FakeModelService) -> None:
    fake.fail["Classify"] = 2
    with fake_server(fake) as address, connect(address, retry=FAST_RETRY) as c:
        result = c.classify(IMAGES, model="fake_classifier")
    assert fake.calls["Classify"] == 3
    np.testing.assert_array_equal(result.probabilities, fake_probabilities(IMAGES))
    assert result.labels == [CLASSES[i] for i in result.class_index]


def test_retries_give_up_and_say_how_often(fake: FakeModelService) -> None:
    fake.fail["PredictProfit"] = 100
    with fake_server(fake) as address, connect(address, retry=FAST_RETRY) as c:
        with pytest.raises(UnavailableError, match="after 4 attempts") as info:
            c.predict_profit([1.0])
    assert info.value.attempts == 4 and fake.calls["PredictProfit"] == 4


def test_other_codes_are_not_retried(fake: FakeModelService) -> None:
    with fake_server(fake) as address, connect(address, retry=FAST_RETRY) as c:
        with pytest.raises(InvalidArgumentError, match="populations must be >= 0"):
            c.predict_profit([-1.0])
        with pytest.raises(NotFoundError):
            c.metadata("nope")
    assert fake.calls["PredictProfit"] == 1 and fake.calls["GetModelMetadata"] == 1


def test_every_call_has_a_deadline_covering_its_retries(fake: FakeModelService) -> None:
    fake.delay = 1.0
    with fake_server(fake) as address, connect(address, timeout=0.3, retry=FAST_RETRY) as c:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as info:
            c.predict_profit([1.0])
        assert time.monotonic() - started < 0.9
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    fake.delay, fake.fail["PredictProfit"] = 0.0, 1000
    slow_retry = RetryPolicy(attempts=1000, initial_backoff=0.05, max_backoff=0.05)
    with fake_server(fake) as address, connect(address, timeout=0.5, retry=slow_retry) as c:
        started = time.monotonic()
        with pytest.raises(RpcError):
            c.predict_profit([1.0])
        assert time.monotonic() - started < 1.0  # the deadline, not the 1000 attempts, ended it


def test_token_is_sent_as_bearer_metadata(fake: FakeModelService) -> None:
    with fake_server(fake) as address, connect(address, token="s3cret") as c:
        c.predict_profit([1.0])
        c.health()
    assert fake.metadata[-1]["authorization"] == "Bearer s3cret"


def test_tls_and_mutual_tls(fake: FakeModelService, tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    files = tls_files(tmp_path)
    read = lambda name: files[name].read_bytes()  # noqa: E731
    mutual = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.crt"))], root_certificates=read("ca.crt"), require_client_auth=True
    )
    with fake_server(fake, mutual) as address:
        with connect(address, root_certificates=files["ca.crt"], certificate_chain=files["client.crt"],
                     private_key=files["client.key"], token="t") as c:
            np.testing.assert_array_equal(c.predict_profit([2.0]), [4.0])
        with connect(address, root_certificates=files["ca.crt"], retry=NO_RETRY, timeout=5) as c:
            with pytest.raises(UnavailableError):  # no client certificate
                c.predict_profit([2.0])
        with connect(address, retry=NO_RETRY, timeout=5) as c:
            with pytest.raises(UnavailableError):  # plaintext to a TLS port
                c.predict_profit([2.0])


def test_stream_surfaces_errors_from_the_batches_iterable(fake: FakeModelService) -> None:
    def batches():
        yield IMAGES[:2]
        raise OSError("disk went away")

    with fake_server(fake) as address, connect(address) as c:
        with pytest.raises(OSError, match="disk went away"):
            list(c.classify_stream(batches(), model="fake_classifier"))
        fake.stream_cut_after = 1
        with pytest.raises(UnavailableError, match="stream cut"):
            list(c.classify_stream([IMAGES[:2]] * 3, model="fake_classifier"))


def test_stream_keeps_a_bounded_window_in_flight(fake: FakeModelService) -> None:
    pulled = []

    def batches():
        for i in range(20):
            pulled.append(i)
            yield IMAGES[:1]

    with fake_server(fake) as address, connect(address) as c:
        results = c.classify_stream(batches(), model="fake_classifier", max_in_flight=2)
        next(results)
        time.sleep(0.3)  # give the sending thread every chance to run ahead
        assert len(pulled) <= 3  # one answered + at most two in flight
        assert len(list(results)) == 19


def test_retry_policy_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2.0, jitter=0.0)
    assert [policy.backoff(i) for i in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        ServingClient("localhost:1", timeout=0)


# -- the container health probe --------------------------------------------------------------------


def test_healthcheck_exit_status(server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    assert healthcheck.main(["--address", server.address]) == 0
    assert "SERVING" in capsys.readouterr().out
    assert healthcheck.main(["--address", server.address, "--service", "fashion_softmax"]) == 0
    assert healthcheck.main(["--address", server.address, "--service", "no_such_model"]) == 1
    assert healthcheck.main(["--address", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "unhealthy" in capsys.readouterr().out


def test_healthcheck_not_serving_and_default_port(fake: FakeModelService, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_server(fake) as address:
        assert healthcheck.main(["--address", address, "--service", "sleepy"]) == 1
        monkeypatch.setenv("SERVING_PORT", address.rsplit(":", 1)[1])
        assert healthcheck.main([]) == 0  # 127.0.0.1:$SERVING_PORT
