"""Request guards in front of every servicer (:class:`GuardInterceptor`).

* **Undecodable messages.** gRPC decodes each request before our code sees it; a message that
  does not parse (truncated bytes, a wrong wire type, a ``string`` field that is not valid UTF-8)
  made grpc.aio answer ``UNKNOWN: Unexpected DecodeError``. Now: ``INVALID_ARGUMENT`` naming the
  message type, for unary and streaming requests alike.
* **Concurrent calls.** At most ``max_concurrent_requests`` calls run at once; one more is
  answered ``RESOURCE_EXHAUSTED`` at once. A stream counts as one call while it is open. Health
  checks are not counted and never refused, so probes keep working while the server is saturated.
  (grpc.aio's own ``maximum_concurrent_rpcs`` counts the call it is waiting for as active and
  refuses calls at random near the limit; this count is exact.)
* **Draining** (shutdown, :meth:`GuardInterceptor.drain`). New calls (health checks aside) do no
  work: each is *held* until gRPC has begun to stop and is then answered ``UNAVAILABLE`` (before
  its deadline, at the latest). Meanwhile the calls already running finish. Why hold rather than
  answer at once: when gRPC stops it cancels (``CANCELLED``, https://github.com/grpc/grpc/issues/41785)
  every call that reached it but was not started yet, including those arriving until the client
  has read gRPC's GOAWAY. A client refused at once retries, and its retry can land right in that
  window; a client whose call is held has nothing in flight to lose, and reads the GOAWAY before
  its UNAVAILABLE. Held calls are capped (the ``max_concurrent_requests`` limit, or 1024).
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from .errors import clip


class _Undecodable:
    """Stands in for a request message that failed to parse."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _message_type(deserializer: Callable[[bytes], Any]) -> str:
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is a classmethod
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    type_name = _message_type(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or anything a parser raises
            return _Undecodable(
                clip(
                    f"the request is not a valid {type_name} message ({len(data)} bytes): {exc}; "
                    "truncated bytes, a wrong field type or a string that is not UTF-8"
                )
            )

    return deserialize


async def _reject(context: grpc.aio.ServicerContext, bad: _Undecodable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


#: Methods never refused by the concurrency limit (prefix match).
UNLIMITED_PREFIXES = ("/grpc.health.v1.Health/",)


class ConcurrencyLimit:
    """Counts the calls running now (event loop only, no lock needed); ``limit`` None = no cap."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit if limit else None
        self.active = 0
        self.refused = 0
        self.draining = False
        self.last_call = 0.0  # time.monotonic() when the last call (refused or not) came in
        self.held = 0
        self.release = asyncio.Event()  # set once gRPC has begun to stop: held calls answer

    def admit(self) -> str | None:
        """Why a new call is refused now, or None (then the caller counts itself in)."""
        self.last_call = time.monotonic()
        if self.draining:
            return "draining"
        if self.limit is not None and self.active >= self.limit:
            return "busy"
        return None

    async def refuse(self, context: grpc.aio.ServicerContext, why: str) -> None:
        if why == "draining":
            if self.held < (self.limit or 1024):
                self.held += 1
                try:
                    remaining = context.time_remaining()
                    timeout = None if remaining is None else max(remaining - 0.1, 0.0)
                    await asyncio.wait_for(self.release.wait(), timeout)
                except asyncio.TimeoutError:
                    pass  # answer before the caller's deadline
                finally:
                    self.held -= 1
            self.refused += 1
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down and takes no new calls; retry (another replica)",
            )
        self.refused += 1
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the server is busy: {self.active} calls in progress, its max_concurrent_requests "
            "limit; retry with backoff",
        )


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is _Undecodable:
            await _reject(context, request)
        yield request


def _wrap(behavior: Callable[..., Any], stream_request: bool, limit: ConcurrencyLimit | None) -> Callable[..., Any]:
    """``behavior`` behind the concurrency limit (when given), with undecodable requests rejected
    first; same kind (coroutine function or async generator function), which grpc.aio looks at
    to drive it."""

    if inspect.isasyncgenfunction(behavior):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if limit is not None and (why := limit.admit()) is not None:
                await limit.refuse(context, why)
            if stream_request:
                request = _checked(request, context)
            elif type(request) is _Undecodable:
                await _reject(context, request)
            if limit is not None:
                limit.active += 1
            try:
                async for item in behavior(request, context):
                    yield item
            finally:
                if limit is not None:
                    limit.active -= 1

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if limit is not None and (why := limit.admit()) is not None:
            await limit.refuse(context, why)
        if stream_request:
            request = _checked(request, context)
        elif type(request) is _Undecodable:
            await _reject(context, request)
        if limit is not None:
            limit.active += 1
        try:
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result
        finally:
            if limit is not None:
                limit.active -= 1

    return coroutine


def guard_handler(handler: grpc.RpcMethodHandler, limit: ConcurrencyLimit | None = None) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that never raises and a behaviour that answers
    INVALID_ARGUMENT for a message that did not parse (and RESOURCE_EXHAUSTED over ``limit``)."""
    if handler.unary_unary:
        factory, behavior, stream_request = grpc.unary_unary_rpc_method_handler, handler.unary_unary, False
    elif handler.unary_stream:
        factory, behavior, stream_request = grpc.unary_stream_rpc_method_handler, handler.unary_stream, False
    elif handler.stream_unary:
        factory, behavior, stream_request = grpc.stream_unary_rpc_method_handler, handler.stream_unary, True
    else:
        factory, behavior, stream_request = grpc.stream_stream_rpc_method_handler, handler.stream_stream, True
    return factory(
        _wrap(behavior, stream_request, limit),
        request_deserializer=_safe(handler.request_deserializer),
        response_serializer=handler.response_serializer,
    )


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler with :func:`guard_handler` (once per method, then cached)."""

    def __init__(self, max_concurrent: int | None = None) -> None:
        self.limit = ConcurrencyLimit(max_concurrent)
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    @property
    def active(self) -> int:
        """Calls running now (health checks not counted)."""
        return self.limit.active

    def start_draining(self) -> None:
        """From now on hold every new call (health aside) for an UNAVAILABLE answer."""
        self.limit.draining = True

    def release_held(self) -> None:
        """Answer the held calls UNAVAILABLE (call once gRPC has begun to stop)."""
        self.limit.release.set()

    async def drain(self, timeout: float, quiet: float = 0.02, linger: float = 2.0) -> dict[str, float]:
        """Hold new calls and wait (at most ``timeout`` s) until none is running and either no
        call came in for ``quiet`` s (gRPC's queue of arrived-but-unstarted calls is then empty,
        since an idle event loop starts them at once) or ``linger`` s passed. Returns figures;
        then stop gRPC and call :meth:`release_held`."""
        self.start_draining()
        start = time.monotonic()
        running_at_start = self.limit.active
        while True:
            now = time.monotonic()
            if now - start >= timeout:
                break
            if not self.limit.active and (now - self.limit.last_call >= quiet or now - start >= linger):
                break
            await asyncio.sleep(0.002)
        return {
            "running_at_signal": running_at_start,
            "still_running": self.limit.active,
            "held_for_unavailable": self.limit.held,
            "drain_seconds": round(time.monotonic() - start, 3),
        }

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        cached = self._cache.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        limit = None if details.method.startswith(UNLIMITED_PREFIXES) else self.limit
        wrapped = guard_handler(handler, limit)
        self._cache[details.method] = (handler, wrapped)  # keys: registered methods only
        return wrapped
