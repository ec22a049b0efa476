"""Prometheus metrics: one registry per server, served on its own HTTP port (``metrics_port``).

Inference requests are counted by protocol (``typed`` / ``v2``), model, version and status code
(read from each request's :class:`~service.core.context.RequestContext` when it finishes), with
their server-side latency; the dynamic batcher reports queue wait, compute time,
executed batch sizes and requests dropped before compute. Queue depth, batches in flight and
model load status are read from the live model registry at scrape time (no hot-path cost, and they
follow reloads).

Hot-path cost is kept to a dictionary lookup plus one ``inc``/``observe`` per value on plain
Python objects (no locks: every observation happens on the event loop thread); the values are
turned into Prometheus families when scraped.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ..core.context import RequestContext

if TYPE_CHECKING:
    from ..core.registry import ModelRegistry

log = logging.getLogger(__name__)

#: Latency buckets in seconds: 50 µs .. 10 s (a batch-1 round trip here is ~0.5 ms).
LATENCY_BUCKETS = (
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    500e-3,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


class _Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _Histogram:
    """Bucket counts in a list: one bisect and three additions per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le=bound: value <= bound
        self.sum += value


class _Family:
    """A labelled metric whose children are plain objects, exported by :class:`_Collector`.

    The hot path (all on the event loop thread) touches no lock: prometheus-client's own
    metric classes cost 2-3 µs per observation there, which showed in the server's throughput.
    A scrape (HTTP thread) reads the numbers as they are; CPython makes each read whole.
    """

    def __init__(
        self, kind: str, name: str, documentation: str, labels: list[str], buckets: tuple[float, ...] = ()
    ) -> None:
        self.kind, self.name, self.documentation, self.label_names = kind, name, documentation, labels
        self.buckets = buckets
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = _Histogram(self.buckets) if self.kind == "histogram" else _Counter()
            self.children[values] = child
        return child

    def export(self) -> CounterMetricFamily | HistogramMetricFamily:
        children = list(self.children.items())
        if self.kind == "counter":
            counter = CounterMetricFamily(self.name, self.documentation, labels=self.label_names)
            for values, child in children:
                counter.add_metric(list(values), child.value)
            return counter
        histogram = HistogramMetricFamily(self.name, self.documentation, labels=self.label_names)
        bounds = [floatToGoString(b) for b in (*self.buckets, float("inf"))]  # type: ignore[no-untyped-call]
        for values, child in children:
            counts, total = list(child.counts), child.sum
            cumulative: list[tuple[str, float]] = []
            running = 0
            for bound, count in zip(bounds, counts):
                running += count
                cumulative.append((bound, running))
            histogram.add_metric(list(values), cumulative, sum_value=total)
        return histogram


class ModelMetrics:
    """The batcher's metrics for one model version (children bound once)."""

    def __init__(self, metrics: Metrics, name: str, version: int) -> None:
        labels = (name, str(version))
        self.queue_wait = metrics.queue_wait.labels(*labels)
        self.compute = metrics.compute.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self._dropped = metrics.dropped
        self._labels = labels

    def dropped(self, reason: str) -> None:
        """A request dropped without being computed: ``queue_full``, ``deadline``, ``cancelled``."""
        self._dropped.labels(*self._labels, reason).inc()


class Metrics:
    """Every serving metric, in a registry of its own (several servers can share a process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = _Family(
            "counter",
            "serving_requests",
            "Inference requests by protocol, model, version and gRPC status code (one per "
            "message on streams; model/version empty when the request named no loaded model)",
            ["protocol", "model", "version", "code"],
        )
        self.request_latency = _Family(
            "histogram",
            "serving_request_duration_seconds",
            "Server-side time of an inference request, from decoded request to encoded response",
            ["protocol", "model", "version"],
            LATENCY_BUCKETS,
        )
        self.queue_wait = _Family(
            "histogram",
            "serving_queue_wait_seconds",
            "Time a request waited in the batch queue before its (first) batch started",
            ["model", "version"],
            LATENCY_BUCKETS,
        )
        self.compute = _Family(
            "histogram",
            "serving_compute_duration_seconds",
            "onnxruntime time of one executed batch (including concatenation of the inputs)",
            ["model", "version"],
            LATENCY_BUCKETS,
        )
        self.batch_size = _Family(
            "histogram",
            "serving_batch_size",
            "Rows in each executed batch",
            ["model", "version"],
            tuple(float(b) for b in BATCH_BUCKETS),
        )
        self.dropped = _Family(
            "counter",
            "serving_dropped_requests",
            "Requests answered without compute: queue_full (RESOURCE_EXHAUSTED), deadline "
            "(DEADLINE_EXCEEDED while queued), cancelled (caller went away while queued)",
            ["model", "version", "reason"],
        )
        self._families = [
            self.requests,
            self.request_latency,
            self.queue_wait,
            self.compute,
            self.batch_size,
            self.dropped,
        ]
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._registry: ModelRegistry | None = None
        self.registry.register(_StateCollector(self))
        self._http: Any = None

    # -- per request ---------------------------------------------------------------------------

    def for_model(self, name: str, version: int) -> ModelMetrics:
        return ModelMetrics(self, name, version)

    def finish(self, context: RequestContext) -> None:
        """Count one finished inference request (metadata calls are not counted)."""
        if not context.inference:
            return
        key = (context.protocol, context.model, context.version, context.status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(*key),
                self.request_latency.labels(context.protocol, context.model, context.version),
            )
        children[0].value += 1
        children[1].observe(context.seconds())

    # -- scrape-time state ---------------------------------------------------------------------

    def attach(self, registry: ModelRegistry) -> None:
        """Report this registry's queues and load status at scrape time."""
        self._registry = registry

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the /metrics HTTP server in a daemon thread; return the bound port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._http = server
        return int(server.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _StateCollector(Collector):
    """Queue depth, batches in flight and model load status, read when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Any]:
        return []  # unchecked: names come from collect() at scrape time

    def collect(self) -> Iterator[Any]:
        for family in self._metrics._families:
            yield family.export()
        depth = GaugeMetricFamily(
            "serving_queue_depth", "Requests waiting in the batch queue", labels=["model", "version"]
        )
        in_flight = GaugeMetricFamily(
            "serving_batches_in_flight", "Batches running in onnxruntime", labels=["model", "version"]
        )
        loaded = GaugeMetricFamily(
            "serving_model_loaded",
            "1 = model version loaded and served; 0 = it failed to load (version empty when the whole model failed)",
            labels=["model", "version"],
        )
        registry = self._metrics._registry
        if registry is not None:
            for model in registry.models():  # one published snapshot, never mutated
                labels = [model.name, str(model.version)]
                loaded.add_metric(labels, 1)
                depth.add_metric(labels, model.batcher.depth)
                in_flight.add_metric(labels, model.batcher.in_flight)
            for failure in list(registry.failures):  # likewise replaced whole by each round
                loaded.add_metric([failure.model, failure.version], 0)
        yield depth
        yield in_flight
        yield loaded
