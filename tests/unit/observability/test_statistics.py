"""Triton's statistics (service.observability.statistics), in process: requests through the data
plane as a front end makes them, counted by the observer and the batcher; the same traffic in
the Prometheus metrics; the report's shape (Triton's JSON) and which versions it covers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fixtures.inprocess import request_tensors
from fixtures.metrics import exposed

from service.core.context import RequestContext
from service.core.dataplane import DataPlane
from service.core.registry import ModelRegistry
from service.errors import InvalidArgument, NotFound, ServingError
from service.observability.metrics import Metrics
from service.observability.statistics import Statistics
from service.v2_common import model_statistics


async def traffic(plane: DataPlane, requests: list[np.ndarray]) -> list[RequestContext]:
    """Concurrent requests for profit v1, answered and finished as a front end does it."""

    async def one(x: np.ndarray) -> RequestContext:
        context = RequestContext("v2", "/inference.GRPCInferenceService/ModelInfer", inference=True)
        try:
            model = plane.model(context, "profit", 1)
            await plane.infer(context, model, request_tensors({"population": x}))
            context.status = "OK"
        except ServingError as err:
            context.status = type(err).__name__
        plane.finish(context)
        return context

    return list(await asyncio.gather(*(one(x) for x in requests)))


def test_statistics_agree_with_the_metrics(tiny_registry: ModelRegistry) -> None:
    metrics, statistics = Metrics(), Statistics()
    plane = DataPlane(tiny_registry, tiny_registry.settings, [metrics, statistics])
    model = tiny_registry.get("profit", 1)
    model.batcher._stats = statistics.for_model("profit", 1)  # this test's statistics (the registry's are shared)
    model.batcher._metrics = metrics.for_model("profit", 1)
    ok = [np.full((rows, 1), 2.0, np.float32) for rows in (1, 2, 3, 1, 1)]
    bad = [np.array([[np.nan]], np.float32)]
    try:
        contexts = asyncio.run(traffic(plane, [*ok, *bad]))
    finally:
        model.batcher._stats = tiny_registry.statistics.for_model("profit", 1)
        model.batcher._metrics = None
    assert [c.status for c in contexts] == ["OK"] * 5 + ["InvalidArgument"]
    (stats,) = statistics.report([("profit", 1)])
    assert stats["name"] == "profit" and stats["version"] == "1" and stats["last_inference"] > 0
    inference = stats["inference_stats"]
    assert inference["success"]["count"] == 5 and inference["fail"]["count"] == 1
    assert stats["inference_count"] == 8  # rows of the successful requests
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inference[phase]["count"] == 5
    # The phases tile a request: together at most its whole duration.
    phases = sum(inference[p]["ns"] for p in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < phases <= inference["success"]["ns"]
    batches = stats["batch_stats"]
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in batches) == 8
    assert stats["execution_count"] == sum(b["compute_infer"]["count"] for b in batches) < 5  # they batched

    samples = exposed(metrics.registry)
    labels = (("model", "profit"), ("version", "1"))
    assert samples[("serving_batch_size_count", labels)] == stats["execution_count"]
    assert samples[("serving_batch_size_sum", labels)] == stats["inference_count"]
    assert samples[("serving_queue_wait_seconds_count", labels)] == inference["queue"]["count"]
    assert samples[("serving_queue_wait_seconds_sum", labels)] == pytest.approx(
        inference["queue"]["ns"] / 1e9, abs=1e-6
    )
    ok_requests = samples[
        ("serving_requests_total", (("code", "OK"), ("model", "profit"), ("protocol", "v2"), ("version", "1")))
    ]
    assert ok_requests == inference["success"]["count"]


def test_which_versions_are_reported(tiny_registry: ModelRegistry) -> None:
    everything = model_statistics(tiny_registry)["model_stats"]
    assert [(s["name"], s["version"]) for s in everything] == [(m.name, str(m.version)) for m in tiny_registry.models()]
    assert [s["version"] for s in model_statistics(tiny_registry, "fashion_softmax")["model_stats"]] == ["1", "2"]
    assert [s["version"] for s in model_statistics(tiny_registry, "fashion_softmax", "1")["model_stats"]] == ["1"]
    with pytest.raises(NotFound, match="failed to load"):
        model_statistics(tiny_registry, "broken")
    with pytest.raises(NotFound, match="version 9"):
        model_statistics(tiny_registry, "profit", "9")
    with pytest.raises(InvalidArgument, match="needs a model name"):
        model_statistics(tiny_registry, "", "1")
    unused = model_statistics(tiny_registry, "house_price")["model_stats"][0]
    assert (
        unused["last_inference"] == 0
        and unused["batch_stats"] == []
        and unused["inference_stats"]["success"]
        == {
            "count": 0,
            "ns": 0,
        }
    )
