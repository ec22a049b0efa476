"""The comparator's figures and the mirror's bounded queue, in process (a real registry and model)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from fixtures.onnx_models import image_classifier, save

from service.core.registry import ModelRegistry, ModelVersion
from service.rollout.compare import Agreement, compare
from service.rollout.mirror import Job, Mirror
from service.settings import Settings


def test_classifier_agreement_is_argmax_and_mean_abs_diff() -> None:
    primary = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], np.float32)
    other = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.3, 0.3, 0.4]], np.float32)
    result = compare(primary, other, tolerance=0.05)
    assert result.classifier and result.agreed.tolist() == [True, False, True]
    np.testing.assert_allclose(result.abs_diff, [0.2 / 3, 0.8 / 3, 0.0], atol=1e-6)
    pair = Agreement("m", 2, 1)
    pair.add(result)
    figures = pair.as_dict()
    assert figures["kind"] == "classifier" and figures["rows"] == 3
    assert figures["agreement"] == 2 / 3
    assert abs(figures["mean_abs_diff"] - (1.0 / 3) / 3) < 1e-6
    assert "mean_relative_error" not in figures


def test_regression_agreement_is_within_the_relative_tolerance() -> None:
    primary = np.array([[100.0], [200.0], [0.0]], np.float32)
    other = np.array([[104.0], [220.0], [0.0]], np.float32)
    result = compare(primary, other, tolerance=0.05)
    assert not result.classifier and result.agreed.tolist() == [True, False, True]
    np.testing.assert_allclose(result.abs_diff, [4.0, 20.0, 0.0])
    np.testing.assert_allclose(result.rel_error, [0.04, 0.1, 0.0], rtol=1e-6)
    pair = Agreement("m", 1, 2)
    pair.add(result)
    figures = pair.as_dict()
    assert figures["kind"] == "regression" and figures["max_abs_diff"] == 20.0
    assert abs(figures["mean_relative_error"] - 0.14 / 3) < 1e-6


def test_mirror_runs_jobs_and_drops_past_its_capacity(tmp_path: Path) -> None:
    """Jobs offered in one event-loop turn beyond the capacity are dropped and counted; the queued
    ones run on the target version in one batch and report its output."""
    save(image_classifier(0), tmp_path, "clf", 1)
    registry = ModelRegistry(tmp_path, Settings(model_repository=tmp_path, provider="cpu"))

    async def scenario() -> tuple[Mirror, list[tuple[int, np.ndarray | None]], np.ndarray]:
        await registry.start()
        target: ModelVersion = registry.get("clf")
        reports: list[tuple[int, np.ndarray | None]] = []
        finished = asyncio.Event()

        def done(jobs: list[Job], output: np.ndarray | None, error: BaseException | None) -> None:
            reports.append((len(jobs), output))
            finished.set()

        mirror = Mirror("clf", 3, 1 << 20, lambda v: target if v == 1 else None, done)
        x = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28), dtype=np.uint8)
        answer = np.zeros((2, 10), np.float32)
        offered = [mirror.offer(Job(1, 2, False, {"image": x}, "probabilities", answer)) for _ in range(5)]
        assert offered == [True, True, True, False, False]
        assert mirror.dropped["queue_full"] == 2 and mirror.depth == 3
        await asyncio.wait_for(finished.wait(), 60)
        expected = (await target.batcher.submit({"image": np.concatenate([x] * 3)}, ["probabilities"]))["probabilities"]
        await mirror.stop()
        return mirror, reports, expected

    try:
        mirror, reports, expected = asyncio.run(scenario())
    finally:
        registry.close()
    assert [n for n, _ in reports] == [3] and mirror.batches == 1 and mirror.depth == 0
    output = reports[0][1]
    assert output is not None
    np.testing.assert_array_equal(output, expected)


def test_mirror_drops_past_its_bytes() -> None:
    async def scenario() -> Mirror:
        mirror = Mirror("clf", 100, 1000, lambda v: None, lambda jobs, output, error: None)
        feeds = {"x": np.zeros((1, 100), np.float32)}  # 400 bytes + a 40-byte answer
        offered = [mirror.offer(Job(1, 2, False, feeds, "y", np.zeros((1, 10), np.float32))) for _ in range(3)]
        assert offered == [True, True, False]
        await mirror.stop()
        return mirror

    mirror = asyncio.run(scenario())
    assert mirror.dropped == {"queue_full": 0, "queue_bytes": 1, "not_served": 0}
