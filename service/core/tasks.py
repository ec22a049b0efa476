"""What the tasks mean, in one place for the typed API, the batch job and the Ray pipeline:
image classification (pixel types, labels, top-k) and regression (one value per row)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidArgument
from .spec import ModelSpec, TensorSpec
from .tensors import check_finite

#: The model each task uses when a request names none.
DEFAULT_MODELS = {"classify": "fashion_softmax", "profit": "profit", "house_price": "house_price"}

Convert = Callable[[np.ndarray], np.ndarray]


def classifier_io(spec: ModelSpec) -> tuple[TensorSpec, TensorSpec]:
    """The image input [N, C, H, W] and probabilities output [N, classes] of a classifier;
    InvalidArgument for any other kind of model."""
    image, probabilities = spec.inputs[0], spec.outputs[0]
    if len(spec.inputs) != 1 or len(image.shape) != 4 or len(probabilities.shape) != 2:
        raise InvalidArgument(
            f"{spec} is not an image classifier (inputs "
            f"{[f'{s.name} {s.shape_str()}' for s in spec.inputs]}, output {probabilities.shape_str()}); "
            "expected one [N, C, H, W] image input and [N, classes] probabilities"
        )
    return image, probabilities


def regression_io(spec: ModelSpec) -> tuple[TensorSpec, TensorSpec]:
    """The features input [N, k] and the value output of a one-input regression model."""
    if len(spec.inputs) != 1:
        raise InvalidArgument(f"{spec} takes inputs {[s.name for s in spec.inputs]}; expected one")
    return spec.inputs[0], spec.outputs[0]


def _unit_floats_to_bytes(images: np.ndarray) -> np.ndarray:
    check_finite(images, "images", "float32 pixels as finite numbers in [0, 1]")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        raise InvalidArgument(f"images: float32 pixels must be in [0, 1], got values from {low} to {high}")
    pixels: np.ndarray = np.rint(images * 255).astype(np.uint8)
    return pixels


def pixel_converter(have: np.dtype, want: np.dtype) -> Convert | None:
    """How to turn pixels of ``have`` into the model's ``want`` (None: already right): float
    0–1 → uint8 0–255 and back. InvalidArgument for anything else."""
    if have == want:
        return None
    if have.kind == "f" and want == np.uint8:
        return _unit_floats_to_bytes
    if have == np.uint8 and want.kind == "f":
        return lambda images: (images / np.float32(255)).astype(want)
    raise InvalidArgument(f"images: the model takes {want}; {have} cannot be converted to it")


def model_pixels(images: np.ndarray, want: np.dtype) -> np.ndarray:
    """``images`` in the model input's dtype (see :func:`pixel_converter`)."""
    convert = pixel_converter(images.dtype, want)
    return images if convert is None else convert(images)


def class_labels(spec: ModelSpec, classes: int) -> list[str]:
    """The model's class names when it declares one per class, else the class indices."""
    names = spec.class_names
    return names if len(names) == classes else [str(i) for i in range(classes)]


def top_classes(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Per row, the ``k`` most probable classes, most probable first (ties: lower index first)."""
    classes = probabilities.shape[1]
    if k > classes:
        raise InvalidArgument(f"top_k must be at most {classes} (the class count), got {k}")
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


def one_value_per_row(spec: ModelSpec, output: TensorSpec, values: np.ndarray, rows: int) -> np.ndarray:
    """A regression output as a flat array of ``rows`` values."""
    if values.size != rows:
        raise InvalidArgument(
            f"{spec} returns {output.name} of shape {list(values.shape)}, not one value per input row ({rows})"
        )
    return values.reshape(-1)
