"""The training CLI end to end (``python -m training`` subprocesses): a short run exports a valid
ONNX model; bad input fails cleanly."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fixtures.data import REPO_ROOT

from training import data


def run_cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "name, limit, min_accuracy",
    [
        ("fashion_softmax", 3000, 0.6),
        ("fashion_cnn", 2000, 0.5),
    ],
)
def test_short_training_run_exports_valid_onnx(
    tmp_path: Path, fashion_dir: Path, fashion_test, name: str, limit: int, min_accuracy: float
) -> None:
    result = run_cli(
        "train",
        name,
        "--data-dir",
        fashion_dir,
        "--limit",
        limit,
        "--epochs",
        1,
        "--repository",
        tmp_path / "models",
        "--reports",
        tmp_path / "reports",
        "--seed",
        7,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{name} epoch  1/1" in result.stderr  # progress is shown while training
    path = tmp_path / "models" / name / "1" / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["class_names"]) == data.CLASS_NAMES
    assert props["training_data_sha256"] == data.FASHION_SHA256["train-images-idx3-ubyte"]
    assert props["seed"] == "7" and f"--limit {limit}" in props["training_command"]
    assert {"torch", "onnx", "onnxruntime", "numpy"} <= set(json.loads(props["versions"]))
    card = json.loads((path.parent / "card.json").read_text())
    assert card["parity_max_diff"] <= 1e-5 and card["parity_samples"] >= 1000
    # Dynamic batch axis, uint8 in, probabilities out; clearly better than chance (10 %).
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "N"
    probs = session.run(None, {"image": fashion_test.images[:2000]})[0]
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    accuracy = float((probs.argmax(1) == fashion_test.labels[:2000]).mean())
    assert accuracy > min_accuracy
    metrics = json.loads((tmp_path / "reports" / name / "metrics.json").read_text())
    assert metrics["test_accuracy"] > min_accuracy
    assert (tmp_path / "reports" / name / "confusion.png").stat().st_size > 1000


def test_regression_training_writes_model_report_and_figures(tmp_path: Path) -> None:
    result = run_cli("train", "profit", "house_price", "--repository", tmp_path / "m", "--reports", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["profit"]["mse"] == pytest.approx(8.9539427520, rel=1e-6)
    assert summary["profit"]["prediction_35000_usd"] == pytest.approx(2798.37, abs=1)
    assert summary["house_price"]["prediction_1650sqft_3br_usd"] == pytest.approx(293081.46, abs=1)
    for figure in ("profit/fit.png", "profit/loss.png", "house_price/loss.png"):
        assert (tmp_path / "r" / figure).stat().st_size > 1000
    session = ort.InferenceSession(str(tmp_path / "m" / "profit" / "1" / "model.onnx"))
    (out,) = session.run(None, {"population": np.array([[70000]], np.float32)})
    assert out[0, 0] == pytest.approx(44554.55, abs=1)


def assert_clean_failure(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_data_dir(tmp_path: Path) -> None:
    assert_clean_failure(
        run_cli("train", "fashion_softmax", "--data-dir", tmp_path / "absent"), "data directory does not exist"
    )


def test_unknown_model() -> None:
    assert_clean_failure(run_cli("train", "resnet"), "unknown model resnet")


def test_wrong_checksum(tmp_path: Path, fashion_dir: Path) -> None:
    for stem in data.FASHION_SHA256:
        shutil.copyfile(fashion_dir / f"{stem}.gz", tmp_path / f"{stem}.gz")
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(bad.read_bytes()))
    content[-1] = (content[-1] + 1) % 10
    bad.write_bytes(gzip.compress(bytes(content)))
    result = run_cli("train", "fashion_softmax", "--data-dir", tmp_path, "--epochs", 1)
    assert_clean_failure(result, "train-labels-idx1-ubyte.gz: checksum mismatch")


def test_corrupt_file(tmp_path: Path, fashion_dir: Path) -> None:
    for stem in data.FASHION_SHA256:
        shutil.copyfile(fashion_dir / f"{stem}.gz", tmp_path / f"{stem}.gz")
    cut = tmp_path / "t10k-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:1000])
    assert_clean_failure(run_cli("evaluate", "--data-dir", tmp_path), "corrupt or truncated gzip")


# -- evaluate: what the repository holds, the rest named; never a traceback ----------------------


def partial_repository(root: Path, *names: str) -> Path:
    """A repository with only ``names`` (copies of the bundled version 1: the files `train NAME
    --repository ROOT` writes, without the training time)."""
    for name in names:
        shutil.copytree(REPO_ROOT / "models" / name, root / name)
    return root


def test_evaluate_a_partial_repository_skips_and_names_the_rest(tmp_path: Path, fashion_dir: Path) -> None:
    """The issue's case (`train fashion_softmax --repository /tmp/models`, then evaluate it):
    fashion_cnn was an onnxruntime NoSuchFile traceback."""
    repo = partial_repository(tmp_path / "models", "fashion_softmax", "profit")
    result = run_cli("evaluate", "--repository", repo, "--data-dir", fashion_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout)
    assert set(figures) == {"fashion_softmax", "profit_35000", "profit_70000"}
    card = json.loads((repo / "fashion_softmax" / "1" / "card.json").read_text())
    assert figures["fashion_softmax"] == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-4)
    assert figures["profit_35000"] == pytest.approx(2798.37, abs=1)
    assert result.stderr.splitlines() == [
        f"skipped fashion_cnn: {repo / 'fashion_cnn' / '1' / 'model.onnx'} not found",
        f"skipped house_price: {repo / 'house_price' / '1' / 'model.onnx'} not found",
    ]


def test_evaluate_regressions_only_needs_no_fashion_data(tmp_path: Path) -> None:
    repo = partial_repository(tmp_path / "models", "house_price")
    result = run_cli("evaluate", "--repository", repo, "--data-dir", tmp_path / "no-data-here")
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads(result.stdout)) == {"house_1650_3"}
    assert len(result.stderr.splitlines()) == 3 and "Traceback" not in result.stderr


def test_evaluate_an_empty_repository_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    result = run_cli("evaluate", "--repository", tmp_path / "models")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'models'}: no model to evaluate (looked for <name>/1/model.onnx, name in "
        "fashion_softmax, fashion_cnn, profit, house_price)"
    ]
    assert result.stdout == ""
    missing = run_cli("evaluate", "--repository", tmp_path / "absent")
    assert missing.returncode == 2
    assert missing.stderr.splitlines() == [f"error: {tmp_path / 'absent'}: model repository does not exist"]


def test_evaluate_a_broken_model_is_one_line_and_exit_1(tmp_path: Path) -> None:
    repo = partial_repository(tmp_path / "models", "profit")
    (repo / "house_price" / "1").mkdir(parents=True)
    (repo / "house_price" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    result = run_cli("evaluate", "--repository", repo)
    assert result.returncode == 1
    assert set(json.loads(result.stdout)) == {"profit_35000", "profit_70000"}  # the others still run
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: house_price: InvalidProtobuf:") and "Traceback" not in result.stderr
