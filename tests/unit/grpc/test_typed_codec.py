"""The typed API's codec (service.grpc.typed_codec): the fast Classify encoding equals building
the messages one by one; images become the model's input tensor (declared now, decoded later)."""

from __future__ import annotations

import numpy as np
import pytest

from service.core.spec import TensorSpec
from service.errors import InvalidArgument
from service.generated.serving.v1 import serving_pb2 as pb
from service.grpc.typed_codec import classifications, image_tensor


def slow(probs: np.ndarray, labels: list[str]) -> pb.ClassifyResponse:
    response = pb.ClassifyResponse()
    for row in probs:
        best = int(np.argmax(row))
        response.results.add(probabilities=row.tolist(), class_index=best, label=labels[best])
    return response


@pytest.mark.parametrize(
    ("rows", "classes", "labels"),
    [
        (1, 10, None),
        (256, 10, None),
        (7, 40, None),  # 160 bytes of floats: two-byte lengths
        (5, 3, ["ä", "x" * 200, ""]),  # non-ASCII, a long label, an empty one
        (3, 200, None),  # class indices past 127: two-byte varints
    ],
)
def test_fast_classify_encoding_is_exact(rows: int, classes: int, labels: list[str] | None) -> None:
    rng = np.random.default_rng(rows * classes)
    probs = rng.random((rows, classes)).astype(np.float32)
    probs[0, :] = 0.5  # ties: the first maximum wins, as argmax/argsort
    probs[-1, -1] = np.float32(np.inf)
    labels = labels or [f"class {i}" for i in range(classes)]
    fast = classifications(probs, labels)
    assert pb.ClassifyResponse.FromString(fast) == slow(probs, labels)
    assert fast == slow(probs, labels).SerializeToString()


UINT8_IMAGE = TensorSpec("image", np.dtype(np.uint8), (-1, 1, 28, 28))
FLOAT_IMAGE = TensorSpec("image", np.dtype(np.float32), (-1, 1, 28, 28))


def _images(array: np.ndarray, shape: list[int] | None = None) -> pb.Tensor:
    dtype = pb.DATA_TYPE_UINT8 if array.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
    return pb.Tensor(dtype=dtype, shape=list(array.shape) if shape is None else shape, data=array.tobytes())


def test_image_tensor_declares_the_models_input_and_converts_pixels_on_decode() -> None:
    pixels = np.array([0, 128, 255], np.uint8).repeat(784 // 3 + 1)[:784].reshape(1, 1, 28, 28)
    tensor = image_tensor(_images(pixels), UINT8_IMAGE)
    assert (tensor.name, tensor.datatype, tensor.shape) == ("image", "UINT8", (1, 1, 28, 28))
    np.testing.assert_array_equal(tensor.decode(), pixels)
    # float32 pixels in [0, 1] for a uint8 model, and uint8 pixels for a float model
    as_float = image_tensor(_images(pixels.astype(np.float32) / 255), UINT8_IMAGE)
    assert as_float.datatype == "UINT8"  # declared as what the model takes
    np.testing.assert_array_equal(as_float.decode(), pixels)
    to_float = image_tensor(_images(pixels), FLOAT_IMAGE)
    assert to_float.datatype == "FP32" and to_float.decode().dtype == np.float32
    np.testing.assert_allclose(to_float.decode(), pixels / 255, rtol=1e-6)


def test_image_tensor_errors() -> None:
    with pytest.raises(
        InvalidArgument, match="images.dtype must be DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32, got DATA_TYPE_UNSPECIFIED"
    ):
        image_tensor(pb.Tensor(), UINT8_IMAGE)
    with pytest.raises(InvalidArgument, match="got 7"):
        image_tensor(pb.Tensor(dtype=7), UINT8_IMAGE)
    short = image_tensor(pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[2, 1, 28, 28], data=bytes(1567)), UINT8_IMAGE)
    assert short.shape == (2, 1, 28, 28)  # declared: the byte count is checked only on decode
    with pytest.raises(
        InvalidArgument, match=r"images: shape \[2, 1, 28, 28\] of uint8 needs 1568 bytes \(1568 x 1\), got 1567"
    ):
        short.decode()
    bright = image_tensor(_images(np.full((1, 1, 28, 28), 2.0, np.float32)), UINT8_IMAGE)
    with pytest.raises(InvalidArgument, match=r"float32 pixels must be in \[0, 1\], got values from 2.0 to 2.0"):
        bright.decode()
