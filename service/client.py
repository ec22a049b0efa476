"""Python client for the typed API (``serving.v1.ModelService``) and gRPC health: numpy in, numpy out.

>>> from service.client import connect
>>> with connect("localhost:8001") as client:
...     result = client.classify(images)              # uint8 [N, 28, 28] or [N, 1, 28, 28]
...     result.probabilities, result.class_index       # float32 [N, 10], int64 [N]
...     client.predict_profit([35_000, 70_000])        # float32 [2], US dollars

Every call has a deadline (``timeout`` seconds, default :data:`DEFAULT_TIMEOUT`) that covers all
its attempts. Inference is idempotent, so a call that fails with ``UNAVAILABLE`` (server starting,
restarting, or briefly unreachable) is retried with exponential backoff and jitter
(:class:`RetryPolicy`); every other status fails at once. Failures raise :class:`RpcError` (or a
subclass per status code) carrying the gRPC code, the server's message, the method and the number of
attempts.

No torch, no onnxruntime: only grpcio, protobuf, numpy and the generated stubs.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .generated.serving.v1 import serving_pb2 as pb
from .generated.serving.v1 import serving_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "Classification",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "RetryPolicy",
    "RpcError",
    "ServingClient",
    "TensorInfo",
    "UnavailableError",
    "as_images",
    "connect",
    "rpc_error",
]

DEFAULT_TIMEOUT = 30.0
DEFAULT_BATCH_SIZE = 1024  # the server's default --max-batch-size
MiB = 1024 * 1024
T = TypeVar("T")
_END = object()


# -- errors ----------------------------------------------------------------------------------------


class RpcError(Exception):
    """A call failed: ``code`` (grpc.StatusCode), ``details`` (the server's message), ``method``,
    and ``attempts`` (how many times it was tried)."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str, attempts: int = 1) -> None:
        self.method = method
        self.code = code
        self.details = details
        self.attempts = attempts
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{method} failed with {code.name}{tries}: {details}")


class InvalidArgumentError(RpcError):
    """INVALID_ARGUMENT: the request is malformed (shape, dtype, batch size, NaN/inf...)."""


class NotFoundError(RpcError):
    """NOT_FOUND: unknown model, version, or health service name."""


class UnavailableError(RpcError):
    """UNAVAILABLE: the server could not be reached or is not ready (retries exhausted)."""


class DeadlineExceededError(RpcError):
    """DEADLINE_EXCEEDED: the call's deadline passed."""


_ERRORS: dict[grpc.StatusCode, type[RpcError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
}


def rpc_error(method: str, code: grpc.StatusCode, details: str, attempts: int = 1) -> RpcError:
    """The :class:`RpcError` subclass for ``code``."""
    return _ERRORS.get(code, RpcError)(method, code, details, attempts)


def _from_grpc(method: str, exc: grpc.RpcError, attempts: int = 1) -> RpcError:
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return rpc_error(method, code or grpc.StatusCode.UNKNOWN, details or "", attempts)


# -- retries ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, for status codes in ``retry_on`` (UNAVAILABLE only by
    default: safe because inference is idempotent). ``attempts`` counts the first try."""

    attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    retry_on: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), jittered by ±``jitter``."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return max(0.0, base * (1 + random.uniform(-self.jitter, self.jitter)))


NO_RETRY = RetryPolicy(attempts=1)


# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Classification:
    """Results for N images: ``probabilities`` float32 [N, classes], ``class_index`` int64 [N],
    ``labels`` (the name of each image's top class), and the model version that answered."""

    probabilities: np.ndarray
    class_index: np.ndarray
    labels: list[str]
    model: str
    version: int

    def __len__(self) -> int:
        return len(self.class_index)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    unit: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """A model version as the server describes it (``GetModelMetadata``)."""

    name: str
    version: int
    versions: tuple[int, ...]
    platform: str
    execution_provider: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    class_names: tuple[str, ...]
    metrics: dict[str, float]
    max_batch_size: int
    description: str
    properties: dict[str, str]

    @classmethod
    def from_proto(cls, m: pb.ModelMetadata) -> ModelInfo:
        def tensors(items: Iterable[pb.TensorMetadata]) -> tuple[TensorInfo, ...]:
            return tuple(TensorInfo(t.name, t.dtype, tuple(t.shape), t.unit) for t in items)

        return cls(
            name=m.name,
            version=m.version,
            versions=tuple(m.versions),
            platform=m.platform,
            execution_provider=m.execution_provider,
            inputs=tensors(m.inputs),
            outputs=tensors(m.outputs),
            class_names=tuple(m.class_names),
            metrics=dict(m.metrics),
            max_batch_size=m.max_batch_size,
            description=m.description,
            properties=dict(m.properties),
        )


# -- numpy ↔ protobuf ------------------------------------------------------------------------------

_IMAGE_DTYPES = {np.dtype(np.uint8): pb.DATA_TYPE_UINT8, np.dtype(np.float32): pb.DATA_TYPE_FLOAT32}


def as_images(images: Any) -> np.ndarray:
    """Images as a C-contiguous [N, 1, 28, 28]-style array: uint8 (0–255) or float32 (0–1).

    A single [H, W] image becomes [1, 1, H, W]; a [N, H, W] stack becomes [N, 1, H, W]; other
    shapes are sent as they are (the server says what it expects).
    """
    array = np.asarray(images)
    if array.dtype not in _IMAGE_DTYPES:
        raise TypeError(f"images must be uint8 (0-255) or float32 (0-1), got {array.dtype}")
    if array.ndim == 2:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[:, None]
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))


