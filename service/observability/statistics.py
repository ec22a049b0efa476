"""Triton's statistics extension: per model version, what ``ModelStatistics`` (gRPC) and
``GET /v2/models[/{m}[/versions/{v}]]/stats`` (HTTP) report, in Triton's fields.

Two writers, as for the Prometheus metrics: :class:`Statistics` is a data-plane observer that
reads each finished inference request's :class:`~service.core.context.RequestContext` (success or
failure, its duration, queue wait, compute split, rows), and each model version's batcher reports
every executed batch to its :class:`ModelStats` (execution count, per-batch-size durations). Both
run on the event loop thread: plain additions, no locks. Numbers accumulate per model name and
version for the life of the process (a reloaded file continues its version's numbers, as the
Prometheus counters do); only served versions are reported.

How Triton's durations map onto this server's request path (they tile a successful request):

* ``queue``: waiting in the version's batch queue until the first batch with its rows started;
* ``compute_input``: from that batch's start until onnxruntime was called (the hand-off to an
  inference thread and the concatenation of several requests' inputs);
* ``compute_infer``: onnxruntime itself;
* ``compute_output``: from onnxruntime's return until the front end had encoded the response
  (the return to the event loop, splitting the batch output, encoding);
* ``success`` / ``fail``: the whole request as the server saw it (decoded request to encoded
  response), by outcome.

A request split across several batches (more rows than ``max_batch_rows``) adds up the input and
infer durations of its batches. ``inference_count`` counts the rows of successful requests,
``execution_count`` the batches run.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from ..core.context import RequestContext

#: Statuses of a successful request (gRPC, HTTP).
SUCCESS = frozenset({"OK", "200"})


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Duration:
    """Triton's ``StatisticDuration``: a count and the total time."""

    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.seconds += seconds

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": _ns(self.seconds)}


class _BatchSize:
    __slots__ = ("compute_input", "compute_infer", "compute_output")

    def __init__(self) -> None:
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()


class ModelStats:
    """One model version's statistics."""

    __slots__ = (
        "name",
        "version",
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
        "inference_count",
        "execution_count",
        "last_inference",
        "batches",
    )

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0.0  # perf_counter() of the last request's answer (0: none yet)
        self.batches: dict[int, _BatchSize] = {}

    def request(self, context: RequestContext) -> None:
        """One finished inference request for this version (every request: kept to additions)."""
        end = context.end
        self.last_inference = end  # perf_counter(); turned into ms since the epoch when reported
        if context.status not in SUCCESS:
            self.fail.add(end - context.start)
            return
        # One count for the five: every successful request adds to each of them.
        self.success.count += 1
        self.success.seconds += end - context.start
        self.queue.seconds += context.queue_seconds
        self.compute_input.seconds += context.input_seconds
        self.compute_infer.seconds += context.compute_seconds
        if context.computed:
            self.compute_output.seconds += end - context.computed
        self.inference_count += context.rows

    def batch(self, rows: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One executed batch of ``rows`` rows (from the batcher)."""
        self.execution_count += 1
        size = self.batches.get(rows)
        if size is None:
            size = self.batches[rows] = _BatchSize()
        size.compute_input.add(input_s)
        size.compute_infer.add(infer_s)
        size.compute_output.add(output_s)

    def as_dict(self) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` as its HTTP API shows it (numbers as numbers)."""
        empty = {"count": 0, "ns": 0}
        successes = self.success.count
        for phase in (self.queue, self.compute_input, self.compute_infer, self.compute_output):
            phase.count = successes
        last = 0
        if self.last_inference:
            last = int((time.time() - (time.perf_counter() - self.last_inference)) * 1000)
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": last,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": self.success.as_dict(),
                "fail": self.fail.as_dict(),
                "queue": self.queue.as_dict(),
                "compute_input": self.compute_input.as_dict(),
                "compute_infer": self.compute_infer.as_dict(),
                "compute_output": self.compute_output.as_dict(),
                "cache_hit": dict(empty),
                "cache_miss": dict(empty),
            },
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": size.compute_input.as_dict(),
                    "compute_infer": size.compute_infer.as_dict(),
                    "compute_output": size.compute_output.as_dict(),
                }
                for rows, size in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }


class Statistics:
    """Every model version's :class:`ModelStats`, and the observer that fills them."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, str], ModelStats] = {}

    def for_model(self, name: str, version: int | str) -> ModelStats:
        """The statistics of one model version (created on first use; the batcher's reporter)."""
        key = (name, str(version))
        stats = self._models.get(key)
        if stats is None:
            stats = self._models[key] = ModelStats(*key)
        return stats

    def finish(self, context: RequestContext) -> None:
        """Count one finished inference request of a resolved model version."""
        if not context.inference or not context.version:
            return
        stats = self._models.get((context.model, context.version))
        if stats is None:
            stats = self.for_model(context.model, context.version)
        stats.request(context)

    def report(self, versions: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
        """Triton's ``model_stats`` list for these (name, version) pairs, in that order."""
        return [self.for_model(name, version).as_dict() for name, version in versions]
