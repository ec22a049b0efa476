"""OpenTelemetry tracing (service.observability.tracing), in process: the real gRPC and HTTP front
ends over the tiny repository, spans captured by the SDK's in-memory exporter. A caller's W3C
``traceparent`` is continued; span names and attributes follow the semantic conventions; the
queue and compute child spans lie end to end in the request; sampling and the stable RPC
conventions come from the OTEL_* variables; with tracing off nothing of OpenTelemetry is imported."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from itertools import pairwise

import grpc
import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")
from fixtures.servers import REPO_ROOT
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.core.dataplane import DataPlane
from service.core.registry import ModelRegistry
from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.grpc.server import build_grpc
from service.http.api import HttpApi, Request
from service.limits import CallGate, MessageLimits
from service.observability.tracing import Tracing
from service.settings import Settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"
PHASES = ["queue", "compute"]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    yield InMemorySpanExporter()


def plane_with(registry: ModelRegistry, exporter: InMemorySpanExporter) -> DataPlane:
    tracing = Tracing(SimpleSpanProcessor(exporter))
    return DataPlane(registry, registry.settings, [registry.statistics, tracing], tracing)


def infer_request(model: str = "profit", rows: int = 2) -> v2.ModelInferRequest:
    x = np.arange(rows, dtype=np.float32).reshape(rows, 1)
    tensor = v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=x.shape)
    return v2.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[x.tobytes()], id="req-7")


async def grpc_calls(plane: DataPlane, calls: list[tuple[v2.ModelInferRequest, tuple]]) -> list[grpc.StatusCode]:
    """ModelInfer calls with metadata through a real in-process gRPC server; their status codes."""
    front = await build_grpc(
        Settings(provider="cpu", host="127.0.0.1", port=0), plane, CallGate(16), None, MessageLimits(None)
    )
    await front.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{front.port}") as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            for request, metadata in calls:
                try:
                    await stub.ModelInfer(request, metadata=metadata, timeout=10)
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
    finally:
        await front.server.stop(0)
    return codes


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def children(exporter: InMemorySpanExporter, parent: ReadableSpan) -> list[ReadableSpan]:
    spans = [
        s for s in exporter.get_finished_spans() if s.parent is not None and s.parent.span_id == parent.context.span_id
    ]
    return sorted(spans, key=lambda s: s.start_time or 0)


def test_grpc_span_continues_the_callers_trace(tiny_registry: ModelRegistry, exporter: InMemorySpanExporter) -> None:
    plane = plane_with(tiny_registry, exporter)
    codes = asyncio.run(
        grpc_calls(
            plane,
            [
                (infer_request(), (("traceparent", TRACEPARENT), ("tracestate", "vendor=1"))),
                (infer_request("no_such_model"), (("traceparent", TRACEPARENT),)),
                (infer_request(), ()),
            ],
        )
    )
    assert codes == [grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OK]
    ok, missing, root = server_spans(exporter)
    assert ok.name == "inference.GRPCInferenceService/ModelInfer"
    assert ok.context.trace_id == int(TRACE_ID, 16) and ok.parent is not None and ok.parent.span_id == int(PARENT, 16)
    assert ok.parent.is_remote and ok.context.trace_state.get("vendor") == "1"
    assert dict(ok.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer",
        "rpc.grpc.status_code": 0,
        "model_serving.protocol": "v2",
        "model_serving.model.name": "profit",
        "model_serving.model.version": "1",
        "model_serving.request.id": "req-7",
        "model_serving.request.rows": 2,
        "model_serving.batch.rows": 2,
    }
    assert ok.status.status_code == StatusCode.UNSET
    # The phases: children laid end to end inside the request's span.
    phases = children(exporter, ok)
    assert [s.name for s in phases] == PHASES
    assert ok.start_time <= phases[0].start_time and phases[-1].end_time <= ok.end_time  # type: ignore[operator]
    for before, after in pairwise(phases):
        assert before.end_time == after.start_time
    compute = dict(phases[1].attributes or {})
    assert compute["model_serving.compute.infer_seconds"] > 0 and compute["model_serving.compute.input_seconds"] >= 0
    assert phases[1].end_time - phases[1].start_time == pytest.approx(  # type: ignore[operator]
        1e9 * (compute["model_serving.compute.infer_seconds"] + compute["model_serving.compute.input_seconds"]), abs=2
    )
    # A failed request: its status code, no phases, not an error span (NOT_FOUND is the caller's).
    assert missing.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]  # type: ignore[index]
    assert missing.status.status_code == StatusCode.UNSET and children(exporter, missing) == []
    assert root.parent is None and root.context.trace_id != int(TRACE_ID, 16)


async def http_call(plane: DataPlane, path: str, body: bytes, headers: dict[str, str]) -> int:
    async def read_body(limit: int) -> bytes:
        return body

    api = HttpApi(plane, CallGate(16), None, MessageLimits(None))
    response = await api.handle(Request("POST", path, {"content-type": "application/json", **headers}, [], read_body))
    return response.status


def test_http_span(tiny_registry: ModelRegistry, exporter: InMemorySpanExporter) -> None:
    plane = plane_with(tiny_registry, exporter)
    body = json.dumps({"inputs": [{"name": "population", "datatype": "FP32", "shape": [1, 1], "data": [3.0]}]}).encode()
    statuses = [
        asyncio.run(http_call(plane, "/v2/models/profit/versions/1/infer", body, {"traceparent": TRACEPARENT})),
        asyncio.run(http_call(plane, "/v2/models/profit/infer", b"{", {})),
    ]
    assert statuses == [200, 400]
    ok, bad = server_spans(exporter)
    assert ok.name == "POST /v2/models/{model}/versions/{version}/infer"
    assert ok.parent is not None and ok.parent.span_id == int(PARENT, 16)
    assert {k: v for k, v in (ok.attributes or {}).items() if not k.startswith("model_serving.")} == {
        "http.request.method": "POST",
        "http.route": "/v2/models/{model}/versions/{version}/infer",
        "url.path": "/v2/models/profit/versions/1/infer",
        "url.scheme": "http",
        "http.response.status_code": 200,
    }
    assert [s.name for s in children(exporter, ok)] == PHASES
    assert bad.name == "POST /v2/models/{model}/infer" and bad.attributes["http.response.status_code"] == 400  # type: ignore[index]
    assert bad.status.status_code == StatusCode.UNSET  # a 4xx is the client's error, not the server's


def test_sampler_and_stable_conventions_from_the_environment(
    tiny_registry: ModelRegistry, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    asyncio.run(grpc_calls(plane_with(tiny_registry, exporter), [(infer_request(), ())] * 3))
    assert exporter.get_finished_spans() == ()  # 0 % sampled: nothing recorded
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", "rpc")
    asyncio.run(grpc_calls(plane_with(tiny_registry, exporter), [(infer_request(), ())]))
    (span,) = server_spans(exporter)
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system.name"] == "grpc" and attributes["rpc.response.status_code"] == "OK"
    assert attributes["rpc.method"] == "inference.GRPCInferenceService/ModelInfer"
    assert "rpc.system" not in attributes and "rpc.grpc.status_code" not in attributes


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys, service.app, service.grpc.server, service.http.api, service.core.registry\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
