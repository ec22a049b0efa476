"""The abuse suite: what one caller (often without a token) can do to the server, attack by attack.

    python benchmarks/abuse.py [--only NAME ...] [--baseline-tree DIR] [--json FILE]

Starts the server on the bundled models as an operator would expose it (bearer tokens, an admin
token, model control on, ``max_concurrent_requests`` 4, short stream/HTTP timeouts so that the
run takes minutes: see :data:`SERVER_ENV`), and a *probe*: a separate process that keeps calling
``Classify`` (one image, with a token) back to back and logs each call's latency. Then, for each
attack in :data:`ATTACKS`:

* the server's peak RSS is reset (``/proc/PID/clear_refs``) and the attack runs (quick ones are
  repeated for at least ``--min-seconds`` so the probe sees them);
* printed: the status the attacker got (a gRPC code, ``HTTP nnn``, or what the connection did),
  whether that is the expected refusal, the time to it, the server's peak RSS growth, the
  probe's p99 during the attack against its p99 in the quiet second before, and probe errors.

Goals (issue 18): peak RSS growth < 64 MiB per attack, the probe served throughout with p99
within 2x of its baseline, no INTERNAL/UNKNOWN anywhere. ``--baseline-tree`` runs the same
attacks against another checkout (e.g. the commit before the hardening) for a before/after table;
attacks on a protocol that checkout does not serve print ``n/a``.

The attacks are plain async functions of a :class:`Target`; tests/e2e/test_abuse.py runs each
once against a real server and asserts its status and the memory bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from service.generated.inference import grpc_service_pb2 as v2  # noqa: E402
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc  # noqa: E402
from service.generated.serving.v1 import serving_pb2 as pb  # noqa: E402
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

MiB = 1024 * 1024
TOKEN = "abuse-inference-token"
ADMIN_TOKEN = "abuse-admin-token"
#: How the attacked server runs (environment, so an older checkout ignores what it lacks).
SERVER_ENV = {
    "SERVING_AUTH_TOKENS": TOKEN,
    "SERVING_ADMIN_TOKENS": ADMIN_TOKEN,
    "SERVING_ALLOW_MODEL_CONTROL": "true",
    "SERVING_MAX_CONCURRENT_REQUESTS": "4",
    "SERVING_STREAM_IDLE_TIMEOUT_SECONDS": "2",
    "SERVING_MAX_INFERENCE_STREAMS": "16",
    "SERVING_HTTP_HEADER_TIMEOUT_SECONDS": "2",
    "SERVING_HTTP_BODY_TIMEOUT_SECONDS": "2",
    "SERVING_HTTP_KEEP_ALIVE_SECONDS": "2",
    "SERVING_PROVIDER": "cpu",
}
#: Goals: peak RSS growth per attack, the probe's p99 against its baseline.
RSS_GOAL_MIB = 64
P99_GOAL_RATIO = 2.0
#: Statuses that are never an acceptable answer to anything.
FORBIDDEN = frozenset({"INTERNAL", "UNKNOWN", "HTTP 500"})
BOMB_BYTES = 400 * MiB


# -- the target and what an attack returns --------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A running server: gRPC ``address`` (host:port), HTTP ``http`` (host:port, None if off)."""

    address: str
    http: str | None = None


@dataclass
class Outcome:
    """What the attacker saw: ``status`` (a gRPC code name, ``HTTP nnn``, ``closed``, ``held``),
    a ``detail``, and for attacks that hold resources whether an authenticated call was served
    meanwhile (``served``)."""

    status: str
    detail: str = ""
    served: bool | None = None


AttackFn = Callable[[Target], Awaitable[Outcome]]


@dataclass(frozen=True)
class Attack:
    name: str
    surface: str  # typed, v2, health, reflection, control, transport, http
    what: str
    expected: frozenset[str]
    run: AttackFn
    repeat: bool = True  # quick: repeat for --min-seconds
    http: bool = False


ATTACKS: list[Attack] = []


def attack(surface: str, what: str, *expected: str, repeat: bool = True) -> Callable[[AttackFn], AttackFn]:
    def register(fn: AttackFn) -> AttackFn:
        name = fn.__name__.removeprefix("attack_").replace("_", "-")
        ATTACKS.append(Attack(name, surface, what, frozenset(expected), fn, repeat, surface == "http"))
        return fn

    return register


# -- helpers --------------------------------------------------------------------------------------


