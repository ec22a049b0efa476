"""Operating it like Triton, through real servers and real clients (tritonclient gRPC and HTTP, an
OTLP receiver): a Triton-style repository written here (config.pbtxt per model, several
versions) served and reported as configured, its version policies followed on hot reload, the
repository index listing failed and unloaded versions; Triton's statistics read by
``get_inference_statistics`` agreeing with the Prometheus metrics for the same traffic; and
traces of gRPC and HTTP requests arriving at an OTLP receiver as children of the caller's span.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from fixtures.metrics import sample
from fixtures.onnx_models import image_classifier, linear, save
from fixtures.servers import MODELS, ServerProcess, scrape, start_server, wait_for
from tritonclient.utils import InferenceServerException

CLASSIFIER = """
# A Triton model configuration, as a Triton user writes it.
name: "classifier"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "image", data_type: TYPE_UINT8, format: FORMAT_NCHW, dims: [ 1, 28, 28 ] } ]
output [ { name: "probabilities", data_type: TYPE_FP32, dims: [ 10 ] } ]
version_policy: { latest: { num_versions: 2 } }
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 2000 }
instance_group [ { count: 2, kind: KIND_CPU } ]
model_warmup [
  {
    name: "full batch of zeros"
    batch_size: 8
    inputs { key: "image" value: { data_type: TYPE_UINT8, dims: [ 1, 28, 28 ], zero_data: true } }
  }
]
"""
PINNED = 'name: "pinned"\nbackend: "onnxruntime"\nversion_policy: { specific: { versions: [ 1, 3 ] } }\n'
BAD = 'name: "bad"\noptimization { graph { level: 1 } }\n'


def linear_model(weight: float) -> onnx.ModelProto:
    return linear(1, [weight], 0.0, "x", "y")


def publish(repo: Path, name: str, version: int, proto: onnx.ModelProto) -> None:
    """Add a version the safe way: build it aside, then one rename into place."""
    staging = repo / ".staging"
    save(proto, staging, name, version)
    os.rename(staging / name / str(version), repo / name / str(version))


def _triton_repo(repo: Path) -> Path:
    for version in (1, 2, 3):
        save(image_classifier(version), repo, "classifier", version)
        save(linear_model(float(version)), repo, "pinned", version)
    for version in (1, 2):
        save(linear_model(float(version)), repo, "m", version)  # no config.pbtxt: Triton's default policy
    save(linear_model(1.0), repo, "bad")
    (repo / "classifier" / "config.pbtxt").write_text(CLASSIFIER)
    (repo / "pinned" / "config.pbtxt").write_text(PINNED)
    (repo / "bad" / "config.pbtxt").write_text(BAD)
    return repo


def _triton_server(repo: Path, work: Path) -> Iterator[ServerProcess]:
    args = ["--model-repository", str(repo), "--provider", "cpu", "--reload-interval-seconds", "0.2"]
    with start_server(work, *args, metrics=True) as proc:
        yield proc


@pytest.fixture(scope="module")
def triton_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The server the read-only checks share (they run in any order)."""
    repo = _triton_repo(tmp_path_factory.mktemp("triton-repo"))
    yield from _triton_server(repo, tmp_path_factory.mktemp("triton-server"))


@pytest.fixture
def changing_repo(tmp_path: Path) -> Path:
    (tmp_path / "repo").mkdir()
    return _triton_repo(tmp_path / "repo")


