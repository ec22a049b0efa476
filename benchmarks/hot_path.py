"""CPU per request of the server's request path in process, for a before/after comparison that the
noise of a shared machine does not swamp (the end-to-end benchmark, run.py, moves ±10-30 % from
round to round when other work runs).

Each source tree runs in a process of its own (``python benchmarks/hot_path.py --tree DIR``
imports that tree's ``service``), builds the app as ``python -m service`` does (``build_app``:
the same observers, tracing when ``SERVING_TRACING`` says so) over the bundled models, and sends
batch-1 fashion_softmax requests through the data plane exactly as the gRPC wrapper does: a
``RequestContext`` per request, ``DataPlane.model`` → ``infer`` → ``finish``. It prints the
process CPU time per request (µs), ``--clients`` requests in flight at a time.

Compare trees, alternating them round after round:

    python benchmarks/hot_path.py --compare /tmp/before . --rounds 8
    SERVING_TRACING=true OTEL_TRACES_EXPORTER=none python benchmarks/hot_path.py --compare /tmp/before .
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure(tree: Path, requests: int, clients: int) -> float:
    """CPU µs per request of ``tree``'s request path (run in this process)."""
    sys.path.insert(0, str(tree))
    import numpy as np

    from service.app import build_app
    from service.core.context import RequestContext
    from service.core.dataplane import RequestTensor
    from service.settings import Settings

    settings = Settings(
        model_repository=tree / "models", provider="cpu", port=0, http_port=0, metrics_port=0, log_level="WARNING"
    )
    image = np.zeros((1, 1, 28, 28), np.uint8)
    method = "/inference.GRPCInferenceService/ModelInfer"

    async def run() -> float:
        app = await build_app(settings)
        await app.registry.start()
        plane = app.plane

        traced = getattr(plane, "tracing", None) is not None  # (a tree from before tracing has no attribute)

        async def one() -> None:
            context = RequestContext("v2", method, inference=True, timeout=None)
            if traced:  # what the gRPC wrapper does with tracing on: the call's metadata
                context.carrier = ()
            model = plane.model(context, "fashion_softmax", "")
            tensor = RequestTensor("image", "UINT8", (1, 1, 28, 28), lambda: image)
            await plane.infer(context, model, [tensor])
            context.status = "OK"
            plane.finish(context)

        async def client(count: int) -> None:
            for _ in range(count):
                await one()

        await asyncio.gather(*(client(200) for _ in range(clients)))  # warm-up
        start = time.process_time()
        await asyncio.gather(*(client(requests // clients) for _ in range(clients)))
        used = time.process_time() - start
        await app.registry.stop()
        close = getattr(plane, "close", None)
        if close is not None:
            close()
        return 1e6 * used / (requests // clients * clients)

    return asyncio.run(run())


def compare(trees: list[Path], rounds: int, requests: int, clients: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {str(t): [] for t in trees}
    for round_ in range(rounds):
        order = trees if round_ % 2 == 0 else list(reversed(trees))
        for tree in order:
            out = subprocess.run(
                [
                    sys.executable,
                    str(HERE / "hot_path.py"),
                    "--tree",
                    str(tree),
                    "--requests",
                    str(requests),
                    "--clients",
                    str(clients),
                ],
                capture_output=True,
                text=True,
                check=True,
                cwd=tree,
                env={**os.environ, "PYTHONPATH": str(tree)},
            )
            results[str(tree)].append(float(out.stdout.strip().splitlines()[-1]))
        print(f"round {round_ + 1}: " + ", ".join(f"{t}: {v[-1]:.1f} µs" for t, v in results.items()), file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, help="measure this source tree (in this process)")
    parser.add_argument("--compare", type=Path, nargs="+", help="measure these trees, alternating")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--clients", type=int, default=1, help="requests in flight at a time (default 1)")
    args = parser.parse_args()
    if args.tree is not None:
        print(f"{measure(args.tree.resolve(), args.requests, args.clients):.2f}")
        return 0
    trees = [t.resolve() for t in args.compare]
    results = compare(trees, args.rounds, args.requests, args.clients)
    base = results[str(trees[0])]
    summary = {}
    for tree, values in results.items():
        ratios = [v / b for v, b in zip(values, base)]
        summary[tree] = {
            "median_us": round(statistics.median(values), 2),
            "min_us": round(min(values), 2),
            "median_ratio_to_first": round(statistics.median(ratios), 3),
            "rounds_us": [round(v, 2) for v in values],
        }
    print(json.dumps({"clients": args.clients, "requests": args.requests, "trees": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