def bearer(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def channel(target: Target) -> grpc.aio.Channel:
    # The attacker sends whatever it likes: no client-side size limits.
    return grpc.aio.insecure_channel(
        target.address, options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    )


def failed(err: grpc.aio.AioRpcError) -> Outcome:
    return Outcome(err.code().name, (err.details() or "")[:300])


async def unary(target: Target, method: str, payload: bytes, metadata: Any = None, **kwargs: Any) -> Outcome:
    """Send ``payload`` as the serialized request of ``method`` (bytes crafted by hand: no
    client-side encoding cost, and shapes a well-behaved client library would refuse)."""
    async with channel(target) as ch:
        call = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
        try:
            await call(payload, metadata=metadata, timeout=60, **kwargs)
        except grpc.aio.AioRpcError as err:
            return failed(err)
    return Outcome("OK")


class EndedBeforeWrite(Exception):
    """The server ended the call (a refusal) while the client's write was on its way, and grpc.aio
    reported its own failed send (INTERNAL "Internal error from Core", debug string "Failed
    execute_batch") instead of the server's status."""


async def write(call: Any, message: Any) -> None:
    """Write ``message`` on a stream; a call the server already ended is left for ``read()`` to
    report, except in the race above (:class:`EndedBeforeWrite`: try a fresh call)."""
    try:
        await call.write(message)
    except asyncio.InvalidStateError:
        pass  # ended before the write: read() raises the server's status
    except grpc.aio.AioRpcError as err:
        if err.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (err.debug_error_string() or ""):
            raise EndedBeforeWrite from err
        raise


async def served(target: Target) -> bool:
    """Whether an authenticated Classify of one image is answered (over a connection of its own)."""
    async with channel(target) as ch:
        try:
            await pb_grpc.ModelServiceStub(ch).Classify(_one_image(), metadata=bearer(), timeout=10)
        except grpc.aio.AioRpcError:
            return False
    return True


def _one_image() -> pb.ClassifyRequest:
    pixels = np.arange(784, dtype=np.uint8).tobytes()
    return pb.ClassifyRequest(images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[1, 1, 28, 28], data=pixels))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _classify(dtype: int, shape: Sequence[int], data: bytes) -> bytes:
    shape_bytes = b"".join(_varint(d) for d in shape)
    tensor = _varint(1 << 3) + _varint(dtype) + _field(2, shape_bytes) + _field(3, data)
    return _field(2, tensor)  # ClassifyRequest.images


CLASSIFY = "/serving.v1.ModelService/Classify"
PROFIT = "/serving.v1.ModelService/PredictProfit"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _v2_raw(model: str, name: str, datatype: str, shape: Sequence[int], raw: bytes) -> v2.ModelInferRequest:
    return v2.ModelInferRequest(
        model_name=model,
        inputs=[v2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=list(shape))],
        raw_input_contents=[raw],
    )


async def _gzip_call(target: Target, method: str, request: Any, metadata: Any) -> Outcome:
    async with channel(target) as ch:
        call = ch.unary_unary(method, request_serializer=lambda r: r.SerializeToString(), response_deserializer=None)
        try:
            await call(request, metadata=metadata, timeout=120, compression=grpc.Compression.Gzip)
        except grpc.aio.AioRpcError as err:
            return failed(err)
    return Outcome("OK")


# -- typed API ------------------------------------------------------------------------------------


@attack("typed", "Classify, float32 [21000,1,28,28] (66 MB)", "RESOURCE_EXHAUSTED")
async def attack_typed_classify_21000_images(target: Target) -> Outcome:
    return await unary(target, CLASSIFY, _classify(2, [21000, 1, 28, 28], bytes(21000 * 784 * 4)), bearer())


_NAN = np.full(21000 * 784, np.nan, dtype=np.float32).tobytes()


@attack("typed", "Classify, float32 [21000,1,28,28] all NaN", "RESOURCE_EXHAUSTED")
async def attack_typed_classify_21000_nan_images(target: Target) -> Outcome:
    return await unary(target, CLASSIFY, _classify(2, [21000, 1, 28, 28], _NAN), bearer())


@attack("typed", "Classify, float32 [1024,1,28,28] all NaN (within the row limit)", "INVALID_ARGUMENT")
async def attack_typed_classify_nan_images(target: Target) -> Outcome:
    return await unary(target, CLASSIFY, _classify(2, [1024, 1, 28, 28], _NAN[: 1024 * 784 * 4]), bearer())


