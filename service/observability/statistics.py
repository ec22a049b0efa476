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


def _duration(count: int, seconds: float) -> dict[str, int]:
    """Triton's ``StatisticDuration``: a count and the total time in nanoseconds."""
    return {"count": count, "ns": int(seconds * 1e9)}


class ModelStats:
    """One model version's statistics: plain numbers on slots, turned into Triton's structure when
    reported (the request path only adds)."""

    __slots__ = (
        "name",
        "version",
        "successes",
        "success_s",
        "failures",
        "fail_s",
        "queue_s",
        "input_s",
        "infer_s",
        "output_s",
        "inference_count",
        "execution_count",
        "last_inference",
        "batches",
    )

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.successes = 0
        self.success_s = 0.0
        self.failures = 0
        self.fail_s = 0.0
        # Every successful request adds to each phase: their counts are ``successes``.
        self.queue_s = 0.0
        self.input_s = 0.0
        self.infer_s = 0.0
        self.output_s = 0.0
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference = 0.0  # perf_counter() of the last request's answer (0: none yet)
        #: Executed batch size → [batches, input seconds, infer seconds, output seconds].
        self.batches: dict[int, list[float]] = {}

    def request(self, context: RequestContext) -> None:
        """One finished inference request for this version."""
        end = context.end
        self.last_inference = end
        if context.status not in SUCCESS:
            self.failures += 1
            self.fail_s += end - context.start
            return
        self.successes += 1
        self.success_s += end - context.start
        self.queue_s += context.queue_seconds
        self.input_s += context.input_seconds
        self.infer_s += context.compute_seconds
        if context.computed:
            self.output_s += end - context.computed
        self.inference_count += context.rows

    def batch(self, rows: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One executed batch of ``rows`` rows (from the batcher)."""
        self.execution_count += 1
        size = self.batches.get(rows)
        if size is None:
            self.batches[rows] = [1, input_s, infer_s, output_s]
        else:
            size[0] += 1
            size[1] += input_s
            size[2] += infer_s
            size[3] += output_s

    def as_dict(self) -> dict[str, Any]:
        """Triton's ``ModelStatistics`` as its HTTP API shows it (numbers as numbers)."""
        successes = self.successes
        last = 0
        if self.last_inference:  # perf_counter() → ms since the epoch
            last = int((time.time() - (time.perf_counter() - self.last_inference)) * 1000)
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": last,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(successes, self.success_s),
                "fail": _duration(self.failures, self.fail_s),
                "queue": _duration(successes, self.queue_s),
                "compute_input": _duration(successes, self.input_s),
                "compute_infer": _duration(successes, self.infer_s),
                "compute_output": _duration(successes, self.output_s),
                "cache_hit": _duration(0, 0.0),
                "cache_miss": _duration(0, 0.0),
            },
            "batch_stats": [
                {
                    "batch_size": rows,
                    "compute_input": _duration(int(count), input_s),
                    "compute_infer": _duration(int(count), infer_s),
                    "compute_output": _duration(int(count), output_s),
                }
                for rows, (count, input_s, infer_s, output_s) in sorted(self.batches.items())
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
