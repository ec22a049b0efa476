"""The mirror's child process (--rollout-mirror process): real ONNX files, a real child."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fixtures.onnx_models import failing_classifier, image_classifier, save

from service.core.registry import ModelRegistry, ModelVersion
from service.errors import Internal, Unavailable
from service.rollout import mirror_process
from service.rollout.mirror import Job, Mirror
from service.rollout.mirror_process import MirrorProcess
from service.settings import Settings

OUTPUT = "probabilities"
#: The child runs at idle priority: on a busy machine it waits for CPU time nobody else wants.
DEADLINE_S = 120


def images(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[ModelRegistry]:
    save(image_classifier(0), tmp_path, "clf", 1)
    save(failing_classifier(), tmp_path, "bad", 1)
    registry = ModelRegistry(tmp_path, Settings(model_repository=tmp_path, provider="cpu"))
    yield registry
    registry.close()


def test_answers_bit_for_bit_in_a_child_at_idle_priority(registry: ModelRegistry) -> None:
    """The child's answer is the server's own, to the bit; it runs in another process, at idle CPU
    priority (Linux), and exits when the mirror stops it."""

    async def scenario() -> tuple[np.ndarray, np.ndarray, MirrorProcess, int | None]:
        await registry.start()
        model: ModelVersion = registry.get("clf")
        process = MirrorProcess("clf", 1, 1)
        feeds = images(5, seed=1)
        try:
            remote = await process.run(model, feeds, OUTPUT)
            policy = os.sched_getscheduler(process.pid) if sys.platform == "linux" and process.pid else None
        finally:
            await process.stop()
        local = (await model.batcher.submit(feeds, [OUTPUT]))[OUTPUT]
        return remote, local, process, policy

    remote, local, process, policy = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    np.testing.assert_array_equal(remote, local)
    assert remote.dtype == local.dtype and remote.shape == (5, 10)
    assert process.pid is not None and process.pid != os.getpid()
    assert process.starts == 1 and process.deaths == 0
    if sys.platform == "linux":
        assert process.priority == "idle" and policy == os.SCHED_IDLE
    with pytest.raises(ProcessLookupError):  # stopped: the child exited and was reaped
        os.kill(process.pid, 0)


def test_a_failing_model_fails_the_batch_and_the_child_lives_on(registry: ModelRegistry) -> None:
    async def scenario() -> tuple[MirrorProcess, int | None, np.ndarray]:
        await registry.start()
        process = MirrorProcess("clf", 1, 1)
        try:
            with pytest.raises(Internal, match="inference failed in the mirror process"):
                await process.run(registry.get("bad"), images(2, seed=2), OUTPUT)
            pid = process.pid
            good = await process.run(registry.get("clf"), images(2, seed=3), OUTPUT)
        finally:
            await process.stop()
        return process, pid, good

    process, pid, good = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    assert process.pid == pid and process.starts == 1 and process.deaths == 0
    assert good.shape == (2, 10) and np.allclose(good.sum(axis=1), 1, atol=1e-5)


def test_a_killed_child_fails_one_batch_and_is_started_again(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL to the child: the next batch fails with Unavailable (the mirror counts it failed);
    after the back-off a new child answers."""
    monkeypatch.setattr(mirror_process, "RESTART_BACKOFF", (0.05, 1.0))

    async def scenario() -> tuple[MirrorProcess, int | None, int | None, np.ndarray]:
        await registry.start()
        model = registry.get("clf")
        process = MirrorProcess("clf", 1, 1)
        try:
            await process.run(model, images(1, seed=4), OUTPUT)
            first = process.pid
            assert first is not None
            os.kill(first, signal.SIGKILL)
            with pytest.raises(Unavailable, match="mirror process of model 'clf' exited"):
                await process.run(model, images(1, seed=5), OUTPUT)
            again = await process.run(model, images(3, seed=6), OUTPUT)
            return process, first, process.pid, again
        finally:
            await process.stop()

    process, first, second, again = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    assert process.starts == 2 and process.deaths == 1
    assert second is not None and second != first
    assert again.shape == (3, 10)


def test_shadow_jobs_go_to_the_child_and_canary_checks_stay_in_the_batcher(registry: ModelRegistry) -> None:
    """Through the mirror: a shadow's jobs run in the child (one batch, gathered); a canary's
    checks (``check=True``) run in the target's batcher and never start a child."""

    async def scenario() -> tuple[list[tuple[bool, int, np.ndarray | None]], MirrorProcess, np.ndarray]:
        await registry.start()
        model = registry.get("clf")
        reports: list[tuple[bool, int, np.ndarray | None]] = []
        ran = asyncio.Event()

        def done(jobs: list[Job], output: np.ndarray | None, error: BaseException | None) -> None:
            reports.append((jobs[0].check, len(jobs), output))
            ran.set()

        process = MirrorProcess("clf", 1, 1)
        mirror = Mirror("clf", 16, 1 << 20, lambda v: model if v == 1 else None, done, process)
        answer = np.zeros((2, 10), np.float32)
        try:
            assert mirror.offer(Job(1, 2, True, images(2, seed=7), OUTPUT, answer))  # a canary check
            while not reports:
                ran.clear()
                await ran.wait()
            assert process.starts == 0  # the check ran without a child
            for seed in (8, 9, 10):  # a shadow's jobs, offered in one turn: one batch
                assert mirror.offer(Job(1, 2, False, images(2, seed=seed), OUTPUT, answer))
            while len(reports) < 2:
                ran.clear()
                await ran.wait()
        finally:
            await mirror.stop()
        feeds = {"image": np.concatenate([images(2, seed=s)["image"] for s in (8, 9, 10)])}
        expected = (await model.batcher.submit(feeds, [OUTPUT]))[OUTPUT]
        return reports, process, expected

    reports, process, expected = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    (check, check_jobs, check_output), (shadow, shadow_jobs, shadow_output) = reports
    assert check and check_jobs == 1 and check_output is not None and check_output.shape == (2, 10)
    assert not shadow and shadow_jobs == 3 and process.starts == 1 and not process.running
    assert shadow_output is not None
    np.testing.assert_array_equal(shadow_output, expected)


def test_a_child_that_cannot_be_started_fails_the_batch_and_backs_off(
    registry: ModelRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirror_process, "RESTART_BACKOFF", (0.05, 1.0))

    async def scenario() -> tuple[MirrorProcess, float]:
        await registry.start()
        process = MirrorProcess("clf", 1, 1)
        process._argv = [str(tmp_path / "no-such-python")]  # what exec cannot run
        with pytest.raises(Unavailable, match="could not start"):
            await process.run(registry.get("clf"), images(1, seed=11), OUTPUT)
        return process, process._retry_at - asyncio.get_running_loop().time()

    process, wait = asyncio.run(asyncio.wait_for(scenario(), DEADLINE_S))
    assert process.starts == 0 and process.deaths == 1 and not process.running
    assert 0 < wait <= 0.05  # the next try waits for the back-off