@attack("typed", "Classify, shape [2^40,1,28,28] declared, 784 bytes sent", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
async def attack_typed_classify_shape_lie(target: Target) -> Outcome:
    return await unary(target, CLASSIFY, _classify(1, [1 << 40, 1, 28, 28], bytes(784)), bearer())


@attack("typed", "Classify, shape of 10,000 dimensions", "INVALID_ARGUMENT")
async def attack_typed_classify_deep_shape(target: Target) -> Outcome:
    return await unary(target, CLASSIFY, _classify(1, [1] * 10_000, bytes(1)), bearer())


@attack("typed", "PredictProfit with 16M populations (64 MB packed)", "RESOURCE_EXHAUSTED")
async def attack_typed_profit_16m(target: Target) -> Outcome:
    return await unary(target, PROFIT, _field(2, bytes(16_000_000 * 4)), bearer())


@attack("typed", "Classify, 400 MiB of zeros gzip-compressed", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED", repeat=False)
async def attack_typed_gzip_bomb(target: Target) -> Outcome:
    rows = BOMB_BYTES // 784
    request = pb.ClassifyRequest(
        images=pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[rows, 1, 28, 28], data=bytes(rows * 784))
    )
    return await _gzip_call(target, CLASSIFY, request, bearer())


@attack("typed", "ClassifyStream: open streams until refused (the cap is 16)", "RESOURCE_EXHAUSTED", repeat=False)
async def attack_typed_streams_over_cap(target: Target) -> Outcome:
    async with channel(target) as ch:
        stub = pb_grpc.ModelServiceStub(ch)
        calls = []
        outcome = Outcome("OK", "64 streams open, none refused")
        try:
            for opened in range(64):  # each stream answered once: it is open and admitted
                call = stub.ClassifyStream(metadata=bearer(), timeout=30)
                calls.append(call)
                try:
                    await write(call, _one_image())
                    await call.read()
                except EndedBeforeWrite:
                    continue  # the refusal's status was lost: the next stream shows it
                except grpc.aio.AioRpcError as err:
                    outcome = failed(err)
                    outcome.detail = f"after {opened} open: {outcome.detail}"
                    break
            outcome.served = await served(target)
        finally:
            for call in calls:
                call.cancel()
    return outcome


# -- V2 gRPC --------------------------------------------------------------------------------------


def _v2_bomb() -> v2.ModelInferRequest:
    return _v2_raw("fashion_softmax", "image", "UINT8", [BOMB_BYTES // 784, 1, 28, 28], bytes(BOMB_BYTES // 784 * 784))


@attack("v2", "ModelInfer, 400 MiB of zeros gzip-compressed", "UNIMPLEMENTED", "RESOURCE_EXHAUSTED", repeat=False)
async def attack_v2_gzip_bomb(target: Target) -> Outcome:
    return await _gzip_call(target, MODEL_INFER, _v2_bomb(), bearer())


@attack(
    "v2",
    "ModelInfer, 400 MiB gzip bomb without a token",
    "UNAUTHENTICATED",
    "UNIMPLEMENTED",
    "RESOURCE_EXHAUSTED",
    repeat=False,
)
async def attack_v2_gzip_bomb_no_token(target: Target) -> Outcome:
    return await _gzip_call(target, MODEL_INFER, _v2_bomb(), None)


_FP32_15M: bytes | None = None


def _fp32_contents_15m() -> bytes:
    global _FP32_15M
    if _FP32_15M is None:
        tensor = v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[15_000_000, 1])
        tensor.contents.fp32_contents.extend(np.zeros(15_000_000, dtype=np.float32))
        _FP32_15M = v2.ModelInferRequest(model_name="profit", inputs=[tensor]).SerializeToString()
    return _FP32_15M


@attack("v2", "ModelInfer, 15M FP32 values in typed contents, shape [15000000,1]", "RESOURCE_EXHAUSTED")
async def attack_v2_contents_15m(target: Target) -> Outcome:
    return await unary(target, MODEL_INFER, _fp32_contents_15m(), bearer())


@attack("v2", "ModelInfer, shape [2^40,1] declared, 4 bytes sent", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
async def attack_v2_shape_lie(target: Target) -> Outcome:
    request = _v2_raw("profit", "population", "FP32", [1 << 40, 1], bytes(4))
    return await unary(target, MODEL_INFER, request.SerializeToString(), bearer())


@attack("v2", "ModelInfer with 10,000 input tensors", "INVALID_ARGUMENT")
async def attack_v2_many_inputs(target: Target) -> Outcome:
    request = v2.ModelInferRequest(model_name="profit")
    for i in range(10_000):
        request.inputs.add(name=f"x{i}", datatype="FP32", shape=[1, 1])
        request.raw_input_contents.append(bytes(4))
    return await unary(target, MODEL_INFER, request.SerializeToString(), bearer())


@attack("v2", "ModelInfer naming a 1 MB model", "NOT_FOUND", "INVALID_ARGUMENT")
async def attack_v2_huge_model_name(target: Target) -> Outcome:
    request = _v2_raw("m" * 1_000_000, "population", "FP32", [1, 1], bytes(4))
    outcome = await unary(target, MODEL_INFER, request.SerializeToString(), bearer())
    if len(outcome.detail) >= 300:
        outcome.detail = f"(a {len(outcome.detail)}+ character message) " + outcome.detail[:80]
    return outcome


@attack(
    "v2",
    "8 idle ModelStreamInfer streams with a token (max_concurrent_requests is 4)",
    "DEADLINE_EXCEEDED",
    repeat=False,
)
async def attack_v2_idle_streams(target: Target) -> Outcome:
    request = _v2_raw("profit", "population", "FP32", [1, 1], np.float32(3).tobytes())
    async with channel(target) as ch:
        stub = v2_grpc.GRPCInferenceServiceStub(ch)
        calls = [stub.ModelStreamInfer(metadata=bearer(), timeout=30) for _ in range(8)]
        try:
            for call in calls:  # one answer each: every stream is open and admitted, then idle
                await write(call, request)
                await call.read()
            ok = await served(target)
            try:
                answer = await asyncio.wait_for(calls[0].read(), 20)  # until the server ends it
                outcome = Outcome(f"answered {answer!r:.40}" if answer is not grpc.aio.EOF else "OK")
            except grpc.aio.AioRpcError as err:
                outcome = failed(err)
            except TimeoutError:
                outcome = Outcome("held", "still open after 20 s")
            outcome.served = ok
        except grpc.aio.AioRpcError as err:
            outcome = failed(err)
            outcome.served = await served(target)
        finally:
            for call in calls:
                call.cancel()
    return outcome


@attack("v2", "ModelStreamInfer: 20,000 requests written, no response read", "CANCELLED", repeat=False)
async def attack_v2_stream_flood_unread(target: Target) -> Outcome:
    request = _v2_raw("profit", "population", "FP32", [1, 1], np.float32(3).tobytes())
    async with channel(target) as ch:
        call = v2_grpc.GRPCInferenceServiceStub(ch).ModelStreamInfer(metadata=bearer(), timeout=60)

        async def flood() -> int:
            sent = 0
            for _ in range(20_000):
                await call.write(request)
                sent += 1
            return sent

        writer = asyncio.ensure_future(flood())
        done, _ = await asyncio.wait([writer], timeout=3)  # flow control stops the writer
        ok = await served(target)
        call.cancel()
        writer.cancel()
        sent = writer.result() if writer in done and not writer.cancelled() else "<20000"
    return Outcome("CANCELLED", f"sent {sent} before cancelling", served=ok)


@attack("v2", "2,000 calls with wrong tokens, 50 at a time", "UNAUTHENTICATED")
async def attack_v2_bad_token_flood(target: Target) -> Outcome:
    request = _v2_raw("profit", "population", "FP32", [1, 1], bytes(4)).SerializeToString()
    async with channel(target) as ch:
        call = ch.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)
        codes: set[str] = set()

        async def one(i: int) -> None:
            try:
                await call(request, metadata=bearer(f"guess-{i}"), timeout=30)
                codes.add("OK")
            except grpc.aio.AioRpcError as err:
                codes.add(err.code().name)

        for start in range(0, 2000, 50):
            await asyncio.gather(*(one(i) for i in range(start, start + 50)))
    return Outcome("UNAUTHENTICATED" if codes == {"UNAUTHENTICATED"} else ",".join(sorted(codes)))


@attack("transport", "a call with 1 MiB of metadata (100 headers of 10 KiB)", "RESOURCE_EXHAUSTED", "UNAVAILABLE")
async def attack_metadata_flood(target: Target) -> Outcome:
    metadata = (*bearer(), *((f"x-pad-{i}", "p" * 10240) for i in range(100)))
    request = _v2_raw("profit", "population", "FP32", [1, 1], bytes(4)).SerializeToString()
    return await unary(target, MODEL_INFER, request, metadata)


@attack("transport", "256 TCP connections sending the HTTP/2 preface, then nothing", "held", repeat=False)
async def attack_idle_connections(target: Target) -> Outcome:
    host, port = target.address.rsplit(":", 1)
    writers = []
    try:
        for _ in range(256):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))  # + empty SETTINGS
            writers.append(writer)
        await asyncio.sleep(0.5)
        ok = await served(target)
    finally:
        for writer in writers:
            writer.close()
    return Outcome("held", "256 connections open", served=ok)


