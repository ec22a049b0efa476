"""The contract of a model version (service.core.spec): built from the graph's inputs/outputs
and checked against the metadata training wrote; the card (class names, units, evaluation)."""

from __future__ import annotations

import json
from typing import NamedTuple

import numpy as np
import pytest

from service.core.spec import ModelKey, ModelSpec, TensorSpec

KEY = ModelKey("m", 3)


class Arg(NamedTuple):
    """What ModelSpec.from_graph reads of an onnxruntime NodeArg."""

    name: str
    type: str
    shape: list


def spec(inputs: list[Arg], outputs: list[Arg], metadata: dict[str, str] | None = None, rows: int = 1024) -> ModelSpec:
    return ModelSpec.from_graph(KEY, inputs, outputs, metadata or {}, rows)


X = Arg("x", "tensor(float)", ["N", 2])
Y = Arg("y", "tensor(float)", ["N", 1])


def test_from_graph_reads_names_types_and_shapes() -> None:
    s = spec([Arg("image", "tensor(uint8)", ["N", 1, 28, 28])], [Arg("p", "tensor(float)", [None, 10])])
    assert s.inputs == (TensorSpec("image", np.dtype(np.uint8), (-1, 1, 28, 28)),)
    assert s.outputs == (TensorSpec("p", np.dtype(np.float32), (-1, 10)),)
    assert (s.inputs[0].datatype, s.outputs[0].datatype) == ("UINT8", "FP32")
    assert s.max_rows == 1024 and s.batchable and s.key == KEY and str(KEY) == "m/3"
    assert str(s) == "model 'm' version 3"
    assert s.signature() == (["image uint8 [N, 1, 28, 28]"], ["p float32 [N, 10]"])
    assert s.inputs[0].row_bytes == 784 and s.outputs[0].row_bytes == 40


def test_a_static_leading_dimension_caps_the_rows() -> None:
    s = spec([Arg("x", "tensor(float)", [4, 2])], [Arg("y", "tensor(float)", [4, 1])], rows=16)
    assert s.max_rows == 4 and not s.batchable
    assert spec([X], [Y], rows=16).max_rows == 16


def test_shape_strings_and_row_bytes_with_dynamic_dimensions() -> None:
    t = TensorSpec("t", np.dtype(np.float32), (-1, 3, -1))
    assert t.shape_str() == "[N, 3, ?]" and t.row_bytes is None
    assert TensorSpec("s", np.dtype(np.float32), (2, -1)).shape_str() == "[2, ?]"


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ([Arg("x", "tensor(string)", ["N", 1])], [Y], "input 'x' has unsupported type tensor(string)"),
        ([X], [Arg("y", "seq(tensor(float))", [])], "output 'y' has unsupported type seq(tensor(float))"),
        ([], [Y], "model needs at least one input and one output"),
        ([X], [], "model needs at least one input and one output"),
        ([Arg("x", "tensor(float)", [])], [Y], "every input needs a batch axis (rank >= 1)"),
    ],
)
def test_from_graph_refuses_unusable_graphs(inputs: list[Arg], outputs: list[Arg], message: str) -> None:
    with pytest.raises(ValueError) as info:
        spec(inputs, outputs)
    assert message in str(info.value)


def test_declared_tensors_must_equal_the_graph() -> None:
    good = json.dumps([{"name": "x", "dtype": "float32", "shape": ["N", 2], "unit": "m"}])
    assert spec([X], [Y], {"inputs": good}).units == {"x": "m"}
    wrong = json.dumps([{"name": "x", "dtype": "float64", "shape": ["N", 2]}])
    with pytest.raises(
        ValueError,
        match=r"metadata 'inputs' declares \[\('x', 'float64', \(-1, 2\)\)\] but the graph has \[\('x', 'float32', \(-1, 2\)\)\]",  # noqa: E501
    ):
        spec([X], [Y], {"inputs": wrong})
    renamed = json.dumps([{"name": "total", "dtype": "float32", "shape": ["N", 1]}])
    with pytest.raises(ValueError, match="metadata 'outputs' declares"):
        spec([X], [Y], {"outputs": renamed})
    assert spec([X], [Y], {"inputs": "not json"}).inputs == (TensorSpec("x", np.dtype(np.float32), (-1, 2)),)


def test_the_card() -> None:
    metadata = {
        "class_names": json.dumps(["a", "b"]),
        "metrics": json.dumps({"accuracy": 0.9, "epochs": 3, "optimizer": "adam", "folded": True, "w": [1]}),
        "description": "a model",
        "outputs": json.dumps([{"name": "y", "dtype": "float32", "shape": ["N", 1], "unit": "USD"}]),
    }
    s = spec([X], [Y], metadata)
    assert s.class_names == ["a", "b"]
    assert s.evaluation == {"accuracy": 0.9, "epochs": 3.0}  # numbers only (not bools)
    assert s.description == "a model" and s.units == {"y": "USD"}
    bare = spec([X], [Y], {"class_names": "{", "metrics": "[1]"})
    assert (bare.class_names, bare.evaluation, bare.description, bare.units) == ([], {}, "", {})
