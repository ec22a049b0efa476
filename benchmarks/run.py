"""Throughput and latency benchmark: our server vs in-process onnxruntime, a do-nothing gRPC
server and MLServer, on this machine, in one command:

    .venv/bin/python benchmarks/run.py                 # everything (~6-8 min; MLServer installed on first run)
    .venv/bin/python benchmarks/run.py --skip-mlserver --duration 2

Prints a table and the goal ratios, writes benchmarks/results/benchmark.json and
benchmarks/results/benchmark.png. Every server runs as its own process on 127.0.0.1; the load
comes from benchmarks/loadgen.py (grpc.aio, pre-serialised request bytes, responses not decoded),
one process per measurement, whose CPU use is reported next to each result. Server CPU is the
server process tree's CPU time during the measurement. All servers run side by side and every
load is measured on each of them in turn, ``--repeat`` rounds (default 2), keeping each one's best:
the machine is shared, and a burst of other work should hit every system alike.

Measurements:
1. ceilings: in-process onnxruntime (batch 1/64/256; onnxruntime's default threads with one caller,
   and our server's session options with two callers — the better is the compute ceiling), and a
   do-nothing grpc.aio server that parses the same request and answers an empty message (the
   transport ceiling);
2. our server, V2 and typed API, fashion_softmax and fashion_cnn, batch 1/64/256;
3. fashion_cnn, batch-1 clients 1/8/32/64, dynamic batching on vs off;
4. fashion_softmax unloaded batch-1 round trip p50/p99;
5. MLServer (its own venv, benchmarks/.venv-mlserver) with a small onnxruntime runtime
   (benchmarks/mlserver_runtime.py) loading the same ONNX files, same V2 requests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from service.generated.inference import grpc_service_pb2 as v2  # noqa: E402
from service.generated.serving.v1 import serving_pb2 as typed_pb  # noqa: E402

PY = sys.executable
MODELS = ROOT / "models"
RESULTS = HERE / "results"
MLSERVER_VENV = HERE / ".venv-mlserver"
# uvloop 0.21+ breaks MLServer 1.7.1's worker processes (parallel_workers >= 1: "There is no
# current event loop in thread 'MainThread'"), so it is pinned below that.
MLSERVER_REQUIREMENTS = ["mlserver==1.7.1", "onnxruntime", "uvloop<0.21"]
V2_METHOD = "/inference.GRPCInferenceService/ModelInfer"
TYPED_METHOD = "/serving.v1.ModelService/Classify"
SOFTMAX, CNN = "fashion_softmax", "fashion_cnn"
CLK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- requests ----------------------------------------------------------------------------------


def images(batch: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)


def write_payloads(directory: Path) -> dict[tuple[str, str, int], Path]:
    """Serialised requests: (protocol, model, batch) → file."""
    paths = {}
    for model in (SOFTMAX, CNN):
        for batch in (1, 64, 256):
            x = images(batch)
            tensor = v2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=x.shape)
            requests = {
                "v2": v2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()]),
                "typed": typed_pb.ClassifyRequest(
                    model=typed_pb.ModelRef(name=model),
                    images=typed_pb.Tensor(dtype=typed_pb.DATA_TYPE_UINT8, shape=x.shape, data=x.tobytes()),
                ),
            }
            for protocol, request in requests.items():
                path = directory / f"{protocol}-{model}-{batch}.bin"
                path.write_bytes(request.SerializeToString())
                paths[(protocol, model, batch)] = path
            # REST: Triton's binary tensor extension (what tritonclient.http sends by default), and JSON.
            raw = x.tobytes()
            binary_head = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "image",
                            "datatype": "UINT8",
                            "shape": list(x.shape),
                            "parameters": {"binary_data_size": len(raw)},
                        }
                    ],
                    "parameters": {"binary_data_output": True},
                }
            ).encode()
            path = directory / f"rest-{model}-{batch}.bin"
            path.write_bytes(binary_head + raw)
            paths[("rest", model, batch)] = path
            REST_HEADER_LENGTH[(model, batch)] = len(binary_head)
            path = directory / f"rest-json-{model}-{batch}.json"
            path.write_text(
                json.dumps(
                    {
                        "inputs": [
                            {
                                "name": "image",
                                "datatype": "UINT8",
                                "shape": list(x.shape),
                                "data": x.reshape(-1).tolist(),
                            }
                        ]
                    }
                )
            )
            paths[("rest-json", model, batch)] = path
    return paths


#: Length of the JSON part of each binary REST request body: (model, batch) → bytes.
REST_HEADER_LENGTH: dict[tuple[str, int], int] = {}


# -- processes ---------------------------------------------------------------------------------


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and all its descendants."""
    children: dict[int, list[int]] = {}
    stats: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ppid = int(fields[1])
        children.setdefault(ppid, []).append(int(entry))
        stats[int(entry)] = (int(fields[11]) + int(fields[12])) / CLK
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += stats.get(current, 0.0)
        todo += children.get(current, [])
    return total


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path
    http_port: int | None = None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def wait_ready(server: Server, model: str | None, timeout: float = 120) -> None:
    """Until ModelReady(model) (or ServerReady) answers true over V2."""
    import grpc

    from service.generated.inference import grpc_service_pb2_grpc as v2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} exited:\n{server.log_path.read_text()[-3000:]}")
            try:
                if model is None:
                    return  # the null server: answers as soon as it listens
                if stub.ModelReady(v2.ModelReadyRequest(name=model), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(f"{server.name} not ready after {timeout} s:\n{server.log_path.read_text()[-3000:]}")


def start(
    name: str,
    command: list[str],
    port: int,
    workdir: Path,
    env: dict[str, str] | None = None,
    ready_model: str | None = SOFTMAX,
    cwd: Path = ROOT,
) -> Server:
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(name, process, port, log_path)
    if ready_model is None:
        for _ in range(200):  # the null server prints "ready"
            if b"ready" in log_path.read_bytes() or process.poll() is not None:
                break
            time.sleep(0.05)
    wait_ready(server, ready_model)
    return server


def start_ours(
    workdir: Path,
    *args: str,
    tree: Path = ROOT,
    name: str = "ours",
    http: bool = True,
    env: dict[str, str] | None = None,
) -> Server:
    """Our server from the source tree ``tree`` (``python -m service`` run there: that tree's
    ``service`` package comes first on the path), on the bundled models of this tree; HTTP on a
    port of its own unless ``http`` is False (or the tree predates HTTP); ``env`` added to its
    environment."""
    port = free_port()
    http_port = free_port() if http else None
    flags = ("--http-port", str(http_port or 0), *args) if tree == ROOT else args
    command = [
        PY,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--provider",
        "cpu",
        "--metrics-port",
        str(free_port()),
        "--log-level",
        "WARNING",
        "--model-repository",
        str(MODELS),
        *flags,
    ]
    server = start(name + "".join(a.strip("-") for a in args), command, port, workdir, env=env, cwd=tree)
    server.http_port = http_port if tree == ROOT else None
    wait_ready(server, CNN)
    return server


def start_otlp_sink(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """An OTLP/gRPC receiver that counts and drops spans (tests/fixtures/otlp.py), and its endpoint."""
    port = free_port()
    log_file = open(workdir / "otlp-sink.log", "wb")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [PY, str(ROOT / "tests" / "fixtures" / "otlp.py"), str(port)],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    for _ in range(100):
        if b"OTLP sink" in (workdir / "otlp-sink.log").read_bytes():
            break
        time.sleep(0.05)
    return process, f"http://127.0.0.1:{port}"


def tracing_env(ratio: float, endpoint: str) -> dict[str, str]:
    """Tracing on, root requests sampled at ``ratio``, spans to ``endpoint`` over OTLP/gRPC."""
    return {
        "SERVING_TRACING": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(ratio),
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }


def start_null(workdir: Path) -> Server:
    port = free_port()
    return start("null", [PY, str(HERE / "null_server.py"), str(port)], port, workdir, ready_model=None)


# -- MLServer ------------------------------------------------------------------------------------


def mlserver_python(install: bool) -> Path | str:
    """The MLServer venv's python (created and installed on first use), or why there is none."""
    python = MLSERVER_VENV / "bin" / "python"
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    marker = MLSERVER_VENV / "benchmark-requirements.txt"
    wanted = "\n".join(MLSERVER_REQUIREMENTS)
    if mlserver.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    if not install:
        return f"{MLSERVER_VENV} lacks {MLSERVER_REQUIREMENTS} and --no-install was given"
    log(f"installing {' '.join(MLSERVER_REQUIREMENTS)} into {MLSERVER_VENV} ...")
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        if not python.exists():
            subprocess.run([base, "-m", "venv", str(MLSERVER_VENV)], check=True, capture_output=True, text=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *MLSERVER_REQUIREMENTS],
            check=True,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        output = getattr(exc, "stderr", "") or getattr(exc, "stdout", "") or str(exc)
        return f"pip install {' '.join(MLSERVER_REQUIREMENTS)} failed: {str(output)[-1500:]}"
    if not mlserver.exists():
        return "pip finished but installed no mlserver command"
    marker.write_text(wanted)
    return python


def start_mlserver(workdir: Path, python: Path, parallel_workers: int) -> Server:
    repo = workdir / "mlserver-models"
    shutil.rmtree(repo, ignore_errors=True)
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    repo.mkdir(parents=True)
    (repo / "settings.json").write_text(
        json.dumps(
            {
                "grpc_port": port,
                "http_port": http_port,
                "metrics_port": metrics_port,
                "host": "127.0.0.1",
                "parallel_workers": parallel_workers,
                "debug": False,
            }
        )
    )
    for model in (SOFTMAX, CNN):
        (repo / model).mkdir()
        (repo / model / "model-settings.json").write_text(
            json.dumps(
                {
                    "name": model,
                    "implementation": "mlserver_runtime.OnnxRuntime",
                    "parameters": {"uri": str(MODELS / model / "1" / "model.onnx")},
                }
            )
        )
    env = {"PYTHONPATH": str(HERE), "MLSERVER_LOGGING_LEVEL": "WARNING"}
    command = [str(Path(python).parent / "mlserver"), "start", str(repo)]
    server = start(f"mlserver-pw{parallel_workers}", command, port, workdir, env=env, ready_model=SOFTMAX)
    server.http_port = http_port
    wait_ready(server, CNN)
    return server


# -- measurements -------------------------------------------------------------------------------


@dataclass
class Point:
    system: str  # null | ours | ours-nobatch | mlserver
    protocol: str  # v2 | typed
    model: str
    batch: int
    concurrency: int
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    client_cpu: float = 0.0  # cores
    server_cpu: float = 0.0  # cores
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    note: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rps * self.batch

    def key(self) -> str:
        return f"{self.system}/{self.protocol}/{self.model}/b{self.batch}/c{self.concurrency}"

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.update(rps=self.rps, rows_per_s=self.rows_per_s)
        return d


def _measure_once(
    server: Server,
    system: str,
    protocol: str,
    model: str,
    batch: int,
    concurrency: int,
    payloads: dict,
    duration: float,
    warmup: float,
) -> Point:
    if protocol.startswith("rest"):  # HTTP/1.1 keep-alive, one connection per client
        spec: dict[str, Any] = {
            "target": f"127.0.0.1:{server.http_port}",
            "path": f"/v2/models/{model}/infer",
            "body_file": str(payloads[(protocol, model, batch)]),
            "content_type": "application/octet-stream" if protocol == "rest" else "application/json",
            "headers": (
                {"Inference-Header-Content-Length": str(REST_HEADER_LENGTH[(model, batch)])}
                if protocol == "rest"
                else {}
            ),
            "concurrency": concurrency,
            "duration_s": duration,
            "warmup_s": warmup,
        }
        generator = HERE / "http_loadgen.py"
    else:
        spec = {
            "target": f"127.0.0.1:{server.port}",
            "method": V2_METHOD if protocol == "v2" else TYPED_METHOD,
            "payload_file": str(payloads[(protocol, model, batch)]),
            "concurrency": concurrency,
            "duration_s": duration,
            "warmup_s": warmup,
            "channels": 1 if concurrency < 8 else 4,
        }
        generator = HERE / "loadgen.py"
    process = subprocess.Popen(
        [PY, str(generator), json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    # Server CPU over the measured window only: sample when the window starts and ends.
    cpu: dict[str, float] = {}

    def sample_cpu() -> None:
        time.sleep(0.8 + warmup)  # process start + channel set-up + warm-up (approximate)
        cpu["start"], cpu["t0"] = tree_cpu(server.process.pid), time.monotonic()
        time.sleep(duration * 0.9)
        cpu["end"], cpu["t1"] = tree_cpu(server.process.pid), time.monotonic()

    sampler = threading.Thread(target=sample_cpu, daemon=True)
    sampler.start()
    out, err = process.communicate(timeout=duration + warmup + 120)
    sampler.join()
    point = Point(system, protocol, model, batch, concurrency)
    if process.returncode != 0:
        point.note = f"load generator failed: {err.decode()[-500:]}"
        return point
    result = json.loads(out)
    latencies = np.asarray(result["latencies_s"]) * 1000
    point.requests, point.errors, point.seconds = result["requests"], result["errors"], result["wall_s"]
    point.client_cpu = result["cpu_s"] / result["wall_s"]
    if "end" in cpu:
        point.server_cpu = (cpu["end"] - cpu["start"]) / (cpu["t1"] - cpu["t0"])
    if len(latencies):
        point.p50_ms, point.p90_ms, point.p99_ms = (float(np.percentile(latencies, q)) for q in (50, 90, 99))
    log(
        f"  {point.key():45s} {point.rps:9.0f} req/s {point.rows_per_s:10.0f} rows/s  p50 {point.p50_ms:7.2f}"
        f"  p99 {point.p99_ms:7.2f} ms  client {point.client_cpu:.2f} server {point.server_cpu:.2f} cores"
        + (f"  errors {point.errors}" if point.errors else "")
    )
    return point


def inprocess_ceiling(duration: float) -> list[dict[str, Any]]:
    """Run in a subprocess (its threads must not linger): rows/s of onnxruntime called directly."""
    code = f"""
import json, sys, threading, time
import numpy as np, onnxruntime as ort
sys.path.insert(0, {str(HERE)!r})
from run import images
out = []
def session(path, intra):
    o = ort.SessionOptions()
    if intra:
        o.intra_op_num_threads = intra
        o.inter_op_num_threads = 1
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
for model in ("fashion_softmax", "fashion_cnn"):
    path = {str(MODELS)!r} + "/" + model + "/1/model.onnx"
    configs = (("onnxruntime defaults, 1 caller", 0, 1), ("server options (1 thread), 2 callers", 1, 2))
    for label, intra, callers in configs:
        s = session(path, intra)
        for batch in (1, 64, 256):
            x = images(batch)
            for _ in range(5): s.run(None, {{"image": x}})
            counts, lat = [0] * callers, []
            stop = time.perf_counter() + {duration}
            def work(i):
                while time.perf_counter() < stop:
                    t = time.perf_counter(); s.run(None, {{"image": x}})
                    lat.append(time.perf_counter() - t); counts[i] += 1
            t0 = time.perf_counter()
            threads = [threading.Thread(target=work, args=(i,)) for i in range(callers)]
            [t.start() for t in threads]; [t.join() for t in threads]
            wall = time.perf_counter() - t0
            l = np.asarray(lat) * 1000
            out.append(dict(model=model, config=label, batch=batch, callers=callers,
                            rows_per_s=sum(counts) * batch / wall, calls_per_s=sum(counts) / wall,
                            p50_ms=float(np.percentile(l, 50)), p99_ms=float(np.percentile(l, 99))))
print(json.dumps(out))
"""
    result = subprocess.run([PY, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    rows = json.loads(result.stdout)
    for r in rows:
        log(
            f"  in-process {r['model']:16s} b{r['batch']:<4d} {r['config']:38s} {r['rows_per_s']:10.0f} rows/s "
            f"p50 {r['p50_ms']:.3f} ms"
        )
    return rows


# -- report -------------------------------------------------------------------------------------


def find(points: list[Point], system: str, protocol: str, model: str, batch: int, concurrency: int) -> Point | None:
    for p in points:
        if (p.system, p.protocol, p.model, p.batch, p.concurrency) == (system, protocol, model, batch, concurrency):
            return p
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def goals(points: list[Point], ceilings: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def rows(system: str, protocol: str, model: str, batch: int, concurrency: int) -> float | None:
        p = find(points, system, protocol, model, batch, concurrency)
        return p.rows_per_s if p else None

    def p99(system: str, protocol: str, model: str, batch: int, concurrency: int) -> float | None:
        p = find(points, system, protocol, model, batch, concurrency)
        return round(p.p99_ms, 2) if p else None

    def cpu_us(system: str, protocol: str, model: str, batch: int, concurrency: int) -> int | None:
        p = find(points, system, protocol, model, batch, concurrency)
        return round(1e6 * p.server_cpu / p.rps) if p and p.rps else None

    def ceiling(model: str, batch: int) -> float | None:
        values = [c["rows_per_s"] for c in ceilings if c["model"] == model and c["batch"] == batch]
        return max(values) if values else None

    out = []

    def goal(name: str, value: float | None, target: float, better: str, detail: str) -> None:
        met = None if value is None else (value >= target if better == "higher" else value <= target)
        out.append({"goal": name, "value": value, "target": target, "better": better, "met": met, "detail": detail})

    for protocol in ("v2", "typed"):
        goal(
            f"softmax b256 (8 clients), {protocol}: ours / transport ceiling",
            ratio(rows("ours", protocol, SOFTMAX, 256, 8), rows("null", protocol, SOFTMAX, 256, 8)),
            0.85,
            "higher",
            "do-nothing server, same request bytes",
        )
        goal(
            f"softmax b1, 32 clients, {protocol}: ours / transport ceiling",
            ratio(rows("ours", protocol, SOFTMAX, 1, 32), rows("null", protocol, SOFTMAX, 1, 32)),
            0.85,
            "higher",
            "do-nothing server, same request bytes; server CPU per request: ours "
            f"{cpu_us('ours', protocol, SOFTMAX, 1, 32)} µs, do-nothing {cpu_us('null', protocol, SOFTMAX, 1, 32)} µs",
        )
        goal(
            f"cnn b256 (8 clients), {protocol}: ours / in-process onnxruntime",
            ratio(rows("ours", protocol, CNN, 256, 8), ceiling(CNN, 256)),
            0.90,
            "higher",
            "best in-process configuration at batch 256",
        )
    # The most any server could gain over batching off here: the do-nothing server's rate at the
    # same load (batch-1 requests of the same size) over ours with batching off.
    bound = ratio(rows("null", "v2", SOFTMAX, 1, 32), rows("ours-nobatch", "v2", CNN, 1, 32))
    goal(
        "cnn b1, 32 clients: batching on / off",
        ratio(rows("ours", "v2", CNN, 1, 32), rows("ours-nobatch", "v2", CNN, 1, 32)),
        3.0,
        "higher",
        f"p99 on {p99('ours', 'v2', CNN, 1, 32)} ms, off {p99('ours-nobatch', 'v2', CNN, 1, 32)} ms; "
        f"transport ceiling / batching off = {fmt(bound)}",
    )
    goal(
        "softmax b1 unloaded round trip p99 (ms), v2",
        p99("ours", "v2", SOFTMAX, 1, 1),
        1.0,
        "lower",
        f"do-nothing server p99 {p99('null', 'v2', SOFTMAX, 1, 1)} ms",
    )
    goal(
        "softmax b1 unloaded round trip p99 (ms), typed",
        p99("ours", "typed", SOFTMAX, 1, 1),
        1.0,
        "lower",
        f"do-nothing server p99 {p99('null', 'typed', SOFTMAX, 1, 1)} ms",
    )
    goal(
        "softmax b1, 32 clients: ours / MLServer",
        ratio(rows("ours", "v2", SOFTMAX, 1, 32), rows("mlserver", "v2", SOFTMAX, 1, 32)),
        3.0,
        "higher",
        f"transport ceiling / MLServer = {fmt(ratio(rows('null', *B1), rows('mlserver', *B1)))}",
    )
    goal(
        "softmax b256 (8 clients): ours / MLServer",
        ratio(rows("ours", "v2", SOFTMAX, 256, 8), rows("mlserver", "v2", SOFTMAX, 256, 8)),
        10.0,
        "higher",
        "",
    )
    goal(
        "REST softmax b1, 32 clients: ours (binary) / MLServer REST (JSON)",
        ratio(rows("ours", "rest", SOFTMAX, 1, 32), rows("mlserver", "rest-json", SOFTMAX, 1, 32)),
        3.0,
        "higher",
        f"ours JSON / MLServer = {fmt(ratio(rows('ours', *JSON_B1), rows('mlserver', *JSON_B1)))}; "
        f"server CPU per request: ours REST {cpu_us('ours', 'rest', SOFTMAX, 1, 32)} µs, "
        f"gRPC {cpu_us('ours', *B1)} µs, MLServer REST {cpu_us('mlserver', *JSON_B1)} µs",
    )
    goal(
        "REST softmax b256 (8 clients): ours (binary) / MLServer REST (JSON)",
        ratio(rows("ours", "rest", SOFTMAX, 256, 8), rows("mlserver", "rest-json", SOFTMAX, 256, 8)),
        10.0,
        "higher",
        f"server CPU per request: ours REST {cpu_us('ours', 'rest', SOFTMAX, 256, 8)} µs, "
        f"gRPC {cpu_us('ours', 'v2', SOFTMAX, 256, 8)} µs",
    )
    goal(
        "gRPC softmax b1, 32 clients: HTTP on (idle) / HTTP off",
        ratio(rows("ours", "v2", SOFTMAX, 1, 32), rows("ours-nohttp", "v2", SOFTMAX, 1, 32)),
        0.95,
        "higher",
        f"server CPU per request {cpu_us('ours', *B1)} vs {cpu_us('ours-nohttp', *B1)} µs",
    )
    for batch, conc in ((1, 1), (1, 32), (256, 8)):
        ours, theirs = p99("ours", "v2", SOFTMAX, batch, conc), p99("mlserver", "v2", SOFTMAX, batch, conc)
        goal(
            f"softmax b{batch}, {conc} clients: p99 ours / MLServer",
            ratio(ours, theirs),
            1.0,
            "lower",
            f"ours {ours} ms, MLServer {theirs} ms",
        )
    return out


#: The loads a redesign must not slow down (within 5 %): before vs after, same run.
REGRESSION_LOADS = [("v2", SOFTMAX, 1, 32), ("typed", SOFTMAX, 1, 32), ("v2", SOFTMAX, 256, 8), ("v2", CNN, 256, 8)]


def regression(
    points: list[Point], runs: dict[tuple[str, tuple[str, str, int, int]], list[Point]]
) -> list[dict[str, Any]]:
    """Before vs after per load: the best rounds, and the median of the per-round ratios (each
    round measures both trees back to back, so a burst of other work on the machine hits a pair
    rather than one side)."""
    rows = []
    for load in REGRESSION_LOADS:
        after, before = find(points, "ours", *load), find(points, "before", *load)
        if after is None or before is None:
            continue

        def cpu(p: Point) -> float | None:
            return 1e6 * p.server_cpu / p.rps if p.rps else None

        pairs = list(zip(runs.get(("ours", load), []), runs.get(("before", load), [])))
        ratios = sorted(a.rows_per_s / b.rows_per_s for a, b in pairs if b.rows_per_s)
        cpu_ratios = sorted(cpu(b) / cpu(a) for a, b in pairs if cpu(a) and cpu(b))  # type: ignore[operator]
        rows.append(
            {
                "load": "/".join(map(str, load)),
                "before_rows_per_s": before.rows_per_s,
                "after_rows_per_s": after.rows_per_s,
                "ratio": ratio(after.rows_per_s, before.rows_per_s),
                "median_round_ratio": float(np.median(ratios)) if ratios else None,
                "round_ratios": [round(r, 3) for r in ratios],
                "median_round_cpu_ratio": float(np.median(cpu_ratios)) if cpu_ratios else None,
                "before_cpu_us": cpu(before),
                "after_cpu_us": cpu(after),
                "before_p99_ms": before.p99_ms,
                "after_p99_ms": after.p99_ms,
            }
        )
    return rows


def regression_table(rows: list[dict[str, Any]], tree: Path) -> str:
    lines = [
        f"Before ({tree}) vs after (this tree), same run (best round of each; then the median over rounds of "
        "after/before measured back to back, for throughput and for server CPU per request, before/after):",
        "",
        "| load (protocol/model/batch/clients) | before rows/s | after rows/s | after / before | "
        "median of rounds | CPU/req median before/after | server CPU µs/req before | after | p99 ms before | after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['load']} | {r['before_rows_per_s']:.0f} | {r['after_rows_per_s']:.0f} | {fmt(r['ratio'])} | "
            f"{fmt(r['median_round_ratio'])} | {fmt(r['median_round_cpu_ratio'])} | "
            f"{fmt(r['before_cpu_us'], 0)} | {fmt(r['after_cpu_us'], 0)} | {r['before_p99_ms']:.2f} | "
            f"{r['after_p99_ms']:.2f} |"
        )
    return "\n".join(lines)


#: (protocol, model, batch, clients) of the loads several goals compare.
B1 = ("v2", SOFTMAX, 1, 32)
JSON_B1 = ("rest-json", SOFTMAX, 1, 32)


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def table(points: list[Point], ceilings: list[dict[str, Any]], goal_rows: list[dict[str, Any]]) -> str:
    lines = [
        "| system | protocol | model | batch | clients | req/s | rows/s | p50 ms | p90 ms | p99 ms "
        "| client CPU (cores) | server CPU (cores) | server CPU µs/req |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in ceilings:
        lines.append(
            f"| in-process onnxruntime ({c['config']}) | - | {c['model']} | {c['batch']} | {c['callers']} | "
            f"{c['calls_per_s']:.0f} | {c['rows_per_s']:.0f} | {c['p50_ms']:.3f} | | {c['p99_ms']:.3f} | | | |"
        )
    names = {
        "null": "do-nothing gRPC server",
        "ours": "ours (batching on)",
        "ours-nobatch": "ours (batching off)",
        "ours-nohttp": "ours (HTTP off)",
        "before": "ours before (baseline tree)",
        "mlserver": "MLServer 1.7.1",
    }
    for p in points:
        errors = f" ({sum(p.errors.values())} errors)" if p.errors else ""
        lines.append(
            f"| {names.get(p.system, p.system)} | {p.protocol} | {p.model} | {p.batch} | {p.concurrency} | "
            f"{p.rps:.0f}{errors} | {p.rows_per_s:.0f} | {p.p50_ms:.2f} | {p.p90_ms:.2f} | {p.p99_ms:.2f} | "
            f"{p.client_cpu:.2f} | {p.server_cpu:.2f} | {1e6 * p.server_cpu / p.rps if p.rps else 0:.0f} |"
        )
    lines += ["", "| goal | measured | target | met |", "| --- | ---: | ---: | --- |"]
    for g in goal_rows:
        sign = ">=" if g["better"] == "higher" else "<="
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        detail = f" ({g['detail']})" if g["detail"] else ""
        lines.append(f"| {g['goal']}{detail} | {fmt(g['value'])} | {sign} {g['target']} | {met} |")
    return "\n".join(lines)


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    series = [
        ("null", "v2", SOFTMAX, "do-nothing gRPC server (transport ceiling)", "k--"),
        ("ours", "v2", SOFTMAX, "ours, fashion_softmax (V2)", "C0-o"),
        ("mlserver", "v2", SOFTMAX, "MLServer, fashion_softmax", "C3-s"),
        ("ours", "v2", CNN, "ours, fashion_cnn, batching on", "C2-o"),
        ("ours-nobatch", "v2", CNN, "ours, fashion_cnn, batching off", "C1-^"),
    ]
    for system, protocol, model, label, style in series:
        pts = sorted(
            (p for p in points if (p.system, p.protocol, p.model, p.batch) == (system, protocol, model, 1)),
            key=lambda p: p.concurrency,
        )
        if len(pts) > 1:
            left.plot([p.concurrency for p in pts], [p.rps for p in pts], style, label=label)
    left.set_xscale("log", base=2)
    left.set_xticks([1, 8, 32, 64], ["1", "8", "32", "64"])
    left.set_xlabel("concurrent clients (batch-1 requests)")
    left.set_ylabel("requests / s")
    left.set_title("Throughput vs concurrency (2-core CPU, loopback)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)

    picks = [
        ("null", "v2", SOFTMAX, 1, 1, "null b1 c1"),
        ("ours", "v2", SOFTMAX, 1, 1, "ours V2 b1 c1"),
        ("ours", "typed", SOFTMAX, 1, 1, "ours typed b1 c1"),
        ("mlserver", "v2", SOFTMAX, 1, 1, "MLServer b1 c1"),
        ("null", "v2", SOFTMAX, 1, 32, "null b1 c32"),
        ("ours", "v2", SOFTMAX, 1, 32, "ours b1 c32"),
        ("mlserver", "v2", SOFTMAX, 1, 32, "MLServer b1 c32"),
        ("ours", "v2", CNN, 1, 32, "cnn on b1 c32"),
        ("ours-nobatch", "v2", CNN, 1, 32, "cnn off b1 c32"),
    ]
    chosen = [(label, find(points, *key)) for *key, label in picks]
    chosen = [(label, p) for label, p in chosen if p is not None]
    x = np.arange(len(chosen))
    for offset, attr, name in ((-0.27, "p50_ms", "p50"), (0, "p90_ms", "p90"), (0.27, "p99_ms", "p99")):
        right.bar(x + offset, [getattr(p, attr) for _, p in chosen], width=0.27, label=name)
    right.set_xticks(x, [label for label, _ in chosen], rotation=35, ha="right", fontsize=8)
    right.set_yscale("log")
    right.set_ylabel("latency, ms (log)")
    right.set_title("Latency percentiles (fashion_softmax unless noted)")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- main ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    import grpc
    import onnxruntime

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "gpu": "none",
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "grpcio": grpc.__version__,
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per point (default 3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (default 1)")
    parser.add_argument(
        "--repeat", type=int, default=2, help="rounds over all points; each point keeps its best (default 2)"
    )
    parser.add_argument("--skip-mlserver", action="store_true", help="leave MLServer out")
    parser.add_argument("--no-install", action="store_true", help="do not create the MLServer venv")
    parser.add_argument(
        "--mlserver-workers",
        type=int,
        default=0,
        help="MLServer parallel_workers (0 = inference in the server process, its fastest here; "
        "MLServer's default is 1)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default benchmarks/results)")
    parser.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run our server from this source tree (e.g. a `git worktree` of an earlier "
        "commit) on the regression loads, interleaved with today's: a before/after table",
    )
    parser.add_argument(
        "--tracing",
        type=float,
        metavar="RATIO",
        help="run this tree's server with OpenTelemetry tracing on, requests sampled at RATIO (1 = all), "
        "spans exported over OTLP/gRPC to a sink process that counts and drops them",
    )
    parser.add_argument(
        "--only-regression",
        action="store_true",
        help="with --baseline-tree: measure the regression loads only (no ceilings, no MLServer)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    d, w = args.duration, args.warmup
    started = time.time()
    report: dict[str, Any] = {
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    points: list[Point] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        payloads = write_payloads(workdir)

        log("1. in-process onnxruntime (compute ceiling)")
        ceilings = inprocess_ceiling(min(d, 2.0))

        softmax_loads = [
            ("v2", SOFTMAX, 1, 1),
            ("v2", SOFTMAX, 1, 8),
            ("v2", SOFTMAX, 1, 32),
            ("v2", SOFTMAX, 1, 64),
            ("v2", SOFTMAX, 64, 8),
            ("v2", SOFTMAX, 256, 8),
        ]
        typed_loads = [("typed", SOFTMAX, 1, 1), ("typed", SOFTMAX, 1, 32), ("typed", SOFTMAX, 256, 8)]
        cnn_batch1 = [("v2", CNN, 1, 1), ("v2", CNN, 1, 8), ("v2", CNN, 1, 32), ("v2", CNN, 1, 64)]
        # REST: ours with Triton's binary tensors (and JSON); MLServer's REST takes JSON.
        rest_loads = [
            ("rest", SOFTMAX, 1, 1),
            ("rest", SOFTMAX, 1, 32),
            ("rest", SOFTMAX, 256, 8),
            ("rest-json", SOFTMAX, 1, 32),
            ("rest-json", SOFTMAX, 256, 8),
        ]
        mlserver_rest = [("rest-json", SOFTMAX, 1, 1), ("rest-json", SOFTMAX, 1, 32), ("rest-json", SOFTMAX, 256, 8)]
        plan: dict[str, list[tuple[str, str, int, int]]] = {
            "null": softmax_loads + typed_loads,
            "ours": softmax_loads
            + typed_loads
            + cnn_batch1
            + rest_loads
            + [("v2", CNN, 64, 8), ("v2", CNN, 256, 8), ("typed", CNN, 256, 8), ("typed", CNN, 1, 32)],
            "ours-nobatch": cnn_batch1,
            "ours-nohttp": [("v2", SOFTMAX, 1, 32), ("v2", SOFTMAX, 1, 1)],
            "mlserver": [*softmax_loads, ("v2", CNN, 1, 32), ("v2", CNN, 256, 8), *mlserver_rest],
        }
        if args.baseline_tree:
            plan["before"] = REGRESSION_LOADS
            if args.only_regression:
                plan = {"ours": REGRESSION_LOADS, "before": REGRESSION_LOADS}

        # All servers run side by side (idle ones cost nothing) so that each load is measured on
        # every system in turn, round after round: a burst of other work on this shared machine
        # then hits all systems alike instead of deciding one comparison.
        servers: dict[str, Server] = {}
        report["mlserver"] = {"requirements": MLSERVER_REQUIREMENTS, "parallel_workers": args.mlserver_workers}
        sink = None
        ours_env = None
        if args.tracing is not None:
            sink, endpoint = start_otlp_sink(workdir)
            ours_env = tracing_env(args.tracing, endpoint)
            report["tracing"] = ours_env
        try:
            log("2. starting: do-nothing gRPC server, ours (batching on), ours (batching off), MLServer")
            if "null" in plan:
                servers["null"] = start_null(workdir)
            servers["ours"] = start_ours(workdir, env=ours_env)
            if "before" in plan:
                servers["before"] = start_ours(workdir, tree=args.baseline_tree.resolve(), name="before")
            if "ours-nobatch" in plan:
                servers["ours-nobatch"] = start_ours(workdir, "--dynamic-batching", "false")
            if "ours-nohttp" in plan:
                servers["ours-nohttp"] = start_ours(workdir, name="ours-nohttp", http=False)
            if args.skip_mlserver or "mlserver" not in plan:
                report["mlserver"]["skipped"] = "--skip-mlserver"
            else:
                python = mlserver_python(not args.no_install)
                if isinstance(python, str):
                    report["mlserver"]["skipped"] = python
                    log(f"   MLServer skipped: {python}")
                else:
                    try:
                        servers["mlserver"] = start_mlserver(workdir, python, args.mlserver_workers)
                    except (RuntimeError, TimeoutError) as exc:
                        report["mlserver"]["skipped"] = f"did not start: {exc}"
                        log(f"   MLServer did not start: {exc}")
            loads = list(dict.fromkeys(load for system in plan for load in plan[system]))
            runs: dict[tuple[str, tuple[str, str, int, int]], list[Point]] = {}
            for round_ in range(max(1, args.repeat)):
                log(f"3. round {round_ + 1} of {args.repeat}: every load on every system")
                for load in loads:
                    for system, server in servers.items() if round_ % 2 == 0 else reversed(servers.items()):
                        if load in plan[system]:
                            runs.setdefault((system, load), []).append(
                                _measure_once(server, system, *load, payloads, d, w)
                            )
            for measured in runs.values():
                best = max(measured, key=lambda p: p.rps)
                best.note = f"best of {len(measured)}: " + ", ".join(f"{p.rps:.0f}" for p in measured) + " req/s"
                points.append(best)
        finally:
            for server in servers.values():
                server.stop()
            if sink is not None:
                sink.terminate()
                sink.wait(10)
                report["tracing"]["sink"] = (workdir / "otlp-sink.log").read_text().strip().splitlines()[-1]

        log("4. in-process onnxruntime again (the better of both passes is the ceiling)")
        for row in inprocess_ceiling(min(d, 2.0)):
            key = (row["model"], row["config"], row["batch"])
            old = next((c for c in ceilings if (c["model"], c["config"], c["batch"]) == key), None)
            if old is None:
                ceilings.append(row)
            elif row["rows_per_s"] > old["rows_per_s"]:
                ceilings[ceilings.index(old)] = row

    goal_rows = goals(points, ceilings) if not args.only_regression else []
    if args.baseline_tree:
        report["regression"] = regression(points, runs)
    report.update(
        load_average_after=os.getloadavg(),
        wall_seconds=round(time.time() - started, 1),
        ceilings=ceilings,
        points=[p.as_dict() for p in points],
        goals=goal_rows,
    )
    (args.out / "benchmark.json").write_text(json.dumps(report, indent=2))
    text = table(points, ceilings, goal_rows)
    if args.baseline_tree:
        text += "\n\n" + regression_table(report["regression"], args.baseline_tree)
    if args.tracing is not None:
        text += (
            f"\n\nAfter = this tree with tracing on, sampled at {args.tracing:g} "
            f"(OTLP/gRPC to a sink: {report['tracing'].get('sink', '?')})."
        )
    (args.out / "benchmark.md").write_text(text + "\n")
    try:
        plot(points, args.out / "benchmark.png")
    except ImportError as exc:  # matplotlib is a test/batch extra
        log(f"no plot: {exc}")
    print(text)
    m = report["machine"]
    print(
        f"\nmachine: {m['cpu']}, {m['cores']} cores, no GPU; load average before "
        f"{report['load_average_before'][0]:.2f}, after {report['load_average_after'][0]:.2f}; "
        f"{report['wall_seconds']:.0f} s; results in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
