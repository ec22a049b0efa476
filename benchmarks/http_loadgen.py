"""Closed-loop HTTP/1.1 load generator: pre-serialised request bytes over keep-alive connections.

Run as a process of its own (``python benchmarks/http_loadgen.py '<json spec>'``); prints one JSON
object like benchmarks/loadgen.py: completed requests, errors (by HTTP status), wall time,
per-request latencies (seconds) and the CPU seconds this process used.

Each of ``concurrency`` connections sends one whole request (head and body written at once),
reads the response head, then exactly ``Content-Length`` body bytes (no chunked responses
expected), and sends the next: no HTTP parsing beyond the status line and that one header.

Spec: target (host:port), path, body_file (the request body), content_type, headers (extra,
a dict), concurrency, duration_s, warmup_s, max_samples.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def request_bytes(host: str, path: str, body: bytes, content_type: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _Connection(asyncio.Protocol):
    """One keep-alive connection: ``call()`` sends the request and waits for its response."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._need = -1
        self._status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._need < 0:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            self._status = int(head[9:12])
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            del self.buffer[: end + 4]
            self._need = length
        if len(self.buffer) >= self._need and self.waiter is not None:
            del self.buffer[: self._need]
            self._need = -1
            waiter, self.waiter = self.waiter, None
            if not waiter.done():
                waiter.set_result(self._status)

    async def call(self, payload: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self.waiter


async def _run(spec: dict) -> dict:
    host, port = spec["target"].rsplit(":", 1)
    body = Path(spec["body_file"]).read_bytes()
    payload = request_bytes(
        spec["target"],
        spec["path"],
        body,
        spec.get("content_type", "application/octet-stream"),
        spec.get("headers", {}),
    )
    concurrency = int(spec["concurrency"])
    duration = float(spec["duration_s"])
    warmup = float(spec.get("warmup_s", 0.5))
    loop = asyncio.get_running_loop()
    connections = [(await loop.create_connection(_Connection, host, int(port)))[1] for _ in range(concurrency)]
    status = await connections[0].call(payload)  # one check that the request is answered properly
    if status != 200:
        raise SystemExit(f"the server answered {status} to the benchmark request")

    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"measuring": False, "stop": False}
    counted = 0

    async def worker(connection: _Connection) -> None:
        nonlocal counted
        perf = time.perf_counter
        while not state["stop"]:
            start = perf()
            try:
                code = await connection.call(payload)
            except ConnectionError:
                if state["measuring"]:
                    errors["connection closed"] = errors.get("connection closed", 0) + 1
                return
            if state["measuring"]:
                if code == 200:
                    latencies.append(perf() - start)
                    counted += 1
                else:
                    errors[str(code)] = errors.get(str(code), 0) + 1

    tasks = [asyncio.create_task(worker(c)) for c in connections]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.sleep(duration)
    state["measuring"] = False
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    state["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for connection in connections:
        if connection.transport is not None:
            connection.transport.close()
    max_samples = int(spec.get("max_samples", 200_000))
    if len(latencies) > max_samples:  # keep an even subsample
        step = len(latencies) / max_samples
        latencies = [latencies[int(i * step)] for i in range(max_samples)]
    return {
        "requests": counted,
        "errors": errors,
        "wall_s": wall,
        "cpu_s": cpu,
        "latencies_s": latencies,
        "pid": os.getpid(),
    }


def main() -> None:
    json.dump(asyncio.run(_run(json.loads(sys.argv[1]))), sys.stdout)


if __name__ == "__main__":
    main()
