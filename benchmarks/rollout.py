"""Guarded rollout benchmark (issue 17; docs/rollout.md): shadow, canary rollback, capture + replay.

    python benchmarks/rollout.py [--seconds 5] [--concurrency 32] [--rounds 3] [--json results.json]

Servers are ``python -m service`` subprocesses on the CPU provider over a temporary repository
holding the bundled ``models/fashion_cnn/1/model.onnx`` (twice: v1 and v2, the same answers), plus
a version that fails every call (its Reshape cannot take the image). Requests are V2 gRPC
``ModelInfer`` of one image, pre-serialised.

1. **Shadow.** The primary's saturation throughput (closed loop, ``--concurrency`` callers); then
   per round (``--rounds``) four servers up at once: the primary alone, with a shadow (the same
   model) in a mirror process, with a shadow failing every call in a mirror process, and with a
   shadow in the batcher (``--rollout-mirror batcher``), loaded in turn by open-loop slices at
   half the saturation (``--slices`` of ``--slice-seconds`` each, as for capture below). Reports
   each one's p50 and p99 (their medians over the rounds, and the p99 of all rounds' latencies
   pooled), client errors, and the share of sent requests the shadow ran (from ``GET
   /v2/models/{model}/rollout`` once its queue drained). Last, the machine's floor: the primary
   alone with an unrelated CPU burner at idle priority running and stopped in turn
   (``idle_interference``): what any background compute costs here.
2. **Canary.** A failing canary at a 10 % share under an open loop: time until the rollback
   (audit record), client errors, the audit record.
3. **Capture.** Capture off and on (``--capture-share``, 100 % by default) at batch 1 ×
   ``--concurrency`` callers: per round (``--rounds``) a fresh pair of servers, both up at
   once, loaded in turn for ``--slices`` closed-loop slices of ``--slice-seconds``
   each, in the order A B B A … (:func:`slices`; benchmarks/ab.py runs the same for any two
   configurations). Sequential 5 s runs of one server after the other moved by several per cent
   from one server to the next; interleaving puts the machine's drift on both alike. Medians of
   the rounds are the figures, with each side's server CPU per request (/proc). Then the capture
   is replayed in process (``python -m service.rollout.replay --local``): how many outputs are
   bit-identical.

Prints one JSON object; figures are what this machine measured in this run, nothing else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import free_port, wait_serving  # noqa: E402

from service.generated.inference import grpc_service_pb2 as v2  # noqa: E402

MODEL = "fashion_cnn"
INFER = "/inference.GRPCInferenceService/ModelInfer"
#: Open-loop requests started in the first second are sent (and mirrored) but not timed.
WARMUP_S = 1.0
#: Closed-loop callers run this long on a server before a slice's measuring starts.
SETTLE_S = 0.25


def failing_copy(source: Path) -> bytes:
    """``source``'s signature and metadata, but every run fails (tests/fixtures/onnx_models.py)."""
    import onnx

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from fixtures.onnx_models import failing_classifier

    original = onnx.load(str(source))
    model = failing_classifier()
    keep = {"class_names", "inputs", "outputs", "input_units", "output_units"}
    for prop in original.metadata_props:
        if prop.key in keep:
            model.metadata_props.append(onnx.StringStringEntryProto(key=prop.key, value=prop.value))
    return model.SerializeToString()


def repository(root: Path, second: bytes | None = None) -> Path:
    """fashion_cnn v1 (the bundled model) and v2 (``second``, else the same file)."""
    source = REPO_ROOT / "models" / MODEL / "1" / "model.onnx"
    for version in (1, 2):
        (root / MODEL / str(version)).mkdir(parents=True, exist_ok=True)
    shutil.copy(source, root / MODEL / "1" / "model.onnx")
    if second is None:
        shutil.copy(source, root / MODEL / "2" / "model.onnx")
    else:
        (root / MODEL / "2" / "model.onnx").write_bytes(second)
    return root


class Server:
    def __init__(self, address: str, http_port: int, process: subprocess.Popen[bytes]) -> None:
        self.address, self.http_port, self.process = address, http_port, process

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL}/rollout"
        with urllib.request.urlopen(url, timeout=10) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result


