"""Prometheus metrics: one registry per server, served on its own HTTP port (``metrics_port``).

Inference requests are counted by protocol (``typed`` / ``v2``), model, version and gRPC status
code, with their server-side latency; the dynamic batcher reports queue wait, compute time,
executed batch sizes and requests dropped before compute. Queue depth, batches in flight and
model load status are read from the live repository at scrape time (no hot-path cost, and they
follow reloads).

Hot-path cost is kept to a dictionary lookup plus one ``inc``/``observe`` per value: labelled
children are created once and cached.
"""
from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: Latency buckets in seconds: 50 µs .. 10 s (a batch-1 round trip here is ~0.5 ms).
LATENCY_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3,
    500e-3, 1.0, 2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

TYPED = "typed"
V2 = "v2"

#: The model version an inference request resolved to (set by the adapters, read when the
#: request's status is recorded). Each gRPC call runs in its own task, hence its own context.
_current: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "serving_model", default=None
)


def resolved(name: str, version: int) -> None:
    """Record which model version the current request is for (labels of its request metrics)."""
    _current.set((name, str(version)))


class _Batcherish(Protocol):
    depth: int
    in_flight: int


class _Modelish(Protocol):
    name: str
    version: int
    batcher: _Batcherish


class ModelMetrics:
    """The batcher's metrics for one model version (children bound once)."""

    def __init__(self, metrics: Metrics, name: str, version: int) -> None:
        labels = (name, str(version))
        self.queue_wait = metrics.queue_wait.labels(*labels)
        self.compute = metrics.compute.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self._dropped = metrics.dropped
        self._labels = labels
        self._dropped_children: dict[str, Any] = {}

    def dropped(self, reason: str) -> None:
        """A request dropped without being computed: ``queue_full``, ``deadline``, ``cancelled``."""
        child = self._dropped_children.get(reason)
        if child is None:
            child = self._dropped_children[reason] = self._dropped.labels(*self._labels, reason)
        child.inc()


class Metrics:
    """Every serving metric, in a registry of its own (several servers can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "serving_requests",
            "Inference requests by protocol, model, version and gRPC status code (one per "
            "message on streams; model/version empty when the request named no loaded model)",
            ["protocol", "model", "version", "code"],
            registry=r,
        )
        self.request_latency = Histogram(
            "serving_request_duration_seconds",
            "Server-side time of an inference request, from decoded request to encoded response",
            ["protocol", "model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "serving_queue_wait_seconds",
            "Time a request waited in the batch queue before its (first) batch started",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "serving_compute_duration_seconds",
            "onnxruntime time of one executed batch (including concatenation of the inputs)",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "serving_batch_size",
            "Rows in each executed batch",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.dropped = Counter(
            "serving_dropped_requests",
            "Requests answered without compute: queue_full (RESOURCE_EXHAUSTED), deadline "
            "(DEADLINE_EXCEEDED while queued), cancelled (caller went away while queued)",
            ["model", "version", "reason"],
            registry=r,
        )
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._repository: Any = None
        r.register(_StateCollector(self))
        self._http: Any = None

    # -- per request ---------------------------------------------------------------------------

    def for_model(self, name: str, version: int) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def observe_request(self, protocol: str, code: str, seconds: float) -> None:
        """Count one inference request of the current call (model from :func:`resolved`)."""
        model, version = _current.get() or ("", "")
        _current.set(None)  # a stream's next message resolves its own model
        key = (protocol, model, version, code)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key),
                self.request_latency.labels(protocol, model, version),
            )
        children[0].inc()
        children[1].observe(seconds)

    # -- scrape-time state ---------------------------------------------------------------------

    def attach(self, repository: Any) -> None:
        """Report this repository's queues and load status at scrape time."""
        self._repository = repository

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server in a daemon thread; return the bound port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def status_code(context: Any, exc: BaseException | None = None) -> str:
    """The status name to record for a call ending with ``exc`` (None = success)."""
    if exc is None:
        return "OK"
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(exc, BaseException) and not isinstance(exc, Exception):  # CancelledError
        try:
            remaining = context.time_remaining()
        except Exception:  # noqa: BLE001 - the call may be gone already
            remaining = None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


class _StateCollector(Collector):
    """Queue depth, batches in flight and model load status, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list:
        return []  # unchecked: names come from collect() at scrape time

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily(
            "serving_queue_depth", "Requests waiting in the batch queue", labels=["model", "version"]
        )
        in_flight = GaugeMetricFamily(
            "serving_batches_in_flight", "Batches running in onnxruntime", labels=["model", "version"]
        )
        loaded = GaugeMetricFamily(
            "serving_model_loaded",
            "1 = model version loaded and served; 0 = it failed to load (version empty when "
            "the whole model failed)",
            labels=["model", "version"],
        )
        repository = self._metrics._repository
        if repository is not None:
            models, failed = _snapshot(repository)
            for model in models:
                labels = [model.name, str(model.version)]
                loaded.add_metric(labels, 1)
                batcher = getattr(model, "batcher", None)
                if batcher is not None:
                    depth.add_metric(labels, batcher.depth)
                    in_flight.add_metric(labels, batcher.in_flight)
            for key in failed:
                name, _, version = key.partition("/")
                loaded.add_metric([name, version], 0)
        yield depth
        yield in_flight
        yield loaded


def _snapshot(repository: Any) -> tuple[list[_Modelish], list[str]]:
    """Models and failures, retried if a reload changes them mid-read (scrapes run in a thread)."""
    for _ in range(5):
        try:
            return list(repository.models()), list(dict(repository.failed))
        except RuntimeError:  # dictionary changed size during iteration
            time.sleep(0.001)
    return [], []
