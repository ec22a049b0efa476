"""A/B of two server configurations, both up at once, loaded in turn (docs/performance.md).

    python benchmarks/ab.py --a "--gc-freeze false" --b "" [--rounds 4] [--slices 10] [--json out.json]

Each round starts a fresh pair of ``python -m service`` processes on the CPU provider over
``fashion_cnn`` (benchmarks/rollout.py's repository and request: V2 gRPC ``ModelInfer`` of one
image), ``--a`` and ``--b`` added to their flags; then closed loops of ``--concurrency`` callers
against each in turn, ``--slices`` slices of ``--slice-seconds`` each, in the order A B B A …
(:func:`rollout.slices`): the machine's drift falls on both alike, while each pair of processes
keeps its own luck, hence several rounds and their medians. Prints one JSON object: per round
each side's throughput, p99 and server CPU per request, and B against A.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout import payload, repository, server, slices


def compare(
    work: Path, a: list[str], b: list[str], rounds: int, count: int, slice_s: float, concurrency: int
) -> dict[str, Any]:
    repo = repository(work / "models")
    body = payload(1)
    runs: list[dict[str, Any]] = []
    for round_ in range(rounds):
        with server(repo, work, *a) as side_a, server(repo, work, *b) as side_b:
            pair = {"a": side_a, "b": side_b} if round_ % 2 == 0 else {"b": side_b, "a": side_a}
            asyncio.run(slices(pair, body, concurrency, 1, 1.0))  # warm-up, not counted
            figures: dict[str, Any] = asyncio.run(slices(pair, body, concurrency, count, slice_s))
        figures["throughput_change"] = figures["b"]["rps"] / figures["a"]["rps"] - 1
        figures["p99_change_ms"] = figures["b"]["p99_ms"] - figures["a"]["p99_ms"]
        figures["server_cpu_change"] = (
            figures["b"]["server_cpu_us_per_request"] / figures["a"]["server_cpu_us_per_request"] - 1
        )
        runs.append(figures)
        print(json.dumps({k: round(figures[k], 4) for k in ("throughput_change", "p99_change_ms")}), file=sys.stderr)
    return {
        "a": a,
        "b": b,
        "concurrency": concurrency,
        "slices_per_round": count,
        "slice_seconds": slice_s,
        "rounds": runs,
        "median_throughput_change": statistics.median(r["throughput_change"] for r in runs),
        "median_p99_change_ms": statistics.median(r["p99_change_ms"] for r in runs),
        "median_server_cpu_change": statistics.median(r["server_cpu_change"] for r in runs),
        "errors": sum(r["a"]["errors"] + r["b"]["errors"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", default="", help="server flags of side A (one shell-quoted string)")
    parser.add_argument("--b", default="", help="server flags of side B")
    parser.add_argument("--rounds", type=int, default=4, help="fresh pairs of servers")
    parser.add_argument("--slices", type=int, default=10, help="slices per side per round")
    parser.add_argument("--slice-seconds", type=float, default=1.0, help="measured seconds a slice")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ab-bench-") as tmp:
        a, b = shlex.split(args.a), shlex.split(args.b)
        result = compare(Path(tmp), a, b, args.rounds, args.slices, args.slice_seconds, args.concurrency)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
