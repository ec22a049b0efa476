"""One onnxruntime session: runs feeds that the data plane has already admitted and checked."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from ..errors import Internal
from .spec import ModelKey, ModelSpec

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


class Runner:
    """An InferenceSession and the execution provider that runs it."""

    def __init__(self, session: ort.InferenceSession, provider: str, label: str = "the model") -> None:
        self._session: ort.InferenceSession | None = session
        self.provider = provider
        self.label = label
        #: The options of the runs in progress (any thread), so :meth:`terminate` can end them.
        self._running: set[ort.RunOptions] = set()
        self._terminated = False

    def spec(self, key: ModelKey, max_request_rows: int) -> ModelSpec:
        """The contract read from the session's graph and metadata (ValueError when unusable)."""
        session = self._live()
        metadata: Mapping[str, str] = session.get_modelmeta().custom_metadata_map
        return ModelSpec.from_graph(key, session.get_inputs(), session.get_outputs(), metadata, max_request_rows)

    def _live(self) -> ort.InferenceSession:
        if self._session is None:
            raise Internal(f"{self.label} was unloaded")
        return self._session

    def run(self, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> Arrays:
        """Run the session synchronously; onnxruntime's failures become Internal."""
        session = self._live()
        options = ort.RunOptions()
        self._running.add(options)  # (set.add/discard are atomic under the GIL)
        try:
            if self._terminated:
                raise Internal(f"{self.label} was stopped")
            results = session.run(list(names), dict(feeds), options)
        except Internal:
            raise
        except Exception as exc:  # onnxruntime raises its own exception types
            raise Internal(f"inference failed in {self.label}: {exc}") from exc
        finally:
            self._running.discard(options)
        return dict(zip(names, results))

    def terminate(self) -> None:
        """End the runs in progress (onnxruntime stops between two operators and raises) and
        refuse new ones: the server is stopping and nobody waits for their answers any more."""
        self._terminated = True
        for options in list(self._running):
            options.terminate = True

    def warm_up(self, spec: ModelSpec, rows: Sequence[int] = (1, 16)) -> dict[int, float]:
        """Run zeros of each row count three times (onnxruntime's first call is slow); return the
        best seconds per row count, or {} when the graph has no canonical input to try (a dynamic
        non-batch dimension) or refuses zeros."""
        if any(d < 0 for s in spec.inputs for d in s.shape[1:]):
            return {}
        timings: dict[int, float] = {}
        session = self._live()
        try:
            for count in rows:
                feeds = {s.name: np.zeros((count, *s.shape[1:]), s.dtype) for s in spec.inputs}
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    session.run(spec.output_names, feeds)
                    best = min(best, time.perf_counter() - start)
                timings[count] = best
        except Exception as exc:
            log.warning("warm-up run failed", extra={"model": spec.name, "version": spec.version, "error": str(exc)})
            return {}
        return timings

    def close(self) -> None:
        """Drop the session (frees its memory now rather than at garbage collection)."""
        self._session = None


def open_model(runtime: Runtime, path: Path, key: ModelKey, max_request_rows: int) -> tuple[ModelSpec, Runner]:
    """One version's contract and runner (no batcher): for the registry, and for in-process runs
    (the batch job's ``--local``, Ray actors). ValueError & co when the file is unusable."""
    runner = runtime.load(path, f"model '{key.name}' version {key.version}")
    try:
        return runner.spec(key, max_request_rows), runner
    except Exception:
        runner.close()
        raise