@contextmanager
def server(repo: Path, work: Path, *extra: str) -> Iterator[Server]:
    port, http_port = free_port(), free_port()
    command = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--http-port", str(http_port), "--metrics-port", "0", "--model-repository", str(repo)]
    command += ["--provider", "cpu", "--log-level", "warning", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    log = open(work / f"server-{port}.log", "wb")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        yield Server(f"127.0.0.1:{port}", http_port, process)
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def payload(seed: int = 0) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (1, 1, 28, 28), dtype=np.uint8)
    tensor = v2.ModelInferRequest.InferInputTensor(name="image", datatype="UINT8", shape=image.shape)
    return v2.ModelInferRequest(
        model_name=MODEL, inputs=[tensor], raw_input_contents=[image.tobytes()]
    ).SerializePartialToString()


def p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99)) * 1000 if latencies else float("nan")


async def paced(
    rate: float,
    seconds: float,
    one: Callable[[bool], Awaitable[None]],
    warmup: float,
    until: Callable[[], Awaitable[bool]] | None = None,
) -> int:
    """Start ``one(measured)`` ``rate`` times a second for ``seconds`` (``measured``: started after
    ``warmup``), or until ``until()`` is true (asked every 50 requests); wait for all of them;
    return how many were started."""
    tasks = []
    begin = time.perf_counter()
    sent = 0
    while (now := time.perf_counter() - begin) < seconds:
        if until is not None and sent and sent % 50 == 0 and await until():
            break
        due = sent / rate
        if due > now:
            await asyncio.sleep(due - now)
        tasks.append(asyncio.create_task(one(now >= warmup)))
        sent += 1
    await asyncio.gather(*tasks)
    return sent


