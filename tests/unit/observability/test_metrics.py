"""The metrics exporter (service.observability.metrics) in process: request contexts and batcher
observations in, a Prometheus scrape (prometheus_client.generate_latest) out, counts and
buckets adding up; model state read from a live registry at scrape time."""

from __future__ import annotations

import urllib.request

import pytest
from fixtures.metrics import Samples, exposed, sample

from service.core.context import RequestContext
from service.core.registry import ModelRegistry
from service.observability.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics


def scrape(metrics: Metrics) -> Samples:
    return exposed(metrics.registry)


def finished(protocol: str, model: str, version: str, status: str, inference: bool = True) -> RequestContext:
    context = RequestContext(protocol, f"/{protocol}/Infer", inference=inference)
    context.model, context.version, context.status = model, version, status
    return context


def test_requests_are_counted_from_their_context() -> None:
    metrics = Metrics()
    for _ in range(3):
        metrics.finish(finished("typed", "profit", "1", "OK"))
    metrics.finish(finished("v2", "profit", "1", "OK"))
    metrics.finish(finished("v2", "", "", "NOT_FOUND"))  # named no loaded model
    metrics.finish(finished("v2", "profit", "1", "INVALID_ARGUMENT"))
    metrics.finish(finished("v2", "profit", "1", "OK", inference=False))  # metadata calls: not counted
    samples = scrape(metrics)
    requests = {
        dict(labels)["code"] + "/" + dict(labels)["protocol"] + "/" + dict(labels)["model"]: value
        for (name, labels), value in samples.items()
        if name == "serving_requests_total"
    }
    assert requests == {"OK/typed/profit": 3, "OK/v2/profit": 1, "NOT_FOUND/v2/": 1, "INVALID_ARGUMENT/v2/profit": 1}
    # One latency observation per request, per protocol/model/version; buckets are cumulative.
    for protocol, model, version, count in (("typed", "profit", "1", 3), ("v2", "profit", "1", 2), ("v2", "", "", 1)):
        labels = {"protocol": protocol, "model": model, "version": version}
        assert sample(samples, "serving_request_duration_seconds_count", **labels) == count
        buckets = [
            sample(samples, "serving_request_duration_seconds_bucket", le=_le(b), **labels)
            for b in (*LATENCY_BUCKETS, float("inf"))
        ]
        assert buckets == sorted(buckets) and buckets[-1] == count
        assert sample(samples, "serving_request_duration_seconds_sum", **labels) > 0


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def test_batcher_observations_and_bucket_edges() -> None:
    metrics = Metrics()
    model = metrics.for_model("clf", 2)
    for rows in (1, 16, 17, 5000):
        model.batch_size.observe(rows)
    model.queue_wait.observe(0.0002)
    model.compute.observe(0.003)
    model.dropped("queue_full")
    model.dropped("deadline")
    model.dropped("deadline")
    samples = scrape(metrics)
    labels = {"model": "clf", "version": "2"}
    bucket = lambda le: sample(samples, "serving_batch_size_bucket", le=le, **labels)  # noqa: E731
    assert (bucket("1.0"), bucket("8.0"), bucket("16.0"), bucket("32.0"), bucket("2048.0"), bucket("+Inf")) == (
        1,
        1,
        2,
        3,
        3,
        4,
    )
    assert sample(samples, "serving_batch_size_count", **labels) == 4
    assert sample(samples, "serving_batch_size_sum", **labels) == 1 + 16 + 17 + 5000
    assert sample(samples, "serving_queue_wait_seconds_bucket", le="0.00025", **labels) == 1
    assert sample(samples, "serving_queue_wait_seconds_bucket", le="0.0001", **labels) == 0
    assert sample(samples, "serving_compute_duration_seconds_count", **labels) == 1
    assert sample(samples, "serving_dropped_requests_total", reason="queue_full", **labels) == 1
    assert sample(samples, "serving_dropped_requests_total", reason="deadline", **labels) == 2
    assert len(BATCH_BUCKETS) + 1 == len([k for k in samples if k[0] == "serving_batch_size_bucket"])


def test_model_state_is_read_from_the_registry_at_scrape_time(tiny_registry: ModelRegistry) -> None:
    metrics = Metrics()
    assert not [k for k in scrape(metrics) if k[0] == "serving_model_loaded"]  # nothing attached yet
    metrics.attach(tiny_registry)
    samples = scrape(metrics)
    loaded = {
        (dict(labels)["model"], dict(labels)["version"]): value
        for (name, labels), value in samples.items()
        if name == "serving_model_loaded"
    }
    assert loaded == {
        ("fashion_softmax", "1"): 1,
        ("fashion_softmax", "2"): 1,
        ("house_price", "1"): 1,
        ("profit", "1"): 1,
        ("broken", "1"): 0,
    }
    for model in tiny_registry.models():
        labels = {"model": model.name, "version": str(model.version)}
        assert sample(samples, "serving_queue_depth", **labels) == 0
        assert sample(samples, "serving_batches_in_flight", **labels) == 0


def test_metrics_endpoint() -> None:
    metrics = Metrics()
    metrics.finish(finished("typed", "profit", "1", "OK"))
    port = metrics.serve(0, "127.0.0.1")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'serving_requests_total{code="OK",model="profit",protocol="typed",version="1"} 1.0' in text
        with pytest.raises(RuntimeError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            Metrics().serve(port, "127.0.0.1")
    finally:
        metrics.close()
