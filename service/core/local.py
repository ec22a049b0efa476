"""One model version run in this process, without a server: the batch job's ``--local`` backend
and the Ray pipeline's actors. Same session options, same admission and checks, same task logic
as the server (no batcher: the caller sends whole chunks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import NotFound
from ..settings import Settings
from . import tasks
from .dataplane import predict
from .discovery import scan
from .runner import Runner, open_model
from .runtime import Runtime
from .spec import ModelKey, ModelSpec


def resolve_version(root: Path, name: str, version: int = 0) -> tuple[ModelKey, Path]:
    """The model file of ``name`` version ``version`` (0 = the latest on disk); NotFound names
    what exists."""
    found = scan(root)
    if found is None:
        raise NotFound(f"model repository {root} cannot be read")
    versions = found.found.get(name)
    if not versions:
        raise NotFound(f"model '{name}' not found in {root}; available models: {sorted(found.found)}")
    version = version or max(versions)
    path = versions.get(version)
    if path is None or not path.is_file():
        raise NotFound(f"version {version} of model '{name}' not found; available versions: {sorted(versions)}")
    return ModelKey(name, version), path


class LocalModel:
    """A loaded version: its contract and runner."""

    def __init__(self, spec: ModelSpec, runner: Runner) -> None:
        self.spec = spec
        self.runner = runner

    @classmethod
    def open(cls, path: Path, key: ModelKey, settings: Settings) -> LocalModel:
        """Load ``path`` with ``settings``' provider and threads (ProviderUnavailable,
        ValueError & co when unusable)."""
        spec, runner = open_model(Runtime(settings), path, key, settings.max_request_rows)
        return cls(spec, runner)

    @property
    def provider(self) -> str:
        return self.runner.provider

    def classify(self, images: np.ndarray) -> np.ndarray:
        """Probabilities float32 [n, classes] of uint8 (0–255) or float (0–1) images."""
        image, output = tasks.classifier_io(self.spec)
        arrays = {image.name: tasks.model_pixels(images, image.dtype)}
        return predict(self.spec, self.runner, arrays, [output.name])[output.name]

    def regress(self, features: np.ndarray) -> np.ndarray:
        """One value per row of float32 [n, k] features."""
        column, output = tasks.regression_io(self.spec)
        values = predict(self.spec, self.runner, {column.name: features}, [output.name])[output.name]
        return tasks.one_value_per_row(self.spec, output, values, len(features))

    def close(self) -> None:
        self.runner.close()
