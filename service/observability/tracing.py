"""OpenTelemetry traces of every request (the ``tracing`` setting; the ``[otel]`` extra).

Imported only when tracing is on: with it off, the server neither imports OpenTelemetry nor
does anything per request but one attribute check in each front end.

:class:`Tracing` is a data-plane observer. While a request runs, the front end hands it the
request's headers (HTTP) or metadata (gRPC) — :meth:`Tracing.grpc`, :meth:`Tracing.http` keep a
reference on the :class:`~service.core.context.RequestContext`, nothing else. When the request has
been answered, :meth:`Tracing.finish` creates its spans after the fact with explicit timestamps
from the context, so the hot path (the batcher above all) makes no tracer call:

* one SERVER span per request (per message on streams), a child of the caller's span when the
  request carries a W3C ``traceparent`` (and ``tracestate``), named and attributed as
  OpenTelemetry's semantic conventions say for gRPC (``inference.GRPCInferenceService/ModelInfer``:
  ``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``; with
  ``OTEL_SEMCONV_STABILITY_OPT_IN=rpc`` the stable ``rpc.system.name``, ``rpc.method``,
  ``rpc.response.status_code`` instead, ``rpc/dup`` both) and for HTTP servers
  (``POST /v2/models/{model}/infer``: ``http.request.method``, ``http.route``, ``url.path``,
  ``url.scheme``, ``http.response.status_code``); plus, under ``model_serving.``, the model name
  and version, the request's rows, the rows of the executed batch and the request id;
* for an inference request that ran, two child spans: ``queue`` (waiting in the batch queue) and
  ``compute`` (the batch's start to onnxruntime's return, with Triton's split of it as attributes
  ``model_serving.compute.input_seconds`` — thread hand-off, concatenation — and
  ``model_serving.compute.infer_seconds`` — onnxruntime); the rest of the request span after
  ``compute`` is Triton's ``compute_output`` (splitting the batch output, encoding). A request
  split across several batches gets the summed durations, laid end to end before its last batch
  finished. (Two children rather than one per statistics phase: each span costs ~15 µs of CPU to
  make and ~30 µs to export with the Python SDK.)

The sampler is asked before any span is made, with the trace id the span will get: a request it
drops costs ~8 µs (reading the trace context, the decision) and makes no span object.

Everything else comes from the standard ``OTEL_*`` variables: the exporter
(``OTEL_TRACES_EXPORTER``: ``otlp`` (default), ``console`` or ``none``; OTLP over gRPC by default,
``OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`` for HTTP), its endpoint and headers
(``OTEL_EXPORTER_OTLP_ENDPOINT`` ...), the sampler (``OTEL_TRACES_SAMPLER``,
``OTEL_TRACES_SAMPLER_ARG``; default ``parentbased_always_on``), the service name
(``OTEL_SERVICE_NAME``, default ``model-serving``), the batch span processor
(``OTEL_BSP_*``) and the propagators (``OTEL_PROPAGATORS``; default W3C trace context + baggage).
Spans are exported off the event loop by the SDK's batch span processor.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode

from ..core.context import RequestContext

#: The attribute namespace of this server's own span attributes.
NS = "model_serving"
DEFAULT_SERVICE_NAME = "model-serving"
#: gRPC codes that mark a server span as an error (OpenTelemetry's gRPC conventions).
GRPC_SERVER_ERRORS = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_GRPC_CODES = {code.name: code.value[0] for code in grpc.StatusCode}
#: The parent of a request without trace context: none (not whatever span is current).
_ROOT = Context()


class TracingUnavailable(RuntimeError):
    """Tracing is on but cannot be set up (the server must not start)."""


def _exporter() -> SpanExporter | None:
    """The span exporter the OTEL_* variables ask for (None: ``none``)."""
    name = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if name == "none":
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name != "otlp":
        raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={name!r} is not supported here; use otlp, console or none")
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise TracingUnavailable(f"OTLP protocol {protocol!r} is not supported here; use grpc or http/protobuf")


def _resource() -> Resource:
    """The process's resource: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, else model-serving."""
    from ..v2_common import server_version

    named = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    defaults: dict[str, Any] = {SERVICE_VERSION: server_version()}
    if not named:
        defaults[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    return Resource.create(defaults)


def _semconv_rpc() -> tuple[bool, bool]:
    """(old, stable) RPC conventions to emit, from OTEL_SEMCONV_STABILITY_OPT_IN."""
    opted = {v.strip() for v in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
    if "rpc/dup" in opted:
        return True, True
    if "rpc" in opted:
        return False, True
    return True, False


class _DecidedIds(RandomIdGenerator):
    """The SDK's random ids, except that the trace id of the next root span can be set beforehand:
    the one the sampler was already asked about (see :meth:`Tracing.finish`)."""

    def __init__(self) -> None:
        self.next_trace_id = 0

    def generate_trace_id(self) -> int:
        trace_id, self.next_trace_id = self.next_trace_id, 0
        return trace_id or super().generate_trace_id()


class Tracing:
    """Spans of finished requests (see the module docstring)."""

    def __init__(
        self, processor: SpanProcessor | None = None, provider: TracerProvider | None = None, tls: bool = False
    ) -> None:
        """``processor``: where spans go (default: the OTEL_* exporter behind a batch processor);
        ``tls``: the HTTP front end serves https."""
        self._scheme = "https" if tls else "http"
        self._ids = _DecidedIds()
        if provider is None:  # the sampler: OTEL_TRACES_SAMPLER(_ARG)
            provider = TracerProvider(resource=_resource(), id_generator=self._ids)
        else:
            provider.id_generator = self._ids
        self.provider = provider
        self._sampler = provider.sampler
        self._disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        # Only the headers the propagators read are looked at (W3C: traceparent, tracestate, baggage).
        self._fields = frozenset(propagate.get_global_textmap().fields)
        if processor is None:
            exporter = _exporter()
            processor = BatchSpanProcessor(exporter) if exporter is not None else None
        if processor is not None:
            self.provider.add_span_processor(processor)
        from ..v2_common import server_version

        self.tracer = self.provider.get_tracer("model-serving", server_version())
        self._old_rpc, self._stable_rpc = _semconv_rpc()
        self._routes: Any = None  # the HTTP route table, imported when first needed
        self._names: dict[str, tuple[str, str, str]] = {}  # gRPC method → (span name, service, method)

    # -- while the request runs (front ends) -------------------------------------------------------

    def grpc(self, context: RequestContext, grpc_context: grpc.aio.ServicerContext) -> None:
        """A gRPC call's metadata (``traceparent``/``tracestate`` keys are lower-case there)."""
        context.carrier = grpc_context.invocation_metadata()

    def http(self, context: RequestContext, headers: Mapping[str, str]) -> None:
        """An HTTP request's headers (lower-case names)."""
        context.carrier = headers

    # -- once answered (observer) ------------------------------------------------------------------

    def finish(self, context: RequestContext) -> None:
        """The request's spans. The sampler is asked first, with the trace id the span will have,
        and a request it drops costs nothing more (no span object, no clock reads): with 1 %
        sampling that is 99 requests in 100."""
        if self._disabled:
            return
        carrier = getattr(context, "carrier", None)
        fields = self._fields
        if not carrier:
            headers: Mapping[str, str] = {}
        elif isinstance(carrier, Mapping):
            headers = {k: carrier[k] for k in fields if k in carrier}
        else:  # gRPC metadata: a sequence of (key, value)
            headers = {k: v for k, v in carrier if k in fields and isinstance(v, str)}
        parent = propagate.extract(headers, _ROOT) if headers else _ROOT
        if context.protocol == "http":
            name, attributes, error = self._http(context)
        else:
            name, attributes, error = self._rpc(context)
        caller = trace.get_current_span(parent).get_span_context()
        root = not caller.is_valid
        trace_id = self._ids.generate_trace_id() if root else caller.trace_id
        decision = self._sampler.should_sample(parent, trace_id, name, SpanKind.SERVER, attributes)
        if not decision.decision.is_recording():  # type: ignore[no-untyped-call]
            return
        if root:
            self._ids.next_trace_id = trace_id  # the span gets the trace id the sampler judged
        offset = time.time_ns() - time.perf_counter_ns()  # perf_counter → epoch nanoseconds
        start = int(context.start * 1e9) + offset
        end = int(context.end * 1e9) + offset if context.end else time.time_ns()
        span = self.tracer.start_span(name, parent, SpanKind.SERVER, attributes, start_time=start)
        if span.is_recording():  # (the sampler said yes: the rest of the attributes, the children)
            extra: dict[str, Any] = {f"{NS}.protocol": context.protocol}
            if context.model:
                extra[f"{NS}.model.name"] = context.model
                extra[f"{NS}.model.version"] = context.version
            if context.request_id:
                extra[f"{NS}.request.id"] = context.request_id
            if context.rows:
                extra[f"{NS}.request.rows"] = context.rows
            if context.batch_rows:
                extra[f"{NS}.batch.rows"] = context.batch_rows
            if error is not None:
                extra["error.type"] = error
                span.set_status(Status(StatusCode.ERROR, (context.error or error)[:1000]))
            span.set_attributes(extra)
            if context.computed:
                self._phases(span, context, offset)
        span.end(end_time=end)

    def _phases(self, span: trace.Span, context: RequestContext, offset: int) -> None:
        """``queue`` then ``compute``, laid end to end up to the moment onnxruntime returned."""
        computed = int(context.computed * 1e9) + offset
        compute_start = computed - int((context.compute_seconds + context.input_seconds) * 1e9)
        queue_start = compute_start - int(context.queue_seconds * 1e9)
        parent = trace.set_span_in_context(span)
        queue = self.tracer.start_span("queue", parent, SpanKind.INTERNAL, start_time=queue_start)
        queue.end(end_time=compute_start)
        compute = self.tracer.start_span(
            "compute",
            parent,
            SpanKind.INTERNAL,
            {
                f"{NS}.compute.input_seconds": context.input_seconds,
                f"{NS}.compute.infer_seconds": context.compute_seconds,
            },
            start_time=compute_start,
        )
        compute.end(end_time=computed)

    def _rpc(self, context: RequestContext) -> tuple[str, dict[str, Any], str | None]:
        names = self._names.get(context.method)
        if names is None:
            full = context.method.lstrip("/")
            names = self._names[context.method] = (full, *full.rpartition("/")[::2])
        full, service, method = names
        status = context.status or "UNKNOWN"
        attributes: dict[str, Any] = {}
        if self._old_rpc:
            attributes.update(
                {
                    "rpc.system": "grpc",
                    "rpc.service": service,
                    "rpc.method": method,
                    "rpc.grpc.status_code": _GRPC_CODES.get(status, 2),
                }
            )
        if self._stable_rpc:
            attributes.update({"rpc.system.name": "grpc", "rpc.method": full, "rpc.response.status_code": status})
        return full, attributes, status if status in GRPC_SERVER_ERRORS else None

    def _http(self, context: RequestContext) -> tuple[str, dict[str, Any], str | None]:
        verb, _, path = context.method.partition(" ")
        route = self._route(verb, path)
        attributes: dict[str, Any] = {"http.request.method": verb, "url.path": path, "url.scheme": self._scheme}
        if route:
            attributes["http.route"] = route
        try:
            status = int(context.status)
        except ValueError:
            status = 0
        if status:
            attributes["http.response.status_code"] = status
        return (f"{verb} {route}" if route else verb), attributes, str(status) if status >= 500 else None

    def _route(self, verb: str, path: str) -> str:
        """The route template of a path (``/v2/models/{model}/infer``), as the HTTP API matched it."""
        if self._routes is None:
            from ..http.api import route_template

            self._routes = route_template
        template: str = self._routes(verb, path)
        return template

    def close(self) -> None:
        """Export what is pending and stop the exporter (the server has stopped)."""
        self.provider.shutdown()
