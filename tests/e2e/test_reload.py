"""Hot model reload through real servers: repository polling under load, V2
RepositoryModelLoad/Unload — what clients see (0 failed requests while versions come and go,
health following). (What only the process can show, drain order and sessions freed:
tests/unit/core/test_registry.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from fixtures.onnx_models import linear, save, serve_all_versions
from fixtures.servers import ServerProcess, start_server
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


def wait_for(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def health(proc: ServerProcess, name: str) -> int | None:
    """Health of ``name``, None while the health service does not know it."""
    try:
        return proc.health(name)
    except grpc.RpcError:
        return None


def log_lines(proc: ServerProcess, msg: str) -> list[dict]:
    lines = []
    for line in proc.log().splitlines():
        if f'"msg": "{msg}"' in line:
            lines.append(json.loads(line))
    return lines


class Load:
    """Threads calling model ``m`` (latest) over both protocols until stopped; every answer is
    checked against the version it reports."""

    def __init__(self, channel: grpc.Channel, threads: int = 4) -> None:
        self.typed = pb_grpc.ModelServiceStub(channel)
        self.v2 = v2_grpc.GRPCInferenceServiceStub(channel)
        self.versions: Counter[int] = Counter()
        self.errors: list[str] = []
        self.wrong: list[tuple[int, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True) for i in range(threads)]
        self._request = v2.ModelInferRequest(
            model_name="m",
            inputs=[v2.ModelInferRequest.InferInputTensor(name="population", datatype="FP32", shape=[1, 1])],
            raw_input_contents=[np.float32(X).tobytes()],
        )

    def _call(self, typed: bool) -> tuple[int, float]:
        if typed:
            r = self.typed.PredictProfit(
                pb.PredictProfitRequest(model=pb.ModelRef(name="m"), population=[X]), timeout=30
            )
            return r.model.version, r.profit_usd[0]
        r = self.v2.ModelInfer(self._request, timeout=30)
        return int(r.model_version), float(np.frombuffer(r.raw_output_contents[0], "<f4")[0])

    def _run(self, typed: bool) -> None:
        while not self._stop.is_set():
            try:
                version, value = self._call(typed)
            except grpc.RpcError as err:
                with self._lock:
                    self.errors.append(f"{err.code()}: {err.details()}")
                continue
            with self._lock:
                self.versions[version] += 1
                if value != WEIGHT.get(version, -1) * X:
                    self.wrong.append((version, value))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def latest(self) -> int:
        with self._lock:
            before = sum(self.versions.values())
        wait_for(lambda: sum(self.versions.values()) > before + 4, "fresh answers")
        return self.typed.GetModelMetadata(pb.GetModelMetadataRequest(model=pb.ModelRef(name="m")), timeout=10).version


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
            return [r for r in log_lines(proc, "model rejected") if f"{r['model']}/{r['version']}" == key]

        # A new version directory becomes servable without a restart.
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
    unloaded = {(r["model"], r["version"]) for r in log_lines(proc, "model unloaded")}
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
        time.sleep(0.3)
        assert versions() == ["1"]  # no polling: nothing changes by itself
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
    assert len(log_lines(proc, "model rejected")) == 1
