"""The call guard (service.grpc.interceptor.CallGuard) in a real in-process grpc.aio server on
port 0, in front of a tiny servicer (no mocks): auth before decoding, the call gate's limit and
drain, health never counted, undecodable messages answered INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from service.generated.serving.v1 import serving_pb2 as pb
from service.grpc.interceptor import DRAINING_MESSAGE, CallGuard, _Refused, safe_deserializer
from service.limits import CallGate
from service.security import MISSING, Authenticator, TokenStore

UNARY = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"
TOKEN = "tok-123"
identity: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
GOOD = pb.PredictProfitRequest(population=[1.0, 2.0]).SerializeToString()
GARBAGE = b"\xff" * 16


class CountingParser:
    """``PredictProfitRequest.FromString`` that counts its calls (``__self__`` names the message
    type, as on the generated code's bound classmethod)."""

    __self__ = pb.PredictProfitRequest

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, data: bytes) -> pb.PredictProfitRequest:
        self.calls += 1
        return pb.PredictProfitRequest.FromString(data)


class Echo:
    """A servicer that answers each PredictProfitRequest with its populations doubled; calls wait
    while ``hold`` is clear. Counts how often a request was parsed."""

    def __init__(self) -> None:
        self.hold = asyncio.Event()
        self.hold.set()
        self.entered = 0
        self.parse = CountingParser()

    @property
    def parsed(self) -> int:
        return self.parse.calls

    async def unary(self, request: pb.PredictProfitRequest, context: Any) -> pb.PredictProfitResponse:
        self.entered += 1
        await self.hold.wait()
        return pb.PredictProfitResponse(profit_usd=[2 * p for p in request.population])

    async def stream(
        self, requests: AsyncIterator[pb.PredictProfitRequest], context: Any
    ) -> AsyncIterator[pb.PredictProfitResponse]:
        async for request in requests:
            yield pb.PredictProfitResponse(profit_usd=[2 * p for p in request.population])

    def handler(self) -> grpc.GenericRpcHandler:
        parse, serialize = self.parse, pb.PredictProfitResponse.SerializeToString
        return grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary, parse, serialize),
                "Stream": grpc.stream_stream_rpc_method_handler(self.stream, parse, serialize),
            },
        )


Scenario = Callable[[grpc.aio.Channel, Echo, CallGate], Awaitable[Any]]


def run(scenario: Scenario, limit: int | None = None, tokens: list[str] | None = None) -> Any:
    """Serve Echo and health behind a CallGuard on a free port; run ``scenario`` with a channel."""

    async def main() -> Any:
        gate = CallGate(limit)
        authenticator = Authenticator(TokenStore(tokens)) if tokens else None
        server = grpc.aio.server(interceptors=[CallGuard(gate, authenticator)])
        echo = Echo()
        server.add_generic_rpc_handlers((echo.handler(),))
        health = health_aio.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await scenario(channel, echo, gate)
        finally:
            await server.stop(0)

    return asyncio.run(main())


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def unary(channel: grpc.aio.Channel) -> Any:
    return channel.unary_unary(
        UNARY, request_serializer=identity, response_deserializer=pb.PredictProfitResponse.FromString
    )


async def health_status(channel: grpc.aio.Channel) -> int:
    return (await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)).status


