"""Structured logging: JSON lines (or text), and one debug line per gRPC request.

Adapters add request details (model, version, batch) with :func:`annotate`; the interceptor writes
them with the method, status code and latency when the call ends.
"""
from __future__ import annotations

import contextvars
import inspect
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import grpc

log = logging.getLogger("service.requests")

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_request_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "request_fields", default=None
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the ``extra=`` fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return super().format(record) + (" " + fields if fields else "")


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route all logs to stderr in the chosen format and level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library internals stay out of our per-request debug lines.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.INFO))


def annotate(**fields: Any) -> None:
    """Attach fields to the current request's log line (no-op outside a logged request)."""
    current = _request_fields.get()
    if current is not None:
        current.update(fields)


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    code = context.code()
    if code is not None:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if exc is None:
        return "OK"
    return "UNKNOWN" if isinstance(exc, Exception) else "CANCELLED"


class RequestLogInterceptor(grpc.aio.ServerInterceptor):
    """Logs one line per request at DEBUG: method, code, duration and annotated fields."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not log.isEnabledFor(logging.DEBUG):
            return handler
        method = details.method
        if handler.unary_unary or handler.stream_unary:
            behavior = handler.unary_unary or handler.stream_unary

            async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                _request_fields.set({})  # each RPC runs in its own task and context
                exc: BaseException | None = None
                try:
                    return await behavior(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    _log(method, context, exc, start)

            factory = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler
            )
            wrapped = unary_response
        else:
            behavior = handler.unary_stream or handler.stream_stream

            async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                _request_fields.set({})  # each RPC runs in its own task and context
                exc: BaseException | None = None
                try:
                    result = behavior(request, context)
                    if inspect.isasyncgen(result):
                        async for item in result:
                            yield item
                    else:
                        await result
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    _log(method, context, exc, start)

            factory = (
                grpc.unary_stream_rpc_method_handler
                if handler.unary_stream
                else grpc.stream_stream_rpc_method_handler
            )
            wrapped = stream_response
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _log(method: str, context: grpc.aio.ServicerContext, exc: BaseException | None, start: float) -> None:
    fields = _request_fields.get() or {}
    log.debug(
        "request",
        extra={
            "method": method,
            "code": _code(context, exc),
            "ms": round((time.perf_counter() - start) * 1000, 3),
            **fields,
        },
    )
