"""The model registry (service.core.registry), in process, over tiny generated ONNX models:
loading, lookup, the contract each version carries, bad repository layouts, and reload rounds
(drain before unload, rejected files not retried until they change)."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import threading
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from fixtures.inprocess import ainfer, open_registry
from fixtures.onnx_models import declared, image_classifier, linear, save, serve_all_versions, slow

from service.core.discovery import Failure
from service.core.registry import ModelRegistry, RepositoryPoller
from service.core.spec import ModelKey, TensorSpec
from service.errors import InvalidArgument, NotFound, Unavailable
from service.settings import Settings


def test_loads_all_versions_and_reports_broken_model(tiny_registry: ModelRegistry) -> None:
    repo = tiny_registry
    assert repo.ready
    assert repo.names() == ["fashion_softmax", "house_price", "profit"]
    assert repo.versions("fashion_softmax") == [1, 2]
    assert [(m.name, m.version) for m in repo.models()] == [
        ("fashion_softmax", 1),
        ("fashion_softmax", 2),
        ("house_price", 1),
        ("profit", 1),
    ]
    assert list(repo.failed) == ["broken/1"]
    assert "Protobuf parsing failed" in repo.failed["broken/1"]
    # Clients read these reasons: they name files inside the repository, not this machine's paths.
    assert str(repo.root.resolve()) not in repo.failed["broken/1"]
    assert "broken/1/model.onnx" in repo.failed["broken/1"]
    assert list(repo.failures) == [Failure("broken", "1")]  # the typed keys behind `failed`


def test_get_versions(tiny_registry: ModelRegistry) -> None:
    repo = tiny_registry
    assert repo.get("fashion_softmax").version == 2
    assert repo.get("fashion_softmax", "").version == 2
    assert repo.get("fashion_softmax", 0).version == 2
    assert repo.get("fashion_softmax", 1).version == 1
    assert repo.get("fashion_softmax", "1").version == 1
    assert repo.get("fashion_softmax", 1).key == ModelKey("fashion_softmax", 1)
    assert str(repo.get("fashion_softmax", 1).key) == "fashion_softmax/1"
    with pytest.raises(InvalidArgument, match="version must be an integer, got 'one'"):
        repo.get("fashion_softmax", "one")
    with pytest.raises(NotFound, match=r"version 3 of model 'fashion_softmax' not found; available versions: \[1, 2\]"):
        repo.get("fashion_softmax", 3)
    with pytest.raises(NotFound, match=r"model 'nope' not found; available models: \['fashion_softmax'"):
        repo.get("nope")
    with pytest.raises(NotFound, match="failed to load"):
        repo.get("broken")
    with pytest.raises(InvalidArgument, match="a model name is required"):
        repo.get("")


def test_tensor_specs_and_metadata(tiny_registry: ModelRegistry) -> None:
    clf = tiny_registry.get("fashion_softmax", 2)
    assert clf.spec.inputs == (TensorSpec("image", np.dtype("uint8"), (-1, 1, 28, 28)),)
    assert clf.spec.outputs == (TensorSpec("probabilities", np.dtype("float32"), (-1, 10)),)
    assert clf.spec.class_names == [f"class{i}" for i in range(10)]
    assert clf.spec.evaluation == {"accuracy": 0.84}
    assert clf.provider == "CPUExecutionProvider"
    assert clf.spec.max_rows == 8
    profit = tiny_registry.get("profit")
    assert profit.spec.units == {"population": "people", "profit": "USD"}
    assert profit.spec.evaluation == {"rmse_usd": 3000.0}
    assert profit.spec.description == "profit from population"
    assert profit.path.name == "model.onnx"


def test_unavailable_before_load_and_bad_layout(tmp_path: Path) -> None:
    save(linear(1, [2.0], 0.0), tmp_path, "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "named" / "latest").mkdir(parents=True)
    (tmp_path / "nofile" / "1").mkdir(parents=True)
    save(image_classifier(), tmp_path, "zero", version=1).parent.rename(tmp_path / "zero" / "0")
    (tmp_path / "unicode" / "²").mkdir(parents=True)  # str.isdigit() says yes, int() says no
    (tmp_path / "unicode" / "１").mkdir()  # a full-width 1: int() would even accept it
    registry = ModelRegistry(tmp_path, Settings(provider="cpu"))
    with pytest.raises(Unavailable, match="still loading"):
        registry.get("good")
    assert not registry.ready
    asyncio.run(registry.start())
    try:
        assert registry.names() == ["good"]
        assert set(registry.failed) == {"empty", "named/latest", "nofile/1", "zero/0", "unicode/²", "unicode/１"}
        assert "no version directories" in registry.failed["empty"]
        assert "positive integer" in registry.failed["named/latest"]
        assert "model.onnx is missing" in registry.failed["nofile/1"]
        assert "positive integer, got '²'" in registry.failed["unicode/²"]
    finally:
        registry.close()


def test_metadata_must_match_the_graph(tmp_path: Path) -> None:
    wrong = json.dumps([declared("population", "float64", ["N", 1], "people")])
    save(linear(1, [2.0], 0.0, "population", "profit"), tmp_path, "profit", inputs=wrong)
    registry = open_registry(tmp_path, Settings(provider="cpu"))
    registry.close()
    assert not registry.ready
    assert "metadata 'inputs' declares [('population', 'float64', (-1, 1))]" in registry.failed["profit/1"]
    assert "the graph has [('population', 'float32', (-1, 1))]" in registry.failed["profit/1"]


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "nowhere", Settings(provider="cpu"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        asyncio.run(registry.start())
    registry.close()


# -- reload rounds: drain order and memory ----------------------------------------------------------


def model(weight: float) -> onnx.ModelProto:
    return linear(1, [weight], 0.0, "population", "profit")


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


def _settings(repo: Path, **kw: object) -> Settings:
    return Settings(**{"model_repository": repo, "provider": "cpu", "shutdown_grace_seconds": 30, **kw})


def test_a_removed_version_drains_before_it_unloads(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish(repo, "slow", 1, slow())
    publish(repo, "slow", 2, slow())
    serve_all_versions(repo, "slow")  # version 1 is served too (Triton's default: only the latest)
    rows = 6000  # ~0.6 s of CPU

    async def scenario() -> tuple[list[str], object, object]:
        registry = ModelRegistry(repo, _settings(repo, max_request_rows=rows))
        await registry.start()
        old = registry.get("slow", 1)
        session = weakref.ref(old.runner._session)
        events: list[str] = []

        async def request() -> None:
            out = await ainfer(registry, old, {"x": np.full((rows, 1), 0.5, np.float32)})
            assert out["y"].shape == (rows, 1)
            events.append("request finished")

        task = asyncio.create_task(request())
        while not old.batcher.busy:  # queued / running on version 1
            await asyncio.sleep(0)
        shutil.rmtree(repo / "slow" / "1")
        report = await registry.reload()
        events.append("reload returned")
        await task
        assert registry.versions("slow") == [2]
        old = None  # (the closure above holds it too)
        gc.collect()
        await registry.stop()
        return events, report, session()

    events, report, session = asyncio.run(scenario())
    assert report.unloaded == [ModelKey("slow", 1)] and not report.loaded
    assert events == ["request finished", "reload returned"]  # the drain waited for it
    assert session is None  # and then the session was freed


def test_a_valid_replacement_file_swaps_the_session_and_frees_the_old_one(tmp_path: Path) -> None:
    """m/1/model.onnx replaced by another valid model with the same tensors: the next reload
    loads it, requests get the new model's answers, and the old session is freed."""
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))
    x = {"population": np.array([[3.0]], np.float32)}

    async def scenario() -> tuple:
        registry = ModelRegistry(repo, _settings(repo))
        await registry.start()
        before = (await ainfer(registry, "m", x))["profit"]
        old = registry.get("m", 1)
        session = weakref.ref(old.runner._session)
        replace_file(repo / "m" / "1" / "model.onnx", model(7.0).SerializeToString())
        report = await registry.reload()
        after = (await ainfer(registry, "m", x))["profit"]
        closed = old.runner._session is None
        old = None
        gc.collect()
        await registry.stop()
        return before, after, report, closed, session()

    before, after, report, closed, session = asyncio.run(scenario())
    assert before.tolist() == [[3.0]] and after.tolist() == [[21.0]]
    assert report.loaded == [ModelKey("m", 1)] and report.unloaded == []  # the same version, a new file
    assert closed and session is None  # drained, closed, freed


