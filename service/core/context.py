"""The per-request context: one object per request (per message on streams) that the front end
opens, the data plane and the batcher fill in, and metrics, logs and traces read when it ends."""

from __future__ import annotations

import time
from typing import Any

#: A gRPC call cancelled with less than this left of its deadline counts as cut by the deadline
#: (DEADLINE_EXCEEDED, dropped "deadline"), not as cancelled by its caller: the client's own
#: deadline passes first (by the request's transit time and gRPC's rounding of the timeout), and
#: its cancel can reach the server just before the server's timer fires.
DEADLINE_SLACK_SECONDS = 0.25


class RequestContext:
    """What is known about one request. Times are ``time.perf_counter()`` seconds."""

    __slots__ = (
        "protocol",
        "method",
        "inference",
        "start",
        "deadline",
        "model",
        "version",
        "request_id",
        "rows",
        "queue_seconds",
        "input_seconds",
        "compute_seconds",
        "computed",
        "batch_rows",
        "status",
        "error",
        "fields",
        "end",
        # Set only while tracing is on (service/observability/tracing.py): the request's headers
        # or metadata, where a caller's W3C trace context is. Never initialised otherwise, so
        # that tracing off costs the hot path nothing; read it with getattr(context, "carrier", None).
        "carrier",
        # Set only while a guarded rollout or capture is on (service/rollout/): the canary routing
        # of an unversioned request, and what the request ran with for the mirror and capture.
        "route",
        "tap",
    )

    #: The request's headers or metadata; only set while tracing or a canary is on (see __slots__).
    carrier: Any
    #: service.rollout.state.Route of a request routed between a primary and its canary.
    route: Any
    #: service.rollout.controller.Tap: the version, inputs and outputs of the request.
    tap: Any

    def __init__(self, protocol: str, method: str, *, inference: bool = False, timeout: float | None = None) -> None:
        self.protocol = protocol
        self.method = method
        #: An inference request (counted in the request metrics); metadata calls are not.
        self.inference = inference
        self.start = time.perf_counter()
        self.deadline = None if timeout is None else self.start + timeout
        self.model = ""
        self.version = ""
        self.request_id = ""
        self.rows = 0
        #: Time in the batch queue before the first batch with this request's rows started.
        self.queue_seconds = 0.0
        #: From a batch's start to onnxruntime's start: hand-off to an inference thread and the
        #: concatenation of the inputs (summed when the request was split across batches).
        self.input_seconds = 0.0
        #: onnxruntime time of the batches this request's rows ran in (summed when split).
        self.compute_seconds = 0.0
        #: ``perf_counter()`` when the (last) batch with this request's rows finished computing.
        self.computed = 0.0
        #: Rows of the (largest) executed batch this request's rows ran in.
        self.batch_rows = 0
        #: The protocol's status for the outcome ("OK", "INVALID_ARGUMENT", "200", ...).
        self.status = ""
        self.error: str | None = None
        self.fields: dict[str, Any] | None = None
        #: ``perf_counter()`` when the front end had answered (set by ``DataPlane.finish``).
        self.end = 0.0

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline (None = no deadline)."""
        return None if self.deadline is None else self.deadline - time.perf_counter()

    def resolved(self, name: str, version: int) -> None:
        """Record the model version the request is for."""
        self.model = name
        self.version = str(version)

    def annotate(self, **fields: Any) -> None:
        """Extra fields for the request's log line."""
        if self.fields is None:
            self.fields = fields
        else:
            self.fields.update(fields)

    def seconds(self) -> float:
        """Time from the request's opening to its answer (until then: to now)."""
        return (self.end or time.perf_counter()) - self.start


class Carrier:
    """Keeps a request's gRPC metadata or HTTP headers on its context (``context.carrier``) for
    those who read them after the fact: tracing (a caller's ``traceparent``) and the canary's
    sticky routing (``x-caller-id``). A front end calls it only while one of them is on
    (``DataPlane.headers``)."""

    @staticmethod
    def grpc(context: RequestContext, grpc_context: Any) -> None:
        context.carrier = grpc_context.invocation_metadata()

    @staticmethod
    def http(context: RequestContext, headers: Any) -> None:
        context.carrier = headers


CARRIER = Carrier()
