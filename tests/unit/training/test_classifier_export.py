"""The softmax classifier is served with its input scaling folded into the linear layer."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training import classifier
from training.export import TensorContract, export, parity


def _random_net(seed: int) -> classifier.SoftmaxRegression:
    torch.manual_seed(seed)
    net = classifier.SoftmaxRegression()
    with torch.no_grad():  # weights of a trained model's magnitude, not the tiny initial ones
        net.linear.weight.normal_(0.0, 0.05)
        net.linear.bias.normal_(0.0, 0.5)
    return net.eval()


def test_folded_softmax_computes_the_same_function() -> None:
    net = _random_net(0)
    images = np.random.default_rng(0).integers(0, 256, (500, 1, 28, 28), dtype=np.uint8)
    images[0] = 0  # the extremes of the pixel range
    images[1] = 255
    x = torch.from_numpy(images)
    with torch.no_grad():
        expected = classifier.ImageClassifier(net)(x).numpy()
        folded = classifier.served_module(net)(x).numpy()
    assert isinstance(classifier.served_module(net), classifier.FoldedSoftmaxRegression)
    np.testing.assert_allclose(folded, expected, atol=2e-6)
    assert (folded.argmax(1) == expected.argmax(1)).mean() > 0.99  # ties aside, same labels


def test_only_the_softmax_model_is_folded() -> None:
    # The CNN pads with zeros in standardised space: folding would change its borders.
    assert isinstance(classifier.served_module(classifier.SmallCNN()), classifier.ImageClassifier)


def test_folded_export_is_cast_gemm_softmax_and_matches_the_trained_model(tmp_path) -> None:
    net = _random_net(1)
    sample = np.random.default_rng(1).integers(0, 256, (1000, 1, 28, 28), dtype=np.uint8)
    path, diff = export(
        classifier.served_module(net),
        tmp_path,
        "fashion_softmax",
        1,
        inputs=TensorContract("image", "uint8", ("N", 1, 28, 28), "pixel intensity 0-255", "image"),
        outputs=TensorContract("probabilities", "float32", ("N", 10), "probability", "probabilities"),
        parity_sample=sample,
        metadata={"description": "test"},
        card_extra={},
        reference=classifier.ImageClassifier(net),
    )
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops == ["Cast", "Flatten", "Gemm", "Softmax"], ops  # no Div/Sub pass over the pixels
    # Parity is measured against the unfolded model as trained, and recomputing it agrees.
    assert diff <= 1e-5 and diff == parity(classifier.ImageClassifier(net).eval(), path, sample, "image")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": sample[:3]})[0].shape == (3, 10)
