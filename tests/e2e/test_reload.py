"""Hot model reload through real servers: repository polling under load, a served file replaced
by a valid new model under load, V2 RepositoryModelLoad/Unload (alone, and under traffic with
the metrics that follow) — what clients see: no failed request that should not fail, answers
from the right model, health and metrics following. (What only the process can show, drain order,
a drain that times out, sessions freed: tests/unit/core/test_registry.py.)
"""

from __future__ import annotations

import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from fixtures.metrics import sample
from fixtures.onnx_models import linear, save, serve_all_versions
from fixtures.servers import ServerProcess, scrape, start_server, wait_for
from grpc_health.v1 import health_pb2

from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
X = 3.0  # every request asks for f(3); version v of model m answers WEIGHT[v] * 3
WEIGHT = {1: 1.0, 2: 2.0, 3: 3.0}


def model(weight: float, in_name: str = "population") -> onnx.ModelProto:
    return linear(1, [weight], 0.0, in_name, "profit")


def publish(repo: Path, name: str, version: int, proto: onnx.ModelProto) -> None:
    """Add a version the safe way: build it aside, then one rename into place."""
    staging = repo / ".staging"
    save(proto, staging, name, version)
    (repo / name).mkdir(exist_ok=True)
    os.rename(staging / name / str(version), repo / name / str(version))


