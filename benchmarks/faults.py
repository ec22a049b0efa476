"""Fault scenarios under load, with figures: SIGTERM while clients are busy, and hot reload while
clients are busy. (The test suite runs short versions: tests/test_load_faults.py, test_reload.py.)

    python benchmarks/faults.py sigterm [--clients 64] [--seconds 3] [--rounds 3]
    python benchmarks/faults.py reload  [--clients 8] [--interval 0.5] [--cycles 5]

**sigterm** starts the server (bundled models, ``--log-level debug`` so it logs every call it
accepted, with the call's id), keeps ``--clients`` callers busy (typed Classify and V2 ModelInfer
of ``--images`` images each, unique ids), sends SIGTERM, and keeps calling until the port is gone
(``--retry``: after UNAVAILABLE a caller retries every 20 ms, by default; or backs off as
``service.client`` does; or fails over, i.e. stops calling this server).
Then it matches the clients' outcomes with the server's log: an accepted call must have completed
and reached its client (``lost`` counts those that did not); a call refused with UNAVAILABLE must
never have been accepted; any other status is a failure.

**reload** starts the server with repository polling and ``--allow-model-control``, keeps clients
calling the latest version of a model, and ``--cycles`` times: publishes a new version (atomic
rename), drops a corrupt one in, removes the oldest version, and loads/unloads a second model by
V2 RPC. It prints the answers per version, the failures (must be 0) and how long each new version
took to be served.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import start_server  # noqa: E402

from service.client import RetryPolicy  # noqa: E402
from service.generated.inference import grpc_service_pb2 as v2  # noqa: E402
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc  # noqa: E402
from service.generated.serving.v1 import serving_pb2 as pb  # noqa: E402
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc  # noqa: E402

OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


# -- SIGTERM under load ---------------------------------------------------------------------------


#: How callers react to UNAVAILABLE: ``failover`` stops calling this server (as a client behind a
#: load balancer goes to another replica); ``backoff`` retries it like service.client's RetryPolicy
#: (exponential from 0.1 s, jittered); ``hammer`` retries every 20 ms.
RETRY_MODES = ("failover", "backoff", "hammer")


async def _caller(
    address: str,
    index: int,
    model: str,
    images: int,
    outcomes: dict[str, str],
    stop: asyncio.Event,
    odd: list[str],
    mode: str,
    exited: asyncio.Event | None = None,
    own_connection: bool = False,
) -> None:
    """Calls back to back, each with a unique id; reacts to UNAVAILABLE as ``mode`` says. Ends
    with ``stop``, or at its first failed call once ``exited`` is set (the server is gone: the
    caller has met the closed port). ``own_connection``: a TCP connection of its own (else
    callers share one)."""
    policy = RetryPolicy()
    refusals = 0
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        typed = pb_grpc.ModelServiceStub(channel)
        infer = v2_grpc.GRPCInferenceServiceStub(channel)
        pixels = np.random.default_rng(index).integers(0, 256, (images, 1, 28, 28), dtype=np.uint8).tobytes()
        tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[images, 1, 28, 28], data=pixels)
        n = 0
        while not stop.is_set():
            n += 1
            rid = f"c{index}-{n}"
            try:
                if index % 2:
                    await typed.Classify(
                        pb.ClassifyRequest(model=pb.ModelRef(name=model), images=tensor, request_id=rid), timeout=60
                    )
                else:
                    request = v2.ModelInferRequest(
                        model_name=model,
                        id=rid,
                        raw_input_contents=[pixels],
                        inputs=[
                            v2.ModelInferRequest.InferInputTensor(
                                name="image", datatype="UINT8", shape=[images, 1, 28, 28]
                            )
                        ],
                    )
                    await infer.ModelInfer(request, timeout=60)
                outcomes[rid] = "OK"
                refusals = 0
            except grpc.aio.AioRpcError as err:
                outcomes[rid] = err.code().name
                if err.code() not in (OK, UNAVAILABLE) and len(odd) < 5:
                    odd.append(f"{rid}: {err.code().name}: {err.details()}")
                if exited is not None and exited.is_set():
                    return
                if err.code() == UNAVAILABLE:
                    if mode == "failover":
                        return
                    refusals += 1
                    await asyncio.sleep(policy.backoff(refusals) if mode == "backoff" else 0.02)


async def sigterm_under_load(
    address: str,
    process: subprocess.Popen,
    log: Callable[[], str],
    *,
    clients: int,
    seconds: float,
    model: str,
    images: int,
    mode: str = "failover",
    own_connections: bool = False,
) -> dict[str, Any]:
    """Run one SIGTERM-under-load round against a server started with ``--log-level debug``:
    ``seconds`` of load (0: none beyond the next condition), and until ``2 * clients`` calls
    have completed; then SIGTERM; the callers go on until each has met the closed port.
    ``own_connections``: each caller on a connection of its own (reaching every worker of a
    ``--workers`` server; else they share one)."""
    outcomes: dict[str, str] = {}
    odd: list[str] = []
    stop, exited = asyncio.Event(), asyncio.Event()
    tasks = [
        asyncio.create_task(_caller(address, i, model, images, outcomes, stop, odd, mode, exited, own_connections))
        for i in range(clients)
    ]
    await asyncio.sleep(seconds)
    deadline = time.monotonic() + 120  # (a guard against a server that never answers)
    while sum(code == "OK" for code in outcomes.values()) < 2 * clients:  # every caller is busy
        if time.monotonic() > deadline or all(task.done() for task in tasks):
            raise RuntimeError(f"the load never got going: {dict(Counter(outcomes.values()))} {odd}")
        await asyncio.sleep(0.01)
    before = sum(code == "OK" for code in outcomes.values())
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    exit_code = await asyncio.get_running_loop().run_in_executor(None, process.wait, 120)
    exit_s = time.monotonic() - sent
    exited.set()  # each caller ends at its next failure: the port is closed
    await asyncio.wait_for(asyncio.gather(*tasks), 60)

    text = log()
    drains = [json.loads(line) for line in text.splitlines() if '"msg": "drained: stopping gRPC"' in line]
    drained = (
        {  # one line per process (several with --workers)
            "running_at_signal": sum(d.get("running_at_signal", 0) for d in drains),
            "drain_seconds": max((d.get("drain_seconds", 0.0) for d in drains), default=None),
        }
        if drains
        else {}
    )
    served: dict[str, str] = {}
    after_signal = 0
    signalled = False
    for line in text.splitlines():
        if '"msg": "shutting down"' in line:
            signalled = True
        if '"msg": "request"' in line and '"request_id"' in line:
            entry = json.loads(line)
            if entry.get("request_id"):
                served[entry["request_id"]] = entry["code"]
                after_signal += signalled
    client = Counter(outcomes.values())
    client_ok = {rid for rid, code in outcomes.items() if code == "OK"}
    refused = {rid for rid, code in outcomes.items() if code == "UNAVAILABLE"}
    server_ok = {rid for rid, code in served.items() if code == "OK"}
    return {
        "calls": len(outcomes),
        "completed": len(client_ok),
        "completed_before_signal": before,
        "in_flight_at_signal": drained.get("running_at_signal", after_signal),
        "completed_after_signal": after_signal,
        "drain_s": drained.get("drain_seconds"),
        "refused_unavailable": len(refused),
        "other_client_codes": {k: v for k, v in client.items() if k not in ("OK", "UNAVAILABLE")},
        "other_client_errors": odd,
        "server_accepted": len(served),
        "server_codes": dict(Counter(served.values())),
        "lost": len(server_ok - client_ok) + sum(code != "OK" for code in served.values()),
        "refused_after_acceptance": len(refused & set(served)),
        "answered_but_not_logged": len(client_ok - set(served)),
        "exit_code": exit_code,
        "exit_s": round(exit_s, 2),
    }


def run_sigterm(args: argparse.Namespace) -> int:
    failures = 0
    for round_ in range(1, args.rounds + 1):
        log_path = Path(tempfile.gettempdir()) / f"faults-sigterm-{os.getpid()}-{round_}.log"
        address, process = start_server(
            args.model_repository, ["--log-level", "debug", "--shutdown-grace-seconds", "30"], log_path
        )
        result = asyncio.run(
            sigterm_under_load(
                address,
                process,
                log_path.read_text,
                clients=args.clients,
                seconds=args.seconds,
                model=args.model,
                images=args.images,
                mode=args.retry,
            )
        )
        bad = (
            result["lost"] or result["refused_after_acceptance"] or result["other_client_codes"] or result["exit_code"]
        )
        failures += bool(bad)
        print(f"round {round_}: {json.dumps(result)}")
    print(
        "sigterm: "
        + ("FAILED" if failures else "every accepted call completed; every refusal was UNAVAILABLE before acceptance")
    )
    return 1 if failures else 0


# -- hot reload under load ------------------------------------------------------------------------


def _linear(weight: float, in_name: str = "population") -> bytes:
    from onnx import TensorProto, helper, numpy_helper  # onnx: only to write the test models

    w = numpy_helper.from_array(np.array([[weight]], np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [in_name, "w"], ["profit"])],
        "linear",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("profit", TensorProto.FLOAT, ["N", 1])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _publish(repo: Path, name: str, version: int, content: bytes) -> None:
    staging = repo / ".staging" / f"{name}-{version}"
    staging.mkdir(parents=True)
    (staging / "model.onnx").write_bytes(content)
    (repo / name).mkdir(exist_ok=True)
    os.rename(staging, repo / name / str(version))


def run_reload(args: argparse.Namespace) -> int:
    repo = Path(tempfile.mkdtemp(prefix="faults-reload-"))
    _publish(repo, "m", 1, _linear(1.0))
    _publish(repo, "other", 1, _linear(0.5))
    log_path = repo.parent / f"{repo.name}.log"
    address, process = start_server(
        repo, ["--reload-interval-seconds", str(args.interval), "--allow-model-control", "true"], log_path
    )
    versions: Counter[int] = Counter()
    errors: list[str] = []
    wrong = 0
    stop = threading.Event()
    lock = threading.Lock()

    def caller() -> None:
        nonlocal wrong
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            while not stop.is_set():
                try:
                    r = stub.PredictProfit(
                        pb.PredictProfitRequest(model=pb.ModelRef(name="m"), population=[2.0]), timeout=30
                    )
                except grpc.RpcError as err:
                    with lock:
                        errors.append(f"{err.code().name}: {err.details()}")
                    continue
                with lock:
                    versions[r.model.version] += 1
                    wrong += r.profit_usd[0] != 2.0 * r.model.version

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    to_serve: list[float] = []
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.ModelServiceStub(channel)
            control = v2_grpc.GRPCInferenceServiceStub(channel)

            def latest() -> int:
                return stub.GetModelMetadata(
                    pb.GetModelMetadataRequest(model=pb.ModelRef(name="m")), timeout=10
                ).version

            for cycle in range(args.cycles):
                new = cycle + 2
                start = time.monotonic()
                _publish(repo, "m", new, _linear(float(new)))  # version v answers 2 * v for 2
                while latest() != new:
                    time.sleep(0.01)
                to_serve.append(time.monotonic() - start)
                corrupt = repo / "m" / str(100 + cycle)
                corrupt.mkdir()
                (corrupt / "model.onnx").write_bytes(b"\x08\x07 not a whole model")
                shutil.rmtree(repo / "m" / str(new - 1))
                control.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="other"), timeout=30)
                control.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="other"), timeout=30)
                time.sleep(args.interval * 3)
                shutil.rmtree(corrupt)
            time.sleep(args.interval * 2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    text = log_path.read_text()
    result = {
        "answers": sum(versions.values()),
        "answers_by_version": dict(sorted(versions.items())),
        "failed_requests": len(errors),
        "wrong_answers": wrong,
        "new_version_served_after_s": [round(t, 2) for t in to_serve],
        "rejected_log_lines": text.count('"msg": "model rejected"'),
        "unloaded_log_lines": text.count('"msg": "model unloaded"'),
        "poll_interval_s": args.interval,
    }
    print(json.dumps(result))
    for line in errors[:5]:
        print(f"  error: {line}")
    shutil.rmtree(repo, ignore_errors=True)
    ok = not errors and not wrong
    print("reload: " + ("0 requests failed" if ok else "FAILED"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    sig = sub.add_parser("sigterm", help="SIGTERM while clients are busy")
    sig.add_argument("--clients", type=int, default=64)
    sig.add_argument("--seconds", type=float, default=3.0, help="load before the signal")
    sig.add_argument("--rounds", type=int, default=3)
    sig.add_argument("--model", default="fashion_cnn")
    sig.add_argument("--images", type=int, default=32, help="images per call")
    sig.add_argument(
        "--retry",
        choices=RETRY_MODES,
        default="hammer",
        help="what a caller does after UNAVAILABLE: stop (failover), back off like "
        "service.client, or retry every 20 ms (hammer, default)",
    )
    sig.add_argument("--model-repository", type=Path, default=REPO_ROOT / "models")
    rel = sub.add_parser("reload", help="hot reload while clients are busy")
    rel.add_argument("--clients", type=int, default=8)
    rel.add_argument("--interval", type=float, default=0.5, help="repository poll interval, seconds")
    rel.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args(argv)
    return run_sigterm(args) if args.scenario == "sigterm" else run_reload(args)


if __name__ == "__main__":
    sys.exit(main())
