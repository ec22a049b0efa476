"""Dynamic batching (service.core.batching) in process: the scheduler with a fake run function
(batches formed from what queued meanwhile, cancellation, splitting, errors, capacity, deadlines,
the idle wait a drain uses) and the per-model batching configuration.
(Through real servers under concurrency: tests/e2e/test_batching.py.)"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fixtures.inprocess import open_registry
from fixtures.metrics import by_label, exposed
from fixtures.onnx_models import linear, save

from service.core.batching import Batcher, BatchingConfig
from service.core.context import RequestContext
from service.errors import DeadlineExceeded, Internal, ResourceExhausted, Unavailable
from service.observability.metrics import Metrics
from service.settings import Settings


class GatedModel:
    """A fake run function: y = 2x, blocking until released, recording each batch's rows."""

    def __init__(self) -> None:
        self.batches: list[list[float]] = []
        self.gate = threading.Event()
        self.fail = False

    def __call__(self, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        self.gate.wait(10)
        x = feeds["x"]
        self.batches.append(x[:, 0].tolist())
        if self.fail:
            raise Internal("boom")
        return {"y": x * 2}


def batcher(run: GatedModel, executor, **config) -> Batcher:
    return Batcher("test model", run, executor, BatchingConfig(**config), max_in_flight=1)


def rows(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, np.float32).reshape(-1, 1)}


def test_requests_queued_during_a_batch_form_the_next_one_and_cancellation_spares_the_others() -> None:
    model = GatedModel()
    with ThreadPoolExecutor(1) as executor:
        b = batcher(model, executor, max_batch_rows=8)

        async def scenario() -> list:
            first = asyncio.create_task(b.submit(rows(1), ["y"]))
            await asyncio.sleep(0.05)  # first batch [1] is running, held at the gate
            waiting = [asyncio.create_task(b.submit(rows(*v), ["y"])) for v in ([2, 3], [4], [5, 6, 7], [8])]
            await asyncio.sleep(0.05)
            waiting[1].cancel()  # a caller that went away while queued
            await asyncio.sleep(0.01)
            model.gate.set()
            return await asyncio.gather(first, *waiting, return_exceptions=True)

        results = asyncio.run(scenario())
    assert model.batches == [[1.0], [2.0, 3.0, 5.0, 6.0, 7.0, 8.0]]  # the cancelled one was never run
    assert results[0]["y"].ravel().tolist() == [2.0]
    assert results[1]["y"].ravel().tolist() == [4.0, 6.0]
    assert isinstance(results[2], asyncio.CancelledError)
    assert results[3]["y"].ravel().tolist() == [10.0, 12.0, 14.0]
    assert results[4]["y"].ravel().tolist() == [16.0]


def test_split_request_is_joined_in_order_and_errors_reach_every_caller() -> None:
    model = GatedModel()
    model.gate.set()
    with ThreadPoolExecutor(2) as executor:
        b = Batcher("test model", model, executor, BatchingConfig(max_batch_rows=3), max_in_flight=2)

        async def split() -> dict:
            return await b.submit(rows(*range(10)), ["y"])

        assert asyncio.run(split())["y"].ravel().tolist() == [2.0 * i for i in range(10)]
        assert sorted(len(batch) for batch in model.batches) == [1, 3, 3, 3]

        model.fail = True

        async def failing() -> list:
            return await asyncio.gather(*(b.submit(rows(i), ["y"]) for i in range(3)), return_exceptions=True)

        errors = asyncio.run(failing())
    assert all(isinstance(e, Internal) and "boom" in str(e) for e in errors)


def test_capacity_and_deadline_in_process() -> None:
    metrics = Metrics()
    model = GatedModel()
    with ThreadPoolExecutor(1) as executor:
        b = Batcher("test model", model, executor, BatchingConfig(queue_capacity=2), 1, metrics.for_model("m", 1))

        async def scenario() -> list:
            running = asyncio.create_task(b.submit(rows(0), ["y"]))
            await asyncio.sleep(0.05)
            queued = [asyncio.create_task(b.submit(rows(i), ["y"], timeout=t)) for i, t in ((1, 0.05), (2, 10))]
            await asyncio.sleep(0.01)
            with pytest.raises(ResourceExhausted):
                await b.submit(rows(3), ["y"])
            await asyncio.sleep(0.1)  # the first queued request expires while the batch runs
            model.gate.set()
            return await asyncio.gather(running, *queued, return_exceptions=True)

        results = asyncio.run(scenario())
    assert isinstance(results[1], DeadlineExceeded)
    assert results[2]["y"].ravel().tolist() == [4.0]
    assert model.batches == [[0.0], [2.0]]  # the expired request was not computed
    dropped = by_label(exposed(metrics.registry), "serving_dropped_requests_total", "reason")
    assert dropped == {"queue_full": 1.0, "deadline": 1.0}


