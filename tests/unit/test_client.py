"""service.client against an in-process fake of the typed API (fixtures.fake_serving): retries,
deadlines, errors, TLS and the token, streams; the container health probe's NOT_SERVING and
default port. (Against the real server: tests/e2e/test_client.py.)"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.fake_serving import CLASSES, FakeModelService, fake_probabilities, fake_server
from fixtures.servers import closed_port, wait_for
from fixtures.tls import tls_files

from service import healthcheck
from service.client import (
    NO_RETRY,
    DeadlineExceededError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    RpcError,
    ServingClient,
    UnavailableError,
    connect,
)

FAST_RETRY = RetryPolicy(attempts=4, initial_backoff=0.01, max_backoff=0.05)
rng = np.random.default_rng(6)
IMAGES = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)


@pytest.fixture
def fake() -> FakeModelService:
    return FakeModelService()


def test_unreachable_server_fails_with_unavailable_after_its_attempts() -> None:
    """Connection refused: UNAVAILABLE, retried as the policy says, then raised as UNAVAILABLE
    with the count (had the deadline ended it, it would be DEADLINE_EXCEEDED)."""
    with closed_port() as port, connect(f"127.0.0.1:{port}", timeout=60, retry=FAST_RETRY) as c:
        with pytest.raises(UnavailableError) as info:
            c.predict_profit([1.0])
    assert info.value.attempts == 4 and info.value.code == grpc.StatusCode.UNAVAILABLE


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
    # A server that does not answer until the test lets it: only the deadline can end the call,
    # and DEADLINE_EXCEEDED is not retried.
    fake.hold = threading.Event()
    try:
        with fake_server(fake) as address, connect(address, timeout=0.3, retry=FAST_RETRY) as c:
            with pytest.raises(DeadlineExceededError) as info:
                c.predict_profit([1.0])
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.attempts == 1
            assert not fake.hold.is_set() and fake.calls["PredictProfit"] == 1
    finally:
        fake.hold.set()
    # 1,000 allowed attempts 0.05 s apart (50 s) under a 0.5 s deadline: the deadline ends them.
    fake.hold, fake.fail["PredictProfit"] = None, 1000
    slow_retry = RetryPolicy(attempts=1000, initial_backoff=0.05, max_backoff=0.05)
    with fake_server(fake) as address, connect(address, timeout=0.5, retry=slow_retry) as c:
        with pytest.raises(RpcError) as ended:
            c.predict_profit([1.0])
    assert ended.value.attempts < 1000 and ended.value.attempts == fake.calls["PredictProfit"] - 1


def test_a_token_is_not_sent_over_plaintext_unless_asked() -> None:
    with pytest.raises(ValueError, match="plaintext channel") as refused:
        connect("127.0.0.1:1", token="s3cret")
    assert "s3cret" not in str(refused.value)


def test_token_is_sent_as_bearer_metadata(fake: FakeModelService) -> None:
    with fake_server(fake) as address, connect(address, token="s3cret", insecure_token=True) as c:
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
        with connect(
            address,
            root_certificates=files["ca.crt"],
            certificate_chain=files["client.crt"],
            private_key=files["client.key"],
            token="t",
        ) as c:
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
    """max_in_flight 2: after each answer the sender pulls batches until two are unanswered (the
    test waits for exactly that), and never one more (recorded as each batch is pulled)."""
    answered = 0
    ahead: list[int] = []  # for each batch pulled: batches sent before it and not yet answered

    def batches():
        for i in range(20):
            ahead.append(i - answered)
            yield IMAGES[:1]

    with fake_server(fake) as address, connect(address) as c:
        for _ in c.classify_stream(batches(), model="fake_classifier", max_in_flight=2):
            answered += 1
            want = min(answered + 2, 20)
            wait_for(lambda: len(ahead) >= want, f"the sender to fill its window ({want} pulled)")  # noqa: B023
    assert answered == 20
    assert max(ahead) <= 2, ahead  # 2: the window slot frees just before the answer reaches the loop
    assert ahead.count(2) + ahead.count(1) >= 18, ahead  # and the window was used, not 1 at a time


def test_retry_policy_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.5, multiplier=2.0, jitter=0.0)
    assert [policy.backoff(i) for i in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        ServingClient("localhost:1", timeout=0)


# -- the container health probe --------------------------------------------------------------------


def test_healthcheck_not_serving_and_default_port(fake: FakeModelService, monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_server(fake) as address:
        assert healthcheck.main(["--address", address, "--service", "sleepy"]) == 1
        monkeypatch.setenv("SERVING_PORT", address.rsplit(":", 1)[1])
        assert healthcheck.main([]) == 0  # 127.0.0.1:$SERVING_PORT
