"""The Ray Data pipeline (service.jobs.ray_pipeline) on Ray against the single-machine batch job.

A local Ray instance (2 CPUs, no dashboard) runs the pipeline on the real Fashion-MNIST test set —
IDX (gzip) with 2 actors, Parquet with an autoscaling pool of 1-2 — and the CLI joins a running `ray start` cluster
with --address for a .npy input; every run must give the batch job's predictions row for row
(probabilities bitwise equal where the batches line up) and the model's recorded test accuracy.
Everything listens on loopback. (Checks before any Ray work, the Arrow image encodings and the
actor class without Ray: tests/unit/jobs/test_ray_pipeline.py.)
"""

from __future__ import annotations

import os

# Before Ray is imported: a local instance listens on loopback only (see ray_pipeline.LOCAL_ONLY_ENV).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import json
import re
from pathlib import Path

import numpy as np
import pytest
from fixtures.servers import MODELS, free_port

from service.jobs.__main__ import main as batch_main
from service.jobs.ray_pipeline import PipelineConfig, PipelineError, plan_input, run_pipeline

ray = pytest.importorskip("ray")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.slow
MODEL = "fashion_softmax"
CHUNK = 256  # the batch job's default --chunk-size and the pipeline's default --batch-size


def quiet(**kwargs: object) -> PipelineConfig:
    """A pipeline on the CPU (as the batch job it is compared with, bit for bit: on a GPU host
    --provider auto would put the driver's job on CUDA and the GPU-less actors on the CPU)."""
    return PipelineConfig(model_repository=MODELS, log=lambda message: None, provider="cpu", **kwargs)  # type: ignore[arg-type]


def two_actors_over_idx(fashion: dict[str, Path], out: Path) -> PipelineConfig:
    """The Fashion-MNIST test set's IDX files on 2 actors of 1 CPU, read 2048 rows at a time."""
    return quiet(
        inputs=[fashion["images"]],
        labels=fashion["labels"],
        output=out,
        model=MODEL,
        actors=2,
        cpus_per_actor=1,
        rows_per_read=2048,
    )


@pytest.fixture(scope="module")
def local_ray() -> object:
    """One new local Ray instance for the module: 2 CPUs like this machine, no dashboard."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fashion(fashion_files: dict[str, Path]) -> dict[str, Path]:
    return {"images": fashion_files["t10k-images-idx3-ubyte"], "labels": fashion_files["t10k-labels-idx1-ubyte"]}


@pytest.fixture(scope="module")
def batch_job(fashion: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The single-machine batch job, in-process onnxruntime, over the 10,000 test images."""
    out = tmp_path_factory.mktemp("batch") / "out"
    assert (
        batch_main(
            [
                "classify",
                str(fashion["images"]),
                "--labels",
                str(fashion["labels"]),
                "-o",
                str(out),
                "--local",
                "--model-repository",
                str(MODELS),
                "--model",
                MODEL,
                "--provider",
                "cpu",
                "--chunk-size",
                str(CHUNK),
                "--progress",
                "none",
                "--no-fsync",
            ]
        )
        == 0
    )
    return out


@pytest.fixture(scope="module")
def test_set(fashion: dict[str, Path]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) read by the training package's own IDX parser."""
    import gzip

    from training.data import parse_idx

    def load(path: Path) -> np.ndarray:
        raw = path.read_bytes()
        return parse_idx(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw, path.name)

    return load(fashion["images"]).astype(np.uint8), load(fashion["labels"]).astype(np.int64)


def recorded_accuracy() -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODELS / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return json.loads(session.get_modelmeta().custom_metadata_map["metrics"])["test_accuracy"]


