"""Soak test: many requests at a fixed concurrency through both protocols; every answer checked,
errors counted, server memory (RSS) tracked from the end of the warm-up to the end.

    python benchmarks/soak.py                                   # 100,000 requests at 64, own server
    python benchmarks/soak.py --requests 2000 --concurrency 16   # a quick one
    python benchmarks/soak.py --address 127.0.0.1:8001 --pid 1234  # a server already running

Without ``--address`` it starts ``python -m service`` on a free 127.0.0.1 port over
``--model-repository`` (default: the bundled models) and stops it with SIGTERM at the end.

Requests cycle through a fixed set (typed Classify with two models, PredictProfit,
PredictHousePrice; V2 ModelInfer with raw and typed contents on four models), half per protocol.
Each template's first answer (sent alone, before the load) is the reference every later answer is
compared with (float tolerance: dynamic batching may change the summation order).

Warm-up = a priming burst (``--concurrency`` copies of each request kind at once, so every model
meets its largest batch and onnxruntime's memory arena reaches its high-water mark; without it a
single ~18 MiB arena extension lands a few thousand requests in, whenever the first full batch
happens) and then the first ``--warmup`` requests. RSS is read from /proc/<pid>/status every
second; growth is measured from the end of the warm-up to the end. Prints a summary and, with
``--json``, writes it.
Exit status 1 when any request failed or mismatched, or RSS grew by ``--max-rss-growth`` % or more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from service.generated.inference import grpc_service_pb2 as v2  # noqa: E402
from service.generated.serving.v1 import serving_pb2 as pb  # noqa: E402

MiB = 1024 * 1024
TYPED = "/serving.v1.ModelService/"
V2 = "/inference.GRPCInferenceService/"


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Template:
    """One request kind: its method, serialized bytes, and how to pull comparable numbers out of
    the answer."""

    name: str
    method: str
    payload: bytes
    values: Callable[[bytes], np.ndarray]


def _v2_values(data: bytes) -> np.ndarray:
    response = v2.ModelInferResponse.FromString(data)
    return np.concatenate([np.frombuffer(raw, "<f4") for raw in response.raw_output_contents])


def templates(models: dict[str, str]) -> list[Template]:
    """The request mix, for the models the server has (bundled names → first input name)."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (4, 1, 28, 28), dtype=np.uint8)
    out: list[Template] = []

    def classify_values(data: bytes) -> np.ndarray:
        return np.array([p for r in pb.ClassifyResponse.FromString(data).results for p in r.probabilities], np.float32)

    for name, n in (("fashion_softmax", 1), ("fashion_cnn", 4)):
        if name in models:
            tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[n, 1, 28, 28], data=images[:n].tobytes())
            request = pb.ClassifyRequest(model=pb.ModelRef(name=name), images=tensor, top_k=3)
            out.append(
                Template(
                    f"typed Classify {name} x{n}", TYPED + "Classify", request.SerializeToString(), classify_values
                )
            )
            raw = v2.ModelInferRequest(
                model_name=name,
                inputs=[
                    v2.ModelInferRequest.InferInputTensor(name=models[name], datatype="UINT8", shape=[n, 1, 28, 28])
                ],
                raw_input_contents=[images[:n].tobytes()],
            )
            out.append(Template(f"V2 ModelInfer {name} x{n}", V2 + "ModelInfer", raw.SerializeToString(), _v2_values))
    if "profit" in models:
        request = pb.PredictProfitRequest(population=[35_000.0, 70_000.0, 123_456.0])
        out.append(
            Template(
                "typed PredictProfit x3",
                TYPED + "PredictProfit",
                request.SerializeToString(),
                lambda d: np.array(pb.PredictProfitResponse.FromString(d).profit_usd, np.float32),
            )
        )
        raw = v2.ModelInferRequest(
            model_name="profit",
            inputs=[v2.ModelInferRequest.InferInputTensor(name=models["profit"], datatype="FP32", shape=[2, 1])],
            raw_input_contents=[np.array([50_000, 80_000], "<f4").tobytes()],
        )
        out.append(Template("V2 ModelInfer profit x2", V2 + "ModelInfer", raw.SerializeToString(), _v2_values))
    if "house_price" in models:
        request = pb.PredictHousePriceRequest(
            houses=[pb.House(size_sqft=1650, bedrooms=3), pb.House(size_sqft=2400, bedrooms=4)]
        )
        out.append(
            Template(
                "typed PredictHousePrice x2",
                TYPED + "PredictHousePrice",
                request.SerializeToString(),
                lambda d: np.array(pb.PredictHousePriceResponse.FromString(d).price_usd, np.float32),
            )
        )
        typed = v2.ModelInferRequest(model_name="house_price")
        tensor = typed.inputs.add(name=models["house_price"], datatype="FP32", shape=[1, 2])
        tensor.contents.fp32_contents.extend([3000.0, 4.0])
        out.append(
            Template(
                "V2 ModelInfer house_price typed contents", V2 + "ModelInfer", typed.SerializeToString(), _v2_values
            )
        )
    if not out:
        raise SystemExit(f"none of the bundled model names in {sorted(models)}")
    return out