def test_good_and_undecodable_requests() -> None:
    async def scenario(channel: grpc.aio.Channel, echo: Echo, gate: CallGate) -> tuple:
        ok = await unary(channel)(GOOD, timeout=5)
        bad = await code_of(unary(channel)(GARBAGE, timeout=5))
        stream = channel.stream_stream(STREAM, request_serializer=identity, response_deserializer=identity)
        streamed = await code_of(stream(iter([GOOD, GARBAGE, GOOD]), timeout=5).read())
        call = stream(iter([GOOD, GARBAGE]), timeout=5)
        answers = [pb.PredictProfitResponse.FromString(r) async for r in _until_error(call)]
        return ok, bad, streamed, answers, await call.code(), echo.entered, gate.active

    ok, bad, streamed, answers, stream_code, entered, active = run(scenario)
    assert list(ok.profit_usd) == [2.0, 4.0]
    assert bad[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert "the request is not a valid serving.v1.PredictProfitRequest message (16 bytes)" in bad[1]
    assert streamed[0] == grpc.StatusCode.OK  # the first answer came before the bad message
    assert [list(a.profit_usd) for a in answers] == [[2.0, 4.0]] and stream_code == grpc.StatusCode.INVALID_ARGUMENT
    assert entered == 1  # the undecodable unary request never reached the servicer
    assert active == 0


async def _until_error(call: Any) -> AsyncIterator[bytes]:
    try:
        async for response in call:
            yield response
    except grpc.aio.AioRpcError:
        return


def test_calls_over_the_limit_are_refused_and_health_is_never_counted() -> None:
    async def scenario(channel: grpc.aio.Channel, echo: Echo, gate: CallGate) -> tuple:
        echo.hold.clear()
        first = asyncio.ensure_future(unary(channel)(GOOD, timeout=10))
        while echo.entered < 1:
            await asyncio.sleep(0.005)
        active = gate.active
        refused = await code_of(unary(channel)(GOOD, timeout=5))
        health = [await health_status(channel) for _ in range(3)]  # over the limit, still answered
        echo.hold.set()
        answered = await first
        again = await unary(channel)(GOOD, timeout=5)  # room again
        return active, refused, health, answered, again, gate.refused, gate.active

    active, refused, health, answered, again, count, active_after = run(scenario, limit=1)
    assert active == 1
    assert refused[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the server is busy: 1 calls in progress, its max_concurrent_requests limit" in refused[1]
    assert health == [health_pb2.HealthCheckResponse.SERVING] * 3
    assert list(answered.profit_usd) == list(again.profit_usd) == [2.0, 4.0]
    assert count == 1 and active_after == 0


def test_draining_holds_new_calls_then_answers_unavailable() -> None:
    async def scenario(channel: grpc.aio.Channel, echo: Echo, gate: CallGate) -> tuple:
        gate.start_draining()
        held = asyncio.ensure_future(code_of(unary(channel)(GOOD, timeout=10)))
        while gate.held < 1:
            await asyncio.sleep(0.005)
        done_before_release = held.done()
        health = await health_status(channel)
        gate.release_held()
        return done_before_release, await held, health, echo.entered

    done_before_release, (code, details), health, entered = run(scenario, limit=4)
    assert not done_before_release
    assert (code, details) == (grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
    assert health == health_pb2.HealthCheckResponse.SERVING and entered == 0


def test_auth_is_checked_before_the_request_is_decoded() -> None:
    async def scenario(channel: grpc.aio.Channel, echo: Echo, gate: CallGate) -> tuple:
        no_token = await code_of(unary(channel)(GARBAGE, timeout=5))
        wrong = await code_of(unary(channel)(GOOD, timeout=5, metadata=[("authorization", "Bearer nope")]))
        parsed_while_refused = echo.parsed
        stream = channel.stream_stream(STREAM, request_serializer=identity, response_deserializer=identity)
        stream_refused = await code_of(stream(iter([GOOD]), timeout=5).read())
        health = await health_status(channel)  # exempt: probes carry no token
        ok = await unary(channel)(GOOD, timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")])
        garbage_with_token = await code_of(
            unary(channel)(GARBAGE, timeout=5, metadata=[("authorization", f"Bearer {TOKEN}")])
        )
        return no_token, wrong, parsed_while_refused, stream_refused, health, ok, garbage_with_token, echo.parsed

    no_token, wrong, parsed, stream_refused, health, ok, garbage, parsed_after = run(scenario, tokens=[TOKEN])
    assert no_token == (grpc.StatusCode.UNAUTHENTICATED, MISSING)  # not INVALID_ARGUMENT: never parsed
    assert wrong == (grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
    assert parsed == 0 and stream_refused[0] == grpc.StatusCode.UNAUTHENTICATED
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert list(ok.profit_usd) == [2.0, 4.0]
    assert garbage[0] == grpc.StatusCode.INVALID_ARGUMENT and parsed_after == 2


def test_safe_deserializer_never_raises() -> None:
    parse = safe_deserializer(pb.ClassifyRequest.FromString)
    assert isinstance(parse(b""), pb.ClassifyRequest)
    bad = parse(b"\x12\xff\xff")
    assert isinstance(bad, _Refused) and bad.code == grpc.StatusCode.INVALID_ARGUMENT
    assert bad.message.startswith("the request is not a valid serving.v1.ClassifyRequest message (3 bytes): ")

    def explode(data: bytes) -> None:
        raise ValueError("no")

    assert "not a valid request message" in safe_deserializer(explode)(b"x").message
