"""The Ray Data pipeline (service.jobs.ray_pipeline) without Ray: bad inputs, models and settings
fail before any Ray work, the CLI's exit codes, the Arrow encodings of an image column, and the
actor class run directly. (On a real Ray: tests/e2e/test_ray_pipeline.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fixtures.servers import MODELS

from service.jobs.inputs import InputError
from service.jobs.ray_pipeline import (
    OnnxPredictor,
    PipelineConfig,
    PipelineError,
    build_parser,
    main,
    resolve_model,
    run_pipeline,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MODEL = "fashion_softmax"
CHUNK = 256  # the batch job's default --chunk-size and the pipeline's default --batch-size


def quiet(**kwargs: object) -> PipelineConfig:
    return PipelineConfig(model_repository=MODELS, log=lambda message: None, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def fashion(fashion_files: dict[str, Path]) -> dict[str, Path]:
    return {"images": fashion_files["t10k-images-idx3-ubyte"], "labels": fashion_files["t10k-labels-idx1-ubyte"]}


def test_bad_inputs_and_settings_fail_before_ray(tmp_path: Path, fashion: dict[str, Path]) -> None:
    truncated = tmp_path / "short-images-idx3-ubyte"
    truncated.write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(InputError, match="truncated"):
        run_pipeline(quiet(inputs=[truncated], output=tmp_path / "a"))
    with pytest.raises(PipelineError, match="multiple of --batch-size"):
        run_pipeline(quiet(inputs=[fashion["images"]], output=tmp_path / "b", batch_size=256, rows_per_read=300))
    with pytest.raises(PipelineError, match="model 'nope' not found"):
        run_pipeline(quiet(inputs=[fashion["images"]], output=tmp_path / "c", model="nope"))
    with pytest.raises(PipelineError, match="one image input"):
        run_pipeline(quiet(inputs=[fashion["images"]], output=tmp_path / "d", model="profit"))
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"pixels": pa.array([b"\0" * 784])}), wrong)
    with pytest.raises(InputError, match="no column 'image'"):
        run_pipeline(quiet(inputs=[wrong], output=tmp_path / "e"))
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(3, np.int64))
    with pytest.raises(InputError, match="3 labels for 10000 input rows"):
        run_pipeline(quiet(inputs=[fashion["images"]], labels=labels, output=tmp_path / "f"))
    for gpus, message in ((-1.0, "cannot be negative"), (1.5, "--gpus-per-actor must be a whole number when above 1")):
        with pytest.raises(PipelineError, match=message):
            run_pipeline(quiet(inputs=[fashion["images"]], output=tmp_path / "g", gpus_per_actor=gpus))
    with pytest.raises(PipelineError, match="--cpus-per-actor must be a whole number"):
        run_pipeline(quiet(inputs=[fashion["images"]], output=tmp_path / "h", cpus_per_actor=2.5))


def test_cli_exit_codes_and_help(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.npy"), "-o", str(tmp_path / "out")]) == 2
    assert "bad input" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.npy"), "-o", str(tmp_path / "out"), "--actors", "0"]) == 1
    help_text = build_parser().format_help()
    for flag in ("--actors", "--max-actors", "--cpus-per-actor", "--gpus-per-actor", "--address", "--batch-size"):
        assert flag in help_text


def test_parquet_image_encodings(fashion_test_set: tuple[np.ndarray, np.ndarray]) -> None:
    """The image column may be raw bytes, flat or nested uint8 lists, or a Ray-style tensor column."""
    from service.jobs.ray_pipeline import _images_from_arrow

    images = np.ascontiguousarray(fashion_test_set[0][:5, 0])  # [5, 28, 28]
    shape = (1, 28, 28)
    encodings = {
        "binary": pa.array([i.tobytes() for i in images], pa.binary()),
        "fixed_binary": pa.array([i.tobytes() for i in images], pa.binary(784)),
        "large_binary": pa.array([i.tobytes() for i in images], pa.large_binary()),
        "chunked slices": pa.chunked_array(
            [
                pa.array([b"x" * 784] + [i.tobytes() for i in images]).slice(1, 2),
                pa.array([i.tobytes() for i in images[2:]]),
            ]
        ),
        "flat list": pa.array([i.reshape(-1).tolist() for i in images], pa.list_(pa.uint8())),
        "nested list": pa.array([i.tolist() for i in images], pa.list_(pa.list_(pa.uint8()))),
        "int64 list": pa.array([i.reshape(-1).astype(np.int64).tolist() for i in images], pa.list_(pa.int64())),
        "fixed list": pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), 784),
    }
    for name, column in encodings.items():
        assert np.array_equal(_images_from_arrow(column, shape, name), images[:, None]), name
    with pytest.raises(InputError, match="expected 784"):
        _images_from_arrow(pa.array([b"\0" * 783]), shape, "short")
    with pytest.raises(InputError, match="uint8 0-255"):
        _images_from_arrow(pa.array([[300] * 784], pa.list_(pa.int64())), shape, "range")


def test_predictor_runs_the_servers_model_code() -> None:
    """The actor class without Ray: same session options and validation as the server."""
    plan = resolve_model(MODELS, MODEL, 0, "cpu", 1, CHUNK)
    assert plan.version == 1 and plan.input_shape == (-1, 1, 28, 28) and len(plan.class_names) == 10
    predictor = OnnxPredictor(plan, Path(plan.path).read_bytes(), None)  # type: ignore[arg-type]
    probabilities = predictor.predict(np.zeros((3, 1, 28, 28), np.uint8))
    assert probabilities.shape == (3, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(PipelineError, match="do not match"):
        OnnxPredictor(plan, b"not the model", None)  # type: ignore[arg-type]