async def open_loop(address: str, body: bytes, rate: float, seconds: float, until: Any = None) -> dict[str, Any]:
    """Requests started at ``rate`` per second for ``seconds`` (or until ``until()`` is true); the
    p99 of those started after :data:`WARMUP_S`; errors of all."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)
        latencies: list[float] = []
        errors: dict[str, int] = {}
        details: dict[str, str] = {}

        async def one(measured: bool) -> None:
            start = time.perf_counter()
            try:
                await call(body, timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                details.setdefault(exc.code().name, str(exc.details())[:200])
                return
            if measured:
                latencies.append(time.perf_counter() - start)

        begin = time.perf_counter()
        sent = await paced(rate, seconds, one, WARMUP_S, until)
        elapsed = time.perf_counter() - begin
    return {
        "sent": sent,
        "seconds": elapsed,
        "p99_ms": p99(latencies),
        "errors": sum(errors.values()),
        "codes": errors,
        "first_details": details,
    }


def drained(srv: Server, sent: int, timeout: float = 120) -> dict[str, Any]:
    """The rollout status once the mirror ran or dropped all ``sent`` requests (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        mirror = srv.status()["mirror"]
        done = mirror["ok"] + mirror["failed"] + sum(mirror["dropped"].values())
        if done >= sent or time.monotonic() > deadline:
            return dict(mirror)
        time.sleep(0.2)


#: An unrelated CPU load: one core's worth of a Python loop.
BURNER = "while True:\n    pass\n"


def idle_interference(work: Path, body: bytes, concurrency: int, rate: float, count: int, slice_s: float) -> Any:
    """What any background compute costs the primary on this machine, whatever the server does:
    the primary alone at ``rate``, in slices with an unrelated CPU burner at the mirror process's
    priority (idle) running, and stopped (SIGSTOP), in turn."""
    from service.rollout.mirror_worker import lower_priority

    burner = subprocess.Popen([sys.executable, "-c", BURNER], preexec_fn=lower_priority)

    def switch(mode: str) -> None:
        os.kill(burner.pid, signal.SIGCONT if mode == "idle_burner_on" else signal.SIGSTOP)

    try:
        with server(repository(work / "burner"), work) as srv:
            sides = {"idle_burner_off": srv, "idle_burner_on": srv}
            asyncio.run(slices(sides, body, concurrency, 1, 1.0, rate, switch))  # warm-up
            figures = asyncio.run(slices(sides, body, concurrency, count, slice_s, rate, switch))
    finally:
        burner.kill()
        burner.wait()
    on, off = figures["idle_burner_on"], figures["idle_burner_off"]
    figures["p99_growth"] = on["p99_ms"] / off["p99_ms"] - 1
    figures["p50_change_ms"] = on["p50_ms"] - off["p50_ms"]
    return figures


def shadow(work: Path, seconds: float, concurrency: int, rounds: int, count: int, slice_s: float) -> dict[str, Any]:
    """The primary's saturation; then per round three servers up at once (the primary alone, with
    a shadow, with a shadow failing every call), loaded in turn by open-loop slices at half the
    saturation; the mirror's figures once it has run (or dropped) every request sent."""
    body = payload()
    good = repository(work / "same")
    bad = repository(work / "failing", failing_copy(REPO_ROOT / "models" / MODEL / "1" / "model.onnx"))
    with server(good, work) as srv:
        asyncio.run(slices({"primary": srv}, body, concurrency, 1, 1.0))  # warm-up, not counted
        saturation = asyncio.run(slices({"primary": srv}, body, concurrency, 1, seconds))["primary"]
    rate = saturation["rps"] / 2
    rollout = ("--rollout", json.dumps({MODEL: {"primary": 1, "shadow_version": 2}}))
    runs: list[dict[str, Any]] = []
    pooled: dict[str, list[float]] = {}
    for round_ in range(rounds):
        with (
            server(good, work) as alone,
            server(good, work, *rollout) as same,
            server(bad, work, *rollout) as failing,
            server(good, work, *rollout, "--rollout-mirror", "batcher") as in_batcher,
        ):
            four = {
                "primary_alone": alone,
                "with_shadow": same,
                "with_failing_shadow": failing,
                "with_shadow_in_batcher": in_batcher,
            }
            order = {m: four[m] for m in (list(four) if round_ % 2 == 0 else list(four)[::-1])}
            warm = asyncio.run(slices(order, body, concurrency, 1, 1.0, rate))
            figures: dict[str, Any] = asyncio.run(slices(order, body, concurrency, count, slice_s, rate, None, pooled))
            for name in ("with_shadow", "with_failing_shadow", "with_shadow_in_batcher"):
                run = figures[name]
                run["mirror"] = mirror = drained(four[name], warm[name]["sent"] + run["sent"])
                run["shadow_ran_share"] = (mirror["ok"] + mirror["failed"]) / (warm[name]["sent"] + run["sent"])
                if "process" in mirror:  # the child's CPU, which the server's figure leaves out
                    child_cpu = process_cpu(mirror["process"]["pid"])
                    run["mirror_process_cpu_us_per_request"] = child_cpu / (mirror["ok"] + mirror["failed"]) * 1e6
                run["p99_growth"] = run["p99_ms"] / figures["primary_alone"]["p99_ms"] - 1
                run["p50_change_ms"] = run["p50_ms"] - figures["primary_alone"]["p50_ms"]
        runs.append(figures)
    # Every round's latencies together: a p99 of rounds × slices × slice_s seconds per server.
    pooled_p99 = {name: p99(values) for name, values in pooled.items()}
    return {
        "pooled_p99_ms": pooled_p99,
        "pooled_p99_growth": {name: ms / pooled_p99["primary_alone"] - 1 for name, ms in pooled_p99.items()},
        "idle_interference": idle_interference(work, body, concurrency, rate, count, slice_s),
        "saturation": saturation,
        "rate": rate,
        "slices_per_round": count,
        "slice_seconds": slice_s,
        "rounds": runs,
        "median_p99_growth": statistics.median(r["with_shadow"]["p99_growth"] for r in runs),
        "median_p50_change_ms": statistics.median(r["with_shadow"]["p50_change_ms"] for r in runs),
        "median_failing_p99_growth": statistics.median(r["with_failing_shadow"]["p99_growth"] for r in runs),
        "median_batcher_p99_growth": statistics.median(r["with_shadow_in_batcher"]["p99_growth"] for r in runs),
        "median_batcher_p50_change_ms": statistics.median(r["with_shadow_in_batcher"]["p50_change_ms"] for r in runs),
        "min_shadow_ran_share": min(r["with_shadow"]["shadow_ran_share"] for r in runs),
        "client_errors": sum(r[m]["errors"] for r in runs for m in r),
    }


def canary(work: Path, rate: float) -> dict[str, Any]:
    bad = repository(work / "canary", failing_copy(REPO_ROOT / "models" / MODEL / "1" / "model.onnx"))
    audit = work / "audit.jsonl"
    rollout = json.dumps({MODEL: {"canary_version": 2, "canary_share": 0.1}})
    with server(bad, work, "--rollout", rollout, "--rollout-audit-file", str(audit)) as srv:

        async def rolled_back() -> bool:
            return srv.status()["canary"] is None

        start = time.time()
        run = asyncio.run(open_loop(srv.address, payload(), rate, 120, until=rolled_back))
        records = [json.loads(line) for line in audit.read_text().splitlines()]
    rollback = next((r for r in records if r["action"] == "rollback"), None)
    if rollback is not None:
        from datetime import datetime

        at = datetime.fromisoformat(rollback["time"].replace("Z", "+00:00")).timestamp()
        run["rollback_after_s"] = at - start
        run["audit_record"] = rollback
    return run


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system, every thread) process ``pid`` has used; NaN off Linux."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed(call: Any, body: bytes, into: dict[str, Any]) -> float | None:
    """One request's latency in seconds, or None when it failed (counted in ``into``)."""
    start = time.perf_counter()
    try:
        await call(body, timeout=30)
    except grpc.aio.AioRpcError:
        into["errors"] += 1
        return None
    return time.perf_counter() - start


