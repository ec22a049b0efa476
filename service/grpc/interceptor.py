"""The one interceptor in front of every gRPC method (:class:`CallGuard`). Each method gets a
policy (:func:`policy_for`); a call then goes through, in this order:

1. **Auth** (when tokens are configured), on the metadata, before the request is parsed: a call
   without a valid bearer token ends with UNAUTHENTICATED; model control (RepositoryModelLoad /
   Unload) needs an admin token (PERMISSION_DENIED for an inference token). Exempt, so that load
   balancers and probes need no secret: the health service and server reflection.
2. **Size**, on the raw bytes, before they are parsed: an inference message larger than any
   request the served models accept is RESOURCE_EXHAUSTED; health and reflection messages are
   tiny by nature and capped at a few KiB.
3. **A call gate** (:mod:`service.limits`): inference and metadata calls share the server's
   ``max_concurrent_requests`` (with HTTP); on an inference stream each message takes a place
   there while it is handled, and the open streams have a gate of their own, so idle streams
   take nothing from other callers. Health Watch streams and reflection calls, which need no
   token and live long, have small gates of their own too. Health Check is never refused. While
   draining, gated calls are held and then answered UNAVAILABLE; a stream waiting for its next
   message is ended UNAVAILABLE at once.
4. **Undecodable messages**: a message that does not parse (truncated, a wrong wire type, a
   ``string`` that is not UTF-8) is INVALID_ARGUMENT naming the message type (grpc.aio would say
   ``UNKNOWN: Unexpected DecodeError``), for unary and streaming requests alike.

The wrapped handler keeps the original's kind (coroutine or async generator function), which
grpc.aio looks at to drive it; wrapped handlers are cached per method.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ..errors import clip
from ..limits import DRAINING, CallGate, MessageLimits
from ..security import PERMISSION_DENIED, Authenticator, Refusal

HEALTH = "/grpc.health.v1.Health/"
HEALTH_WATCH = HEALTH + "Watch"
REFLECTION = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
#: Model control: an admin token when auth is on.
CONTROL = frozenset(
    {"/inference.GRPCInferenceService/RepositoryModelLoad", "/inference.GRPCInferenceService/RepositoryModelUnload"}
)
#: Largest health request (a service name) and reflection request (a symbol or file name).
HEALTH_MESSAGE_BYTES = 1024
REFLECTION_MESSAGE_BYTES = 16 * 1024
DRAINING_MESSAGE = "the server is shutting down and takes no new calls; retry (another replica)"

Behavior = Callable[..., Any]


@dataclass(frozen=True)
class Policy:
    """What a method's calls go through: auth (None = exempt, else whether model control), the
    largest request message (a number, or the live limit of the served models), a gate for the
    call, and for inference streams the gate each message takes (``per_message``, which also
    says when the server drains)."""

    control: bool | None
    max_bytes: int | MessageLimits
    gate: CallGate | None
    per_message: CallGate | None = None


@dataclass(frozen=True)
class Gates:
    """The gates of one server: ``main`` (``max_concurrent_requests``, shared with HTTP),
    ``streams`` (open inference streams), ``watches`` (health Watch), ``reflection``."""

    main: CallGate
    streams: CallGate
    watches: CallGate
    reflection: CallGate

    @classmethod
    def default(cls, main: CallGate) -> Gates:
        return cls(main, CallGate(128), CallGate(32, "max_health_watches"), CallGate(8, "max_reflection_calls"))


def policy_for(method: str, gates: Gates, limits: MessageLimits, stream_request: bool) -> Policy:
    if method.startswith(HEALTH):
        return Policy(None, HEALTH_MESSAGE_BYTES, gates.watches if method == HEALTH_WATCH else None)
    if method.startswith(REFLECTION):
        return Policy(None, REFLECTION_MESSAGE_BYTES, gates.reflection)
    if stream_request:
        return Policy(method in CONTROL, limits, gates.streams, per_message=gates.main)
    return Policy(method in CONTROL, limits, gates.main)


class _Refused:
    """Stands in for a request message that was not parsed: its status and message."""

    __slots__ = ("code", "message")

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


def safe_deserializer(
    deserializer: Callable[[bytes], Any], max_bytes: int | MessageLimits = 0
) -> Callable[[bytes], Any]:
    """``deserializer`` that never raises: a message over ``max_bytes`` (0: no cap) or one that
    does not parse becomes a :class:`_Refused` instead."""
    type_name = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        limit = max_bytes.current if isinstance(max_bytes, MessageLimits) else max_bytes
        if limit and len(data) > limit:
            return _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the {type_name} message is {len(data)} bytes, larger than any request the server accepts "
                f"({limit} bytes)",
            )
        try:
            return deserializer(data)
        except Exception as exc:
            return _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                clip(
                    f"the request is not a valid {type_name} message ({len(data)} bytes): {exc}; "
                    "truncated bytes, a wrong field type or a string that is not UTF-8"
                ),
            )

    return deserialize


async def _checked(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, per_message: CallGate | None
) -> AsyncIterator[Any]:
    """The stream's messages, refused ones ending the call; with ``per_message``, each message
    holds a place in that gate from when it is handed on until the next one is asked for."""
    incoming = aiter(requests)
    while True:
        try:
            request = await (anext(incoming) if per_message is None else _next_message(incoming, per_message, context))
        except StopAsyncIteration:
            return
        if type(request) is _Refused:
            await context.abort(request.code, request.message)
        if per_message is None:
            yield request
            continue
        why = per_message.admit()
        if why == DRAINING:
            await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        elif why is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, per_message.busy_message())
        per_message.active += 1
        try:
            yield request
        finally:
            per_message.active -= 1


async def _next_message(incoming: AsyncIterator[Any], gate: CallGate, context: grpc.aio.ServicerContext) -> Any:
    """The stream's next message; UNAVAILABLE instead once ``gate`` drains (also while waiting)."""
    if gate.draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
    task = asyncio.current_task()
    assert task is not None
    gate.waiting.add(task)
    try:
        return await anext(incoming)
    except asyncio.CancelledError:
        if not gate.draining:
            raise
        task.uncancel()  # woken by the drain (CallGate.start_draining), not cancelled by the client
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
    finally:
        gate.waiting.discard(task)


