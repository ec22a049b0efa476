"""Worker scaling: throughput and server CPU per request of ``--workers 1, 2, …`` on one port.

    .venv/bin/python benchmarks/workers.py                          # 1 and 2 workers, softmax batch 1
    .venv/bin/python benchmarks/workers.py --workers 1,2,4,8 --loadgens 6 --connections 48 --concurrency 192

The kernel spreads *connections* over the workers (SO_REUSEPORT), not calls, so the load comes
from ``--loadgens`` load generator processes (benchmarks/loadgen.py: grpc.aio, pre-serialised V2
requests) with ``--connections`` connections in all. Each worker count gets a fresh server
(``python -m service --workers W --provider …``), measured ``--rounds`` times (the order of the
worker counts alternates between rounds; the best round of each is kept: the machine may be
shared). Server CPU is the CPU time of the supervisor and all its workers over the measured window
(/proc), per request. ``spread`` is each worker's share of the requests
(``serving_worker_requests_total``). Prints a markdown table; ``--out`` writes the JSON.

On 2 cores (the CI machine) this shows correctness and CPU cost only: the load generator needs
most of a core of its own, so two workers have no free core to scale into. The scaling curve comes
from a many-core machine (benchmarks/device/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from run import free_port, tree_cpu  # noqa: E402

from service.generated.inference import grpc_service_pb2 as v2  # noqa: E402

PY = sys.executable
V2_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CLK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def own_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` alone (the supervisor, without its workers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK


def payload(model: str, batch: int, directory: Path) -> Path:
    x = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
    tensor = v2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=x.shape)
    request = v2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()])
    path = directory / f"v2-{model}-{batch}.bin"
    path.write_bytes(request.SerializeToString())
    return path


class Server:
    """``python -m service --workers W`` on free ports, started once every worker serves."""

    def __init__(self, workers: int, provider: str, models: Path, workdir: Path, extra: list[str]) -> None:
        self.workers = workers
        self.log_path = workdir / f"server-{workers}-{time.monotonic_ns()}.log"
        command = [
            *(PY, "-m", "service", "--host", "127.0.0.1", "--port", "0", "--http-port", "0"),
            *("--metrics-port", str(free_port()), "--log-format", "json", "--log-level", "INFO"),
            *("--provider", provider, "--model-repository", str(models), "--workers", str(workers), *extra),
        ]
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        self.port, self.metrics_port = self._wait_started()

    def _wait_started(self, timeout: float = 300.0) -> tuple[int, int | None]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if '"msg": "server started"' in line:
                    entry = json.loads(line)
                    return int(entry["address"].rsplit(":", 1)[1]), entry.get("metrics_port")
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"server did not start:\n{self.log_path.read_text()[-3000:]}")

    def per_worker(self) -> dict[str, float]:
        if not self.metrics_port:
            return {}
        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30).read().decode()
        return {
            s.labels["worker"]: s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "serving_worker_requests_total"
        }

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(server: Server, args: argparse.Namespace, payload_file: Path) -> dict[str, Any]:
    loadgens = args.loadgens
    specs = [
        {
            "target": f"127.0.0.1:{server.port}",
            "method": V2_METHOD,
            "payload_file": str(payload_file),
            "concurrency": max(1, args.concurrency // loadgens),
            "channels": max(1, args.connections // loadgens),
            "duration_s": args.duration,
            "warmup_s": args.warmup,
        }
        for _ in range(loadgens)
    ]
    before = server.per_worker()
    processes = [
        subprocess.Popen(
            [PY, str(HERE / "loadgen.py"), json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for spec in specs
    ]
    cpu: dict[str, float] = {}
    pid = server.process.pid

    def sample_cpu() -> None:
        time.sleep(1.0 + args.warmup)  # process start + channels + warm-up (approximate)
        cpu["own0"], cpu["start"], cpu["t0"] = own_cpu(pid), tree_cpu(pid), time.monotonic()
        time.sleep(args.duration * 0.9)
        cpu["own1"], cpu["end"], cpu["t1"] = own_cpu(pid), tree_cpu(pid), time.monotonic()

    sampler = threading.Thread(target=sample_cpu, daemon=True)
    sampler.start()
    results = []
    for process in processes:
        out, err = process.communicate(timeout=args.duration + args.warmup + 180)
        if process.returncode != 0:
            raise RuntimeError(f"load generator failed: {err.decode()[-1500:]}")
        results.append(json.loads(out))
    sampler.join()
    after = server.per_worker()
    requests = sum(r["requests"] for r in results)
    wall = float(np.mean([r["wall_s"] for r in results]))
    latencies = np.concatenate([np.asarray(r["latencies_s"]) for r in results]) * 1000
    rps = requests / wall if wall else 0.0
    server_cores = (cpu["end"] - cpu["start"]) / (cpu["t1"] - cpu["t0"]) if "end" in cpu else float("nan")
    answered = {w: after.get(w, 0.0) - before.get(w, 0.0) for w in after}
    total = sum(answered.values()) or 1.0
    errors: dict[str, int] = {}
    for r in results:
        for code, n in r["errors"].items():
            errors[code] = errors.get(code, 0) + n
    return {
        "rps": rps,
        "rows_per_s": rps * args.batch,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
        "server_cores": server_cores,
        "server_cpu_us_per_request": server_cores / rps * 1e6 if rps else None,
        # with workers: the supervisor alone (it answers no call; it works when /metrics is read)
        "supervisor_cores": (cpu["own1"] - cpu["own0"]) / (cpu["t1"] - cpu["t0"])
        if "end" in cpu and server.workers > 1
        else None,
        "client_cores": sum(r["cpu_s"] for r in results) / wall if wall else None,
        "spread": {w: round(n / total, 3) for w, n in sorted(answered.items())},
        "errors": errors,
    }


def machine(provider: str) -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    import grpc
    import onnxruntime

    gpu = "none"
    try:
        gpu = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
            or "none"
        )
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "provider": provider,
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_before": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def table(rows: list[dict[str, Any]], batch: int) -> str:
    base = next((r["rps"] for r in rows if r["workers"] == 1), None)
    unit = "req/s" if batch == 1 else "req/s (rows/s)"
    lines = [
        f"| workers | connections | {unit} | × 1 worker | goal 0.8·W | server cores | server CPU µs/request "
        "| p50 / p99 ms | client cores | spread over workers |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        ratio = r["rps"] / base if base else None
        goal = "met" if ratio is not None and ratio >= 0.8 * r["workers"] else "not met"
        rate = f"{r['rps']:.0f}" if batch == 1 else f"{r['rps']:.0f} ({r['rows_per_s']:.0f})"
        lines.append(
            f"| {r['workers']} | {r['connections']} | {rate} | {ratio:.2f} | {goal if r['workers'] > 1 else '–'} "
            f"| {r['server_cores']:.2f} | {r['server_cpu_us_per_request']:.0f} | {r['p50_ms']:.2f} / {r['p99_ms']:.2f} "
            f"| {r['client_cores']:.2f} | {' / '.join(f'{v:.0%}' for v in r['spread'].values()) or '–'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated (default 1,2)")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="fashion_softmax")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight, over all load generators")
    parser.add_argument("--connections", type=int, default=8, help="TCP connections, over all load generators")
    parser.add_argument("--loadgens", type=int, default=1, help="load generator processes")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model-repository", type=Path, default=ROOT / "models")
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    counts = [int(w) for w in args.workers.split(",")]
    info = machine(args.provider)
    log(f"machine: {json.dumps(info)}")
    best: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="workers-bench-") as tmp:
        payload_file = payload(args.model, args.batch, Path(tmp))
        for round_ in range(args.rounds):
            for workers in counts if round_ % 2 == 0 else list(reversed(counts)):
                server = Server(workers, args.provider, args.model_repository, Path(tmp), args.server_arg)
                try:
                    result = measure(server, args, payload_file)
                finally:
                    server.stop()
                log(
                    f"round {round_ + 1}, {workers} workers: {result['rps']:.0f} req/s, server "
                    f"{result['server_cores']:.2f} cores, {result['server_cpu_us_per_request']:.0f} µs/request, "
                    f"p50 {result['p50_ms']:.2f} p99 {result['p99_ms']:.2f} ms, spread {result['spread']}"
                    + (f", errors {result['errors']}" if result["errors"] else "")
                )
                if workers not in best or result["rps"] > best[workers]["rps"]:
                    best[workers] = {"workers": workers, "connections": args.connections, **result}
                if args.out:  # as it goes: a run cut short by a time limit keeps what it measured
                    write(args, info, [best[w] for w in counts if w in best])
    rows = [best[w] for w in counts]
    print(
        f"{args.model} batch {args.batch}, V2 gRPC, {args.concurrency} calls in flight over {args.connections} "
        f"connections from {args.loadgens} load generator(s), provider {args.provider}; best of {args.rounds} "
        f"rounds of {args.duration:g} s\n"
    )
    print(table(rows, args.batch))
    return 0


def write(args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"machine": info, "settings": settings, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
