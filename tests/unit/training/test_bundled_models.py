"""The bundled model repository meets the targets (guards against shipping a worse model).

Runs the exported ONNX files in onnxruntime on the real Fashion-MNIST test set: no torch needed.
"""

from __future__ import annotations

import json

import onnx
import pytest
from fixtures.data import REPO_ROOT

from training import data, evaluate

MODELS = REPO_ROOT / "models"
TARGET_ACCURACY = {"fashion_softmax": 0.845, "fashion_cnn": 0.925}


@pytest.mark.parametrize("name", sorted(TARGET_ACCURACY))
def test_classifier_accuracy(name: str, fashion_test: data.Split) -> None:
    accuracy = evaluate.classifier_accuracy(MODELS, name, fashion_test)
    assert accuracy >= TARGET_ACCURACY[name]
    card = json.loads((MODELS / name / "1" / "card.json").read_text())
    assert card["metrics"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-4)  # card tells the truth


def test_regression_dollar_figures() -> None:
    got = evaluate.regression_predictions(MODELS)
    assert got["profit_35000"] == pytest.approx(2798.37, abs=1.0)
    assert got["profit_70000"] == pytest.approx(44554.55, abs=1.0)
    assert got["house_1650_3"] == pytest.approx(293081.46, abs=1.0)


@pytest.mark.parametrize("name", ["profit", "house_price", "fashion_softmax", "fashion_cnn"])
def test_model_files_are_valid_and_documented(name: str) -> None:
    path = MODELS / name / "1" / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    for key in (
        "description",
        "metrics",
        "training_data_sha256",
        "training_command",
        "seed",
        "versions",
        "inputs",
        "outputs",
        "input_units",
        "output_units",
    ):
        assert props.get(key), f"{name}: metadata_props lacks {key}"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    card = json.loads((path.parent / "card.json").read_text())
    assert card["parity_max_diff"] <= 1e-5 and card["parity_samples"] >= 1000
    if name.startswith("fashion"):
        assert json.loads(props["class_names"]) == data.CLASS_NAMES
    if name == "fashion_softmax":  # input scaling folded into the weights (training/classifier.py)
        assert [n.op_type for n in model.graph.node] == ["Cast", "Flatten", "Gemm", "Softmax"]
    if name == "profit":
        assert json.loads(props["metrics"])["mse"] == pytest.approx(8.9539427520, rel=1e-6)