def replace_file(path: Path, content: bytes) -> None:
    """Replace a model.onnx atomically (write aside, rename over)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def health(proc: ServerProcess, name: str) -> int | None:
    """Health of ``name``, None while the health service does not know it."""
    try:
        return proc.health(name)
    except grpc.RpcError:
        return None


class Load:
    """Threads calling ``model`` (latest version) over both protocols until stopped. Every answer
    is checked against the weights its version may have (``expected``: version → weights); each
    thread keeps its answers in order."""

    def __init__(
        self, channel: grpc.Channel, model: str = "m", threads: int = 4, expected: dict[int, set[float]] | None = None
    ) -> None:
        self.model = model
        self.expected = expected if expected is not None else {v: {w} for v, w in WEIGHT.items()}
        self.typed = pb_grpc.ModelServiceStub(channel)
        self.v2 = v2_grpc.GRPCInferenceServiceStub(channel)
        self.versions: Counter[int] = Counter()
        self.errors: list[str] = []
        self.codes: Counter[grpc.StatusCode] = Counter()
        self.wrong: list[tuple[int, float]] = []
        self.answers: list[list[tuple[int, float]]] = [[] for _ in range(threads)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self._request = v2.ModelInferRequest(
            model_name=model,
            inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[np.float32(X).tobytes()],
        )

    def _call(self, typed: bool) -> tuple[int, float]:
        if typed:
            r = self.typed.PredictProfit(
                pb.PredictProfitRequest(model=pb.ModelRef(name=self.model), population=[X]), timeout=30
            )
            return r.model.version, r.profit_usd[0]
        r = self.v2.ModelInfer(self._request, timeout=30)
        return int(r.model_version), float(np.frombuffer(r.raw_output_contents[0], "<f4")[0])

    def _run(self, index: int) -> None:
        while not self._stop.is_set():
            try:
                version, value = self._call(index % 2 == 0)
            except grpc.RpcError as err:
                with self._lock:
                    self.errors.append(f"{err.code()}: {err.details()}")
                    self.codes[err.code()] += 1
                continue
            with self._lock:
                self.versions[version] += 1
                self.answers[index].append((version, value))
                if value not in {w * X for w in self.expected.get(version, set())}:
                    self.wrong.append((version, value))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def count(self) -> int:
        with self._lock:
            return sum(self.versions.values())

    def fresh(self, more: int = 4) -> None:
        """Wait until ``more`` answers came after now."""
        before = self.count()
        wait_for(lambda: self.count() > before + more, "fresh answers")

    def latest(self) -> int:
        self.fresh()
        return self.typed.GetModelMetadata(
            pb.GetModelMetadataRequest(model=pb.ModelRef(name=self.model)), timeout=10
        ).version


def test_polling_follows_the_repository_under_load(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))
    # Every version on disk is served (Triton's default policy serves only the latest: see
    # tests/e2e/test_operations.py), so that versions come and go side by side here.
    serve_all_versions(repo, "m")
    args = ["--model-repository", str(repo), "--reload-interval-seconds", "0.1", "--provider", "cpu"]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel, Load(channel) as load:
        stub = pb_grpc.ModelServiceStub(channel)

        def versions() -> list[int]:
            return list(stub.ListModels(pb.ListModelsRequest(name="m"), timeout=10).models[0].versions)

        def failed() -> dict[str, str]:
            return dict(stub.ListModels(pb.ListModelsRequest(), timeout=10).failed)

        def rejected(key: str) -> list[dict]:
            return [r for r in proc.log_lines("model rejected") if f"{r['model']}/{r['version']}" == key]

        # A new version directory becomes servable without a restart (once version 1 has answered:
        # the poll runs every 0.1 s, and the load must have seen version 1 first).
        wait_for(lambda: load.versions[1] >= 4, "answers from version 1")
        publish(repo, "m", 2, model(2.0))
        wait_for(lambda: versions() == [1, 2], "version 2 loaded")
        assert load.latest() == 2

        # A corrupt new version is rejected with a clear log line; version 2 keeps serving.
        (repo / "m" / "3").mkdir()
        (repo / "m" / "3" / "model.onnx").write_bytes(b"\x08\x07 truncated onnx")
        wait_for(lambda: rejected("m/3"), "m/3 rejected")
        assert "versions [1, 2] keep serving" in rejected("m/3")[0]["error"] and "m/3" in failed()
        assert load.latest() == 2

        # An incompatible one (its input renamed) too.
        publish(repo, "m", 4, model(4.0, in_name="x"))
        wait_for(lambda: rejected("m/4"), "m/4 rejected")
        assert "incompatible with model 'm' version 2" in rejected("m/4")[0]["error"]
        assert load.latest() == 2 and versions() == [1, 2]

        # A served file replaced by a corrupt one: rejected, the loaded session serves on.
        replace_file(repo / "m" / "2" / "model.onnx", b"garbage")
        wait_for(lambda: rejected("m/2"), "the corrupt m/2 rejected")
        assert "the previously loaded file keeps serving" in rejected("m/2")[0]["error"]
        assert load.latest() == 2

        # A removed version drains and unloads.
        shutil.rmtree(repo / "m" / "1")
        wait_for(lambda: versions() == [2], "version 1 unloaded")
        with pytest.raises(grpc.RpcError) as info:
            stub.PredictProfit(
                pb.PredictProfitRequest(model=pb.ModelRef(name="m", version=1), population=[X]), timeout=10
            )
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # Fixing version 3 makes it the latest; its failure entry goes away.
        replace_file(repo / "m" / "3" / "model.onnx", model(3.0).SerializeToString())
        wait_for(lambda: versions() == [2, 3], "version 3 loaded")
        assert load.latest() == 3 and "m/3" not in failed() and "m/4" in failed()

        # A new model directory, then its removal: health follows.
        publish(repo, "n", 1, model(5.0))
        wait_for(lambda: health(proc, "n") == SERVING, "model n SERVING")
        shutil.rmtree(repo / "n")
        wait_for(lambda: proc.health("n") == NOT_SERVING, "model n NOT_SERVING")
        assert proc.health() == SERVING and proc.health("m") == SERVING

    print(
        f"reload under load: {sum(load.versions.values())} answers by version {dict(load.versions)}, {len(load.errors)} errors"  # noqa: E501
    )
    assert load.errors == [], load.errors[:5]
    assert load.wrong == [], load.wrong[:5]
    assert load.versions[1] and load.versions[2] and load.versions[3], load.versions
    unloaded = {(r["model"], r["version"]) for r in proc.log_lines("model unloaded")}
    assert {("m", 1), ("n", 1)} <= unloaded
    assert len(rejected("m/3")) == 1  # rejected once, not at every poll


def test_v2_model_load_and_unload(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))
    args = ["--model-repository", str(repo), "--allow-model-control", "true", "--provider", "cpu"]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)

        def versions() -> list[str]:
            try:
                return list(stub.ModelMetadata(v2.ModelMetadataRequest(name="m"), timeout=10).versions)
            except grpc.RpcError:
                return []

        def error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
            with pytest.raises(grpc.RpcError) as info:
                call()
            return info.value.code(), info.value.details()

        def load(name, **kw):
            return stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name=name, **kw), timeout=30)

        unload = lambda name: stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name=name), timeout=30)  # noqa: E731

        def index(ready: bool = False) -> set[tuple[str, str, str]]:
            models = stub.RepositoryIndex(v2.RepositoryIndexRequest(ready=ready), timeout=10).models
            return {(m.name, m.version, m.state) for m in models}

        publish(repo, "m", 2, model(2.0))
        assert versions() == ["1"]  # polling is off (no "watching the model repository" line): only a load request
        assert not proc.log_lines("watching the model repository")
        load("m")
        assert versions() == ["2"]  # Triton's default version policy: the latest replaces version 1
        assert index() == {("m", "1", "UNAVAILABLE"), ("m", "2", "READY")}

        unload("m")
        assert versions() == [] and not stub.ModelReady(v2.ModelReadyRequest(name="m"), timeout=10).ready
        assert proc.health("m") == NOT_SERVING
        # As in Triton, an unloaded model stays in the index: UNAVAILABLE (and out of ready ones).
        assert index() == {("m", "1", "UNAVAILABLE"), ("m", "2", "UNAVAILABLE")} and index(ready=True) == set()
        unload("m")  # idempotent
        load("m")
        assert versions() == ["2"] and proc.health("m") == SERVING

        for name in ("nope", "../models/m", "..", ".", "m/../m", "m\x00", "é" * 300, ".staging"):
            assert error(lambda: load(name))[0] == grpc.StatusCode.NOT_FOUND, name  # noqa: B023
            assert error(lambda: unload(name))[0] == grpc.StatusCode.NOT_FOUND, name  # noqa: B023
        assert error(lambda: load("m", repository_name="x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
        params = {"config": v2.ModelRepositoryParameter(string_param="{}")}
        assert error(lambda: load("m", parameters=params))[0] == grpc.StatusCode.INVALID_ARGUMENT

        (repo / "m" / "3").mkdir()
        (repo / "m" / "3" / "model.onnx").write_bytes(b"not onnx")
        code, details = error(lambda: load("m"))
        assert (
            code == grpc.StatusCode.FAILED_PRECONDITION and "m/3" in details and "still serving versions [2]" in details
        )
        assert versions() == ["2"]
    assert len(proc.log_lines("model rejected")) == 1


def test_a_served_version_replaced_by_a_valid_file_under_load(tmp_path: Path) -> None:
    """m/1/model.onnx replaced (atomically) by another valid model with the same tensors, while
    four clients call it on both protocols: every client's answers switch from the old model's to
    the new one's once and for good, no call fails, and the old session is drained and closed."""
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))
    args = ["--model-repository", str(repo), "--reload-interval-seconds", "0.1", "--provider", "cpu"]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel:
        with Load(channel, expected={1: {1.0, 7.0}}) as load:
            wait_for(lambda: all(len(a) >= 3 for a in load.answers), "old answers on every client")
            replace_file(repo / "m" / "1" / "model.onnx", model(7.0).SerializeToString())
            proc.wait_log("model unloaded")
            wait_for(
                lambda: all(a and a[-1][1] == 7.0 * X for a in load.answers), "new answers on every client", server=proc
            )
            load.fresh()
    assert load.errors == [] and load.wrong == [], (load.errors[:5], load.wrong[:5])
    for answers in load.answers:  # old ones, then new ones only: a client never goes back
        values = [value for _, value in answers]
        switch = values.index(7.0 * X)
        assert set(values[:switch]) == {1.0 * X} and set(values[switch:]) == {7.0 * X}, values
    (loaded,) = [line for line in proc.log_lines("model loaded") if line["replaced"]]
    assert (loaded["model"], loaded["version"], loaded["trigger"]) == ("m", 1, "poll")
    (unloaded,) = proc.log_lines("model unloaded")
    assert (unloaded["model"], unloaded["version"]) == ("m", 1)
    assert (
        unloaded["reason"] == "reloaded: its model.onnx or its model's configuration changed"
        and unloaded["drain_timed_out"] is False
    )


