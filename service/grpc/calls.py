"""The two wrappers every RPC of both gRPC services goes through: :meth:`Rpc.unary` and
:meth:`Rpc.stream`. Each opens a :class:`~service.core.context.RequestContext` per request (per
message on streams), turns a :class:`~service.errors.ServingError` into its gRPC status
(:mod:`.status`), records the outcome in the context and hands it to the data plane's
observers (metrics, statistics, request log, traces) once answered; with tracing or a canary
on, the call's metadata is kept on the context (its ``traceparent``, ``x-caller-id``). Handlers
only decode, call the data plane and encode: ``handler(self, request, context) -> response``
with the request context."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from ..core.context import DEADLINE_SLACK_SECONDS, RequestContext
from ..core.dataplane import DataPlane
from ..errors import ServingError, clip
from .status import status_of

Req = TypeVar("Req")
Resp = TypeVar("Resp")


class Servicer(Protocol):
    plane: DataPlane


Handler = Callable[[Any, Req, RequestContext], Awaitable[Resp]]
GrpcUnary = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]
GrpcStream = Callable[[Any, AsyncIterator[Req], grpc.aio.ServicerContext], AsyncIterator[Resp]]
#: What a stream does with a failed message: return a response to send (the stream goes on) or
#: raise a ServingError (the stream ends with its status).
OnError = Callable[[Req, ServingError, int], Resp]


def failure_status(grpc_context: grpc.aio.ServicerContext, exc: BaseException) -> str:
    """The status name to record for a call ending with ``exc`` that is not a ServingError."""
    code = grpc_context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return str(code.name)  # the handler aborted the call itself
    if isinstance(exc, asyncio.CancelledError):
        try:
            remaining = grpc_context.time_remaining()
        except Exception:
            remaining = None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= DEADLINE_SLACK_SECONDS else "CANCELLED"
    return "UNKNOWN"


def refuse(grpc_context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """Set the call's status; the handler then returns (None, or ends its stream). Not
    ``abort()``: grpc.aio keeps the AbortError it raises in a reference cycle with the call's
    state and frames, request included, until the garbage collector runs, so refused 3 MB
    requests piled up (+230 MiB after 160 of them; flat now)."""
    grpc_context.set_code(code)
    grpc_context.set_details(clip(message))


class Rpc:
    """The wrappers for one gRPC service (``protocol`` is the metrics label: typed, v2)."""

    def __init__(self, protocol: str, service: str) -> None:
        self.protocol = protocol
        self.service = service

    def unary(
        self, name: str | None = None, *, inference: bool = False
    ) -> Callable[[Handler[Req, Resp]], GrpcUnary[Req, Resp]]:
        """A unary RPC named ``name`` (default: the handler's name); ``inference`` ones are
        counted in the request metrics."""

        def decorate(handler: Handler[Req, Resp]) -> GrpcUnary[Req, Resp]:
            method = f"/{self.service}/{name or handler.__name__}"
            protocol = self.protocol

            @functools.wraps(handler)
            async def call(servicer: Servicer, request: Req, grpc_context: grpc.aio.ServicerContext) -> Resp:
                context = RequestContext(protocol, method, inference=inference, timeout=grpc_context.time_remaining())
                headers = servicer.plane.headers
                if headers is not None:  # tracing or a canary: the call's metadata
                    headers.grpc(context, grpc_context)
                try:
                    response = await handler(servicer, request, context)
                except ServingError as err:
                    code, message = status_of(err), str(err)
                except BaseException as exc:  # cancelled, or a bug (UNKNOWN)
                    context.status = failure_status(grpc_context, exc)
                    servicer.plane.finish(context)
                    raise
                else:
                    context.status = "OK"
                    servicer.plane.finish(context)
                    return response
                context.status, context.error = code.name, message
                servicer.plane.finish(context)
                refuse(grpc_context, code, message)
                return None  # type: ignore[return-value]  # with the status set, gRPC sends no message

            if name:
                call.__name__ = call.__qualname__ = name
            return call

        return decorate

    def stream(
        self, handler: Handler[Req, Resp], name: str, *, on_error: OnError[Req, Resp], inference: bool = False
    ) -> GrpcStream[Req, Resp]:
        """A bidirectional stream answering each message with ``handler``, in order; a failed
        message goes to ``on_error`` (see :data:`OnError`)."""
        method = f"/{self.service}/{name}"
        protocol = self.protocol

        async def call(
            servicer: Servicer, requests: AsyncIterator[Req], grpc_context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Resp]:
            index = 0
            idle = servicer.plane.settings.stream_idle_timeout_seconds
            incoming = aiter(requests)
            while True:
                try:
                    async with asyncio.timeout(idle):
                        request = await anext(incoming)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    await grpc_context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no message on this stream for {idle:g} s (stream_idle_timeout_seconds): closed",
                    )
                context = RequestContext(protocol, method, inference=inference, timeout=grpc_context.time_remaining())
                headers = servicer.plane.headers
                if headers is not None:
                    headers.grpc(context, grpc_context)
                try:
                    response = await handler(servicer, request, context)
                except ServingError as err:
                    context.status, context.error = status_of(err).name, str(err)
                    servicer.plane.finish(context)
                    try:
                        response = on_error(request, err, index)
                    except ServingError as final:
                        refuse(grpc_context, status_of(final), str(final))
                        return
                except BaseException as exc:
                    context.status = failure_status(grpc_context, exc)
                    servicer.plane.finish(context)
                    raise
                else:
                    context.status = "OK"
                    servicer.plane.finish(context)
                index += 1
                yield response

        call.__name__ = call.__qualname__ = name
        return call
