"""The one interceptor in front of every gRPC method (:class:`CallGuard`), in this order:

1. **Auth** (when tokens are configured): a call without a valid bearer token ends with
   UNAUTHENTICATED before its request is decoded. Exempt, so that load balancers and probes need
   no secret: the health service and server reflection.
2. **The call gate** (:mod:`service.limits`): RESOURCE_EXHAUSTED over ``max_concurrent_requests``;
   while draining, held and then UNAVAILABLE. Health checks are not counted and never refused.
3. **Undecodable messages.** gRPC decodes each request before our code sees it; a message that
   does not parse (truncated bytes, a wrong wire type, a ``string`` field that is not valid
   UTF-8) made grpc.aio answer ``UNKNOWN: Unexpected DecodeError``. Now: INVALID_ARGUMENT naming
   the message type, for unary and streaming requests alike.

The wrapped handler keeps the original's kind (coroutine or async generator function), which
grpc.aio looks at to drive it; wrapped handlers are cached per method.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ..errors import clip
from ..limits import DRAINING, CallGate
from ..security import Authenticator

#: Methods reachable without a token (prefix match on the full method name).
AUTH_EXEMPT = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
#: Methods never counted or refused by the call gate.
UNGATED = ("/grpc.health.v1.Health/",)
DRAINING_MESSAGE = "the server is shutting down and takes no new calls; retry (another replica)"

Behavior = Callable[..., Any]


class _Undecodable:
    """Stands in for a request message that failed to parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


def safe_deserializer(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """``deserializer`` that returns an :class:`_Undecodable` instead of raising."""
    type_name = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(
                clip(
                    f"the request is not a valid {type_name} message ({len(data)} bytes): {exc}; "
                    "truncated bytes, a wrong field type or a string that is not UTF-8"
                )
            )

    return deserialize


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is _Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request


def _denied(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with UNAUTHENTICATED without
    decoding the request (no deserializer: the bytes are never parsed)."""

    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.stream_stream_rpc_method_handler(deny)


class _Admission:
    """What happens before a call's handler runs (auth came before): the gate, the decode guard."""

    def __init__(self, gate: CallGate | None) -> None:
        self.gate = gate

    async def enter(self, request: Any, stream_request: bool, context: grpc.aio.ServicerContext) -> Any:
        """Admit the call (aborting it otherwise) and return the request to hand the handler;
        the caller must call :meth:`leave` once the handler is done."""
        gate = self.gate
        if gate is not None:
            why = gate.admit()
            if why == DRAINING:
                await gate.hold(context.time_remaining())
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            elif why is not None:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, gate.busy_message())
        if stream_request:
            request = _checked(request, context)
        elif type(request) is _Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if gate is not None:
            gate.active += 1
        return request

    def leave(self) -> None:
        if self.gate is not None:
            self.gate.active -= 1


def _wrap(behavior: Behavior, stream_request: bool, admission: _Admission) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = await admission.enter(request, stream_request, context)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                admission.leave()

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        request = await admission.enter(request, stream_request, context)
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            admission.leave()

    return coroutine


def guard_handler(handler: grpc.RpcMethodHandler, admission: _Admission) -> grpc.RpcMethodHandler:
    """``handler`` behind ``admission``, with a deserializer that never raises."""
    if handler.unary_unary:
        factory, behavior, stream_request = grpc.unary_unary_rpc_method_handler, handler.unary_unary, False
    elif handler.unary_stream:
        factory, behavior, stream_request = grpc.unary_stream_rpc_method_handler, handler.unary_stream, False
    elif handler.stream_unary:
        factory, behavior, stream_request = grpc.stream_unary_rpc_method_handler, handler.stream_unary, True
    else:
        factory, behavior, stream_request = grpc.stream_stream_rpc_method_handler, handler.stream_stream, True
    return factory(
        _wrap(behavior, stream_request, admission),
        request_deserializer=safe_deserializer(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Applies auth, the call gate and the decode guard to every method (see the module docstring)."""

    def __init__(self, gate: CallGate, authenticator: Authenticator | None = None) -> None:
        self.gate = gate
        self.authenticator = authenticator
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        if self.authenticator is not None and not method.startswith(AUTH_EXEMPT):
            values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
            reason = self.authenticator.problem(values)
            if reason is not None:
                self.authenticator.refused(method, reason)
                return _denied(handler, reason)
        cached = self._cache.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = guard_handler(handler, _Admission(None if method.startswith(UNGATED) else self.gate))
        self._cache[method] = (handler, wrapped)  # keys: registered methods only
        return wrapped
