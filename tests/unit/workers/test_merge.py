"""The supervisor's metrics page: workers' pages added up (service/workers/merge.py)."""

from __future__ import annotations

from fixtures.metrics import Samples, exposed
from prometheus_client import CollectorRegistry
from prometheus_client.registry import Collector

from service.workers.merge import Page, merge

WORKER_0 = """# HELP serving_requests Inference requests
# TYPE serving_requests_total counter
serving_requests_total{code="OK",model="m",protocol="v2",version="1"} 3.0
# HELP serving_batch_size Rows in each executed batch
# TYPE serving_batch_size histogram
serving_batch_size_bucket{le="1.0",model="m",version="1"} 2.0
serving_batch_size_bucket{le="+Inf",model="m",version="1"} 3.0
serving_batch_size_count{model="m",version="1"} 3.0
serving_batch_size_sum{model="m",version="1"} 5.0
# HELP serving_queue_depth Requests waiting
# TYPE serving_queue_depth gauge
serving_queue_depth{model="m",version="1"} 2.0
# HELP serving_model_loaded 1 = loaded
# TYPE serving_model_loaded gauge
serving_model_loaded{model="m",version="1"} 1.0
serving_model_loaded{model="n",version="1"} 1.0
"""
WORKER_1 = """# HELP serving_requests Inference requests
# TYPE serving_requests_total counter
serving_requests_total{code="OK",model="m",protocol="v2",version="1"} 4.0
serving_requests_total{code="NOT_FOUND",model="",protocol="v2",version=""} 1.0
# HELP serving_queue_depth Requests waiting
# TYPE serving_queue_depth gauge
serving_queue_depth{model="m",version="1"} 1.0
# HELP serving_model_loaded 1 = loaded
# TYPE serving_model_loaded gauge
serving_model_loaded{model="m",version="1"} 1.0
"""


def _exposed(live: list[Page], retired: list[Page]) -> Samples:
    class Merged(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return iter(merge(live, retired))

    registry = CollectorRegistry()
    registry.register(Merged())
    return exposed(registry)  # what Prometheus reads, parsed back


def test_counters_and_histograms_add_up_gauges_follow_the_live_workers() -> None:
    ok = (("code", "OK"), ("model", "m"), ("protocol", "v2"), ("version", "1"))
    mv = (("model", "m"), ("version", "1"))
    exposed = _exposed([Page.parse(WORKER_0), Page.parse(WORKER_1)], [])
    assert exposed[("serving_requests_total", ok)] == 7
    assert (
        exposed[("serving_requests_total", (("code", "NOT_FOUND"), ("model", ""), ("protocol", "v2"), ("version", "")))]
        == 1
    )
    assert exposed[("serving_batch_size_count", mv)] == 3 and exposed[("serving_batch_size_sum", mv)] == 5
    assert exposed[("serving_batch_size_bucket", (("le", "1.0"), *mv))] == 2
    assert exposed[("serving_queue_depth", mv)] == 3  # requests waiting in the whole server
    assert exposed[("serving_model_loaded", mv)] == 1  # everywhere: 1, not 2
    assert exposed[("serving_model_loaded", (("model", "n"), ("version", "1")))] == 0  # not in worker 1


def test_a_worker_that_exited_keeps_its_counts_not_its_gauges() -> None:
    retired = Page()
    retired.add_counts(Page.parse(WORKER_0))
    mv = (("model", "m"), ("version", "1"))
    exposed = _exposed([Page.parse(WORKER_1)], [retired])
    assert (
        exposed[("serving_requests_total", (("code", "OK"), ("model", "m"), ("protocol", "v2"), ("version", "1")))] == 7
    )
    assert exposed[("serving_batch_size_count", mv)] == 3
    assert exposed[("serving_queue_depth", mv)] == 1  # the exited worker's queue is gone
    assert exposed[("serving_model_loaded", mv)] == 1
    assert Page.parse(WORKER_1).total("serving_requests_total") == 5
