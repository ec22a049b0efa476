"""The contract of one model version: its tensors (from the ONNX graph) and its card (the metadata
training wrote into the file: class names, units, evaluation figures). Pure data, no session."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple, Protocol

import numpy as np

from .datatypes import datatype_of

# onnxruntime type strings → numpy dtypes (tensor types a numpy client can send).
ORT_DTYPES: dict[str, np.dtype] = {
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


class ModelKey(NamedTuple):
    """A model version's identity."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


class NodeArg(Protocol):
    """What the contract needs of an onnxruntime ``NodeArg``."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a model input or output; -1 marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    datatype: str = field(init=False, compare=False, repr=False)  # V2 name: FP32, UINT8...

    def __post_init__(self) -> None:
        object.__setattr__(self, "datatype", datatype_of(self.dtype))

    @classmethod
    def from_node(cls, arg: NodeArg, what: str) -> TensorSpec:
        dtype = ORT_DTYPES.get(arg.type)
        if dtype is None:
            raise ValueError(f"{what} '{arg.name}' has unsupported type {arg.type}")
        shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or []))
        return cls(arg.name, dtype, shape)

    def shape_str(self) -> str:
        """Shape for messages: ``[N, 1, 28, 28]`` (N = batch axis, ? = other dynamic dims)."""
        dims = ["N" if i == 0 and d < 0 else "?" if d < 0 else str(d) for i, d in enumerate(self.shape)]
        return "[" + ", ".join(dims) + "]"

    def describe(self) -> str:
        """``name dtype [N, ...]`` (log lines and compatibility checks)."""
        return f"{self.name} {self.dtype.name} {self.shape_str()}"

    @property
    def row_bytes(self) -> int | None:
        """Bytes of one batch row, or None when a non-batch dimension is dynamic."""
        if any(d < 0 for d in self.shape[1:]):
            return None
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def _json_or_none(text: str | None) -> object:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


@dataclass(frozen=True)
class ModelSpec:
    """One version's contract. ``max_rows`` caps the rows of one request (the server's setting,
    or a static batch dimension when the graph has one)."""

    name: str
    version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: Mapping[str, str]
    max_rows: int

    @classmethod
    def from_graph(
        cls,
        key: ModelKey,
        inputs: Sequence[NodeArg],
        outputs: Sequence[NodeArg],
        metadata: Mapping[str, str],
        max_request_rows: int,
    ) -> ModelSpec:
        """Build and check the contract: at least one input and output, every input with a batch
        axis, and tensors declared in the metadata equal to the graph's (catches export mix-ups).
        ValueError when any of that fails."""
        ins = tuple(TensorSpec.from_node(a, "input") for a in inputs)
        outs = tuple(TensorSpec.from_node(a, "output") for a in outputs)
        if not ins or not outs:
            raise ValueError("model needs at least one input and one output")
        if any(not s.shape for s in ins):
            raise ValueError("every input needs a batch axis (rank >= 1)")
        static = [s.shape[0] for s in ins if s.shape[0] > 0]  # a static leading dimension caps it
        spec = cls(key.name, key.version, ins, outs, dict(metadata), min([max_request_rows, *static]))
        spec._check_declared()
        return spec

    def __str__(self) -> str:
        return f"model '{self.name}' version {self.version}"

    @property
    def key(self) -> ModelKey:
        return ModelKey(self.name, self.version)

    @cached_property
    def input_names(self) -> dict[str, TensorSpec]:
        return {s.name: s for s in self.inputs}

    @cached_property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    @property
    def wire_bytes(self) -> int | None:
        """Bytes the largest request this version accepts can take on the wire, in any front
        end's encoding: at most ``max(2 × itemsize, 4)`` bytes an element (typed ``contents``
        varints take up to twice the raw size; the typed API sends uint8 pixels as float32).
        None when a non-batch dimension is dynamic."""
        total = 0
        for tensor in self.inputs:
            row_bytes = tensor.row_bytes
            if row_bytes is None:
                return None
            elements = row_bytes // tensor.dtype.itemsize
            total += self.max_rows * elements * max(2 * tensor.dtype.itemsize, 4)
        return total

    @property
    def batchable(self) -> bool:
        """Every input and output has a dynamic leading (batch) dimension."""
        return all(s.shape and s.shape[0] < 0 for s in (*self.inputs, *self.outputs))

    def signature(self) -> tuple[list[str], list[str]]:
        """Inputs and outputs as ``name dtype shape`` strings: versions serving the same clients
        must have the same signature."""
        return [s.describe() for s in self.inputs], [s.describe() for s in self.outputs]

    # -- the card: metadata written by training/export ------------------------------------------

    def _declared(self, key: str) -> list[dict[str, Any]]:
        """Metadata ``inputs``/``outputs``: JSON list of {name, dtype, shape, unit, ...}."""
        parsed = _json_or_none(self.metadata.get(key))
        return [t for t in parsed if isinstance(t, dict)] if isinstance(parsed, list) else []

    def _check_declared(self) -> None:
        for key, specs in (("inputs", self.inputs), ("outputs", self.outputs)):
            declared = self._declared(key)
            if not declared:
                continue
            want = [
                (
                    str(t.get("name")),
                    str(t.get("dtype")),
                    tuple(d if isinstance(d, int) else -1 for d in t.get("shape", [])),
                )
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
    def evaluation(self) -> dict[str, float]:
        """The numeric entries of metadata ``metrics`` (a JSON object): the model's test figures."""
        parsed = _json_or_none(self.metadata.get("metrics"))
        if not isinstance(parsed, dict):
            return {}
        return {str(k): float(v) for k, v in parsed.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    @property
    def description(self) -> str:
        return self.metadata.get("description", "")