@pytest.fixture
def changing_server(changing_repo: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of its own for a check that changes its repository."""
    yield from _triton_server(changing_repo, tmp_path)


def grpc_client(proc: ServerProcess) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(proc.address)


def http_client(proc: ServerProcess) -> triton_http.InferenceServerClient:
    return triton_http.InferenceServerClient(f"127.0.0.1:{proc.http_port}")


def x_input(module: object, value: float, rows: int = 1) -> object:
    tensor = module.InferInput("x", [rows, 1], "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.full((rows, 1), value, np.float32))
    return tensor


# -- the Triton-style repository --------------------------------------------------------------------


def test_the_repository_is_served_as_configured(triton_server: ServerProcess) -> None:
    client = grpc_client(triton_server)
    assert client.get_model_metadata("classifier").versions == ["2", "3"]  # latest 2
    assert client.get_model_metadata("m").versions == ["2"]  # Triton's default: the latest only
    assert client.get_model_metadata("pinned").versions == ["1", "3"]  # specific
    assert not client.is_model_ready("bad")

    config = client.get_model_config("classifier").config  # what was applied, in Triton's fields
    assert config.max_batch_size == 8 and config.version_policy.latest.num_versions == 2
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    kind_cpu = triton_grpc.model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, kind_cpu)]
    assert [w.name for w in config.model_warmup] == ["full batch of zeros"]
    assert [(i.name, list(i.dims)) for i in config.input] == [("image", [1, 28, 28])]
    assert client.get_model_config("m").config.version_policy.latest.num_versions == 1
    http_config = http_client(triton_server).get_model_config("pinned", "3")
    assert http_config["version_policy"] == {"specific": {"versions": ["1", "3"]}}

    images = np.zeros((9, 1, 28, 28), np.uint8)
    tensor = triton_grpc.InferInput("image", list(images.shape), "UINT8").set_data_from_numpy(images)
    with pytest.raises(InferenceServerException, match="over the maximum of 8"):  # max_batch_size caps requests
        client.infer("classifier", [tensor])
    tensor = triton_grpc.InferInput("image", [8, 1, 28, 28], "UINT8").set_data_from_numpy(images[:8])
    assert client.infer("classifier", [tensor]).as_numpy("probabilities").shape == (8, 10)
    log = triton_server.log()
    assert '"instances": 2' in log and '"preferred_batch_sizes": [4, 8]' in log


def test_the_index_lists_failed_and_unloaded_versions(triton_server: ServerProcess) -> None:
    entries = grpc_client(triton_server).get_model_repository_index(as_json=True)["models"]
    by_key = {(e["name"], e.get("version", "")): e for e in entries}
    assert by_key[("classifier", "1")]["state"] == "UNAVAILABLE"
    assert "outside the version policy latest { num_versions: 2 }" in by_key[("classifier", "1")]["reason"]
    assert by_key[("classifier", "3")]["state"] == "READY"
    assert by_key[("pinned", "2")]["state"] == "UNAVAILABLE"
    bad = by_key[("bad", "")]
    assert bad["state"] == "UNAVAILABLE" and "field 'optimization' of ModelConfig is not supported" in bad["reason"]
    assert "bad/config.pbtxt line 2" in bad["reason"]
    rest = http_client(triton_server).get_model_repository_index()
    assert {(e["name"], e["version"], e["state"]) for e in rest} == {
        (e["name"], e.get("version", ""), e["state"]) for e in entries
    }
    # ready: only what is served (tritonclient.http has no argument for it: a plain POST).
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{triton_server.http_port}/v2/repository/index",
        data=json.dumps({"ready": True}).encode(),
        headers={"content-type": "application/json"},
    )
    ready = json.loads(urllib.request.urlopen(request, timeout=10).read())
    assert {e["state"] for e in ready} == {"READY"} and len(ready) == sum(e["state"] == "READY" for e in entries)


def test_statistics_agree_with_the_metrics(triton_server: ServerProcess) -> None:
    """The same traffic (gRPC and HTTP, one failure) read three ways: tritonclient gRPC and HTTP
    ``get_inference_statistics``, and the /metrics page."""
    grpc_c, http_c = grpc_client(triton_server), http_client(triton_server)
    for rows in (1, 2, 3):
        grpc_c.infer("pinned", [x_input(triton_grpc, 1.0, rows)], model_version="3")
        http_c.infer("pinned", [x_input(triton_http, 1.0, rows)], model_version="3")
    with pytest.raises(InferenceServerException, match="finite"):
        grpc_c.infer("pinned", [x_input(triton_grpc, float("nan"))], model_version="3")

    over_grpc = grpc_c.get_inference_statistics("pinned", "3", as_json=True)["model_stats"]
    over_http = http_c.get_inference_statistics("pinned", "3")["model_stats"]
    (stats,) = over_http
    samples = scrape(triton_server.metrics_port)  # type: ignore[arg-type]
    assert _figures(over_grpc[0]) == _figures(stats)  # the same numbers over both protocols
    inference = stats["inference_stats"]
    labels = {"model": "pinned", "version": "3"}
    requests = {
        code: sample(samples, "serving_requests_total", protocol=protocol, code=code, **labels)
        for protocol, code in (("v2", "OK"), ("http", "200"), ("v2", "INVALID_ARGUMENT"))
    }
    assert inference["success"]["count"] == requests["OK"] + requests["200"] == 6
    assert inference["fail"]["count"] == requests["INVALID_ARGUMENT"] == 1
    assert stats["inference_count"] == sample(samples, "serving_batch_size_sum", **labels) == 12
    assert stats["execution_count"] == sample(samples, "serving_batch_size_count", **labels) == 6
    assert inference["queue"]["count"] == sample(samples, "serving_queue_wait_seconds_count", **labels)
    assert inference["queue"]["ns"] / 1e9 == pytest.approx(
        sample(samples, "serving_queue_wait_seconds_sum", **labels), abs=1e-6
    )
    assert sorted(b["batch_size"] for b in stats["batch_stats"]) == [1, 2, 3]
    assert all(b["compute_infer"]["count"] == 2 for b in stats["batch_stats"])
    assert abs(stats["last_inference"] / 1000 - time.time()) < 60
    # The request durations and their phases, as Triton's tools add them up.
    phases = sum(inference[p]["ns"] for p in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert 0 < phases <= inference["success"]["ns"]
    latency_sum = sum(
        sample(samples, "serving_request_duration_seconds_sum", protocol=p, **labels) for p in ("v2", "http")
    )
    assert (inference["success"]["ns"] + inference["fail"]["ns"]) / 1e9 == pytest.approx(latency_sum, abs=1e-8)
    everything = http_c.get_inference_statistics()["model_stats"]  # every served version
    served = {(m, v) for m in ("classifier", "m", "pinned") for v in grpc_c.get_model_metadata(m).versions}
    assert {(s["name"], s["version"]) for s in everything} == served


def _figures(stats: dict) -> dict:
    """The numbers of a statistics entry, whichever JSON it came as (gRPC's quotes 64-bit integers
    and leaves out zeros)."""
    phases = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
    inference = stats.get("inference_stats", {})
    figures = {p: (int(inference.get(p, {}).get("count", 0)), int(inference.get(p, {}).get("ns", 0))) for p in phases}
    figures["batches"] = sorted(
        (int(b["batch_size"]), int(b["compute_infer"].get("count", 0))) for b in stats.get("batch_stats", [])
    )
    for key in ("inference_count", "execution_count", "last_inference"):
        figures[key] = int(stats.get(key, 0))
    return figures


class Load:
    """Threads calling model ``m`` (latest) over gRPC until stopped; answers checked per version."""

    def __init__(self, proc: ServerProcess, threads: int = 3) -> None:
        self.proc = proc
        self.versions: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client = grpc_client(self.proc)
        while not self._stop.is_set():
            try:
                result = client.infer("m", [x_input(triton_grpc, 3.0)])
            except InferenceServerException as err:
                self.errors.append(str(err))
                continue
            version = result.get_response().model_version
            self.versions[version] += 1
            if float(result.as_numpy("y")[0, 0]) != 3.0 * int(version):
                self.errors.append(f"version {version} answered {result.as_numpy('y')}")

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_hot_reload_follows_the_policy(changing_server: ServerProcess, changing_repo: Path) -> None:
    """A new version appears: it serves, and the oldest one beyond the policy drains and unloads,
    with no failed request meanwhile."""
    triton_server, triton_repo = changing_server, changing_repo
    client = grpc_client(triton_server)
    with Load(triton_server) as load:
        wait_for(lambda: load.versions["2"] > 5, "answers from m/2")
        publish(triton_repo, "m", 3, linear_model(3.0))
        publish(triton_repo, "classifier", 4, image_classifier(4))
        wait_for(lambda: client.get_model_metadata("m").versions == ["3"], "m/3 served, m/2 retired")
        wait_for(lambda: client.get_model_metadata("classifier").versions == ["3", "4"], "classifier/4 served")
        before = load.versions["3"]
        wait_for(lambda: load.versions["3"] > before + 5, "answers from m/3")
    assert load.errors == [], load.errors[:5]
    assert load.versions["2"] and load.versions["3"]
    unloaded = [json.loads(line) for line in triton_server.log().splitlines() if '"msg": "model unloaded"' in line]
    reasons = {(u["model"], u["version"]): u["reason"] for u in unloaded}
    assert reasons[("m", 2)] == "version policy latest { num_versions: 1 } serves versions [3]"
    assert reasons[("classifier", 2)] == "version policy latest { num_versions: 2 } serves versions [3, 4]"
    index = {(e["name"], e["version"]): e for e in http_client(triton_server).get_model_repository_index()}
    assert index[("m", "2")]["state"] == "UNAVAILABLE" and index[("m", "2")]["reason"].startswith("unloaded: version")
    assert index[("classifier", "4")]["state"] == "READY"


# -- the bundled models, unchanged ------------------------------------------------------------------


def test_bundled_models_under_the_default_policy(server: ServerProcess) -> None:
    client = grpc_client(server)
    index = client.get_model_repository_index(as_json=True)["models"]
    bundled = sorted(p.name for p in MODELS.iterdir() if (p / "1" / "model.onnx").is_file())
    assert sorted((e["name"], e["version"], e["state"]) for e in index) == [(n, "1", "READY") for n in bundled]
    for name in bundled:
        config = client.get_model_config(name).config
        assert config.version_policy.latest.num_versions == 1 and config.max_batch_size > 0
        assert config.HasField("dynamic_batching")  # the server's batching, as before
    stats = http_client(server).get_inference_statistics()["model_stats"]
    assert sorted(s["name"] for s in stats) == bundled
    assert {s["name"] for s in client.get_inference_statistics(as_json=True)["model_stats"]} == set(bundled)


# -- tracing: a real OTLP receiver ------------------------------------------------------------------

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
GRPC_PARENT, HTTP_PARENT = "b7ad6b7169203331", "c7ad6b7169203332"


def test_an_otlp_receiver_gets_the_spans_with_the_callers_parent(tmp_path: Path) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from fixtures.otlp import OtlpReceiver

    receiver = OtlpReceiver().start()
    env = {
        "SERVING_TRACING": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "serving-under-test",
    }
    try:
        with start_server(tmp_path, "--model-repository", str(MODELS), "--provider", "cpu", env=env) as proc:
            population = np.array([[3.5]], np.float32)
            tensor = triton_grpc.InferInput("population", [1, 1], "FP32").set_data_from_numpy(population)
            grpc_client(proc).infer("profit", [tensor], headers={"traceparent": f"00-{TRACE_ID}-{GRPC_PARENT}-01"})
            rest_tensor = triton_http.InferInput("population", [1, 1], "FP32")
            rest_tensor.set_data_from_numpy(population)
            http_client(proc).infer("profit", [rest_tensor], headers={"traceparent": f"00-{TRACE_ID}-{HTTP_PARENT}-01"})

            def arrived(spans: list) -> bool:
                parents = {s.parent_span_id for s in spans}
                return GRPC_PARENT in parents and HTTP_PARENT in parents and len(spans) >= 6

            spans = receiver.wait_for(arrived)
    finally:
        receiver.stop()
    by_parent = {s.parent_span_id: s for s in spans}
    grpc_span, http_span = by_parent[GRPC_PARENT], by_parent[HTTP_PARENT]
    assert grpc_span.name == "inference.GRPCInferenceService/ModelInfer" and grpc_span.trace_id == TRACE_ID
    assert grpc_span.kind == 2  # SPAN_KIND_SERVER
    assert grpc_span.attributes["rpc.system"] == "grpc" and grpc_span.attributes["rpc.grpc.status_code"] == 0
    assert grpc_span.attributes["model_serving.model.name"] == "profit"
    assert grpc_span.resource["service.name"] == "serving-under-test"
    assert http_span.name == "POST /v2/models/{model}/infer" and http_span.trace_id == TRACE_ID
    assert http_span.attributes["http.response.status_code"] == 200
    for parent in (grpc_span, http_span):
        phases = sorted((s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_ns)
        assert [s.name for s in phases] == ["queue", "compute"]
        assert parent.start_ns <= phases[0].start_ns <= phases[0].end_ns == phases[1].start_ns < phases[1].end_ns
        assert phases[1].end_ns <= parent.end_ns and phases[1].attributes["model_serving.compute.infer_seconds"] > 0
