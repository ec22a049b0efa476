"""Model repository and validation, in process, over tiny generated ONNX models."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from service.errors import DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from service.repository import ModelRepository, TensorSpec
from service.settings import Settings

from onnx_models import declared, image_classifier, linear, save, tiny_repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepository:
    root = tiny_repository(tmp_path_factory.mktemp("models"))
    repository = ModelRepository(root, Settings(provider="cpu", max_batch_size=8))
    repository.load()
    yield repository
    repository.close()


def infer(model, inputs, **kw):
    return asyncio.run(model.infer(inputs, **kw))


def test_loads_all_versions_and_reports_broken_model(repo: ModelRepository) -> None:
    assert repo.ready
    assert repo.names() == ["fashion_softmax", "house_price", "profit"]
    assert repo.versions("fashion_softmax") == [1, 2]
    assert [(m.name, m.version) for m in repo.models()] == [
        ("fashion_softmax", 1), ("fashion_softmax", 2), ("house_price", 1), ("profit", 1)
    ]
    assert list(repo.failed) == ["broken/1"]
    assert "Protobuf parsing failed" in repo.failed["broken/1"]


def test_get_versions(repo: ModelRepository) -> None:
    assert repo.get("fashion_softmax").version == 2
    assert repo.get("fashion_softmax", "").version == 2
    assert repo.get("fashion_softmax", 1).version == 1
    assert repo.get("fashion_softmax", "1").version == 1
    with pytest.raises(InvalidArgument, match="version must be an integer, got 'one'"):
        repo.get("fashion_softmax", "one")
    with pytest.raises(NotFound, match=r"version 3 of model 'fashion_softmax' not found; available versions: \[1, 2\]"):
        repo.get("fashion_softmax", 3)
    with pytest.raises(NotFound, match=r"model 'nope' not found; available models: \['fashion_softmax'"):
        repo.get("nope")
    with pytest.raises(NotFound, match="failed to load"):
        repo.get("broken")


def test_tensor_specs_and_metadata(repo: ModelRepository) -> None:
    clf = repo.get("fashion_softmax", 2)
    assert clf.inputs == [TensorSpec("image", np.dtype("uint8"), (-1, 1, 28, 28))]
    assert clf.outputs == [TensorSpec("probabilities", np.dtype("float32"), (-1, 10))]
    assert clf.class_names == [f"class{i}" for i in range(10)]
    assert clf.metrics == {"accuracy": 0.84}
    assert clf.provider == "CPUExecutionProvider"
    assert clf.max_batch_size == 8
    profit = repo.get("profit")
    assert profit.units == {"population": "people", "profit": "USD"}
    assert profit.metrics == {"rmse_usd": 3000.0}
    assert profit.description == "profit from population"
    assert profit.path.name == "model.onnx"


def test_infer_runs(repo: ModelRepository) -> None:
    out = infer(repo.get("profit"), {"population": np.array([[35000.0]], np.float32)})
    assert out["profit"].shape == (1, 1)
    assert out["profit"][0, 0] == pytest.approx(35000 * 1.193 - 38958, abs=0.01)
    images = np.zeros((3, 1, 28, 28), np.uint8)
    probs = infer(repo.get("fashion_softmax"), {"image": images}, outputs=["probabilities"])["probabilities"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"img": np.zeros((1, 1, 28, 28), np.uint8)}, r"expects inputs \['image'\], got \['img'\]"),
        ({"image": np.zeros((1, 1, 28, 28), np.float32)}, "expects dtype uint8, got float32"),
        ({"image": np.zeros((1, 28, 28), np.uint8)}, r"expects shape \[N, 1, 28, 28\], got \[1, 28, 28\]"),
        ({"image": np.zeros((1, 1, 28, 27), np.uint8)}, r"expects shape \[N, 1, 28, 28\], got \[1, 1, 28, 27\]"),
        ({"image": np.zeros((0, 1, 28, 28), np.uint8)}, "empty batch"),
        ({"image": np.zeros((9, 1, 28, 28), np.uint8)}, "batch of 9, over the maximum of 8"),
    ],
)
def test_classifier_validation(repo: ModelRepository, inputs, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        infer(repo.get("fashion_softmax"), inputs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_rejected(repo: ModelRepository, bad: float) -> None:
    x = np.array([[1.0], [2.0], [bad]], np.float32)
    with pytest.raises(InvalidArgument, match=r"finite numbers, got 1 NaN/inf value\(s\), the first at index \(2, 0\)"):
        infer(repo.get("profit"), {"population": x})


def test_unknown_output_and_deadline(repo: ModelRepository) -> None:
    x = {"population": np.ones((1, 1), np.float32)}
    with pytest.raises(InvalidArgument, match=r"has outputs \['profit'\], got a request for \['nope'\]"):
        infer(repo.get("profit"), x, outputs=["nope"])
    with pytest.raises(DeadlineExceeded):
        infer(repo.get("profit"), x, timeout=0)


def test_unavailable_before_load_and_bad_layout(tmp_path: Path) -> None:
    save(linear(1, [2.0], 0.0), tmp_path, "good")
    (tmp_path / "empty").mkdir()
    (tmp_path / "named" / "latest").mkdir(parents=True)
    (tmp_path / "nofile" / "1").mkdir(parents=True)
    save(image_classifier(), tmp_path, "zero", version=1).parent.rename(tmp_path / "zero" / "0")
    repository = ModelRepository(tmp_path, Settings(provider="cpu"))
    with pytest.raises(Unavailable, match="still loading"):
        repository.get("good")
    assert not repository.ready
    repository.load()
    try:
        assert repository.names() == ["good"]
        assert set(repository.failed) == {"empty", "named/latest", "nofile/1", "zero/0"}
        assert "no version directories" in repository.failed["empty"]
        assert "positive integer" in repository.failed["named/latest"]
        assert "model.onnx is missing" in repository.failed["nofile/1"]
    finally:
        repository.close()


def test_metadata_must_match_the_graph(tmp_path: Path) -> None:
    wrong = json.dumps([declared("population", "float64", ["N", 1], "people")])
    save(linear(1, [2.0], 0.0, "population", "profit"), tmp_path, "profit", inputs=wrong)
    repository = ModelRepository(tmp_path, Settings(provider="cpu"))
    repository.load()
    repository.close()
    assert not repository.ready
    assert "metadata 'inputs' declares [('population', 'float64', (-1, 1))]" in repository.failed["profit/1"]
    assert "the graph has [('population', 'float32', (-1, 1))]" in repository.failed["profit/1"]


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "nowhere", Settings(provider="cpu"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        repository.load()
    repository.close()