# -- health, reflection ---------------------------------------------------------------------------


@attack("health", "8 Watch streams, no token, each with a 32 MiB service name", "RESOURCE_EXHAUSTED", repeat=False)
async def attack_health_watch_huge_names(target: Target) -> Outcome:
    name = "s" * (32 * MiB)
    async with channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        calls = [stub.Watch(health_pb2.HealthCheckRequest(service=name), timeout=30) for _ in range(8)]
        codes = set()
        for call in calls:
            try:
                await call.read()
                codes.add("OK")
            except grpc.aio.AioRpcError as err:
                codes.add(err.code().name)
        ok = await served(target)
        for call in calls:
            call.cancel()
    return Outcome(",".join(sorted(codes)), served=ok)


@attack("health", "100 Watch streams, no token (the cap is 32)", "RESOURCE_EXHAUSTED", repeat=False)
async def attack_health_watch_flood(target: Target) -> Outcome:
    async with channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        calls = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(100)]
        codes: dict[str, int] = {}
        for call in calls:
            try:
                await call.read()  # the first answer: SERVING
                code = "OK"
            except grpc.aio.AioRpcError as err:
                code = err.code().name
            codes[code] = codes.get(code, 0) + 1
        ok = await served(target)
        for call in calls:
            call.cancel()
    status = "RESOURCE_EXHAUSTED" if set(codes) == {"OK", "RESOURCE_EXHAUSTED"} else ",".join(sorted(codes))
    return Outcome(status, f"{codes}", served=ok)


