"""Model repository: discovers ``<root>/<name>/<version>/model.onnx``, loads and validates each
version into an onnxruntime session, and runs validated inference off the event loop.

Protocol-agnostic: adapters hand in numpy arrays and get numpy arrays back; every problem with a
request is a :mod:`service.errors` exception whose message says what was expected and what came.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .batching import Batcher, BatchingConfig, batchable
from .errors import DeadlineExceeded, Internal, InvalidArgument, NotFound, Unavailable
from .metrics import Metrics
from .runtime import Runtime
from .settings import Settings
from .tensors import check_finite

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"

# onnxruntime type strings → numpy dtypes (tensor types a numpy client can send).
_ORT_DTYPES: dict[str, np.dtype] = {
    f"tensor({ort_name})": np.dtype(np_name)
    for ort_name, np_name in {
        "float": "float32",
        "double": "float64",
        "float16": "float16",
        "uint8": "uint8",
        "int8": "int8",
        "uint16": "uint16",
        "int16": "int16",
        "uint32": "uint32",
        "int32": "int32",
        "uint64": "uint64",
        "int64": "int64",
        "bool": "bool",
    }.items()
}


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a model input or output; -1 marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    def shape_str(self) -> str:
        """Shape for messages: ``[N, 1, 28, 28]`` (N = batch axis, ? = other dynamic dims)."""
        dims = ["N" if i == 0 and d < 0 else "?" if d < 0 else str(d) for i, d in enumerate(self.shape)]
        return "[" + ", ".join(dims) + "]"


def _spec(arg: ort.NodeArg, what: str) -> TensorSpec:
    dtype = _ORT_DTYPES.get(arg.type)
    if dtype is None:
        raise ValueError(f"{what} '{arg.name}' has unsupported type {arg.type}")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
    return TensorSpec(arg.name, dtype, shape)


def _json_or_none(text: str | None) -> object:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


class _Lazy:
    """``input 'NAME' of MODEL`` for error messages, formatted only when one is raised."""

    __slots__ = ("name", "model")

    def __init__(self, name: str, model: object) -> None:
        self.name, self.model = name, model

    def __str__(self) -> str:
        return f"input '{self.name}' of {self.model}"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


class Model:
    """One loaded model version: its tensors, ONNX metadata, provider and session."""

    def __init__(
        self,
        name: str,
        version: int,
        path: Path,
        session: ort.InferenceSession,
        provider: str,
        max_batch_size: int,
        executor: ThreadPoolExecutor | None = None,
        batching: BatchingConfig | None = None,
        metrics: Metrics | None = None,
        max_in_flight: int = 1,
        inline_compute_us: int = 0,
    ) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.provider = provider
        self.inputs = [_spec(a, "input") for a in session.get_inputs()]
        self.outputs = [_spec(a, "output") for a in session.get_outputs()]
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        if not self.inputs or not self.outputs:
            raise ValueError("model needs at least one input and one output")
        if any(not s.shape for s in self.inputs):
            raise ValueError("every input needs a batch axis (rank >= 1)")
        # A static leading dimension caps the batch.
        static = [s.shape[0] for s in self.inputs if s.shape[0] > 0]
        self.max_batch_size = min([max_batch_size, *static])
        self._check_declared()
        self._session = session
        self._executor = executor
        #: Every inference goes through this queue (dynamic batching, or one request per batch).
        self.batcher = Batcher(
            str(self),
            self.run,
            executor,
            batching or BatchingConfig(),
            max_in_flight,
            metrics.for_model(name, version) if metrics is not None else None,
            batchable(self.inputs, self.outputs),
            inline_compute_us,
        )
        self._warm_up()

    def __repr__(self) -> str:
        return f"model '{self.name}' version {self.version}"

    def _warm_up(self) -> None:
        """Run the model on zeros before it serves (onnxruntime's first call is slow) and time
        1 and 16 rows: the batcher's cost model (which batches are cheap enough to run inline)."""
        if any(d < 0 for s in self.inputs for d in s.shape[1:]):
            return  # a dynamic non-batch dimension: no canonical input to try
        names = [s.name for s in self.outputs]
        timings: dict[int, float] = {}
        try:
            for rows in (1, 16):
                if rows > self.max_batch_size or (rows > 1 and not self.batcher.batching):
                    break
                feeds = {s.name: np.zeros((rows, *s.shape[1:]), s.dtype) for s in self.inputs}
                best = float("inf")
                for _ in range(3):
                    start = time.perf_counter()
                    self._session.run(names, feeds)
                    best = min(best, time.perf_counter() - start)
                timings[rows] = best
        except Exception as exc:  # noqa: BLE001 - zeros may be invalid input for some graphs
            log.warning("warm-up run failed", extra={"model": self.name, "version": self.version, "error": str(exc)})
            return
        per_row = (timings[16] - timings[1]) / 15 if 16 in timings else 0.0
        self.batcher.calibrate(timings[1] - per_row, per_row)

    # -- metadata read from the ONNX file (keys written by training/export) -----------------

    def _declared(self, key: str) -> list[dict]:
        """Metadata ``inputs``/``outputs``: JSON list of {name, dtype, shape, unit, ...}."""
        parsed = _json_or_none(self.metadata.get(key))
        return [t for t in parsed if isinstance(t, dict)] if isinstance(parsed, list) else []

    def _check_declared(self) -> None:
        """Tensors declared in the metadata must be the graph's own (catches export mix-ups)."""
        for key, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            declared = self._declared(key)
            if not declared:
                continue
            want = [
                (str(t.get("name")), str(t.get("dtype")), tuple(d if isinstance(d, int) else -1 for d in t.get("shape", [])))
                for t in declared
            ]
            have = [(s.name, s.dtype.name, s.shape) for s in specs]
            if want != have:
                raise ValueError(f"metadata '{key}' declares {want} but the graph has {have}")

    @cached_property
    def class_names(self) -> list[str]:
        """Class labels in output order: metadata ``class_names`` (a JSON list)."""
        parsed = _json_or_none(self.metadata.get("class_names"))
        return [str(x) for x in parsed] if isinstance(parsed, list) else []

    @cached_property
    def units(self) -> dict[str, str]:
        """Tensor name → physical unit, from the ``unit`` of each declared input/output."""
        return {
            str(t["name"]): str(t["unit"])
            for key in ("inputs", "outputs")
            for t in self._declared(key)
            if t.get("name") and t.get("unit")
        }

    @cached_property
    def metrics(self) -> dict[str, float]:
        """The numeric entries of metadata ``metrics`` (a JSON object)."""
        parsed = _json_or_none(self.metadata.get("metrics"))
        if not isinstance(parsed, dict):
            return {}
        return {
            str(k): float(v)
            for k, v in parsed.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    @property
    def description(self) -> str:
        return self.metadata.get("description", "")

    # -- inference -------------------------------------------------------------------------

    def validate(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check names, dtypes, shapes, batch size and finiteness; return the session feeds."""
        expected = [s.name for s in self.inputs]
        missing = [n for n in expected if n not in inputs]
        unexpected = [n for n in inputs if n not in expected]
        if missing or unexpected:
            raise InvalidArgument(f"{self} expects inputs {expected}, got {sorted(inputs)}")
        batch: int | None = None
        feeds: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            array = inputs[spec.name]
            what = _Lazy(spec.name, self)
            if not isinstance(array, np.ndarray):
                raise InvalidArgument(f"{what} must be an array, got {type(array).__name__}")
            if array.dtype != spec.dtype:
                raise InvalidArgument(f"{what} expects dtype {spec.dtype}, got {array.dtype}")
            if array.ndim != len(spec.shape) or any(
                want >= 0 and got != want for want, got in zip(spec.shape, array.shape)
            ):
                raise InvalidArgument(
                    f"{what} expects shape {spec.shape_str()}, got {list(array.shape)}"
                )
            if batch is not None and array.shape[0] != batch:
                raise InvalidArgument(
                    f"{what} has batch size {array.shape[0]}, other inputs have {batch}"
                )
            batch = array.shape[0]
            if batch == 0:
                raise InvalidArgument(f"{what} is an empty batch; expected 1 to {self.max_batch_size} items")
            if batch > self.max_batch_size:
                raise InvalidArgument(
                    f"{what} has a batch of {batch}, over the maximum of {self.max_batch_size}; "
                    "split it into smaller requests"
                )
            check_finite(array, what)
            feeds[spec.name] = np.ascontiguousarray(array)
        return feeds

    def _output_names(self, outputs: Sequence[str] | None) -> list[str]:
        names = [s.name for s in self.outputs]
        if outputs is None:
            return names
        unknown = [n for n in outputs if n not in names]
        if unknown:
            raise InvalidArgument(f"{self} has outputs {names}, got a request for {unknown}")
        return list(outputs)

    def run(self, feeds: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
        """Run the session synchronously on already validated feeds."""
        try:
            results = self._session.run(output_names, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise Internal(f"inference failed in {self}: {exc}") from exc
        return dict(zip(output_names, results))

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Validate ``inputs``, queue them in this version's batcher (:mod:`service.batching`)
        and return the named outputs: this request's rows only, even when batched with others.

        Raises DeadlineExceeded when ``timeout`` seconds pass first, ResourceExhausted when the
        queue is full.
        """
        feeds = self.validate(inputs)
        names = self._output_names(outputs)
        if timeout is not None and timeout <= 0:
            raise DeadlineExceeded(f"deadline already passed before {self} ran")
        return await self.batcher.submit(feeds, names, timeout)

    def close(self) -> None:
        """Stop queueing: waiting requests get UNAVAILABLE; running batches finish."""
        self.batcher.close()


class ModelRepository:
    """All model versions under ``root``; a version that fails to load is recorded, not fatal."""

    def __init__(
        self,
        root: Path,
        settings: Settings,
        runtime: Runtime | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.runtime = runtime if runtime is not None else Runtime(settings)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.attach(self)
        self.failed: dict[str, str] = {}
        self._models: dict[str, dict[int, Model]] = {}
        self._loaded = False
        self._executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load every ``<name>/<version>/model.onnx``; record failures in :attr:`failed`.

        Raises FileNotFoundError when ``root`` is not a directory (a configuration error).
        """
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if model_dir.name.startswith((".", "_")):
                continue
            self._load_model_dir(model_dir)
        self._loaded = True

    def _fail(self, key: str, reason: str) -> None:
        self.failed[key] = reason
        log.error("model failed to load", extra={"model": key, "error": reason})

    def _load_model_dir(self, model_dir: Path) -> None:
        name = model_dir.name
        version_dirs = [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
        if not version_dirs:
            self._fail(name, f"no version directories; expected {model_dir}/<version>/{MODEL_FILE}")
            return
        for version_dir in sorted(version_dirs, key=lambda p: p.name):
            key = f"{name}/{version_dir.name}"
            if not version_dir.name.isdigit() or int(version_dir.name) < 1:
                self._fail(key, f"version directory must be a positive integer, got {version_dir.name!r}")
                continue
            path = version_dir / MODEL_FILE
            if not path.is_file():
                self._fail(key, f"{path} is missing")
                continue
            try:
                model = self._load_version(name, int(version_dir.name), path)
            except Exception as exc:  # any broken file must not take the others down
                self._fail(key, f"{type(exc).__name__}: {exc}")
                continue
            self._models.setdefault(name, {})[model.version] = model
            log.info(
                "model loaded",
                extra={
                    "model": name,
                    "version": model.version,
                    "provider": model.provider,
                    "inputs": [f"{s.name}:{s.dtype}{list(s.shape)}" for s in model.inputs],
                    "outputs": [f"{s.name}:{s.dtype}{list(s.shape)}" for s in model.outputs],
                    "batching": {**model.batcher.config.describe(), "enabled": model.batcher.batching},
                },
            )

    def _load_version(self, name: str, version: int, path: Path) -> Model:
        batching = BatchingConfig.resolve(self.settings, name, path.parent.parent)
        session, provider = self.runtime.session(path)
        return Model(
            name,
            version,
            path,
            session,
            provider,
            self.settings.max_batch_size,
            self._executor,
            batching,
            self.metrics,
            self.settings.inference_workers,
            self.settings.inline_compute_us,
        )

    # -- lookup ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once loading finished with at least one model version to serve."""
        return self._loaded and bool(self._models)

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def models(self) -> list[Model]:
        snapshot = self._models  # read once: a reload swaps in a whole new dict
        return [snapshot[n][v] for n in sorted(snapshot) for v in sorted(snapshot[n])]

    def snapshot(self) -> dict[str, dict[int, Model]]:
        """The served versions, name → version → model. Once published, a snapshot is never
        mutated: :mod:`service.reload` builds a new one and :meth:`publish` swaps it in."""
        return self._models

    def publish(self, models: dict[str, dict[int, Model]], failed: dict[str, str]) -> None:
        """Serve ``models`` from now on (one assignment: readers see the old set or the new)."""
        self.failed = failed
        self._models = models

    def get(self, name: str, version: int | str | None = None) -> Model:
        """The model version asked for; ``None`` or ``""`` → the latest version."""
        if not self._loaded:
            raise Unavailable("the model repository is still loading; retry shortly")
        if not name:
            raise InvalidArgument(f"a model name is required; available models: {self.names()}")
        versions = self._models.get(name)
        if not versions:
            reasons = {k: v for k, v in self.failed.items() if k == name or k.startswith(name + "/")}
            why = f" (failed to load: {reasons})" if reasons else ""
            raise NotFound(f"model '{name}' not found{why}; available models: {self.names()}")
        if version is None or version == "":
            return versions[max(versions)]
        if isinstance(version, str):
            try:
                version = int(version)
            except ValueError:
                raise InvalidArgument(f"model version must be an integer, got {version!r}") from None
        if version not in versions:
            raise NotFound(
                f"version {version} of model '{name}' not found; available versions: {sorted(versions)}"
            )
        return versions[version]

    def close(self) -> None:
        """Stop the queues and inference threads (after the server stopped taking calls)."""
        for model in self.models():
            model.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

