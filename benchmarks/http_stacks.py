"""Which HTTP server should serve the Open Inference Protocol beside gRPC? Measure the candidates.

Each candidate runs as its own process, on one asyncio event loop shared with a grpc.aio server
(as in the model server), and answers ``POST /v2/models/m/infer`` in Triton's binary tensor
format doing the same work: read the body, parse the JSON header (``Inference-Header-Content-Length``),
view the tensor bytes with numpy, and answer a prebuilt JSON header + binary output. So the
figures are the HTTP layer's own cost per request, the part that differs between stacks.

    .venv/bin/python benchmarks/http_stacks.py [--duration 3] [--repeat 2]

Candidates: aiohttp's server; uvicorn (httptools) with a bare ASGI app; uvicorn with Starlette;
granian (Rust, embedded in the asyncio loop, RSGI). Loads: batch 1 x 32 connections and batch
256 x 8 (binary), with benchmarks/http_loadgen.py (pre-serialised bodies, keep-alive).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import free_port, tree_cpu  # noqa: E402

PY = sys.executable
CANDIDATES = ["aiohttp", "uvicorn-asgi", "uvicorn-starlette", "granian-rsgi"]
OUTPUT = np.full((256, 10), 0.1, np.float32)


def _answer(body: bytes, header_length: int) -> tuple[bytes, int]:
    """The shared work: parse the request, view its tensor, build the response (JSON + binary)."""
    header = json.loads(body[:header_length])
    spec = header["inputs"][0]
    rows = spec["shape"][0]
    np.frombuffer(body[header_length:], np.uint8).reshape(spec["shape"])
    raw = OUTPUT[:rows].tobytes()
    head = json.dumps(
        {
            "model_name": "m",
            "model_version": "1",
            "outputs": [
                {
                    "name": "probabilities",
                    "datatype": "FP32",
                    "shape": [rows, 10],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
        }
    ).encode()
    return head + raw, len(head)


def serve(candidate: str, port: int) -> None:
    import asyncio

    import grpc

    async def main() -> None:
        grpc_server = grpc.aio.server()
        grpc_server.add_insecure_port("127.0.0.1:0")
        await grpc_server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        if candidate == "aiohttp":
            from aiohttp import web

            async def handle(request: web.Request) -> web.Response:
                body = await request.read()
                out, length = _answer(body, int(request.headers["Inference-Header-Content-Length"]))
                return web.Response(
                    body=out,
                    content_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(length)},
                )

            app = web.Application(client_max_size=64 * 2**20)
            app.router.add_post("/v2/models/{name}/infer", handle)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            print("ready", flush=True)
            await stop.wait()
            await runner.cleanup()
        elif candidate.startswith("uvicorn"):
            import uvicorn

            if candidate == "uvicorn-asgi":

                async def app(scope, receive, send):  # type: ignore[no-untyped-def]
                    if scope["type"] != "http":
                        return
                    chunks = []
                    while True:
                        message = await receive()
                        chunks.append(message.get("body", b""))
                        if not message.get("more_body"):
                            break
                    headers = dict(scope["headers"])
                    out, length = _answer(b"".join(chunks), int(headers[b"inference-header-content-length"]))
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 200,
                            "headers": [
                                (b"content-type", b"application/octet-stream"),
                                (b"content-length", str(len(out)).encode()),
                                (b"inference-header-content-length", str(length).encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": out})
            else:
                from starlette.applications import Starlette
                from starlette.requests import Request
                from starlette.responses import Response
                from starlette.routing import Route

                async def handle(request: Request) -> Response:
                    body = await request.body()
                    out, length = _answer(body, int(request.headers["inference-header-content-length"]))
                    return Response(
                        out,
                        media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(length)},
                    )

                app = Starlette(routes=[Route("/v2/models/{name}/infer", handle, methods=["POST"])])
            config = uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                loop="none",
                http="httptools",
                lifespan="off",
                access_log=False,
                log_level="warning",
            )
            server = uvicorn.Server(config)
            task = asyncio.create_task(server.serve())
            while not server.started:
                await asyncio.sleep(0.01)
            print("ready", flush=True)
            await stop.wait()
            server.should_exit = True
            await task
        else:
            from granian.constants import Interfaces
            from granian.server.embed import Server

            async def rsgi(scope, protocol):  # type: ignore[no-untyped-def]
                body = await protocol()
                out, length = _answer(body, int(scope.headers.get("inference-header-content-length")))
                protocol.response_bytes(
                    200,
                    [("content-type", "application/octet-stream"), ("inference-header-content-length", str(length))],
                    out,
                )

            server = Server(rsgi, address="127.0.0.1", port=port, interface=Interfaces.RSGI, log_enabled=False)
            task = asyncio.create_task(server.serve())
            await asyncio.sleep(1.0)
            print("ready", flush=True)
            await stop.wait()
            server.stop()
            await asyncio.wait_for(task, 10)
        await grpc_server.stop(0)

    asyncio.run(main())


def body(batch: int) -> bytes:
    images = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [batch, 1, 28, 28],
                    "parameters": {"binary_data_size": len(images)},
                }
            ],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + images, len(header)


def measure(port: int, pid: int, batch: int, concurrency: int, duration: float, workdir: Path) -> dict:
    data, header_length = body(batch)
    path = workdir / f"b{batch}.bin"
    path.write_bytes(data)
    spec = {
        "target": f"127.0.0.1:{port}",
        "path": "/v2/models/m/infer",
        "body_file": str(path),
        "headers": {"Inference-Header-Content-Length": str(header_length)},
        "concurrency": concurrency,
        "duration_s": duration,
        "warmup_s": 1.0,
    }
    cpu: dict[str, float] = {}

    def sample() -> None:
        time.sleep(1.5)
        cpu["a"], cpu["t0"] = tree_cpu(pid), time.monotonic()
        time.sleep(duration * 0.9)
        cpu["b"], cpu["t1"] = tree_cpu(pid), time.monotonic()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = subprocess.run([PY, str(HERE / "http_loadgen.py"), json.dumps(spec)], capture_output=True, check=True)
    sampler.join()
    result = json.loads(out.stdout)
    rps = result["requests"] / result["wall_s"]
    server_cpu = (cpu["b"] - cpu["a"]) / (cpu["t1"] - cpu["t0"])
    lat = np.asarray(result["latencies_s"]) * 1000
    return {
        "rps": rps,
        "server_cpu": server_cpu,
        "cpu_us": 1e6 * server_cpu / rps,
        "client_cpu": result["cpu_s"] / result["wall_s"],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "errors": result["errors"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return 0
    servers = {}
    results: dict[tuple[str, int, int], list[dict]] = {}
    try:
        for name in CANDIDATES:
            port = free_port()
            process = subprocess.Popen(
                [PY, __file__, "--serve", name, "--port", str(port)], stdout=subprocess.PIPE, start_new_session=True
            )
            assert process.stdout is not None
            if process.stdout.readline().strip() != b"ready":
                raise RuntimeError(f"{name} did not start")
            servers[name] = (process, port)
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeat):
                for batch, concurrency in ((1, 32), (256, 8)):
                    for name, (process, port) in servers.items():
                        point = measure(port, process.pid, batch, concurrency, args.duration, Path(tmp))
                        results.setdefault((name, batch, concurrency), []).append(point)
                        print(
                            f"{name:18s} b{batch:<4d} x{concurrency:<3d} {point['rps']:8.0f} req/s  "
                            f"server {point['cpu_us']:5.0f} µs/req  client {point['client_cpu']:.2f} cores  "
                            f"p99 {point['p99_ms']:.2f} ms {point['errors'] or ''}",
                            file=sys.stderr,
                            flush=True,
                        )
    finally:
        for process, _ in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(20)
    print("| stack | load | req/s (best) | server CPU µs/req | client CPU (cores) | p50 ms | p99 ms |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, batch, concurrency), points in results.items():
        best = max(points, key=lambda p: p["rps"])
        print(
            f"| {name} | batch {batch} x {concurrency} | {best['rps']:.0f} | {best['cpu_us']:.0f} | "
            f"{best['client_cpu']:.2f} | {best['p50_ms']:.2f} | {best['p99_ms']:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
