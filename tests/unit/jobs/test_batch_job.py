"""The batch job (service.jobs) in process, without a server: transient errors against an
in-process fake are retried without losing rows, exhausted retries keep the unfinished job, memory
stays bounded on the local path, the progress line, the CLI's argument check.
(Against the real server and as subprocesses: tests/e2e/test_batch_job.py.)"""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fixtures.fake_serving import FakeModelService, fake_probabilities, fake_server
from fixtures.servers import MODELS

from service.client import connect
from service.jobs import Job, JobConfig, JobError, LocalBackend, RemoteBackend
from service.jobs.__main__ import main
from service.jobs.inputs import NpyImages
from service.jobs.progress import Progress

rng = np.random.default_rng(6)
SMALL = rng.integers(0, 256, size=(100, 28, 28), dtype=np.uint8)


def quiet(output: Path) -> JobConfig:
    return JobConfig(output=output, chunk_size=20, progress="none", sync=False, backoff=0.01, log=lambda m: None)


def test_transient_errors_are_retried_without_losing_rows(tmp_path: Path) -> None:
    fake = FakeModelService()
    fake.stream_cut_after = 2  # the first stream dies after two answers
    np.save(tmp_path / "x.npy", SMALL)
    messages: list[str] = []
    config = quiet(tmp_path / "out")
    config.log = messages.append
    with fake_server(fake) as address, connect(address) as client:
        summary = Job(
            "classify", NpyImages(tmp_path / "x.npy"), RemoteBackend(client, "classify", "fake_classifier"), config
        ).run()
    assert summary["model"] == {"name": "fake_classifier", "version": 3}
    assert fake.calls["ClassifyStream"] == 2
    assert any("transient error at row 40/100" in m and "UNAVAILABLE" in m for m in messages)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "probabilities.npy"), fake_probabilities(SMALL))


def test_retries_exhausted_keep_the_unfinished_job(tmp_path: Path) -> None:
    fake = FakeModelService()
    fake.fail["ClassifyStream"] = 100
    np.save(tmp_path / "x.npy", SMALL)
    config = quiet(tmp_path / "out")
    config.retries = 2
    with fake_server(fake) as address, connect(address) as client:
        backend = RemoteBackend(client, "classify", "fake_classifier")
        with pytest.raises(JobError, match="giving up after 2 retries at row 0.*re-run the same command"):
            Job("classify", NpyImages(tmp_path / "x.npy"), backend, config).run()
        config.chunk_size = 65
        with pytest.raises(JobError, match="over the largest batch model 'fake_classifier' accepts \\(64\\)"):
            Job("classify", NpyImages(tmp_path / "x.npy"), backend, config).run()
    assert fake.calls["ClassifyStream"] == 3 and not (tmp_path / "out" / "summary.json").exists()


def test_memory_stays_bounded(tmp_path: Path) -> None:
    """40,000 images (31 MB) through the local path: traced Python/numpy memory stays a few MB."""
    np.save(tmp_path / "big.npy", np.zeros((40_000, 28, 28), np.uint8))
    backend = LocalBackend(MODELS, "classify", None)
    config = JobConfig(output=tmp_path / "out", chunk_size=512, progress="none", sync=False, log=lambda m: None)
    tracemalloc.start()
    try:
        Job("classify", NpyImages(tmp_path / "big.npy"), backend, config).run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        backend.close()
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert np.load(tmp_path / "out" / "probabilities.npy", mmap_mode="r").shape == (40_000, 10)


def test_progress_line_has_rate_and_eta() -> None:
    stream = io.StringIO()
    progress = Progress(1000, initial=200, mode="log", stream=stream, interval=0.0)
    progress.update(300)
    progress.close()
    line = stream.getvalue().splitlines()[0]
    assert "500/1,000" in line and "50%" in line and "rows/s" in line and "ETA" in line and "resumed at 200" in line


def test_cli_refuses_missing_mode(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["classify", "x.gz", "-o", "out"])
    assert "one of the arguments --server --local is required" in capsys.readouterr().err
    # (The old name, python -m service.batch, is run for real: tests/e2e/test_batch_job.py.)
