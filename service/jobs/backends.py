"""Where a batch job's chunks are computed: a server (``--server``) or in-process (``--local``).

Both resolve the model version once (the latest, unless one is named) and pin it for the whole job,
and both return the model's raw outputs, so a job gives the same bytes either way:

* :class:`RemoteBackend` streams image chunks over ``ClassifyStream`` (at most a few chunks in
  flight) and sends populations with ``PredictProfit``, through :mod:`service.client`;
* :class:`LocalBackend` loads the pinned version with the server's own code
  (:class:`service.core.local.LocalModel`: same onnxruntime session options, same admission and
  checks, same pixel conversion) and runs each chunk directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from ..client import RetryPolicy, RpcError, ServingClient
from ..core.tasks import DEFAULT_MODELS


class BackendError(Exception):
    """The model cannot run this job (unknown model, wrong kind of model, bad settings)."""


@dataclass
class ModelSpec:
    """What a job needs to know about the pinned model version."""

    name: str
    version: int
    input_dtype: str
    input_shape: tuple[int, ...]  # -1 = dynamic
    class_names: tuple[str, ...]
    max_batch_size: int


class Backend:
    mode: str
    model: ModelSpec

    def run(self, task: str, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """One output array per input chunk, in order: probabilities float32 [n, classes] for
        ``classify``, profits float32 [n] for ``profit``."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _check_kind(task: str, spec: ModelSpec) -> None:
    rank = len(spec.input_shape)
    if task == "classify" and rank != 4:
        raise BackendError(
            f"model '{spec.name}' takes input {list(spec.input_shape)}; classify needs an image classifier "
            "([N, 1, 28, 28] images)"
        )
    if task == "profit" and spec.input_shape[1:] != (1,):
        raise BackendError(f"model '{spec.name}' takes input {list(spec.input_shape)}; profit needs [N, 1] populations")


class RemoteBackend(Backend):
    """A server reached with :class:`~service.client.ServingClient`."""

    mode = "remote"
    stream_chunks = 64  # chunks per ClassifyStream call (the job reopens streams as it goes)

    def __init__(
        self,
        client: ServingClient,
        task: str,
        model: str | None,
        version: int = 0,
        *,
        chunk_timeout: float = 60.0,
        connect_timeout: float = 30.0,
    ) -> None:
        self.client = client
        self.chunk_timeout = chunk_timeout
        name = model or DEFAULT_MODELS[task]
        try:
            info = client.metadata(name, version, timeout=connect_timeout)
        except RpcError as exc:
            if exc.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                raise BackendError(str(exc)) from None
            raise
        if not info.inputs or not info.outputs:
            raise BackendError(f"model '{name}' reports no inputs or outputs")
        self.model = ModelSpec(
            name=info.name,
            version=info.version,
            input_dtype=info.inputs[0].dtype,
            input_shape=tuple(info.inputs[0].shape),
            class_names=info.class_names,
            max_batch_size=info.max_batch_size,
        )
        _check_kind(task, self.model)

    def run(self, task: str, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        if task == "classify":
            # One stream per call; its deadline grows with the chunks it may carry (the job caps that).
            results = self.client.classify_stream(
                chunks,
                model=self.model.name,
                version=self.model.version,
                timeout=self.chunk_timeout * self.stream_chunks,
            )
            for result in results:
                yield result.probabilities
        else:
            for chunk in chunks:
                yield self.client.predict_profit(
                    chunk,
                    model=self.model.name,
                    version=self.model.version,
                    batch_size=max(len(chunk), 1),
                    timeout=self.chunk_timeout,
                )

    def close(self) -> None:
        self.client.close()


class LocalBackend(Backend):
    """One model version loaded in this process with onnxruntime (the server's own code:
    :class:`service.core.local.LocalModel`)."""

    mode = "local"

    def __init__(
        self, repository: Path, task: str, model: str | None, version: int = 0, provider: str | None = None
    ) -> None:
        from ..core.local import LocalModel, resolve_version  # onnxruntime: only for --local
        from ..core.runtime import ProviderUnavailable
        from ..errors import ServingError
        from ..settings import Settings

        name = model or DEFAULT_MODELS[task]
        try:
            settings = Settings(model_repository=Path(repository))
            if provider:  # else SERVING_PROVIDER or the default
                settings = Settings(model_repository=Path(repository), provider=provider)
            if not settings.model_repository.is_dir():
                raise FileNotFoundError(f"model repository {settings.model_repository} is not a directory")
            key, path = resolve_version(settings.model_repository, name, version)
        except ServingError as exc:
            raise BackendError(str(exc)) from None
        except (FileNotFoundError, ValueError) as exc:
            raise BackendError(f"cannot load the model repository {repository}: {exc}") from exc
        try:
            self._model = LocalModel.open(path, key, settings)
        except ProviderUnavailable as exc:
            raise BackendError(f"cannot load the model repository {repository}: {exc}") from exc
        except Exception as exc:  # onnxruntime's own exception types, a contract that does not hold
            raise BackendError(f"cannot load {key.name}/{key.version}/model.onnx: {type(exc).__name__}: {exc}") from exc
        spec = self._model.spec
        self.model = ModelSpec(
            name=spec.name,
            version=spec.version,
            input_dtype=spec.inputs[0].dtype.name,
            input_shape=spec.inputs[0].shape,
            class_names=tuple(spec.class_names),
            max_batch_size=spec.max_rows,
        )
        _check_kind(task, self.model)

    def run(self, task: str, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        from ..errors import ServingError

        for chunk in chunks:
            try:
                if task == "classify":
                    yield self._model.classify(chunk)
                else:
                    yield self._model.regress(chunk.reshape(-1, 1))
            except ServingError as exc:
                raise BackendError(str(exc)) from None

    def close(self) -> None:
        self._model.close()


TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the server was unreachable, busy, or too slow (inference is idempotent)."""
    return isinstance(exc, RpcError) and exc.code in TRANSIENT


def connect_retry(attempts: int) -> RetryPolicy:
    """UNAVAILABLE retries for single calls (metadata, PredictProfit) made by a batch job."""
    return RetryPolicy(attempts=max(1, attempts), initial_backoff=0.2, max_backoff=5.0)
