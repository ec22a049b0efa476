"""The data plane: the one request path under every front end.

A front end decodes only what a request *declares* (names, datatypes, shapes) into
:class:`RequestTensor` objects whose payload is not yet turned into arrays, then calls
:meth:`DataPlane.infer`, which

1. **admits** the request against the model's contract: input names, datatypes, shapes, rows
   within ``max_request_rows`` — before anything proportional to the claimed size is allocated;
2. **decodes** the payloads (now bounded) and checks float inputs are finite;
3. **infers** through the model version's batcher, under the caller's deadline and cancellation;

and returns the outputs for the front end to encode. Everything is recorded in the request's
:class:`~service.core.context.RequestContext`, which :meth:`DataPlane.finish` hands to the
observers (metrics, request log) when the front end has answered. Errors are protocol-neutral
(:mod:`service.errors`); each front end maps them to its status codes in one table.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ..settings import Settings
from .context import CARRIER, Carrier, RequestContext
from .datatypes import datatype_of
from .registry import ModelRegistry, ModelVersion, ReloadReport
from .runner import Runner
from .spec import ModelSpec, TensorSpec
from .tensors import MAX_ELEMENTS, MAX_RANK, check_finite, check_shape

if TYPE_CHECKING:
    from ..observability.tracing import Tracing
    from ..rollout.controller import Rollout

Arrays = dict[str, np.ndarray]


class RequestTensor:
    """An input as the request declares it; ``decode()`` builds its array (exactly ``shape``, of
    ``datatype``'s dtype) and is called only once the request has been admitted."""

    __slots__ = ("name", "datatype", "shape", "decode")

    def __init__(self, name: str, datatype: str, shape: tuple[int, ...], decode: Callable[[], np.ndarray]) -> None:
        self.name = name
        self.datatype = datatype
        self.shape = shape
        self.decode = decode


class Observer(Protocol):
    """Reads a finished request's context (metrics, request log, ...)."""

    def finish(self, context: RequestContext) -> None: ...


class _What:
    """``input 'NAME' of model 'M' version V`` for messages, formatted only when one is raised."""

    __slots__ = ("name", "spec")

    def __init__(self, name: str, spec: ModelSpec) -> None:
        self.name, self.spec = name, spec

    def __str__(self) -> str:
        return f"input '{self.name}' of {self.spec}"

    def __format__(self, format_spec: str) -> str:
        return format(str(self), format_spec)


def _what(name: str, spec: ModelSpec) -> _What:
    return _What(name, spec)


def admit(spec: ModelSpec, tensors: Sequence[RequestTensor]) -> int:
    """Check declared names, datatypes, shapes and rows against ``spec``; return the rows.
    InvalidArgument names the first problem. Touches no payload."""
    expected = spec.input_names
    if len(tensors) == 1 and len(expected) == 1 and tensors[0].name in expected:
        return _admit_one(spec, tensors[0], expected[tensors[0].name], -1)  # the usual case
    seen: set[str] = set()
    for tensor in tensors:
        if tensor.name not in expected:
            raise InvalidArgument(
                f"model '{spec.name}' has no input {tensor.name!r}; its inputs are {sorted(expected)}"
            )
        if tensor.name in seen:
            raise InvalidArgument(f"input {tensor.name!r} appears more than once")
        seen.add(tensor.name)
    if len(seen) != len(expected):
        raise InvalidArgument(f"{spec} expects inputs {list(expected)}, got {sorted(seen)}")
    rows = -1
    for tensor in tensors:
        rows = _admit_one(spec, tensor, expected[tensor.name], rows)
    return rows


def _admit_one(spec: ModelSpec, tensor: RequestTensor, want: TensorSpec, rows: int) -> int:
    """One input against its spec; ``rows`` of the inputs before it (-1: none). Its rows."""
    shape = tensor.shape
    if not (shape and len(shape) <= MAX_RANK and min(shape) > 0 and math.prod(shape) <= MAX_ELEMENTS):
        shape = check_shape(shape, _what(tensor.name, spec))  # the full checks, for a clear message
    if tensor.datatype != want.datatype:
        raise InvalidArgument(
            f"{_what(tensor.name, spec)} has datatype {want.datatype}, got {tensor.datatype or '(empty)'}"
        )
    dims = want.shape
    if len(shape) != len(dims) or any(w >= 0 and g != w for w, g in zip(dims, shape)):
        raise InvalidArgument(f"{_what(tensor.name, spec)} expects shape {want.shape_str()}, got {list(shape)}")
    if rows >= 0 and shape[0] != rows:
        raise InvalidArgument(f"{_what(tensor.name, spec)} has batch size {shape[0]}, other inputs have {rows}")
    rows = shape[0]
    if rows == 0:
        raise InvalidArgument(f"{_what(tensor.name, spec)} is an empty batch; expected 1 to {spec.max_rows} items")
    if rows > spec.max_rows:
        raise InvalidArgument(
            f"{_what(tensor.name, spec)} has a batch of {rows}, over the maximum of {spec.max_rows}; "
            "split it into smaller requests"
        )
    return rows


def output_names(spec: ModelSpec, requested: Sequence[str] | None) -> list[str]:
    """The outputs to compute: all (None or empty), else the requested ones, which must exist."""
    names = spec.output_names
    if not requested:
        return names
    unknown = [n for n in requested if n not in names]
    if unknown:
        raise InvalidArgument(f"{spec} has outputs {names}, got a request for {unknown}")
    return list(requested)


def _constant(array: np.ndarray) -> Callable[[], np.ndarray]:
    return lambda: array


def predict(spec: ModelSpec, runner: Runner, arrays: Arrays, outputs: Sequence[str] | None = None) -> Arrays:
    """In-process inference without a server (batch job ``--local``, Ray actors): the same
    admission and checks as :meth:`DataPlane.infer`, then the runner, synchronously."""
    tensors = [RequestTensor(n, datatype_of(a.dtype), a.shape, _constant(a)) for n, a in arrays.items()]
    admit(spec, tensors)
    names = output_names(spec, outputs)
    for name, array in arrays.items():
        if array.dtype.kind == "f":
            check_finite(array, _what(name, spec))
    return runner.run({n: np.ascontiguousarray(a) for n, a in arrays.items()}, names)


class ModelControl(Protocol):
    """Loads and unloads models by request (:class:`ModelRegistry` does, in one process)."""

    async def load(self, name: str) -> ReloadReport: ...

    async def unload(self, name: str) -> ReloadReport: ...


class DataPlane:
    """Model lookup, admission, inference and model control over one :class:`ModelRegistry`.

    ``tracing`` (only with the ``tracing`` setting) is also one of the observers. Three hooks are
    None unless something needs them, so that each costs the request path one attribute check:
    ``headers`` (tracing or a canary: the front ends keep the request's headers / metadata on its
    context), ``router`` (a model has a rollout: unversioned requests are routed) and ``taps``
    (a rollout or capture: the request is remembered for the mirror and capture)."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        observers: Sequence[Observer] = (),
        tracing: Tracing | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.observers = list(observers)
        self.tracing = tracing
        #: Who carries out model control requests: this process's registry, or in a worker of a
        #: supervised server the supervisor, which has every worker do it (service/workers).
        self.control: ModelControl = registry
        self.headers: Carrier | None = CARRIER if tracing is not None else None
        #: The rollout controller (model control, status); set by :meth:`Rollout.bind`.
        self.rollout: Rollout | None = None
        self.router: Rollout | None = None
        self.taps: Rollout | None = None

    # -- health and lookup ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.registry.ready

    def model(self, context: RequestContext | None, name: str, version: int | str | None = None) -> ModelVersion:
        """The version asked for (None/""/0 → latest, or what a rollout routes it to), recorded in
        ``context``."""
        model = self.registry.get(name, version)
        if self.router is not None and not version:
            model = self.router.route(context, model)
        if context is not None:
            context.model = model.spec.name
            context.version = str(model.spec.version)
        return model

    def model_ready(self, name: str, version: int | str | None = None) -> bool:
        """Loaded and served. An unknown model or version, or a repository still loading, is not
        ready (no error); a version that is not an integer is InvalidArgument."""
        try:
            self.registry.get(name, version)
        except (NotFound, Unavailable):
            return False
        return True

    # -- inference --------------------------------------------------------------------------------

    async def infer(
        self,
        context: RequestContext,
        model: ModelVersion,
        inputs: Sequence[RequestTensor],
        outputs: Sequence[str] | None = None,
    ) -> Arrays:
        """Admit, decode, check and run one request; the named outputs (all when None), holding
        this request's rows only, even when batched with others."""
        spec = model.spec
        context.rows = admit(spec, inputs)
        names = output_names(spec, outputs)
        feeds: Arrays = {}
        for tensor in inputs:
            array = tensor.decode()
            if array.dtype.kind == "f":
                check_finite(array, _what(tensor.name, spec))
            feeds[tensor.name] = array
        if self.taps is not None:
            return await self.taps.infer(context, model, feeds, names)
        return await model.batcher.submit(feeds, names, context.remaining(), context)

    def finish(self, context: RequestContext) -> None:
        """The front end has answered: stamp the end and let every observer read the context."""
        context.end = time.perf_counter()
        for observer in self.observers:
            observer.finish(context)

    def close(self) -> None:
        """The server stopped: observers that hold resources (the trace exporter) let go."""
        for observer in self.observers:
            close = getattr(observer, "close", None)
            if close is not None:
                close()

    # -- model control ----------------------------------------------------------------------------

    def _control(self) -> ModelControl:
        if not self.settings.allow_model_control:
            raise FailedPrecondition(
                "model control is off on this server: start it with --allow-model-control true "
                "(env SERVING_ALLOW_MODEL_CONTROL=true) to load/unload models by request, or with "
                "--reload-interval-seconds N to follow the repository directory"
            )
        return self.control

    async def load_model(self, name: str, parameters: dict[str, str] | None = None, who: str = "") -> ReloadReport:
        """(Re)load a model from its directory; FailedPrecondition when a version is rejected. With
        ``parameters``: change its rollout (shadow, canary, promote, rollback; docs/rollout.md),
        recorded as done by ``who``."""
        control = self._control()
        if parameters:
            if self.rollout is None:
                raise InvalidArgument(f"parameters {sorted(parameters)} are not supported by this server")
            if control is not self.registry:
                raise FailedPrecondition(
                    "rollout changes by request would reach one worker only: with --workers, set shadows and "
                    "canaries in the settings or the model's configuration (docs/rollout.md)"
                )
            return await self.rollout.control(name, parameters, who)
        return await control.load(name)

    async def unload_model(self, name: str) -> ReloadReport:
        """Stop serving every version of a model once its requests drained."""
        return await self._control().unload(name)
