"""Evaluate exported ONNX models with onnxruntime (no torch): the checks the bundled models must pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import data


def session(repository: Path, name: str, version: int = 1) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(repository / name / str(version) / "model.onnx"), providers=["CPUExecutionProvider"]
    )


def classifier_accuracy(
    repository: Path, name: str, test: data.Split, version: int = 1, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``name`` on the given split, run in onnxruntime."""
    sess = session(repository, name, version)
    correct = 0
    for i in range(0, len(test.labels), batch_size):
        probs = sess.run(["probabilities"], {"image": test.images[i : i + batch_size]})[0]
        correct += int((probs.argmax(1) == test.labels[i : i + batch_size]).sum())
    return correct / len(test.labels)


def profit_predictions(repository: Path, version: int = 1) -> dict[str, float]:
    """The dollar figures ``profit`` must reproduce."""
    profit = session(repository, "profit", version).run(None, {"population": np.array([[35000], [70000]], np.float32)})[
        0
    ]
    return {"profit_35000": float(profit[0, 0]), "profit_70000": float(profit[1, 0])}


def house_price_predictions(repository: Path, version: int = 1) -> dict[str, float]:
    """The dollar figure ``house_price`` must reproduce."""
    house = session(repository, "house_price", version).run(None, {"features": np.array([[1650, 3]], np.float32)})[0]
    return {"house_1650_3": float(house[0, 0])}


def regression_predictions(repository: Path) -> dict[str, float]:
    """The dollar figures the regression models must reproduce."""
    return {**profit_predictions(repository), **house_price_predictions(repository)}
