"""Closed-loop gRPC load generator: pre-serialised request bytes, grpc.aio, no response decoding.

Run as a process of its own (``python benchmarks/loadgen.py '<json spec>'``); prints one JSON
object: completed requests, errors, wall time, per-request latencies (seconds) and the CPU seconds
this process used, so the reader can judge whether the client was the bottleneck.

Spec: target, method (full gRPC path), payload_file (serialised request bytes), concurrency,
duration_s, warmup_s, channels (concurrent callers are spread over this many channels),
max_samples (latency samples kept).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path

import grpc

MAX_MESSAGE = 64 * 1024 * 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run(spec: dict) -> dict:
    payload = Path(spec["payload_file"]).read_bytes()
    concurrency = int(spec["concurrency"])
    duration = float(spec["duration_s"])
    warmup = float(spec.get("warmup_s", 0.5))
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.use_local_subchannel_pool", 1),  # one connection per channel object
    ]
    channels = [
        grpc.aio.insecure_channel(spec["target"], options=options)
        for _ in range(max(1, min(int(spec.get("channels", 1)), concurrency)))
    ]
    calls = [ch.unary_unary(spec["method"]) for ch in channels]  # bytes in, bytes out
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 30)
    timeout = float(spec.get("timeout_s", 30))
    # One check that the server answers this request properly (not an error) before timing.
    reply = await calls[0](payload, timeout=timeout)
    first_reply_bytes = len(reply)

    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"measuring": False, "stop": False}
    counted = 0

    async def worker(call) -> None:
        nonlocal counted
        perf = time.perf_counter
        while not state["stop"]:
            start = perf()
            try:
                await call(payload, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                if state["measuring"]:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            if state["measuring"]:
                latencies.append(perf() - start)
                counted += 1

    tasks = [asyncio.create_task(worker(calls[i % len(calls)])) for i in range(concurrency)]
    await asyncio.sleep(warmup)
    state["measuring"] = True
    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.sleep(duration)
    state["measuring"] = False
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    state["stop"] = True
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
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
        "reply_bytes": first_reply_bytes,
        "pid": os.getpid(),
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop  # type: ignore[import-not-found]  # optional; not required
    except ImportError:
        uvloop = None
    if uvloop is not None and spec.get("uvloop"):
        uvloop.install()
    result = asyncio.run(_run(spec))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