def _loaded_series(port: int) -> dict[tuple[str, str], float]:
    """serving_model_loaded by (model, version), as scraped: a missing key is no series at all."""
    return {
        (dict(labels)["model"], dict(labels)["version"]): value
        for (name, labels), value in scrape(port).items()
        if name == "serving_model_loaded"
    }


def test_rpc_unload_and_load_under_traffic_with_metrics(tmp_path: Path) -> None:
    """Clients call m and n; m is unloaded and loaded again by V2 RPC. n's clients never notice;
    m's get NOT_FOUND while it is unloaded (UNAVAILABLE at most for a call caught in between) and
    correct answers again after the load. Metrics: a failed model is reported loaded=0, an
    unloaded one has no series at all (not a stale 1), and it comes back with the load."""
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))
    publish(repo, "n", 1, model(5.0))
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    args = ["--model-repository", str(repo), "--allow-model-control", "true", "--provider", "cpu"]
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:
        assert proc.metrics_port is not None
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        with Load(channel, "m", 2, {1: {1.0}}) as m_load, Load(channel, "n", 2, {1: {5.0}}) as n_load:
            m_load.fresh()
            n_load.fresh()
            before = _loaded_series(proc.metrics_port)
            stub.RepositoryModelUnload(v2.RepositoryModelUnloadRequest(model_name="m"), timeout=60)
            wait_for(lambda: m_load.codes[grpc.StatusCode.NOT_FOUND] >= 4, "m refused while unloaded", server=proc)
            unloaded = _loaded_series(proc.metrics_port)
            depth = sample(scrape(proc.metrics_port), "serving_queue_depth", model="m", version="1")
            answered = m_load.count()
            stub.RepositoryModelLoad(v2.RepositoryModelLoadRequest(model_name="m"), timeout=60)
            wait_for(lambda: m_load.count() > answered + 4, "m answering again", server=proc)
            n_load.fresh()
            reloaded = _loaded_series(proc.metrics_port)
    assert before == {("m", "1"): 1, ("n", "1"): 1, ("broken", "1"): 0}
    assert unloaded == {("n", "1"): 1, ("broken", "1"): 0} and depth == 0
    assert reloaded == before
    assert n_load.errors == [] and n_load.wrong == [] and m_load.wrong == []
    assert set(m_load.codes) <= {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}, m_load.errors[:5]
    assert all("not found" in e or "unloaded" in e for e in m_load.errors), m_load.errors[:5]
