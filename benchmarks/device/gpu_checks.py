"""The execution-provider checks of the device run (run.sh), against real server processes:

1. **parity**: the server started with ``--provider P`` on the bundled models; every model's
   outputs over V2 against in-process onnxruntime on the CPU provider: the 10,000 Fashion-MNIST
   test images for the classifiers (max |Δp|, accuracy of each), 10,000 made-up inputs for the
   regressions (max |Δ| in US dollars and relative); the provider each model version runs on,
   from the typed API's GetModelMetadata, V2 ModelConfig and the log lines;
2. **fashion_cnn batch 256**: rows/s served over V2 (8 callers, 4 connections) against
   in-process onnxruntime on the same provider with the server's session options (goal ≥ 0.9);
3. **32 batch-1 clients** on fashion_cnn, dynamic batching on vs off (``--dynamic-batching
   false``): req/s, p50/p99 (goal on/off ≥ 3×).

    python3 benchmarks/device/gpu_checks.py --provider cuda --out /tmp/device-results

Needs no torch and nothing outside the repository but its serving dependencies (and the test set
in benchmarks/device/data/, or $FASHION_DATA_DIR/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE.parent))

import grpc  # noqa: E402
from workers import Server, log, machine  # noqa: E402

from service.generated.inference import grpc_service_pb2 as v2  # noqa: E402
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc  # noqa: E402
from service.generated.serving.v1 import serving_pb2 as pb  # noqa: E402
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

PY = sys.executable
MODELS = ROOT / "models"
CNN = "fashion_cnn"
V2_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def test_set() -> tuple[np.ndarray, np.ndarray]:
    folders = [HERE / "data", ROOT / "data" / "fashion-mnist"]
    if os.environ.get("FASHION_DATA_DIR"):
        folders.insert(0, Path(os.environ["FASHION_DATA_DIR"]) / "fashion-mnist")
    for folder in folders:
        images, labels = folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz"
        if images.exists() and labels.exists():
            return read_idx(images).reshape(-1, 1, 28, 28), read_idx(labels).astype(np.int64)
    raise SystemExit(f"Fashion-MNIST test set not found in {folders} (prepare.py copies it to benchmarks/device/data)")


def inputs_for(model: str, images: np.ndarray) -> tuple[str, np.ndarray, str]:
    """(input name, 10,000 rows, V2 datatype) for a bundled model."""
    if model.startswith("fashion"):
        return "image", images, "UINT8"
    rng = np.random.default_rng(0)
    if model == "profit":
        return "population", rng.uniform(5_000, 250_000, (len(images), 1)).astype(np.float32), "FP32"
    size = rng.uniform(500, 5_000, len(images))
    bedrooms = rng.integers(1, 6, len(images)).astype(np.float64)
    return "features", np.stack([size, bedrooms], axis=1).astype(np.float32), "FP32"


def served(channel: grpc.Channel, model: str, name: str, x: np.ndarray, datatype: str, chunk: int = 500) -> np.ndarray:
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    out = []
    for start in range(0, len(x), chunk):
        part = np.ascontiguousarray(x[start : start + chunk])
        tensor = v2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=part.shape)
        reply = stub.ModelInfer(
            v2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[part.tobytes()]), timeout=120
        )
        shape = tuple(reply.outputs[0].shape)
        out.append(np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(shape))
    return np.concatenate(out)


def parity(server: Server, provider: str) -> dict[str, Any]:
    import onnxruntime as ort

    images, labels = test_set()
    results: dict[str, Any] = {}
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        typed = pb_grpc.ModelServiceStub(channel)
        infer = v2_grpc.GRPCInferenceServiceStub(channel)
        for folder in sorted(p for p in MODELS.iterdir() if (p / "1" / "model.onnx").exists()):
            model = folder.name
            name, x, datatype = inputs_for(model, images)
            reference = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
            want = reference.run(None, {name: x})[0]
            got = served(channel, model, name, x, datatype)
            entry: dict[str, Any] = {"rows": len(x), "max_abs_diff": float(np.max(np.abs(got - want)))}
            if model.startswith("fashion"):
                entry["accuracy_served"] = float(np.mean(got.argmax(1) == labels))
                entry["accuracy_cpu_reference"] = float(np.mean(want.argmax(1) == labels))
                entry["accuracy_equal"] = entry["accuracy_served"] == entry["accuracy_cpu_reference"]
                entry["argmax_disagreements"] = int(np.sum(got.argmax(1) != want.argmax(1)))
            else:
                entry["max_rel_diff"] = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1.0)))
            metadata = typed.GetModelMetadata(pb.GetModelMetadataRequest(model=pb.ModelRef(name=model)), timeout=30)
            entry["provider_in_metadata"] = metadata.execution_provider
            config = infer.ModelConfig(v2.ModelConfigRequest(name=model), timeout=30).config
            entry["v2_instance_kind"] = [g.kind for g in config.instance_group]
            results[model] = entry
            log(f"  parity {model}: {json.dumps(entry)}")
    lines = server.log_path.read_text(errors="replace").splitlines()
    logged = [
        json.loads(line) for line in lines if '"msg": "model loaded"' in line or '"msg": "server started"' in line
    ]
    results["_logs"] = {
        "model_loaded_providers": sorted({e["provider"] for e in logged if e["msg"] == "model loaded"}),
        "server_started_providers": next((e["providers"] for e in logged if e["msg"] == "server started"), None),
        "provider_fallback_lines": sum('"msg": "provider fallback"' in line for line in lines),
    }
    return results


def loadgen(port: int, payload: Path, concurrency: int, channels: int, duration: float) -> dict[str, Any]:
    spec = {
        "target": f"127.0.0.1:{port}",
        "method": V2_METHOD,
        "payload_file": str(payload),
        "concurrency": concurrency,
        "channels": channels,
        "duration_s": duration,
        "warmup_s": 1.0,
    }
    out = subprocess.run(
        [PY, str(HERE.parent / "loadgen.py"), json.dumps(spec)], capture_output=True, check=True, timeout=duration + 180
    ).stdout
    result = json.loads(out)
    latencies = np.asarray(result["latencies_s"]) * 1000
    rps = result["requests"] / result["wall_s"]
    return {
        "rps": rps,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "errors": result["errors"],
        "client_cores": result["cpu_s"] / result["wall_s"],
    }


def payload(directory: Path, batch: int) -> Path:
    x = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
    tensor = v2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=x.shape)
    path = directory / f"cnn-{batch}.bin"
    path.write_bytes(
        v2.ModelInferRequest(model_name=CNN, inputs=[tensor], raw_input_contents=[x.tobytes()]).SerializeToString()
    )
    return path


def in_process(provider: str, batch: int, duration: float, callers: int = 2) -> dict[str, Any]:
    """fashion_cnn in this process with the server's own session options and providers."""
    from service.core.runtime import Runtime
    from service.settings import Settings

    session, active = Runtime(Settings(provider=provider)).session(MODELS / CNN / "1" / "model.onnx")
    x = np.random.default_rng(batch).integers(0, 256, (batch, 1, 28, 28), dtype=np.uint8)
    for _ in range(20):
        session.run(None, {"image": x})
    counts = [0] * callers
    stop = time.perf_counter() + duration

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            session.run(None, {"image": x})
            counts[i] += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"provider": active, "callers": callers, "rows_per_s": sum(counts) * batch / wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(args.provider), "provider": args.provider}
    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp:
        workdir = Path(tmp)
        log("1. parity and provider")
        server = Server(1, args.provider, MODELS, workdir, [])
        try:
            report["parity"] = parity(server, args.provider)
            log("2. fashion_cnn batch 256: served vs in process")
            served_256 = loadgen(server.port, payload(workdir, 256), 8, 4, args.duration)
            served_256["rows_per_s"] = served_256["rps"] * 256
        finally:
            server.stop()
            (args.out / "server-parity.log").write_text(server.log_path.read_text(errors="replace")[-200_000:])
        ceiling = in_process(args.provider, 256, args.duration)
        report["batch256"] = {
            "served": served_256,
            "in_process": ceiling,
            "ratio": served_256["rows_per_s"] / ceiling["rows_per_s"],
            "goal": 0.9,
        }
        log(f"  {json.dumps(report['batch256'])}")
        log("3. 32 batch-1 clients, dynamic batching on vs off")
        batching: dict[str, Any] = {}
        for label, extra in (("on", []), ("off", ["--dynamic-batching", "false"])):
            server = Server(1, args.provider, MODELS, workdir, extra)
            try:
                batching[label] = loadgen(server.port, payload(workdir, 1), 32, 4, args.duration)
            finally:
                server.stop()
            log(f"  batching {label}: {json.dumps(batching[label])}")
        batching["ratio"] = batching["on"]["rps"] / batching["off"]["rps"]
        batching["goal"] = 3.0
        report["batching"] = batching
    (args.out / f"gpu-checks-{args.provider}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary(report))
    (args.out / f"gpu-checks-{args.provider}.md").write_text(summary(report) + "\n")
    return 0


def summary(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"### Provider checks, --provider {report['provider']} ({m['date']})",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu']}; Python {m['python']}, onnxruntime "
        f"{m['onnxruntime']}, grpcio {m['grpcio']}",
        "",
        "| model | rows | max abs Δ vs CPU provider | accuracy served / CPU | provider (metadata) |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    for model, e in report["parity"].items():
        if model.startswith("_"):
            continue
        acc = (
            f"{e['accuracy_served']:.4f} / {e['accuracy_cpu_reference']:.4f}"
            + (" (equal)" if e["accuracy_equal"] else f" ({e['argmax_disagreements']} argmax differ)")
            if "accuracy_served" in e
            else f"rel Δ {e['max_rel_diff']:.2e}"
        )
        lines.append(f"| {model} | {e['rows']} | {e['max_abs_diff']:.3g} | {acc} | {e['provider_in_metadata']} |")
    logs = report["parity"]["_logs"]
    lines += [
        "",
        f"Logs: model loaded on {logs['model_loaded_providers']}; server started with "
        f"{logs['server_started_providers']}; {logs['provider_fallback_lines']} provider fallback lines.",
        "",
    ]
    b = report["batch256"]
    lines.append(
        f"fashion_cnn batch 256: served {b['served']['rows_per_s']:.0f} rows/s (p50 {b['served']['p50_ms']:.2f} / p99 "
        f"{b['served']['p99_ms']:.2f} ms) vs in process {b['in_process']['rows_per_s']:.0f} rows/s on "
        f"{b['in_process']['provider']}: **{b['ratio']:.2f}** (goal ≥ {b['goal']})"
    )
    on, off = report["batching"]["on"], report["batching"]["off"]
    lines.append(
        f"fashion_cnn, 32 batch-1 clients: batching on {on['rps']:.0f} req/s (p50 {on['p50_ms']:.2f} / p99 "
        f"{on['p99_ms']:.2f} ms), off {off['rps']:.0f} req/s (p50 {off['p50_ms']:.2f} / p99 {off['p99_ms']:.2f} ms): "
        f"**{report['batching']['ratio']:.2f}×** (goal ≥ {report['batching']['goal']}×)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