def _image_tensor(images: np.ndarray) -> pb.Tensor:
    return pb.Tensor(dtype=_IMAGE_DTYPES[np.dtype(images.dtype.name)], shape=images.shape, data=images.tobytes())


def _classification(response: pb.ClassifyResponse, expected: int, method: str) -> Classification:
    results = response.results
    if len(results) != expected:
        raise rpc_error(
            method, grpc.StatusCode.INTERNAL, f"server returned {len(results)} results for {expected} images"
        )
    probabilities = np.array([r.probabilities for r in results], dtype=np.float32)
    if probabilities.ndim != 2:  # ragged or empty rows
        raise rpc_error(method, grpc.StatusCode.INTERNAL, "server returned malformed probabilities")
    return Classification(
        probabilities=probabilities,
        class_index=np.fromiter((r.class_index for r in results), dtype=np.int64, count=len(results)),
        labels=[r.label for r in results],
        model=response.model.name,
        version=response.model.version,
    )


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _read(value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


# -- the client ------------------------------------------------------------------------------------


class ServingClient:
    """A connection to the model server. Thread-safe; close it (or use ``with``) when done.

    ``tls`` (or any certificate argument) → a TLS channel; ``root_certificates`` is a PEM CA bundle
    (bytes or a path; None = system roots), ``certificate_chain``/``private_key`` a client
    certificate for mutual TLS, ``server_name`` overrides the name checked against the server's
    certificate. ``token`` is sent on every call as ``authorization: Bearer <token>`` metadata,
    over TLS only unless ``insecure_token`` says a plaintext channel is acceptable (e.g. loopback).
    ``timeout`` is the default deadline per call in seconds; ``retry`` the policy for UNAVAILABLE.
    """

    def __init__(
        self,
        address: str,
        *,
        tls: bool = False,
        root_certificates: bytes | str | Path | None = None,
        certificate_chain: bytes | str | Path | None = None,
        private_key: bytes | str | Path | None = None,
        server_name: str | None = None,
        token: str | None = None,
        insecure_token: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 64 * MiB,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout is None or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        secure = bool(tls or root_certificates or certificate_chain or private_key)
        if token and not secure and not insecure_token:
            raise ValueError(
                "refusing to send a bearer token over a plaintext channel, where anyone on the path can read it: "
                "connect with TLS (tls=True or root_certificates=...), or pass insecure_token=True"
            )
        self.address = address
        self.timeout = float(timeout)
        self.retry = retry if retry is not None else RetryPolicy()
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        channel_options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            *options,
        ]
        if server_name:
            channel_options.append(("grpc.ssl_target_name_override", server_name))
        if secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(root_certificates),
                private_key=_read(private_key),
                certificate_chain=_read(certificate_chain),
            )
            self._channel = grpc.secure_channel(address, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(address, options=channel_options)
        self._stub = pb_grpc.ModelServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # -- plumbing ----------------------------------------------------------------------------

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, rpc: Callable[..., T], request: Any, timeout: float | None) -> T:
        """One unary call under one deadline, retried per :attr:`retry` while time is left."""
        budget = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + budget
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(
                    method,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"no time left of the {budget:g} s deadline",
                    attempt - 1,
                )
            try:
                return rpc(request, timeout=remaining, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()
                if code not in self.retry.retry_on or attempt >= self.retry.attempts:
                    raise _from_grpc(method, exc, attempt) from None
                pause = self.retry.backoff(attempt)
                if time.monotonic() + pause >= deadline:
                    raise _from_grpc(method, exc, attempt) from None
                time.sleep(pause)

    # -- inference ---------------------------------------------------------------------------

    def classify(
        self,
        images: Any,
        *,
        model: str = "",
        version: int = 0,
        top_k: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout: float | None = None,
    ) -> Classification:
        """Classify images (uint8 0–255 or float32 0–1; [N,28,28], [N,1,28,28] or one [28,28]).

        Sent in requests of at most ``batch_size`` images, each with its own deadline and retries.
        ``model`` "" → the server's default classifier; ``version`` 0 → latest.
        """
        array = as_images(images)
        if len(array) == 0:
            raise ValueError("classify needs at least one image")
        parts = []
        for part in _chunks(len(array), batch_size):
            request = pb.ClassifyRequest(
                model=pb.ModelRef(name=model, version=version), images=_image_tensor(array[part]), top_k=top_k
            )
            response = self._call("Classify", self._stub.Classify, request, timeout)
            parts.append(_classification(response, part.stop - part.start, "Classify"))
        if len(parts) == 1:
            return parts[0]
        return Classification(
            probabilities=np.concatenate([p.probabilities for p in parts]),
            class_index=np.concatenate([p.class_index for p in parts]),
            labels=[label for p in parts for label in p.labels],
            model=parts[-1].model,
            version=parts[-1].version,
        )

    def classify_stream(
        self,
        batches: Iterable[Any],
        *,
        model: str = "",
        version: int = 0,
        timeout: float | None = None,
        max_in_flight: int = 4,
    ) -> Iterator[Classification]:
        """Classify an iterable of image batches over one ``ClassifyStream`` call; yield one
        :class:`Classification` per batch, in order.

        At most ``max_in_flight`` batches are sent ahead of the responses read, so memory stays
        bounded however long ``batches`` is (it is pulled lazily, from gRPC's sending thread).
        ``timeout`` is the deadline of the whole stream. A stream is not retried (a batch job
        resumes from its last answered batch instead); errors raise :class:`RpcError`. When
        ``batches`` itself raises, the batches sent before are still answered and yielded, then
        its exception is raised here.
        """
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        window = threading.Semaphore(max_in_flight)
        closed = threading.Event()
        sizes: list[int] = []  # appended by the sending thread, popped here, in order
        lock = threading.Lock()
        failure: list[BaseException] = []  # an error raised by ``batches`` (gRPC would hide it)
        ref = pb.ModelRef(name=model, version=version)

        def requests() -> Iterator[pb.ClassifyRequest]:
            try:
                iterator = iter(batches)
                for number in itertools.count():
                    while not window.acquire(timeout=0.1):  # a free slot before pulling a batch
                        if closed.is_set():
                            return
                    if closed.is_set():
                        return
                    batch = next(iterator, _END)
                    if batch is _END:
                        return
                    array = as_images(batch)
                    with lock:
                        sizes.append(len(array))
                    yield pb.ClassifyRequest(model=ref, images=_image_tensor(array), request_id=str(number))
            except Exception as exc:  # end the stream cleanly: batches already sent still get answers
                failure.append(exc)

        call = self._stub.ClassifyStream(
            requests(), timeout=self.timeout if timeout is None else timeout, metadata=self._metadata
        )
        try:
            for number, response in enumerate(call):
                with lock:
                    expected = sizes.pop(0) if sizes else -1
                if response.request_id != str(number):
                    raise rpc_error(
                        "ClassifyStream",
                        grpc.StatusCode.INTERNAL,
                        f"response {number} answers request_id {response.request_id!r}",
                    )
                result = _classification(response, expected, "ClassifyStream")
                window.release()
                yield result
            if failure:  # the stream ended early because reading the batches failed
                raise failure[0]  # after every batch sent before it was answered and yielded
        except grpc.RpcError as exc:
            if failure:
                raise failure[0] from None
            raise _from_grpc("ClassifyStream", exc) from None
        finally:
            closed.set()
            call.cancel()

    def predict_profit(
        self,
        populations: Any,
        *,
        model: str = "",
        version: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Profit (US dollars, float32 [N]) of a food truck in cities of these populations (people)."""
        values = np.asarray(populations, dtype=np.float32).reshape(-1)
        if len(values) == 0:
            raise ValueError("predict_profit needs at least one population")
        out = np.empty(len(values), dtype=np.float32)
        for part in _chunks(len(values), batch_size):
            request = pb.PredictProfitRequest(model=pb.ModelRef(name=model, version=version), population=values[part])
            response = self._call("PredictProfit", self._stub.PredictProfit, request, timeout)
            got = np.asarray(response.profit_usd, dtype=np.float32)
            if len(got) != part.stop - part.start:
                raise rpc_error(
                    "PredictProfit",
                    grpc.StatusCode.INTERNAL,
                    f"server returned {len(got)} values for {part.stop - part.start} populations",
                )
            out[part] = got
        return out

    def predict_house_price(
        self, houses: Any, *, model: str = "", version: int = 0, timeout: float | None = None
    ) -> np.ndarray:
        """Price (US dollars, float32 [N]) of houses given as [N, 2]: size (sq ft), bedrooms."""
        features = np.asarray(houses, dtype=np.float32).reshape(-1, 2)
        request = pb.PredictHousePriceRequest(
            model=pb.ModelRef(name=model, version=version),
            houses=[pb.House(size_sqft=s, bedrooms=b) for s, b in features.tolist()],
        )
        response = self._call("PredictHousePrice", self._stub.PredictHousePrice, request, timeout)
        return np.asarray(response.price_usd, dtype=np.float32)

    # -- metadata and health -----------------------------------------------------------------

    def metadata(self, model: str, version: int = 0, *, timeout: float | None = None) -> ModelInfo:
        """Metadata of one model version (0 → latest)."""
        request = pb.GetModelMetadataRequest(model=pb.ModelRef(name=model, version=version))
        return ModelInfo.from_proto(self._call("GetModelMetadata", self._stub.GetModelMetadata, request, timeout))

    def list_models(self, name: str = "", *, timeout: float | None = None) -> tuple[list[ModelInfo], dict[str, str]]:
        """Every loaded model version (or only ``name``'s), and the models that failed to load."""
        response = self._call("ListModels", self._stub.ListModels, pb.ListModelsRequest(name=name), timeout)
        return [ModelInfo.from_proto(m) for m in response.models], dict(response.failed)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """grpc.health.v1 status name of ``service`` ("" = the whole server): "SERVING",
        "NOT_SERVING", ... Raises NotFoundError for a service the server does not know."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._call("Health.Check", self._health.Check, request, timeout)
        except NotFoundError as exc:
            raise NotFoundError(
                exc.method, exc.code, exc.details or f"the server has no health status for {service!r}", exc.attempts
            ) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def wait_until_serving(self, service: str = "", *, timeout: float = 60.0, poll: float = 0.2) -> None:
        """Block until ``service`` reports SERVING; raise :class:`UnavailableError` after ``timeout``."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                last = self.health(service, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
                if last == "SERVING":
                    return
            except RpcError as exc:
                last = f"{exc.code.name}: {exc.details}"
            time.sleep(poll)
        raise UnavailableError(
            "Health.Check",
            grpc.StatusCode.UNAVAILABLE,
            f"{self.address} not SERVING after {timeout:g} s (last: {last})",
        )


def connect(address: str, **kwargs: Any) -> ServingClient:
    """``ServingClient(address, **kwargs)``: see :class:`ServingClient` for TLS, token, timeout, retry."""
    return ServingClient(address, **kwargs)
