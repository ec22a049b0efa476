"""Execution-provider choice (service.core.runtime): auto, cpu, cuda, and no silent fallback."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fixtures.onnx_models import save, slow

from service.core.runtime import CPU, CUDA, ProviderUnavailable, Runtime, select_providers
from service.errors import Internal
from service.settings import Settings

HAS_CUDA = CUDA in ort.get_available_providers()


@pytest.mark.parametrize(
    ("choice", "available", "expected"),
    [
        ("auto", [CPU], [CPU]),
        ("auto", ["AzureExecutionProvider", CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("cpu", [CUDA, CPU], [CPU]),
        ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_select_providers(choice: str, available: list[str], expected: list[str]) -> None:
    assert select_providers(choice, available) == expected


def test_cuda_without_cuda_is_refused() -> None:
    with pytest.raises(
        ProviderUnavailable, match=r"'cuda' was requested but onnxruntime .* reports only \['CPUExecutionProvider'\]"
    ):
        select_providers("cuda", [CPU])
    with pytest.raises(ProviderUnavailable):
        Runtime(Settings(provider="cuda"), available=[CPU])


def test_auto_takes_cuda_whichever_provider_onnxruntime_lists_first() -> None:
    """onnxruntime-gpu builds list TensorRT first: auto still means CUDA (then CPU), never TensorRT."""
    assert select_providers("auto", ["TensorrtExecutionProvider", CUDA, CPU]) == [CUDA, CPU]
    assert select_providers("auto", ["TensorrtExecutionProvider", CPU]) == [CPU]


@pytest.mark.skipif(HAS_CUDA, reason="onnxruntime reports CUDA here (test_auto_runs_on_cuda_with_a_gpu)")
def test_auto_runs_on_the_cpu_without_cuda(tmp_path: Path) -> None:
    runtime = Runtime(Settings(provider="auto"))
    assert runtime.providers == [CPU]
    assert runtime.load(save(slow(layers=1), tmp_path, "m")).provider == CPU  # what the session runs on


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime with CUDA")
def test_auto_runs_on_cuda_with_a_gpu(tmp_path: Path) -> None:
    assert select_providers("auto", ort.get_available_providers())[0] == CUDA
    assert Runtime(Settings(provider="auto")).load(save(slow(layers=1), tmp_path, "m")).provider == CUDA


def test_terminate_ends_a_run_in_progress(tmp_path: Path) -> None:
    """What the registry does at stop once the grace is over: an onnxruntime run of many seconds
    ends at the next operator with Internal (onnxruntime's terminate flag), and the runner then
    refuses new runs."""
    path = save(slow(layers=400, width=64), tmp_path, "slow")
    runner = Runtime(Settings(provider="cpu")).load(path)
    x = {"x": np.full((100_000, 1), 0.5, np.float32)}
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            runner.run(x, ["y"])
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    while not runner._running and thread.is_alive():  # the run has registered its options
        time.sleep(0.001)
    runner.terminate()
    thread.join()
    assert len(outcome) == 1 and isinstance(outcome[0], Internal), outcome
    assert "terminate" in str(outcome[0])
    with pytest.raises(Internal, match="was stopped"):
        runner.run({"x": np.zeros((1, 1), np.float32)}, ["y"])


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_intra_op_threads_is_the_session_thread_pool(tmp_path: Path) -> None:
    """onnxruntime starts intra_op_threads - 1 threads of its own per session (the calling thread
    is the last one): counted in /proc, and read back from the session the server would run."""
    path = save(slow(layers=1), tmp_path, "m")
    added = {}
    runners = []  # kept alive: a freed session takes its threads with it
    for threads in (1, 4):
        before = _threads()
        runner = Runtime(Settings(provider="cpu", intra_op_threads=threads)).load(path)
        runners.append(runner)
        added[threads] = _threads() - before
        assert runner._live().get_session_options().intra_op_num_threads == threads
    assert added == {1: 0, 4: 3}