@attack(
    "reflection", "16 idle ServerReflectionInfo streams, no token (the cap is 8)", "RESOURCE_EXHAUSTED", repeat=False
)
async def attack_reflection_idle_streams(target: Target) -> Outcome:
    async with channel(target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        calls = [stub.ServerReflectionInfo(timeout=30) for _ in range(16)]
        codes: dict[str, int] = {}
        for index in range(len(calls)):
            for _ in range(3):
                try:
                    await write(calls[index], reflection_pb2.ServerReflectionRequest(list_services=""))
                    await calls[index].read()
                    code = "OK"
                except EndedBeforeWrite:  # the refusal's status was lost: ask on a fresh stream
                    calls[index] = stub.ServerReflectionInfo(timeout=30)
                    code = "ENDED_BEFORE_WRITE"
                    continue
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                break
            codes[code] = codes.get(code, 0) + 1
        ok = await served(target)
        for call in calls:
            call.cancel()
    status = "RESOURCE_EXHAUSTED" if set(codes) == {"OK", "RESOURCE_EXHAUSTED"} else ",".join(sorted(codes))
    return Outcome(status, f"{codes}", served=ok)


@attack("reflection", "a reflection request naming a 1 MiB symbol, no token", "RESOURCE_EXHAUSTED", "NOT_FOUND")
async def attack_reflection_huge_symbol(target: Target) -> Outcome:
    async with channel(target) as ch:
        for attempt in range(3):
            call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(timeout=30)
            try:
                await write(call, reflection_pb2.ServerReflectionRequest(file_containing_symbol="s" * MiB))
                response = await call.read()
                call.cancel()
                if response is grpc.aio.EOF:
                    return Outcome(call.code().name)
                return Outcome("NOT_FOUND" if response.HasField("error_response") else "OK")
            except EndedBeforeWrite:
                if attempt == 2:
                    raise
            except grpc.aio.AioRpcError as err:
                return failed(err)
    raise AssertionError("unreachable")


# -- model control --------------------------------------------------------------------------------


async def _unload(target: Target, metadata: Any) -> Outcome:
    async with channel(target) as ch:
        stub = v2_grpc.GRPCInferenceServiceStub(ch)
        try:
            for _ in range(4):
                await stub.RepositoryModelUnload(
                    v2.RepositoryModelUnloadRequest(model_name="house_price"), metadata=metadata, timeout=30
                )
        except grpc.aio.AioRpcError as err:
            return failed(err)
        # It worked: put the model back (the admin token, or the same one on servers without).
        for credential in (ADMIN_TOKEN, TOKEN):
            try:
                await stub.RepositoryModelLoad(
                    v2.RepositoryModelLoadRequest(model_name="house_price"), metadata=bearer(credential), timeout=60
                )
                break
            except grpc.aio.AioRpcError:
                continue
    return Outcome("OK", "house_price unloaded by the attacker")


@attack("control", "RepositoryModelUnload x4 with an inference token", "PERMISSION_DENIED")
async def attack_control_with_inference_token(target: Target) -> Outcome:
    return await _unload(target, bearer())


@attack("control", "RepositoryModelUnload without a token", "UNAUTHENTICATED")
async def attack_control_without_token(target: Target) -> Outcome:
    return await _unload(target, None)


# -- HTTP -----------------------------------------------------------------------------------------


async def _http(
    target: Target,
    head: bytes,
    body: bytes | Callable[[asyncio.StreamWriter], Awaitable[None]] = b"",
    timeout: float = 30,
) -> Outcome:
    """Send raw HTTP/1.1 (``head`` then ``body``, or a coroutine writing it) and read the status
    line: ``HTTP nnn``, or ``closed`` when the server closes without answering."""
    assert target.http is not None
    host, port = target.http.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:

        async def send() -> None:
            try:
                writer.write(head)
                if callable(body):
                    await body(writer)
                else:
                    writer.write(body)
                await writer.drain()
            except (ConnectionError, OSError):
                pass  # the server answered and closed while we were still sending

        sender = asyncio.ensure_future(send())
        try:
            line = await asyncio.wait_for(reader.readline(), timeout)
        except (ConnectionError, OSError):
            line = b""
        except TimeoutError:
            return Outcome("held", f"no answer in {timeout:g} s")
        finally:
            sender.cancel()
        if not line:
            return Outcome("closed")
        try:
            rest = await asyncio.wait_for(reader.read(2000), 5)
        except (ConnectionError, OSError, TimeoutError):
            rest = b""
        status = line.split()[1].decode() if len(line.split()) > 1 else "?"
        return Outcome(f"HTTP {status}", rest.split(b"\r\n\r\n", 1)[-1][:300].decode(errors="replace"))
    finally:
        writer.close()


def _post(path: str, headers: dict[str, str], token: str | None = TOKEN) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: abuse"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _infer_path(model: str = "profit") -> str:
    return f"/v2/models/{model}/infer"


@attack("http", "slowloris: headers one byte every 0.2 s", "HTTP 408", "closed", repeat=False)
async def attack_http_slow_headers(target: Target) -> Outcome:
    async def drip(writer: asyncio.StreamWriter) -> None:
        for byte in b"X-Slow: " + b"a" * 200:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    return await _http(target, f"POST {_infer_path()} HTTP/1.1\r\nHost: abuse\r\n".encode(), drip)


@attack("http", "slow body: 1 byte every 0.2 s of a declared 1000", "HTTP 408", "closed", repeat=False)
async def attack_http_slow_body(target: Target) -> Outcome:
    async def drip(writer: asyncio.StreamWriter) -> None:
        for _ in range(1000):
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.2)

    head = _post(_infer_path(), {"Content-Type": "application/json", "Content-Length": "1000"})
    return await _http(target, head, drip)