async def one_slice(call: Any, pid: int, body: bytes, concurrency: int, seconds: float, into: dict[str, Any]) -> None:
    """``concurrency`` callers back to back: :data:`SETTLE_S` unmeasured, then ``seconds`` whose
    answers, errors and server CPU (process ``pid``) are added to ``into``."""
    state = {"measure": False, "stop": False}

    async def caller() -> None:
        while not state["stop"]:
            latency = await timed(call, body, into)
            if latency is not None and state["measure"]:
                into["latencies"].append(latency)

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(SETTLE_S)
    cpu, began = process_cpu(pid), time.perf_counter()
    state["measure"] = True
    await asyncio.sleep(seconds)
    state["measure"] = False
    into["seconds"] += time.perf_counter() - began
    into["cpu"] += process_cpu(pid) - cpu
    state["stop"] = True
    await asyncio.gather(*tasks)


async def open_slice(call: Any, pid: int, body: bytes, rate: float, seconds: float, into: dict[str, Any]) -> None:
    """Requests started at ``rate`` per second: :data:`SETTLE_S` unmeasured, then ``seconds``
    whose answers (of requests started then), errors and server CPU are added to ``into``."""

    async def one(measured: bool) -> None:
        latency = await timed(call, body, into)
        if latency is not None and measured:
            into["latencies"].append(latency)

    begin = time.perf_counter()
    cpu = process_cpu(pid)
    into["sent"] += await paced(rate, SETTLE_S + seconds, one, SETTLE_S)
    into["seconds"] += seconds
    into["cpu"] += (process_cpu(pid) - cpu) * seconds / (time.perf_counter() - begin)


