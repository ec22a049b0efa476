"""The data plane (service.core.dataplane): admission of declared names, datatypes, shapes and
rows (before any payload is decoded), the outputs to compute, and one inference end to end in
process — through DataPlane.infer (the server's path) and predict (the batch job's and Ray's)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fixtures.inprocess import TINY_MAX_ROWS, infer

from service.core.context import RequestContext
from service.core.dataplane import DataPlane, RequestTensor, admit, output_names, predict
from service.core.registry import ModelRegistry
from service.core.spec import ModelSpec, TensorSpec
from service.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from service.settings import Settings

# -- DataPlane.infer over real (tiny) models ---------------------------------------------------------


def test_infer_runs(tiny_registry: ModelRegistry) -> None:
    out = infer(tiny_registry, "profit", {"population": np.array([[35000.0]], np.float32)})
    assert out["profit"].shape == (1, 1)
    assert out["profit"][0, 0] == pytest.approx(35000 * 1.193 - 38958, abs=0.01)
    images = np.zeros((3, 1, 28, 28), np.uint8)
    probs = infer(tiny_registry, "fashion_softmax", {"image": images}, outputs=["probabilities"])["probabilities"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        # An input the model does not have is named as such (a missing one: see test_admit_rules).
        (
            {"img": np.zeros((1, 1, 28, 28), np.uint8)},
            r"model 'fashion_softmax' has no input 'img'; its inputs are \['image'\]",
        ),
        (
            {"image": np.zeros((1, 1, 28, 28), np.float32)},
            "input 'image' of model 'fashion_softmax' version 2 has datatype UINT8, got FP32",
        ),
        ({"image": np.zeros((1, 28, 28), np.uint8)}, r"expects shape \[N, 1, 28, 28\], got \[1, 28, 28\]"),
        ({"image": np.zeros((1, 1, 28, 27), np.uint8)}, r"expects shape \[N, 1, 28, 28\], got \[1, 1, 28, 27\]"),
        ({"image": np.zeros((0, 1, 28, 28), np.uint8)}, "empty batch"),
        ({"image": np.zeros((9, 1, 28, 28), np.uint8)}, "batch of 9, over the maximum of 8"),
    ],
)
def test_classifier_validation(tiny_registry: ModelRegistry, inputs, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        infer(tiny_registry, "fashion_softmax", inputs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_rejected(tiny_registry: ModelRegistry, bad: float) -> None:
    x = np.array([[1.0], [2.0], [bad]], np.float32)
    with pytest.raises(InvalidArgument, match=r"finite numbers, got 1 NaN/inf value\(s\), the first at index \(2, 0\)"):
        infer(tiny_registry, "profit", {"population": x})


def test_unknown_output_and_deadline(tiny_registry: ModelRegistry) -> None:
    x = {"population": np.ones((1, 1), np.float32)}
    with pytest.raises(InvalidArgument, match=r"has outputs \['profit'\], got a request for \['nope'\]"):
        infer(tiny_registry, "profit", x, outputs=["nope"])
    with pytest.raises(DeadlineExceeded):  # raised by the batcher: no time left to queue it
        infer(tiny_registry, "profit", x, timeout=0)


def test_the_context_records_the_request(tiny_registry: ModelRegistry) -> None:
    plane = DataPlane(tiny_registry, tiny_registry.settings)
    context = RequestContext("test", "/test/Infer", inference=True)
    model = plane.model(context, "fashion_softmax", 1)
    tensor = RequestTensor("image", "UINT8", (3, 1, 28, 28), lambda: np.zeros((3, 1, 28, 28), np.uint8))
    asyncio.run(plane.infer(context, model, [tensor]))
    assert (context.model, context.version, context.rows) == ("fashion_softmax", "1", 3)
    assert context.batch_rows >= 3 and context.compute_seconds > 0
    assert plane.model_ready("fashion_softmax", 1) and not plane.model_ready("fashion_softmax", 7)
    assert not plane.model_ready("broken")


def test_model_control_is_off_by_default(tiny_registry: ModelRegistry) -> None:
    plane = DataPlane(tiny_registry, Settings(provider="cpu"))
    with pytest.raises(FailedPrecondition, match="--allow-model-control"):
        asyncio.run(plane.unload_model("profit"))
    assert tiny_registry.names() == ["fashion_softmax", "house_price", "profit"]


# -- predict: the in-process path without a batcher ------------------------------------------------


def test_predict_admits_and_checks_like_the_server(tiny_registry: ModelRegistry) -> None:
    model = tiny_registry.get("profit")
    out = predict(model.spec, model.runner, {"population": np.array([[35000.0], [70000.0]], np.float32)})
    assert out["profit"][:, 0] == pytest.approx([35000 * 1.193 - 38958, 70000 * 1.193 - 38958], abs=0.1)
    with pytest.raises(InvalidArgument, match=r"model 'profit' has no input 'pop'; its inputs are \['population'\]"):
        predict(model.spec, model.runner, {"pop": np.ones((1, 1), np.float32)})
    with pytest.raises(InvalidArgument, match=r"the first at index \(1, 0\)"):
        predict(model.spec, model.runner, {"population": np.array([[1.0], [np.nan]], np.float32)})
    with pytest.raises(InvalidArgument, match=f"over the maximum of {TINY_MAX_ROWS}"):
        predict(model.spec, model.runner, {"population": np.ones((TINY_MAX_ROWS + 1, 1), np.float32)})


# -- admit: every rule, on a contract built by hand ------------------------------------------------

SPEC = ModelSpec(
    "m",
    1,
    inputs=(TensorSpec("a", np.dtype(np.float32), (-1, 2)), TensorSpec("b", np.dtype(np.uint8), (-1, 1, 3, -1))),
    outputs=(TensorSpec("y", np.dtype(np.float32), (-1, 1)), TensorSpec("z", np.dtype(np.float32), (-1, 2))),
    metadata={},
    max_rows=8,
)


def declared(name: str, datatype: str, shape: tuple[int, ...]) -> RequestTensor:
    """A tensor whose payload must never be decoded by admission."""

    def decode() -> np.ndarray:
        raise AssertionError("admit() decoded a payload")

    return RequestTensor(name, datatype, shape, decode)


def a(shape: tuple[int, ...] = (2, 2), datatype: str = "FP32") -> RequestTensor:
    return declared("a", datatype, shape)


def b(shape: tuple[int, ...] = (2, 1, 3, 5), datatype: str = "UINT8") -> RequestTensor:
    return declared("b", datatype, shape)


def test_admit_returns_the_rows() -> None:
    assert admit(SPEC, [a(), b()]) == 2
    assert admit(SPEC, [b((8, 1, 3, 1)), a((8, 2))]) == 8  # any order; the dynamic dim is free


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([a(), b(), declared("c", "FP32", (2, 2))], "model 'm' has no input 'c'; its inputs are ['a', 'b']"),
        ([a()], "model 'm' version 1 expects inputs ['a', 'b'], got ['a']"),
        ([], "expects inputs ['a', 'b'], got []"),
        ([a(), a(), b()], "input 'a' appears more than once"),
        ([a(datatype="FP64"), b()], "input 'a' of model 'm' version 1 has datatype FP32, got FP64"),
        ([a(datatype=""), b()], "has datatype FP32, got (empty)"),
        ([a(), b(datatype="FP32")], "input 'b' of model 'm' version 1 has datatype UINT8, got FP32"),
        ([a((2,)), b()], "input 'a' of model 'm' version 1 expects shape [N, 2], got [2]"),
        ([a((2, 3)), b()], "expects shape [N, 2], got [2, 3]"),
        ([a(), b((2, 1, 4, 5))], "expects shape [N, 1, 3, ?], got [2, 1, 4, 5]"),
        ([a((2, 2)), b((3, 1, 3, 5))], "input 'b' of model 'm' version 1 has batch size 3, other inputs have 2"),
        ([a((0, 2)), b((0, 1, 3, 5))], "is an empty batch; expected 1 to 8 items"),
        ([a((9, 2)), b((9, 1, 3, 5))], "has a batch of 9, over the maximum of 8; split it into smaller requests"),
        ([a((-1, 2)), b()], "input 'a' of model 'm' version 1: dimensions must be >= 0, got shape [-1, 2]"),
        ([a((2**62, 2**62)), b()], "far too large"),
        ([a((0, 2**62, 2**62)), b()], "far too large"),  # zeros do not make a huge shape small
        ([a((1,) * 33), b()], "at most 32 dimensions, got 33"),
    ],
)
def test_admit_rules(tensors: list[RequestTensor], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        admit(SPEC, tensors)
    assert message in str(info.value)


def test_output_names() -> None:
    assert output_names(SPEC, None) == ["y", "z"]
    assert output_names(SPEC, []) == ["y", "z"]
    assert output_names(SPEC, ["z"]) == ["z"]
    assert output_names(SPEC, ["z", "y"]) == ["z", "y"]  # in the order asked
    with pytest.raises(
        InvalidArgument, match=r"model 'm' version 1 has outputs \['y', 'z'\], got a request for \['x'\]"
    ):
        output_names(SPEC, ["y", "x"])