@attack("http", "Content-Length: 10 GiB, then a few bytes", "HTTP 413")
async def attack_http_content_length_10gib(target: Target) -> Outcome:
    head = _post(_infer_path(), {"Content-Type": "application/json", "Content-Length": str(10 << 30)})
    return await _http(target, head, b"{" * 1000)


_GZIP_BOMB: bytes | None = None


def _http_gzip_bomb() -> bytes:
    global _GZIP_BOMB
    if _GZIP_BOMB is None:
        packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
        chunk = bytes(MiB)
        _GZIP_BOMB = b"".join(packer.compress(chunk) for _ in range(BOMB_BYTES // MiB)) + packer.flush()
    return _GZIP_BOMB


@attack("http", "body of 400 MiB zeros, Content-Encoding: gzip", "HTTP 413", "HTTP 415", repeat=False)
async def attack_http_gzip_bomb(target: Target) -> Outcome:
    bomb = _http_gzip_bomb()
    head = _post(
        _infer_path(),
        {"Content-Type": "application/json", "Content-Encoding": "gzip", "Content-Length": str(len(bomb))},
    )
    return await _http(target, head, bomb)


@attack("http", "chunked body that never ends (1 MiB chunks)", "HTTP 413", "closed", repeat=False)
async def attack_http_endless_chunks(target: Target) -> Outcome:
    async def chunks(writer: asyncio.StreamWriter) -> None:
        chunk = b"%x\r\n%s\r\n" % (MiB, b" " * MiB)
        for _ in range(1024):
            writer.write(chunk)
            await writer.drain()

    head = _post(_infer_path(), {"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    return await _http(target, head, chunks)


@attack("http", "2,000 request headers of 100 bytes", "HTTP 431", "closed")
async def attack_http_header_flood(target: Target) -> Outcome:
    headers = {f"X-Pad-{i}": "p" * 100 for i in range(2000)}
    return await _http(target, _post(_infer_path(), {**headers, "Content-Length": "0"}))


def _json(body: bytes, token: str | None = TOKEN, path: str | None = None) -> tuple[bytes, bytes]:
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
    return _post(path or _infer_path(), headers, token), body


@attack("http", "JSON infer with shape [2^40,1] and one value", "HTTP 400", "HTTP 413")
async def attack_http_json_shape_lie(target: Target) -> Outcome:
    body = b'{"inputs":[{"name":"population","shape":[1099511627776,1],"datatype":"FP32","data":[1]}]}'
    return await _http(target, *_json(body))


@attack("http", "JSON infer with data nested 20,000 deep", "HTTP 400")
async def attack_http_json_deep_nesting(target: Target) -> Outcome:
    data = b"[" * 20_000 + b"1" + b"]" * 20_000
    body = b'{"inputs":[{"name":"population","shape":[1,1],"datatype":"FP32","data":' + data + b"}]}"
    return await _http(target, *_json(body))


@attack("http", "POST /v2/repository/models/house_price/unload with an inference token", "HTTP 403")
async def attack_http_control_with_inference_token(target: Target) -> Outcome:
    return await _http(target, *_json(b"{}", path="/v2/repository/models/house_price/unload"))


@attack("http", "infer without a token", "HTTP 401")
async def attack_http_no_token(target: Target) -> Outcome:
    body = b'{"inputs":[{"name":"population","shape":[1,1],"datatype":"FP32","data":[1]}]}'
    return await _http(target, *_json(body, token=None))


@attack("http", "256 idle keep-alive connections", "closed", repeat=False)
async def attack_http_idle_connections(target: Target) -> Outcome:
    assert target.http is not None
    host, port = target.http.rsplit(":", 1)
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(256)]
    try:
        ok = await served(target)
        # The server closes them itself (the header timeout: nothing was sent).
        closed = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in connections)), 30)
        status = "closed" if all(not data or data.startswith(b"HTTP/1.1 408") for data in closed) else "answered"
    except TimeoutError:
        status, ok = "held", ok
    finally:
        for _, writer in connections:
            writer.close()
    return Outcome(status, "256 connections", served=ok)


