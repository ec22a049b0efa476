"""Execution-provider choice (service.core.runtime): auto, cpu, cuda, and no silent fallback."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from service.core.runtime import CPU, CUDA, ProviderUnavailable, Runtime, select_providers
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


def test_auto_is_cpu_here() -> None:
    runtime = Runtime(Settings(provider="auto"))
    assert runtime.providers == ([CUDA, CPU] if HAS_CUDA else [CPU])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime with CUDA")
def test_auto_picks_cuda_with_a_gpu() -> None:
    assert select_providers("auto", ort.get_available_providers())[0] == CUDA
