"""onnxruntime sessions and execution-provider choice (``auto`` | ``cpu`` | ``cuda``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from ..settings import Settings
from .runner import Runner

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ProviderUnavailable(RuntimeError):
    """The requested execution provider cannot be used; the server must not start."""


def select_providers(choice: str, available: Sequence[str]) -> list[str]:
    """Providers to hand onnxruntime, most preferred first.

    ``auto`` → CUDA (with CPU behind it for unsupported ops) when onnxruntime reports CUDA,
    else CPU. ``cpu`` → CPU. ``cuda`` → CUDA, or :class:`ProviderUnavailable` when onnxruntime
    does not report it: no silent CPU fallback.
    """
    if choice == "cpu":
        return [CPU]
    if choice == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    if choice == "cuda":
        if CUDA not in available:
            raise ProviderUnavailable(
                f"execution provider 'cuda' was requested but onnxruntime {ort.__version__} "
                f"reports only {list(available)}; install onnxruntime-gpu with a working CUDA "
                "driver, or start with --provider auto/cpu"
            )
        return [CUDA, CPU]
    raise ValueError(f"provider must be one of auto, cpu, cuda; got {choice!r}")


def session_options(intra_op_threads: int, inter_op_threads: int) -> ort.SessionOptions:
    """Every session's options: the threads asked for, all graph optimisations, no spinning."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: the server shares its cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class Runtime:
    """Creates one InferenceSession per model version with the chosen providers and threads."""

    def __init__(self, settings: Settings, available: Sequence[str] | None = None) -> None:
        self.choice = settings.provider
        self.available = list(ort.get_available_providers() if available is None else available)
        self.providers = select_providers(self.choice, self.available)
        self._settings = settings
        log.info(
            "execution providers selected",
            extra={"choice": self.choice, "providers": self.providers, "available": self.available},
        )

    def _options(self) -> ort.SessionOptions:
        return session_options(self._settings.intra_op_threads, self._settings.inter_op_threads)

    def load(self, path: Path, label: str = "the model", providers: Sequence[str] | None = None) -> Runner:
        """A :class:`Runner` over ``path`` on the provider that actually runs it (``providers``:
        this model's own, e.g. CPU for a config.pbtxt instance_group of KIND_CPU)."""
        session, active = self.session(path, providers)
        return Runner(session, active, label)

    def session(self, path: Path, providers: Sequence[str] | None = None) -> tuple[ort.InferenceSession, str]:
        """Load ``path``; return the session and the provider that actually runs it."""
        wanted = list(providers) if providers else self.providers
        session = ort.InferenceSession(str(path), self._options(), providers=wanted)
        active = session.get_providers()[0]
        if active != wanted[0]:
            if self.choice == "cuda":
                raise ProviderUnavailable(
                    f"{path}: onnxruntime could not initialise {wanted[0]} "
                    f"(session runs on {active}); refusing a silent fallback"
                )
            log.warning("provider fallback", extra={"model_path": str(path), "wanted": wanted[0], "active": active})
        return session, active