def ray_output(out: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(out / "predictions").sort_by("row")
    columns = {
        name: table.column(name).to_numpy()
        for name in table.column_names
        if name not in ("probabilities", "label", "true_label")
    }
    columns["probabilities"] = (
        table.column("probabilities").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
    )
    columns["label"] = np.asarray(table.column("label").to_pylist())
    return columns


def assert_same_as_batch_job(out: Path, batch_job: Path, *, bitwise: bool) -> dict:
    got = ray_output(out)
    want_predictions = np.load(batch_job / "predictions.npy")
    want_probabilities = np.load(batch_job / "probabilities.npy")
    assert np.array_equal(got["row"], np.arange(len(want_predictions)))  # every row exactly once
    assert np.array_equal(got["predicted"], want_predictions)
    if bitwise:
        assert np.array_equal(got["probabilities"], want_probabilities)
    else:
        np.testing.assert_allclose(got["probabilities"], want_probabilities, rtol=1e-5, atol=1e-7)
    assert np.array_equal(got["probability"], got["probabilities"].max(axis=1))
    summary = json.loads((out / "summary.json").read_text())
    batch_summary = json.loads((batch_job / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == batch_summary["rows"] == 10_000
    assert summary["model"]["name"] == MODEL and summary["model"]["version"] == batch_summary["model"]["version"]
    assert summary["accuracy"] == batch_summary["accuracy"] == pytest.approx(recorded_accuracy(), abs=5e-5)
    assert summary["correct"] == batch_summary["correct"]
    assert (out / "confusion_matrix.csv").read_bytes() == (batch_job / "confusion_matrix.csv").read_bytes()
    assert not list(out.glob(".predictions-*"))
    return summary


# -- the real thing on a local Ray ----------------------------------------------------------------


def test_idx_on_two_actors_equals_the_batch_job(
    local_ray: object,
    fashion: dict[str, Path],
    batch_job: Path,
    test_set: tuple[np.ndarray, np.ndarray],
    tmp_path: Path,
) -> None:
    out = tmp_path / "ray"
    run_pipeline(two_actors_over_idx(fashion, out))
    # Batches start at multiples of 256 like the batch job's chunks: identical bytes.
    summary = assert_same_as_batch_job(out, batch_job, bitwise=True)
    assert summary["actors"] == {"min": 2, "max": 2, "cpus_each": 1.0, "gpus_each": 0.0, "intra_op_threads": 1}
    assert summary["input"]["kind"] == "idx" and summary["input"]["sha256"]
    got = ray_output(out)
    assert np.array_equal(got["true"], test_set[1])
    assert (
        np.array_equal(got["correct"], got["true"] == got["predicted"]) and got["correct"].sum() == summary["correct"]
    )
    # A second run into the same folder is refused unless told to overwrite.
    with pytest.raises(PipelineError, match="already holds results"):
        run_pipeline(quiet(inputs=[fashion["images"]], output=out, model=MODEL))


def test_parquet_on_an_autoscaling_pool_equals_the_batch_job(
    local_ray: object, test_set: tuple[np.ndarray, np.ndarray], batch_job: Path, tmp_path: Path
) -> None:
    images, labels = test_set
    folder = tmp_path / "parquet"
    folder.mkdir()
    # Two files, row groups of 3,000 images: raw 784-byte binary images plus a label column.
    for name, rows in (("part-0.parquet", slice(0, 6000)), ("part-1.parquet", slice(6000, 10_000))):
        table = pa.table(
            {
                "image": pa.array([img.tobytes() for img in images[rows]], pa.binary()),
                "label": pa.array(labels[rows]),
            }
        )
        pq.write_table(table, folder / name, row_group_size=3000)
    plan = plan_input([folder], rows_per_read=CHUNK)
    assert plan.rows == 10_000 and plan.label_column == "label"
    assert [(u["start"], u["stop"]) for u in plan.units] == [(0, 3000), (3000, 6000), (6000, 9000), (9000, 10_000)]
    out = tmp_path / "ray"
    summary = run_pipeline(quiet(inputs=[folder], output=out, model=MODEL, actors=1, max_actors=2))
    # Row groups of 3,000 do not start on multiples of 256, so batches differ: same predictions,
    # probabilities equal to float32 rounding.
    assert_same_as_batch_job(out, batch_job, bitwise=False)
    assert summary["input"]["kind"] == "parquet" and summary["labels"] == "label"
    assert summary["actors"]["min"] == 1 and summary["actors"]["max"] == 2  # an autoscaling pool


def test_an_actor_that_crashes_mid_run_is_restarted_and_the_result_is_whole(
    local_ray: object, fashion: dict[str, Path], batch_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One actor process dies (os._exit) on its second read unit, after it has answered one: Ray
    restarts it and retries the unit, and the output is still every row exactly once, equal to
    the batch job's."""
    from service.jobs import ray_pipeline

    crashed = tmp_path / "crashed"  # the first actor to reach its second unit dies, once

    class CrashingPredictor(ray_pipeline.OnnxPredictor):  # (a local class: shipped to Ray by value)
        calls = 0

        def __call__(self, batch: dict[str, np.ndarray]) -> object:
            type(self).calls += 1
            if type(self).calls == 2 and not crashed.exists():
                crashed.write_text(str(os.getpid()))
                os._exit(1)
            return super().__call__(batch)

    monkeypatch.setattr(ray_pipeline, "OnnxPredictor", CrashingPredictor)
    out = tmp_path / "ray"
    run_pipeline(two_actors_over_idx(fashion, out))
    assert crashed.exists() and int(crashed.read_text()) != os.getpid()  # an actor died mid-run
    assert_same_as_batch_job(out, batch_job, bitwise=True)


def test_gpus_per_actor_without_gpus_is_refused_not_a_hang(tmp_path: Path, fashion: dict[str, Path]) -> None:
    """--gpus-per-actor on a local Ray instance without GPUs: Ray would wait for them forever; the
    pipeline says so and exits 1 (its own process and Ray instance: no other test's Ray around)."""
    import subprocess
    import sys

    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "service.jobs.ray_pipeline", str(fashion["images"]), "-o", str(tmp_path / "out")]
    command += ["--model", MODEL, "--model-repository", str(MODELS), "--gpus-per-actor", "1", "--num-cpus", "1"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "--gpus-per-actor 1 x 1 actor(s) needs 1 GPU, and the local Ray instance has 0" in result.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An existing one-node Ray cluster (`ray start --head`), on loopback, in its own temp dir;
    yields its address and is killed (its whole process group) afterwards."""
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    for attempt in range(5):  # a port picked free can be taken before Ray binds it: another one
        port = free_port()
        log = tmp_path_factory.mktemp("ray-head") / "head.log"
        with open(log, "wb") as out:
            head = subprocess.Popen(
                [
                    ray_cli,
                    "start",
                    "--head",
                    f"--port={port}",
                    "--num-cpus=2",
                    "--include-dashboard=false",
                    "--disable-usage-stats",
                    f"--temp-dir={temp_dir}",
                    "--block",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes() and head.poll() is None:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        if head.poll() is None or attempt == 4 or b"in use" not in log.read_bytes().lower():
            break
    try:
        assert head.poll() is None, log.read_text()
        yield f"127.0.0.1:{port}"
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # `ray start`, GCS, raylet, workers: one process group
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_npy_through_the_cli_on_an_existing_cluster(
    ray_cluster: str,
    test_set: tuple[np.ndarray, np.ndarray],
    fashion: dict[str, Path],
    batch_job: Path,
    tmp_path: Path,
) -> None:
    """The CLI in its own process joins a running cluster with --address: the service package
    travels as py_modules, and relative paths work although the workers run elsewhere."""
    import subprocess
    import sys

    images, _ = test_set
    np.save(tmp_path / "images.npy", images)  # [N, 28, 28]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.jobs.ray_pipeline",
            "images.npy",
            "--labels",
            str(fashion["labels"]),
            "-o",
            "out",
            "--model",
            MODEL,
            "--model-repository",
            str(MODELS),
            "--actors",
            "1",
            "--provider",
            "cpu",
            "--address",
            ray_cluster,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # The accuracy line reports the model's recorded test accuracy (to its 4 decimals).
    said = re.search(r"^accuracy (\d\.\d{4}) \(([\d,]+)/10,000 correct\)$", result.stderr, re.M)
    assert said, result.stderr[-2000:]
    assert float(said.group(1)) == pytest.approx(recorded_accuracy(), abs=5e-5)
    assert int(said.group(2).replace(",", "")) == json.loads((tmp_path / "out" / "summary.json").read_text())["correct"]
    summary = assert_same_as_batch_job(tmp_path / "out", batch_job, bitwise=True)
    assert summary["input"]["kind"] == "npy" and summary["actors"]["max"] == 1
    assert summary["ray"]["address"] == ray_cluster


def test_the_old_module_name_still_runs() -> None:
    """python -m service.batch.ray_pipeline (the pipeline's old name) is the same CLI."""
    import subprocess
    import sys

    from fixtures.servers import REPO_ROOT

    result = subprocess.run(
        [sys.executable, "-m", "service.batch.ray_pipeline", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--actors" in result.stdout and "--address" in result.stdout