async def _models(channel: grpc.aio.Channel) -> dict[str, str]:
    call = channel.unary_unary(
        TYPED + "ListModels",
        request_serializer=pb.ListModelsRequest.SerializeToString,
        response_deserializer=pb.ListModelsResponse.FromString,
    )
    return {m.name: m.inputs[0].name for m in (await call(pb.ListModelsRequest(), timeout=30)).models}


async def soak(
    address: str,
    pid: int,
    requests: int,
    concurrency: int,
    warmup: int,
    channels: int = 4,
    progress: bool = False,
    prime: bool = True,
) -> dict[str, Any]:
    """Run the soak against ``address`` (server process ``pid``); return the figures."""
    options = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(address, options=options) for _ in range(channels)]
    try:
        kinds = templates(await _models(chans[0]))
        calls = [[ch.unary_unary(t.method) for t in kinds] for ch in chans]
        # Reference answers, one request at a time.
        reference = [t.values(await calls[0][i](t.payload, timeout=30)) for i, t in enumerate(kinds)]
        primed = 0
        if prime:  # every kind at full concurrency at once: the largest batches (checked too)
            for k, t in enumerate(kinds):
                answers = await asyncio.gather(
                    *(calls[w % len(chans)][k](t.payload, timeout=60) for w in range(concurrency))
                )
                bad = [a for a in answers if not np.allclose(t.values(a), reference[k], rtol=1e-4, atol=1e-4)]
                if bad:
                    raise SystemExit(f"priming: {len(bad)} wrong answers to {t.name}")
                primed += len(answers)

        errors: Counter[str] = Counter()
        first_errors: list[str] = []
        mismatches: Counter[str] = Counter()
        per_kind: Counter[str] = Counter()
        latencies = np.zeros(requests)
        rss = {"start": rss_bytes(pid), "warm": 0, "max": 0, "samples": []}
        state = {"next": 0, "done": 0}
        warm_event = asyncio.Event()
        t_start = time.perf_counter()
        t_warm = [t_start]

        async def sampler() -> None:
            while True:
                value = rss_bytes(pid)
                rss["max"] = max(rss["max"], value)
                rss["samples"].append((round(time.perf_counter() - t_start, 1), state["done"], value))
                await asyncio.sleep(1.0)

        async def worker(w: int) -> None:
            perf = time.perf_counter
            while True:
                i = state["next"]
                if i >= requests:
                    return
                state["next"] = i + 1
                k = i % len(kinds)
                call = calls[w % len(chans)][k]
                start = perf()
                try:
                    data = await call(kinds[k].payload, timeout=60)
                except grpc.aio.AioRpcError as err:
                    errors[err.code().name] += 1
                    if len(first_errors) < 5:
                        first_errors.append(f"{kinds[k].name}: {err.code().name}: {err.details()}")
                else:
                    latencies[i] = perf() - start
                    if not np.allclose(kinds[k].values(data), reference[k], rtol=1e-4, atol=1e-4):
                        mismatches[kinds[k].name] += 1
                    per_kind[kinds[k].name] += 1
                state["done"] += 1
                if state["done"] == warmup:
                    rss["warm"] = rss_bytes(pid)
                    t_warm[0] = perf()
                    warm_event.set()
                if progress and state["done"] % 10_000 == 0:
                    rate = state["done"] / (perf() - t_start)
                    print(
                        f"  {state['done']:>7} requests, {rate:,.0f}/s, RSS {rss_bytes(pid) / MiB:.1f} MiB", flush=True
                    )

        sampler_task = asyncio.create_task(sampler())
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        t_end = time.perf_counter()
        rss["end"] = rss_bytes(pid)
        sampler_task.cancel()
        if not warm_event.is_set():
            rss["warm"], t_warm[0] = rss["start"], t_start
    finally:
        for ch in chans:
            await ch.close()

    ok = latencies[latencies > 0]
    growth = (rss["end"] - rss["warm"]) / rss["warm"] * 100
    # Leak check independent of the warm-up: growth over the second half of the requests.
    half = next((v for _, n, v in rss["samples"] if n >= requests // 2), rss["end"])
    second_half = (rss["end"] - half) / half * 100
    return {
        "requests": requests,
        "concurrency": concurrency,
        "ok": int(sum(per_kind.values())),
        "errors": dict(errors),
        "first_errors": first_errors,
        "mismatches": dict(mismatches),
        "per_kind": dict(per_kind),
        "wall_s": round(t_end - t_start, 2),
        "throughput_rps": round(requests / (t_end - t_start), 1),
        "throughput_after_warmup_rps": round((requests - warmup) / max(t_end - t_warm[0], 1e-9), 1),
        "latency_ms": {
            q: round(float(np.percentile(ok, p)) * 1000, 2)
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        }
        if ok.size
        else {},
        "warmup_requests": warmup,
        "priming_requests": primed,
        "rss_mib": {k: round(rss[k] / MiB, 1) for k in ("start", "warm", "end", "max")},
        "rss_growth_pct": round(growth, 2),
        "rss_growth_second_half_pct": round(second_half, 2),
        "rss_samples": [(t, n, round(v / MiB, 1)) for t, n, v in rss["samples"]],
    }


# -- a server of our own -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(address: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"server exited with {process.returncode}")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit("server did not become SERVING")


def start_server(model_repository: Path, extra: list[str], log_path: Path) -> tuple[str, subprocess.Popen]:
    """Start ``python -m service`` on a free port (a few tries: another process may take the
    port between our probe and the server's bind)."""
    for attempt in range(3):
        try:
            return _start_server(model_repository, extra, log_path)
        except SystemExit:
            if attempt == 2 or "already in use" not in log_path.read_text(errors="replace"):
                raise
    raise AssertionError("unreachable")


def _start_server(model_repository: Path, extra: list[str], log_path: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model-repository",
        str(model_repository),
        "--provider",
        "cpu",
    ]
    if _has_setting("metrics_port"):
        command += ["--metrics-port", "0"]  # no fixed port: may run beside another server
    if _has_setting("http_port"):
        command += ["--http-port", "0"]  # gRPC only: nothing on port 8000 to collide with
    command += extra
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    wait_serving(address, process)
    return address, process


def _has_setting(name: str) -> bool:
    from service.settings import Settings

    return name in Settings.model_fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, help="requests before the RSS baseline (default 5 %%, at least 1000)")
    parser.add_argument("--channels", type=int, default=4, help="client channels (connections)")
    parser.add_argument("--no-prime", dest="prime", action="store_false", help="skip the priming burst")
    parser.add_argument("--address", help="soak a running server (needs --pid for RSS)")
    parser.add_argument("--pid", type=int, help="pid of the server at --address")
    parser.add_argument("--model-repository", type=Path, default=REPO_ROOT / "models")
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for our own server (repeat)")
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="percent; at or over it → exit 1")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(1000, args.requests // 20)
    warmup = min(warmup, args.requests)

    process = None
    if args.address:
        if args.pid is None:
            parser.error("--address needs --pid (to read the server's RSS)")
        address, pid = args.address, args.pid
    else:
        log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-server-{os.getpid()}.log"
        address, process = start_server(args.model_repository, args.server_arg, log_path)
        pid = process.pid
        print(f"server pid {pid} on {address}, log {log_path}")
    try:
        primed = f"a priming burst of {args.concurrency} x each request kind + " if args.prime else ""
        print(f"soak: {args.requests:,} requests at concurrency {args.concurrency}, warm-up {primed}{warmup:,}")
        result = asyncio.run(
            soak(address, pid, args.requests, args.concurrency, warmup, args.channels, progress=True, prime=args.prime)
        )
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            result_code = process.wait(60)
            print(f"server stopped (exit {result_code})")

    lat = result["latency_ms"]
    print(
        f"requests   {result['requests']:,} ({result['ok']:,} ok), "
        f"errors {sum(result['errors'].values())} {result['errors'] or ''}"
    )
    print(f"mismatches {sum(result['mismatches'].values())} {result['mismatches'] or ''}")
    print(f"per kind   {result['per_kind']}")
    print(
        f"wall       {result['wall_s']} s, {result['throughput_rps']:,} req/s "
        f"({result['throughput_after_warmup_rps']:,} after warm-up)"
    )
    print(
        f"latency    p50 {lat.get('p50')} ms, p90 {lat.get('p90')} ms, p99 {lat.get('p99')} ms, max {lat.get('max')} ms"
    )
    rss = result["rss_mib"]
    print(
        f"RSS        start {rss['start']} MiB, after warm-up {rss['warm']} MiB, "
        f"end {rss['end']} MiB, max {rss['max']} MiB"
    )
    print(
        f"RSS growth {result['rss_growth_pct']} % from warm-up to end (limit {args.max_rss_growth} %), "
        f"{result['rss_growth_second_half_pct']} % over the second half"
    )
    for line in result["first_errors"]:
        print(f"  error: {line}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    failed = (
        sum(result["errors"].values())
        or sum(result["mismatches"].values())
        or result["rss_growth_pct"] >= args.max_rss_growth
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