def _denied(handler: grpc.RpcMethodHandler, refusal: Refusal) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that ends the call with the refusal's status
    without decoding the request (no deserializer: the bytes are never parsed)."""
    code = grpc.StatusCode.PERMISSION_DENIED if refusal.status == PERMISSION_DENIED else grpc.StatusCode.UNAUTHENTICATED

    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, refusal.message)

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny)
    return grpc.stream_stream_rpc_method_handler(deny)


class _Admission:
    """What happens before a call's handler runs (auth came before): the gate, the decode guard."""

    def __init__(self, gate: CallGate | None, per_message: CallGate | None = None) -> None:
        self.gate = gate
        self.per_message = per_message

    async def enter(self, request: Any, stream_request: bool, context: grpc.aio.ServicerContext) -> Any:
        """Admit the call and return the request to hand the handler (the caller must then call
        :meth:`leave` once the handler is done), or a :class:`_Refused` to answer instead."""
        gate = self.gate
        if self.per_message is not None and self.per_message.draining:
            await self.per_message.hold(context.time_remaining())
            return _Refused(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        if gate is not None:
            why = gate.admit()
            if why == DRAINING:
                await gate.hold(context.time_remaining())
                return _Refused(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            if why is not None:
                message = gate.busy_message() if self.per_message is None else self._streams_busy(gate)
                return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        if stream_request:
            request = _checked(request, context, self.per_message)
        elif type(request) is _Refused:
            return request
        if gate is not None:
            gate.active += 1
        return request

    def leave(self) -> None:
        if self.gate is not None:
            self.gate.active -= 1

    @staticmethod
    def _streams_busy(gate: CallGate) -> str:
        return (
            f"too many inference streams: {gate.active} open, the max_inference_streams limit; "
            "close one or retry with backoff"
        )


def _wrap(behavior: Behavior, stream_request: bool, admission: _Admission) -> Behavior:
    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            request = await admission.enter(request, stream_request, context)
            if type(request) is _Refused:
                await context.abort(request.code, request.message)
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                admission.leave()

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        request = await admission.enter(request, stream_request, context)
        if type(request) is _Refused:  # answered without raising: see service.grpc.calls.refuse
            context.set_code(request.code)
            context.set_details(request.message)
            return None
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            admission.leave()

    return coroutine


def guard_handler(handler: grpc.RpcMethodHandler, policy: Policy) -> grpc.RpcMethodHandler:
    """``handler`` behind ``policy``'s size cap and gate, with a deserializer that never raises."""
    if handler.unary_unary:
        factory, behavior, stream_request = grpc.unary_unary_rpc_method_handler, handler.unary_unary, False
    elif handler.unary_stream:
        factory, behavior, stream_request = grpc.unary_stream_rpc_method_handler, handler.unary_stream, False
    elif handler.stream_unary:
        factory, behavior, stream_request = grpc.stream_unary_rpc_method_handler, handler.stream_unary, True
    else:
        factory, behavior, stream_request = grpc.stream_stream_rpc_method_handler, handler.stream_stream, True
    return factory(
        _wrap(behavior, stream_request, _Admission(policy.gate, policy.per_message)),
        request_deserializer=safe_deserializer(handler.request_deserializer, policy.max_bytes),
        response_serializer=handler.response_serializer,
    )


class CallGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]  # grpc ships no type hints
    """Applies auth, size caps, the gates and the decode guard to every method (see the module
    docstring)."""

    def __init__(
        self,
        gates: Gates | CallGate,
        authenticator: Authenticator | None = None,
        limits: MessageLimits | None = None,
    ) -> None:
        self.gates = gates if isinstance(gates, Gates) else Gates.default(gates)
        self.authenticator = authenticator
        self.limits = limits if limits is not None else MessageLimits(None)
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler, Policy]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method = details.method
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            stream_request = bool(handler.stream_unary or handler.stream_stream)
            policy = policy_for(method, self.gates, self.limits, stream_request)
            cached = (handler, guard_handler(handler, policy), policy)
            self._cache[method] = cached  # keys: registered methods only
        policy = cached[2]
        if policy.control is not None and self.authenticator is not None:
            values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
            refusal = self.authenticator.check(values, control=policy.control)
            if refusal is not None:
                self.authenticator.refused(method, refusal)
                return _denied(handler, refusal)
        return cached[1]
