"""Tiny ONNX models built with onnx.helper, for tests that need their own model repository."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]


def save(model: onnx.ModelProto, repo: Path, name: str, version: int = 1, **metadata: str) -> Path:
    """Write ``model`` as ``repo/name/version/model.onnx`` with ``metadata`` as metadata_props."""
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    onnx.checker.check_model(model)
    path = repo / name / str(version) / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def linear(inputs: int, weights: list[float], bias: float, in_name: str = "x", out_name: str = "y") -> onnx.ModelProto:
    """float32 [N, inputs] → float32 [N, 1]: x @ weights + bias."""
    w = numpy_helper.from_array(np.array(weights, np.float32).reshape(inputs, 1), "w")
    b = numpy_helper.from_array(np.array([bias], np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", [in_name, "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], [out_name])],
        "linear",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["N", inputs])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", 1])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def image_classifier(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """uint8 [N, 1, 28, 28] → float32 [N, classes] softmax of a random linear layer."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (784, classes)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.array([1 / 255], np.float32), "scale")
    shape = numpy_helper.from_array(np.array([-1, 784], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["f", "scale"], ["fs"]),
            helper.make_node("Reshape", ["fs", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [w, scale, shape],
    )
    return helper.make_model(graph, opset_imports=OPSET)


def slow(layers: int = 40, width: int = 512) -> onnx.ModelProto:
    """float32 [N, 1] → float32 [N, 1] through ``layers`` width×width MatMul+Tanh: CPU time ∝ N."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (1, width)).astype(np.float32), "w_in"),
        numpy_helper.from_array((rng.normal(0, 1, (width, width)) / np.sqrt(width)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones((width, 1), np.float32), "w_out"),
    ]
    nodes, prev = [helper.make_node("MatMul", ["x", "w_in"], ["h"])], "h"
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [prev, "w"], [f"m{i}"]), helper.make_node("Tanh", [f"m{i}"], [f"t{i}"])]
        prev = f"t{i}"
    nodes.append(helper.make_node("MatMul", [prev, "w_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=OPSET)


def declared(name: str, dtype: str, shape: list, unit: str) -> dict:
    """One entry of the ``inputs``/``outputs`` metadata lists that training/export writes."""
    return {"name": name, "dtype": dtype, "shape": shape, "unit": unit}


def tiny_repository(repo: Path) -> Path:
    """A repository shaped like the bundled one (profit, house_price, fashion_softmax v1+v2)
    plus a broken model, with made-up weights and export-style metadata."""
    save(
        linear(1, [1.193], -38958.0, "population", "profit"),
        repo,
        "profit",
        inputs=json.dumps([declared("population", "float32", ["N", 1], "people")]),
        outputs=json.dumps([declared("profit", "float32", ["N", 1], "USD")]),
        metrics=json.dumps({"rmse_usd": 3000.0, "optimizer": "none", "weights": [1.193]}),
        description="profit from population",
    )
    save(linear(2, [139.2, -8738.0], 89597.9), repo, "house_price")
    labels = json.dumps([f"class{i}" for i in range(10)])
    save(image_classifier(0), repo, "fashion_softmax", 1, class_names=labels)
    save(image_classifier(1), repo, "fashion_softmax", 2, class_names=labels, metrics='{"accuracy": 0.84}')
    broken = repo / "broken" / "1" / "model.onnx"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"this is not an onnx file")
    return repo