def test_per_model_config_file_and_setting(tmp_path: Path) -> None:
    save(linear(1, [2.0], 1.0), tmp_path, "a")
    save(linear(1, [2.0], 1.0), tmp_path, "b")
    save(linear(1, [2.0], 1.0), tmp_path, "bad")
    # The old key, max_batch_size, is still accepted in config.json.
    (tmp_path / "a" / "config.json").write_text(
        json.dumps({"batching": {"max_batch_size": 8, "max_queue_delay_us": 100}})
    )
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"batching": {"max_batch_sise": 8}}))
    save(linear(1, [2.0], 1.0), tmp_path, "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({"batching": {"max_batch_rows": 4}}))  # today's key
    settings = Settings(
        provider="cpu", max_batch_rows=32, batching={"a": {"max_queue_delay_us": 7}, "b": {"enabled": False}}
    )
    registry = open_registry(tmp_path, settings)
    try:
        assert registry.get("a").batcher.config == BatchingConfig(True, 8, 7, 512)  # file, then setting
        assert registry.get("b").batcher.config == BatchingConfig(False, 32, 0, 512)
        assert registry.get("c").batcher.config == BatchingConfig(True, 4, 0, 512)
        assert not registry.get("b").batcher.batching
        assert "max_batch_sise" in registry.failed["bad"]  # a model-level failure: its config file
        assert registry.get("a").batcher.expected_seconds(1) is not None  # timed at load
    finally:
        registry.close()


def test_busy_wait_idle_and_the_request_context() -> None:
    """What a drain relies on (busy, wait_idle) and what metrics and logs read (the context)."""
    model = GatedModel()
    with ThreadPoolExecutor(1) as executor:
        b = batcher(model, executor, max_batch_rows=8)

        async def scenario() -> tuple:
            assert not b.busy and await b.wait_idle(0)
            contexts = [RequestContext("test", "/t", inference=True) for _ in range(3)]
            first = asyncio.create_task(b.submit(rows(1), ["y"], context=contexts[0]))
            await asyncio.sleep(0.05)
            others = [asyncio.create_task(b.submit(rows(2, 3), ["y"], context=c)) for c in contexts[1:]]
            await asyncio.sleep(0.01)
            busy, timed_out = b.busy, not await b.wait_idle(0.05)
            model.gate.set()
            idle = await b.wait_idle(5)
            await asyncio.gather(first, *others)
            return busy, timed_out, idle, b.busy, contexts

        busy, timed_out, idle, busy_after, contexts = asyncio.run(scenario())
    assert busy and timed_out and idle and not busy_after
    assert [c.batch_rows for c in contexts] == [1, 4, 4]  # the two later requests shared a batch
    assert contexts[1].queue_seconds > 0.01 and all(c.compute_seconds > 0 for c in contexts)


def test_expired_timeout_closed_queue_and_a_new_event_loop() -> None:
    model = GatedModel()
    model.gate.set()
    with ThreadPoolExecutor(1) as executor:
        b = batcher(model, executor)
        with pytest.raises(DeadlineExceeded, match="deadline already passed"):
            asyncio.run(b.submit(rows(1), ["y"], timeout=0))
        # Each asyncio.run is a new event loop: the batcher rebinds to it.
        assert asyncio.run(b.submit(rows(1), ["y"]))["y"].ravel().tolist() == [2.0]
        assert asyncio.run(b.submit(rows(2), ["y"]))["y"].ravel().tolist() == [4.0]
        b.close()
        with pytest.raises(Unavailable, match="being unloaded"):
            asyncio.run(b.submit(rows(1), ["y"]))
    assert model.batches == [[1.0], [2.0]]


def test_batching_off_runs_each_request_alone_and_unsplit() -> None:
    model = GatedModel()
    with ThreadPoolExecutor(1) as executor:
        b = batcher(model, executor, enabled=False, max_batch_rows=2)

        async def scenario() -> list:
            first = asyncio.create_task(b.submit(rows(1), ["y"]))
            await asyncio.sleep(0.05)
            waiting = [asyncio.create_task(b.submit(rows(*v), ["y"])) for v in ([2, 3, 4], [5])]
            await asyncio.sleep(0.01)
            model.gate.set()
            return await asyncio.gather(first, *waiting)

        results = asyncio.run(scenario())
    assert model.batches == [[1.0], [2.0, 3.0, 4.0], [5.0]]  # 3 rows > max_batch_rows 2: not split
    assert results[1]["y"].ravel().tolist() == [4.0, 6.0, 8.0]


def test_a_cancel_just_before_the_deadline_counts_as_the_deadline() -> None:
    """gRPC cancels a call when its client's deadline passes, which can reach the server a little
    before the server's own timer (service.core.context.DEADLINE_SLACK_SECONDS): that is a
    deadline drop. A caller that goes away with time left is a cancellation."""
    metrics = Metrics()
    model = GatedModel()  # never released: nothing runs
    with ThreadPoolExecutor(1) as executor:
        config = BatchingConfig(max_queue_delay_us=60_000_000)
        b = Batcher("test model", model, executor, config, 1, metrics.for_model("m", 1))

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            near = asyncio.ensure_future(b.submit(rows(1), ["y"], timeout=0.15))
            loop.call_later(0.1, near.cancel)  # 0.05 s before its deadline
            early = asyncio.ensure_future(b.submit(rows(2), ["y"], timeout=60))
            loop.call_later(0.1, early.cancel)  # 59.9 s before its deadline
            for task in (near, early):
                with pytest.raises(asyncio.CancelledError):
                    await task

        asyncio.run(scenario())
        model.gate.set()
    dropped = by_label(exposed(metrics.registry), "serving_dropped_requests_total", "reason")
    assert dropped == {"deadline": 1.0, "cancelled": 1.0} and model.batches == []
