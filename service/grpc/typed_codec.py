"""Typed API (``serving.v1``) messages ⇄ the data plane's tensors and results."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from ..core.dataplane import RequestTensor
from ..core.registry import ModelVersion
from ..core.spec import TensorSpec
from ..core.tasks import pixel_converter
from ..core.tensors import from_bytes
from ..errors import InvalidArgument
from ..generated.serving.v1 import serving_pb2 as pb

_DTYPES: dict[int, np.dtype] = {pb.DATA_TYPE_UINT8: np.dtype(np.uint8), pb.DATA_TYPE_FLOAT32: np.dtype("<f4")}


def image_tensor(tensor: pb.Tensor, image: TensorSpec) -> RequestTensor:
    """The request's images as the model's ``image`` input: declared shape now; the bytes are
    viewed (and converted to the model's pixel type, see :func:`~service.core.tasks.pixel_converter`)
    only once the data plane admitted the shape."""
    dtype = _DTYPES.get(tensor.dtype)
    if dtype is None:
        got = pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else tensor.dtype
        raise InvalidArgument(f"images.dtype must be DATA_TYPE_UINT8 or DATA_TYPE_FLOAT32, got {got}")
    convert = pixel_converter(dtype, image.dtype)
    shape = tuple(tensor.shape)
    data = tensor.data

    def decode() -> np.ndarray:
        images = from_bytes(data, dtype, shape, "images")
        return images if convert is None else convert(images)

    return RequestTensor(image.name, image.datatype, shape, decode)


def features_tensor(name: str, rows: int, columns: int, values: Callable[[], object]) -> RequestTensor:
    """float32 [rows, columns] features read from protobuf fields by ``values()``, only once the
    data plane admitted the row count."""

    def decode() -> np.ndarray:
        return np.asarray(values(), dtype=np.float32).reshape(rows, columns)

    return RequestTensor(name, "FP32", (rows, columns), decode)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@functools.lru_cache(maxsize=64)
def _row_framing(labels: tuple[str, ...]) -> tuple[list[bytes], list[bytes]]:
    """Per class: the bytes before and after one image's packed probabilities in the wire
    format of ``ClassifyResponse.results`` (field 2), i.e. of a ``Classification`` holding
    probabilities (1, packed float), class_index (2) and label (3); zero and "" are left out, as
    proto3 serialization does."""
    n = len(labels)
    floats = b"\x0a" + _varint(4 * n)  # field 1, length-delimited
    heads, tails = [], []
    for index, label in enumerate(labels):
        text = label.encode()
        tail = (b"\x10" + _varint(index) if index else b"") + (b"\x1a" + _varint(len(text)) + text if text else b"")
        heads.append(b"\x12" + _varint(len(floats) + 4 * n + len(tail)) + floats)
        tails.append(tail)
    return heads, tails


def classifications(probs: np.ndarray, labels: list[str]) -> bytes:
    """Serialized ``ClassifyResponse`` holding only ``results``: one ``Classification`` per row of
    ``probs`` (float32 [N, classes]) with its probabilities, top class (first maximum) and label.
    Byte-for-byte what building the messages one by one and serializing them gives, at a quarter
    of the cost for a batch (no Python message object per image)."""
    heads, tails = _row_framing(tuple(labels))
    raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
    width = 4 * probs.shape[1]
    parts: list[bytes] = []
    append = parts.append
    for i, best in enumerate(probs.argmax(axis=1).tolist()):
        append(heads[best])
        append(raw[i * width : (i + 1) * width])
        append(tails[best])
    return b"".join(parts)


def model_ref(model: ModelVersion, version: str = "") -> pb.ModelRef:
    """The model that answered: ``version`` when given (the context's: a canary's failed request
    is answered by the primary), else ``model``'s."""
    return pb.ModelRef(name=model.name, version=int(version) if version else model.version)


def model_metadata(model: ModelVersion, versions: list[int]) -> pb.ModelMetadata:
    spec = model.spec

    def tensors(specs: tuple[TensorSpec, ...]) -> list[pb.TensorMetadata]:
        return [
            pb.TensorMetadata(name=s.name, dtype=s.dtype.name, shape=list(s.shape), unit=spec.units.get(s.name, ""))
            for s in specs
        ]

    return pb.ModelMetadata(
        name=spec.name,
        version=spec.version,
        versions=versions,
        platform="onnxruntime",
        execution_provider=model.provider,
        inputs=tensors(spec.inputs),
        outputs=tensors(spec.outputs),
        class_names=spec.class_names,
        metrics=spec.evaluation,
        max_batch_size=spec.max_rows,
        properties=dict(spec.metadata),
        description=spec.description,
    )