def test_a_drain_that_times_out_leaves_its_request_to_finish(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The drain of a removed version waits max(shutdown_grace_seconds, 1 s); a request that runs
    longer is not cut: the reload returns, "model unloaded" says the drain timed out, the session
    stays open until the request has its (correct) answer, and is freed after it."""
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))
    publish(repo, "m", 2, model(2.0))
    serve_all_versions(repo, "m")  # version 1 is served too (the default: only the latest)
    release = threading.Event()

    async def scenario() -> tuple:
        registry = ModelRegistry(repo, _settings(repo, inline_compute_us=0, shutdown_grace_seconds=0))
        await registry.start()
        old = registry.get("m", 1)
        run = old.batcher._run

        def held_run(feeds: dict, names: list) -> dict:  # the request runs until the test says
            release.wait(60)
            return run(feeds, names)

        old.batcher._run = held_run  # (not monkeypatch: it would keep the old session alive to undo)
        session = weakref.ref(old.runner._session)
        task = asyncio.create_task(ainfer(registry, old, {"population": np.array([[3.0]], np.float32)}))
        while not old.batcher.busy:
            await asyncio.sleep(0)
        shutil.rmtree(repo / "m" / "1")
        report = await registry.reload()
        still_running, still_open = not task.done(), old.runner._session is not None
        release.set()
        answer = await task
        old = task = run = None
        gc.collect()
        await registry.stop()
        return report, still_running, still_open, answer, session()

    with caplog.at_level(logging.INFO, logger="service.core.registry"):
        report, still_running, still_open, answer, session = asyncio.run(scenario())
    assert report.unloaded == [ModelKey("m", 1)]
    assert still_running and still_open  # the reload returned while the request ran on
    assert answer["profit"].tolist() == [[3.0]]  # version 1's answer, from its own session
    (unloaded,) = [r for r in caplog.records if r.getMessage() == "model unloaded"]
    assert unloaded.drain_timed_out is True and unloaded.drained is True and unloaded.drain_seconds >= 1.0
    assert session is None  # freed once the request let go of it


def test_rejections_are_not_retried_until_the_file_changes(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))

    async def scenario() -> list:
        registry = ModelRegistry(repo, _settings(repo))
        await registry.start()
        (repo / "m" / "2").mkdir()
        (repo / "m" / "2" / "model.onnx").write_bytes(b"bad")
        reports = [await registry.reload(), await registry.reload()]
        replace_file(repo / "m" / "2" / "model.onnx", model(2.0).SerializeToString())
        reports.append(await registry.reload())
        failed_after = dict(registry.failed)
        root = repo.rename(tmp_path / "moved")  # the root vanishes (an unmounted volume)
        reports.append(await registry.reload())
        versions = registry.versions("m")
        root.rename(repo)
        await registry.stop()
        return [*reports, failed_after, versions]

    first, second, fixed, vanished, failed_after, versions = asyncio.run(scenario())
    assert list(first.rejected) == [ModelKey("m", 2)] and not first.changed  # version 1 serves on
    assert not second.rejected and not second.changed  # same bad file: no retry, no log line
    # Fixed, version 2 serves; the version policy (Triton's default, latest 1) retires version 1.
    assert fixed.loaded == [ModelKey("m", 2)] and fixed.unloaded == [ModelKey("m", 1)] and failed_after == {}
    assert vanished.skipped and versions == [2]  # nothing unloaded when the root is unreadable


def test_unload_and_load_by_request(tmp_path: Path) -> None:
    """registry.unload/load (what V2 RepositoryModelUnload/Load call): an unloaded model stays
    unloaded across polls until it is loaded by request."""
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))

    async def scenario() -> tuple:
        registry = ModelRegistry(repo, _settings(repo))
        await registry.start()
        unloaded = await registry.unload("m")
        polled = await registry.reload()
        after_poll = registry.names()
        loaded = await registry.load("m")
        names = registry.names()
        with pytest.raises(NotFound):
            await registry.unload("..")
        await registry.stop()
        return unloaded, polled, after_poll, loaded, names

    unloaded, polled, after_poll, loaded, names = asyncio.run(scenario())
    assert unloaded.unloaded == [ModelKey("m", 1)]
    assert not polled.changed and after_poll == []
    assert loaded.loaded == [ModelKey("m", 1)] and names == ["m"]


def test_the_poller_follows_the_repository(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    publish(repo, "m", 1, model(1.0))

    async def scenario() -> tuple:
        registry = ModelRegistry(repo, _settings(repo))
        await registry.start()
        idle = RepositoryPoller(registry, 0)
        idle.start()  # interval 0: no polling
        poller = RepositoryPoller(registry, 0.02)
        poller.start()
        publish(repo, "m", 2, model(2.0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60  # a guard against a poller that never sees it
        # (the default version policy: the new version replaces the old)
        while registry.versions("m") != [2] and loop.time() < deadline:
            await asyncio.sleep(0.02)
        found = registry.versions("m")
        await poller.stop()
        await idle.stop()
        await registry.stop()
        return found, idle._task, poller._task

    found, idle_task, stopped = asyncio.run(scenario())
    assert found == [2] and idle_task is None and stopped is None
