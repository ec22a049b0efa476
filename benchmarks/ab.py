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
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rollout import emit, payload, repository, side_by_side


def compare(
    work: Path, a: list[str], b: list[str], rounds: int, count: int, slice_s: float, concurrency: int
) -> dict[str, Any]:
    repo = repository(work / "models")
    figures = side_by_side(repo, work, {"a": a, "b": b}, payload(1), concurrency, rounds, count, slice_s)
    return {"a": a, "b": b, "concurrency": concurrency, **figures}


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
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