# -- the benchmark: server, probe, measurement ----------------------------------------------------


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    match = re.search(rf"^{field_name}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def reset_peak(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_growth_mib(pid: int, before_kib: int) -> float:
    return max(rss_kib(pid, "VmHWM") - before_kib, 0) / 1024


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(tree: Path, log_path: Path, python: str = sys.executable) -> tuple[subprocess.Popen[bytes], Target]:
    """``python -m service`` from ``tree`` with :data:`SERVER_ENV`; waits for SERVING."""
    for attempt in range(5):
        port, http = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
        env.update(SERVER_ENV, SERVING_HTTP_PORT=str(http), SERVING_METRICS_PORT="0", PYTHONPATH=str(tree))
        command = [python, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--model-repository", str(tree / "models")]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT)
        target = Target(f"127.0.0.1:{port}", f"127.0.0.1:{http}")
        if _wait_serving(target, process):
            has_http = "http_port" in log_path.read_text(errors="replace")
            return process, target if has_http else Target(target.address)
        if "already in use" not in log_path.read_text(errors="replace") or attempt == 4:
            raise SystemExit(f"the server did not start: see {log_path}")
    raise AssertionError("unreachable")


def _wait_serving(target: Target, process: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    return False


async def _probe(address: str) -> None:
    """Call Classify back to back; print ``start latency status`` per call (monotonic seconds)."""
    request = _one_image()
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.ModelServiceStub(ch)
        while True:
            start = time.monotonic()
            try:
                await stub.Classify(request, metadata=bearer(), timeout=10)
                status = "OK"
            except grpc.aio.AioRpcError as err:
                status = err.code().name
            print(f"{start:.6f} {time.monotonic() - start:.6f} {status}", flush=True)


@dataclass
class Probe:
    """The well-behaved client, a process of its own; its samples are read from its stdout."""

    process: subprocess.Popen[str]
    samples: list[tuple[float, float, str]] = field(default_factory=list)

    @classmethod
    def start(cls, address: str) -> Probe:
        command = [sys.executable, __file__, "--probe", address]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
        probe = cls(process)
        import threading

        threading.Thread(target=probe._read, daemon=True).start()
        return probe

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            start, latency, status = line.split()
            self.samples.append((float(start), float(latency), status))

    def window(self, start: float, end: float) -> list[tuple[float, str]]:
        return [(lat, st) for t, lat, st in list(self.samples) if t >= start and t + lat <= end + 10 and t < end]

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def p99(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    return float(np.percentile(latencies, 99))


@dataclass
class Row:
    attack: Attack
    status: str = "n/a"
    ok: bool | None = None
    seconds: float | None = None
    rss_mib: float | None = None
    p99_base_ms: float | None = None
    p99_ms: float | None = None
    probe_errors: int = 0
    probe_calls: int = 0
    served: bool | None = None
    detail: str = ""

    @property
    def ratio(self) -> float | None:
        if self.p99_ms is None or not self.p99_base_ms:
            return None
        return self.p99_ms / self.p99_base_ms


async def _attempt(attack_: Attack, target: Target) -> Outcome:
    """Run the attack; an exception on the attacker's side is a result, not the end of the run."""
    try:
        return await attack_.run(target)
    except Exception as exc:
        return Outcome(f"attacker error: {type(exc).__name__}", str(exc)[:300])


async def _measure(attack_: Attack, target: Target, pid: int, probe: Probe, min_seconds: float) -> Row:
    row = Row(attack_)
    await asyncio.sleep(1.0)  # the quiet second: the probe's baseline
    base_end = time.monotonic()
    base = [lat for lat, st in probe.window(base_end - 1.0, base_end) if st == "OK"]
    reset_peak(pid)
    before = rss_kib(pid)
    start = time.monotonic()
    outcome = await _attempt(attack_, target)
    row.seconds = time.monotonic() - start
    while attack_.repeat and time.monotonic() - start < min_seconds:
        await _attempt(attack_, target)
    end = time.monotonic()
    await asyncio.sleep(0.2)  # calls started during the attack report back
    row.rss_mib = peak_growth_mib(pid, before)
    during = probe.window(start, end)
    row.status, row.detail, row.served = outcome.status, outcome.detail, outcome.served
    row.ok = outcome.status in attack_.expected and outcome.served is not False
    row.p99_base_ms = (p99(base) or 0) * 1000 or None
    row.p99_ms = None if not during else (p99([lat for lat, _ in during]) or 0) * 1000
    row.probe_calls = len(during)
    row.probe_errors = sum(1 for _, st in during if st != "OK")
    return row


def run_suite(
    tree: Path, names: set[str] | None, min_seconds: float, python: str = sys.executable
) -> tuple[list[Row], dict[str, Any]]:
    attacks = [a for a in ATTACKS if not names or a.name in names]
    print("preparing payloads ...", file=sys.stderr)
    _fp32_contents_15m()
    _http_gzip_bomb()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        process, target = start_server(tree, log_path, python)
        probe = Probe.start(target.address)
        rows: list[Row] = []
        try:
            time.sleep(2.0)  # the probe warms up
            for attack_ in attacks:
                if attack_.http and target.http is None:
                    rows.append(Row(attack_))
                    continue
                if process.poll() is not None:
                    rows.append(Row(attack_, status=f"server dead (exit {process.returncode})", ok=False))
                    continue
                row = asyncio.run(_measure(attack_, target, process.pid, probe, min_seconds))
                rows.append(row)
                print(_line(row), file=sys.stderr, flush=True)
            unexpected = re.findall(r'"levelname": "(?:ERROR|CRITICAL)"[^\n]*', log_path.read_text(errors="replace"))
            info = {"server_alive": process.poll() is None, "server_errors_logged": len(unexpected)}
        finally:
            probe.stop()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
    return rows, info


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _line(row: Row) -> str:
    return f"{row.attack.name}: {row.status} ({_fmt(row.seconds, '.2f')} s, +{_fmt(row.rss_mib, '.0f')} MiB)"


def table(rows: list[Row]) -> str:
    head = (
        "| attack | surface | status | refused as expected | time to it (s) | peak RSS growth (MiB) "
        "| probe p99 quiet / during (ms) | ratio | probe calls (errors) |\n"
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"
    )
    lines = [head]
    for r in rows:
        ok = "–" if r.ok is None else ("yes" if r.ok else "**no**")
        rss = _fmt(r.rss_mib, ".1f")
        if r.rss_mib is not None and r.rss_mib >= RSS_GOAL_MIB:
            rss = f"**{rss}**"
        ratio = _fmt(r.ratio, ".2f")
        if r.ratio is not None and r.ratio > P99_GOAL_RATIO:
            ratio = f"**{ratio}**"
        lines.append(
            f"| {r.attack.name} ({r.attack.what}) | {r.attack.surface} | {r.status} | {ok} | {_fmt(r.seconds, '.2f')} "
            f"| {rss} | {_fmt(r.p99_base_ms, '.1f')} / {_fmt(r.p99_ms, '.1f')} | {ratio} "
            f"| {r.probe_calls} ({r.probe_errors}) |"
        )
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    ran = [r for r in rows if r.ok is not None]
    within = sum(1 for r in ran if r.ratio is not None and r.ratio <= P99_GOAL_RATIO)
    return (
        f"{len(ran)} attacks run: {sum(1 for r in ran if r.ok)} refused as expected; "
        f"peak RSS growth < {RSS_GOAL_MIB} MiB: {sum(1 for r in ran if (r.rss_mib or 0) < RSS_GOAL_MIB)}; "
        f"probe p99 within {P99_GOAL_RATIO:g}x: {within}"
        f" (of {sum(1 for r in ran if r.ratio is not None)} with probe calls during the attack); "
        f"probe errors: {sum(r.probe_errors for r in ran)}; "
        f"INTERNAL/UNKNOWN/500: {sum(1 for r in ran if set(r.status.split(',')) & FORBIDDEN)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="attack names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the attacks and exit")
    parser.add_argument("--baseline-tree", type=Path, help="also attack the server of this checkout (before/after)")
    parser.add_argument(
        "--baseline-python", default=sys.executable, help="the Python (venv) that runs the baseline tree's server"
    )
    parser.add_argument("--min-seconds", type=float, default=1.0, help="repeat quick attacks for this long")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        asyncio.run(_probe(args.probe))
        return 0
    if args.list:
        for a in ATTACKS:
            print(f"{a.name:40} {a.surface:10} {a.what}")
        return 0
    names = set(args.only) if args.only else None
    results: dict[str, Any] = {}
    trees = [("after", REPO_ROOT, sys.executable)]
    if args.baseline_tree:
        trees.append(("before", args.baseline_tree.resolve(), args.baseline_python))
    for label, tree, python in trees:
        print(f"== {label}: {tree}", file=sys.stderr)
        rows, info = run_suite(tree, names, args.min_seconds, python)
        print(f"\n### {label} ({tree.name}, {time.strftime('%Y-%m-%d')})\n")
        print(table(rows))
        print(
            f"\n{summary(rows)}; server alive at the end: {info['server_alive']}, ERROR lines logged: "
            f"{info['server_errors_logged']}\n"
        )
        results[label] = {
            "tree": str(tree),
            "info": info,
            "rows": [
                {
                    "attack": r.attack.name,
                    "surface": r.attack.surface,
                    "what": r.attack.what,
                    "status": r.status,
                    "expected": sorted(r.attack.expected),
                    "ok": r.ok,
                    "seconds": r.seconds,
                    "rss_mib": r.rss_mib,
                    "p99_base_ms": r.p99_base_ms,
                    "p99_ms": r.p99_ms,
                    "probe_calls": r.probe_calls,
                    "probe_errors": r.probe_errors,
                    "served": r.served,
                    "detail": r.detail,
                }
                for r in rows
            ],
        }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
