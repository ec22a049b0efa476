"""The supervisor's control channel (errors cross it as themselves) and its hold on the ports
(real sockets on loopback: what the kernel lets share a port and what it refuses)."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

from service.errors import FailedPrecondition, NotFound
from service.workers.control import Channel, ChannelClosed
from service.workers.ports import probe, reserve


async def _pair() -> tuple[Channel, Channel]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return await Channel.open(left), await Channel.open(right)


def test_requests_replies_and_errors_cross_the_channel() -> None:
    async def run() -> None:
        supervisor, worker = await _pair()

        async def handle(message: dict) -> dict:
            if message["name"] == "broken":
                raise FailedPrecondition("model 'broken' did not load cleanly")
            if message["name"] == "gone":
                raise NotFound("model 'gone' not found")
            return {"loaded": [[message["name"], 1]]}

        seen: list[dict] = []
        noticed = asyncio.Event()

        def notice(message: dict) -> None:
            seen.append(message)
            noticed.set()

        worker.start(handle)
        supervisor.start(handle, notice)
        assert await supervisor.request("apply", name="profit") == {"loaded": [["profit", 1]]}
        with pytest.raises(FailedPrecondition, match="did not load cleanly"):
            await supervisor.request("apply", name="broken")
        with pytest.raises(NotFound):
            await supervisor.request("apply", name="gone")
        worker.notify("report", msg="listening", fields={"grpc_port": 1})
        await asyncio.wait_for(noticed.wait(), 30)
        assert seen == [{"op": "report", "msg": "listening", "fields": {"grpc_port": 1}}]
        # the other side goes away: a request waiting for it fails, the channel says closed
        pending = asyncio.ensure_future(worker.request("control", action="load", name="x"))
        await asyncio.sleep(0)
        await supervisor.aclose()
        with pytest.raises(ChannelClosed):
            await pending
        await asyncio.wait_for(worker.closed.wait(), 10)
        await worker.aclose()

    asyncio.run(run())


def _listen(port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def test_the_reserved_port_is_shared_by_workers_only() -> None:
    held = reserve("127.0.0.1", 0, 0)  # port 0: a real port, the same for every worker
    try:
        port = held.grpc_port
        assert port > 0 and held.http_port is None
        workers = [_listen(port, reuse_port=True) for _ in range(2)]  # as gRPC binds in a worker
        try:
            with pytest.raises(OSError) as info:  # a server binding without SO_REUSEPORT
                _listen(port, reuse_port=False)
            assert info.value.errno == errno.EADDRINUSE
            with pytest.raises(RuntimeError, match=f"cannot serve gRPC on 127.0.0.1:{port}: Address already in use"):
                probe("127.0.0.1", port, "gRPC")  # a second supervisor's check
        finally:
            for sock in workers:
                sock.close()
    finally:
        held.close()


def test_while_the_workers_load_nobody_else_takes_the_port() -> None:
    """Nothing listens yet (the workers load their models); a server binding with SO_REUSEADDR
    (as gRPC and uvicorn do), which could share a port nobody listens on, is refused too."""
    held = reserve("127.0.0.1", 0, 0)
    try:
        with pytest.raises(OSError) as info:
            _listen(held.grpc_port, reuse_port=False)
        assert info.value.errno == errno.EADDRINUSE
        _listen(held.grpc_port, reuse_port=True).close()  # a worker can
    finally:
        held.close()


def test_a_busy_port_is_refused_before_anything_is_held() -> None:
    with _listen(0, reuse_port=False) as other:
        port = other.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot serve HTTP on 127.0.0.1:{port}: Address already in use"):
            reserve("127.0.0.1", 0, port)