async def slices(
    servers: dict[str, Server],
    body: bytes,
    concurrency: int,
    count: int,
    seconds: float,
    rate: float | None = None,
    before: Callable[[str], None] | None = None,
    latencies: dict[str, list[float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`one_slice` (or, at ``rate``, :func:`open_slice`) against each server in turn,
    ``count`` slices each, in the order A B B A A B …: drift of the machine's speed over the run
    falls on every server alike. ``before(name)`` runs before each of ``name``'s slices; each
    server's latencies (seconds) are added to ``latencies[name]`` when given."""
    modes = list(servers)
    taken: dict[str, dict[str, Any]] = {
        m: {"latencies": [], "errors": 0, "seconds": 0.0, "cpu": 0.0, "sent": 0} for m in modes
    }
    channels = {m: grpc.aio.insecure_channel(servers[m].address) for m in modes}
    try:
        for index in range(count * len(modes)):
            pair, step = divmod(index, len(modes))
            mode = modes[step] if pair % 2 == 0 else modes[-1 - step]
            call = channels[mode].unary_unary(INFER)
            if before is not None:
                before(mode)
            if rate is None:
                await one_slice(call, servers[mode].process.pid, body, concurrency, seconds, taken[mode])
            else:
                await open_slice(call, servers[mode].process.pid, body, rate, seconds, taken[mode])
    finally:
        for channel in channels.values():
            await channel.close()
    if latencies is not None:
        for m, t in taken.items():
            latencies.setdefault(m, []).extend(t["latencies"])
    return {
        m: {
            "rps": len(t["latencies"]) / t["seconds"],
            "p50_ms": float(np.percentile(t["latencies"], 50)) * 1000 if t["latencies"] else float("nan"),
            "p99_ms": p99(t["latencies"]),
            "server_cpu_us_per_request": t["cpu"] / max(1, len(t["latencies"])) * 1e6,
            "errors": t["errors"],
            "requests": len(t["latencies"]),
            "sent": t["sent"],
        }
        for m, t in taken.items()
    }


def side_by_side(
    repo: Path,
    work: Path,
    sides: dict[str, Sequence[str]],
    body: bytes,
    concurrency: int,
    rounds: int,
    count: int,
    slice_s: float,
) -> dict[str, Any]:
    """Two configurations (``sides``: name → server flags, the baseline first): per round a fresh
    pair of servers, both up at once, loaded in turn by ``count`` closed-loop :func:`slices` each;
    the second's throughput, p99 and server CPU per request against the first's."""
    (base, base_flags), (other, other_flags) = sides.items()
    runs: list[dict[str, Any]] = []
    for round_ in range(rounds):
        with server(repo, work, *base_flags) as first, server(repo, work, *other_flags) as second:
            pair = {base: first, other: second} if round_ % 2 == 0 else {other: second, base: first}
            asyncio.run(slices(pair, body, concurrency, 1, 1.0))  # warm-up, not counted
            figures: dict[str, Any] = asyncio.run(slices(pair, body, concurrency, count, slice_s))
        figures["throughput_change"] = figures[other]["rps"] / figures[base]["rps"] - 1
        figures["p99_change_ms"] = figures[other]["p99_ms"] - figures[base]["p99_ms"]
        cpu = figures[other]["server_cpu_us_per_request"] / figures[base]["server_cpu_us_per_request"]
        figures["server_cpu_change"] = cpu - 1
        runs.append(figures)
    return {
        "slices_per_round": count,
        "slice_seconds": slice_s,
        "rounds": runs,
        "median_throughput_change": statistics.median(r["throughput_change"] for r in runs),
        "median_p99_change_ms": statistics.median(r["p99_change_ms"] for r in runs),
        "median_server_cpu_change": statistics.median(r["server_cpu_change"] for r in runs),
        "errors": sum(r[base]["errors"] + r[other]["errors"] for r in runs),
    }


def capture(work: Path, slice_s: float, concurrency: int, rounds: int, count: int, share: float) -> dict[str, Any]:
    """Capture off and on (``share``) :func:`side_by_side`; then the capture replayed."""
    repo = repository(work / "capture-models")
    folder = work / "capture"
    on = ("--capture-dir", str(folder), "--capture-max-files", "1000", "--capture-share", str(share))
    figures = side_by_side(repo, work, {"off": (), "on": on}, payload(1), concurrency, rounds, count, slice_s)
    result: dict[str, Any] = {"share": share, **figures}
    command = [sys.executable, "-m", "service.rollout.replay", str(folder), "--local"]
    command += ["--model-repository", str(repo), "--provider", "cpu"]
    replay = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    report = json.loads(replay.stdout)
    result["replay"] = {k: report[k] for k in ("records", "replayed", "bit_identical", "differing", "skipped")}
    result["replay"]["agreement"] = report["agreement"]
    return result


def emit(results: dict[str, Any], path: Path | None) -> None:
    """Print ``results`` as one JSON object; also write it to ``path`` when given."""
    text = json.dumps(results, indent=2)
    print(text)
    if path is not None:
        path.write_text(text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load phase")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--canary-rate", type=float, default=200.0, help="requests per second in the canary phase")
    parser.add_argument("--rounds", "--capture-rounds", type=int, default=3, help="shadow, capture: fresh servers")
    parser.add_argument("--slices", "--capture-slices", type=int, default=10, help="slices per server per round")
    parser.add_argument("--slice-seconds", "--capture-slice-seconds", type=float, default=1.0, help="seconds a slice")
    parser.add_argument("--capture-share", type=float, default=1.0, help="share of requests captured")
    parser.add_argument("--only", choices=("shadow", "canary", "capture"), help="one phase only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--work", type=Path, help="keep repositories, server logs and captures here (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "seconds": args.seconds, "concurrency": args.concurrency}
    with tempfile.TemporaryDirectory(prefix="rollout-bench-") as tmp:
        work = Path(tmp) if args.work is None else args.work
        work.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "shadow"):
            results["shadow"] = shadow(
                work, args.seconds, args.concurrency, args.rounds, args.slices, args.slice_seconds
            )
        if args.only in (None, "canary"):
            results["canary"] = canary(work, args.canary_rate)
        if args.only in (None, "capture"):
            results["capture"] = capture(
                work,
                args.slice_seconds,
                args.concurrency,
                args.rounds,
                args.slices,
                args.capture_share,
            )
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
