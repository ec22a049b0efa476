"""What the tasks mean (service.core.tasks), shared by the typed API, the batch job and Ray:
which model a task uses by default, classifier/regression contracts, pixel conversion, labels."""

from __future__ import annotations

import numpy as np
import pytest

from service.core import tasks
from service.core.spec import ModelSpec, TensorSpec
from service.errors import InvalidArgument

F32, U8 = np.dtype(np.float32), np.dtype(np.uint8)
CLASSIFIER = ModelSpec(
    "clf",
    1,
    (TensorSpec("image", U8, (-1, 1, 28, 28)),),
    (TensorSpec("probabilities", F32, (-1, 3)),),
    {"class_names": '["a", "b", "c"]'},
    64,
)
PROFIT = ModelSpec(
    "profit", 1, (TensorSpec("population", F32, (-1, 1)),), (TensorSpec("profit", F32, (-1, 1)),), {}, 64
)
TWO_INPUTS = ModelSpec(
    "two", 1, (TensorSpec("a", F32, (-1, 1)), TensorSpec("b", F32, (-1, 1))), (TensorSpec("y", F32, (-1, 1)),), {}, 64
)


def test_default_models() -> None:
    assert tasks.DEFAULT_MODELS == {"classify": "fashion_softmax", "profit": "profit", "house_price": "house_price"}


def test_classifier_and_regression_contracts() -> None:
    assert tasks.classifier_io(CLASSIFIER) == (CLASSIFIER.inputs[0], CLASSIFIER.outputs[0])
    with pytest.raises(
        InvalidArgument,
        match=r"model 'profit' version 1 is not an image classifier \(inputs \['population \[N, 1\]'\], output \[N, 1\]\)",  # noqa: E501
    ):
        tasks.classifier_io(PROFIT)
    assert tasks.regression_io(PROFIT) == (PROFIT.inputs[0], PROFIT.outputs[0])
    with pytest.raises(InvalidArgument, match=r"model 'two' version 1 takes inputs \['a', 'b'\]; expected one"):
        tasks.regression_io(TWO_INPUTS)


def test_pixel_conversion() -> None:
    assert tasks.pixel_converter(U8, U8) is None
    to_bytes = tasks.pixel_converter(F32, U8)
    assert to_bytes(np.array([0.0, 0.5, 1.0], F32)).tolist() == [0, 128, 255]
    to_floats = tasks.pixel_converter(U8, F32)
    assert to_floats(np.array([0, 255], U8)).tolist() == [0.0, 1.0] and to_floats(np.zeros(1, U8)).dtype == F32
    images = np.array([[0.25]], F32)
    assert tasks.model_pixels(images, F32) is images
    assert tasks.model_pixels(images, U8).tolist() == [[64]]
    with pytest.raises(InvalidArgument, match=r"images: the model takes uint8; int32 cannot be converted to it"):
        tasks.pixel_converter(np.dtype(np.int32), U8)
    with pytest.raises(InvalidArgument, match=r"float32 pixels must be in \[0, 1\], got values from 0.0 to 255.0"):
        to_bytes(np.array([0.0, 255.0], F32))
    with pytest.raises(
        InvalidArgument,
        match=r"images expects float32 pixels as finite numbers in \[0, 1\], got 1 NaN/inf value\(s\), the first at index \(1,\)",  # noqa: E501
    ):
        to_bytes(np.array([0.5, np.nan], F32))


def test_labels_and_top_classes() -> None:
    assert tasks.class_labels(CLASSIFIER, 3) == ["a", "b", "c"]
    assert tasks.class_labels(CLASSIFIER, 4) == ["0", "1", "2", "3"]  # names that do not fit: indices
    probabilities = np.array([[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]], F32)
    assert tasks.top_classes(probabilities, 2).tolist() == [[1, 2], [0, 2]]  # ties: lower index first
    with pytest.raises(InvalidArgument, match=r"top_k must be at most 3 \(the class count\), got 4"):
        tasks.top_classes(probabilities, 4)


def test_one_value_per_row() -> None:
    assert tasks.one_value_per_row(PROFIT, PROFIT.outputs[0], np.ones((2, 1), F32), 2).tolist() == [1.0, 1.0]
    with pytest.raises(InvalidArgument, match=r"returns profit of shape \[2, 2\], not one value per input row \(2\)"):
        tasks.one_value_per_row(PROFIT, PROFIT.outputs[0], np.ones((2, 2), F32), 2)
