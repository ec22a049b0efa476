"""The typed API's fast Classify encoding equals building the messages one by one."""
from __future__ import annotations

import numpy as np
import pytest

from service.api.typed import classifications
from service.generated.serving.v1 import serving_pb2 as pb


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
