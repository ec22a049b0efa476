"""The batch job (service.jobs; python -m service.jobs, and its old name python -m service.batch)
against the session server: remote and local give the same bytes on the real Fashion-MNIST test
set, a job killed mid-run resumes to exactly the full result, corrupt inputs fail clearly before
any output. (Retries against a fake, memory, progress: tests/unit/jobs/test_batch_job.py.)"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixtures.providers import ACCURACY_SLACK, AUTO_PROVIDER, CPU, close_to_cpu
from fixtures.proxy import HoldingProxy
from fixtures.servers import MODELS, REPO_ROOT, ServerProcess, wait_for

from service.client import connect
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc
from service.jobs import InputError, Job, JobConfig, JobError, RemoteBackend, open_images
from service.jobs.__main__ import main
from service.jobs.inputs import NpyImages, Source
from service.jobs.job import LOCK, _exclusive

CHUNK = 32
DATA_FILES = ["probabilities.npy", "predictions.npy", "predictions.csv", "confusion_matrix.csv"]


def assert_same_results(got: Path, want: Path) -> None:
    """Two runs of the same job: byte for byte on the CPU. On a GPU host (the session server and
    --local run on --provider auto: CUDA) batches of other sizes may take other kernels: the
    probabilities agree to within TF32 rounding and nearly every prediction is the same."""
    if AUTO_PROVIDER == CPU:
        for name in DATA_FILES:
            assert (got / name).read_bytes() == (want / name).read_bytes(), name
        return
    np.testing.assert_allclose(
        np.load(got / "probabilities.npy"), np.load(want / "probabilities.npy"), **close_to_cpu()
    )
    same = np.load(got / "predictions.npy") == np.load(want / "predictions.npy")
    assert same.mean() >= 1 - ACCURACY_SLACK


def closed_form_profit(populations: list[float]) -> list[float]:
    """US dollars from the normal equations on data/profit/ex1data1.txt (population and profit in
    10,000s): an expectation computed without the model or the service."""
    data = np.loadtxt(REPO_ROOT / "data" / "profit" / "ex1data1.txt", delimiter=",")
    (intercept, slope), *_ = np.linalg.lstsq(np.c_[np.ones(len(data)), data[:, 0]], data[:, 1], rcond=None)
    return [(intercept + slope * p / 1e4) * 1e4 for p in populations]


def run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def quiet(output: Path) -> JobConfig:
    return JobConfig(output=output, chunk_size=20, progress="none", sync=False, backoff=0.01, log=lambda m: None)


def write_idx(path: Path, images: np.ndarray, compress: bool = True) -> Path:
    header = bytes([0, 0, 8, images.ndim]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    data = header + images.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture(scope="module")
def fashion(fashion_files: dict[str, Path]) -> dict[str, Path]:
    return {"images": fashion_files["t10k-images-idx3-ubyte"], "labels": fashion_files["t10k-labels-idx1-ubyte"]}


@pytest.fixture(scope="module")
def reference(server: ServerProcess, fashion: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted remote run over the 10,000 test images, with labels."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert (
        run(
            "classify",
            fashion["images"],
            "--labels",
            fashion["labels"],
            "-o",
            out,
            "--server",
            server.address,
            "--chunk-size",
            CHUNK,
            "--progress",
            "none",
        )
        == 0
    )
    return out


def test_remote_and_local_give_identical_outputs(
    reference: Path, fashion: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    local = tmp_path / "local"
    assert (
        run(
            "classify",
            fashion["images"],
            "--labels",
            fashion["labels"],
            "-o",
            local,
            "--local",
            "--model-repository",
            MODELS,
            "--chunk-size",
            CHUNK,
            "--progress",
            "log",
        )
        == 0
    )
    err = capsys.readouterr().err
    assert_same_results(local, reference)
    probabilities = np.load(reference / "probabilities.npy")
    predictions = np.load(reference / "predictions.npy")
    assert probabilities.shape == (10_000, 10) and probabilities.dtype == np.float32
    np.testing.assert_array_equal(predictions, probabilities.argmax(axis=1))
    remote_summary = json.loads((reference / "summary.json").read_text())
    local_summary = json.loads((local / "summary.json").read_text())
    assert remote_summary["complete"] and remote_summary["runs"][0]["mode"] == "remote"
    assert local_summary["runs"][0]["mode"] == "local"
    # The accuracy the job reports is the model card's test accuracy.
    card = json.loads((MODELS / "fashion_softmax" / "1" / "card.json").read_text())
    assert remote_summary["accuracy"] == pytest.approx(local_summary["accuracy"], abs=ACCURACY_SLACK)
    assert remote_summary["accuracy"] == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-4 + ACCURACY_SLACK)
    assert f"accuracy {remote_summary['accuracy']:.4f}" in err and "rows/s" in err and "ETA" in err
    assert (reference / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (reference / "predictions.csv").read_text().splitlines()
    assert lines[0] == "row,predicted,label,probability,true,true_label,correct" and len(lines) == 10_001
    matrix = np.loadtxt(reference / "confusion_matrix.csv", delimiter=",", skiprows=1, usecols=range(1, 11))
    assert matrix.sum() == 10_000 and np.trace(matrix) == remote_summary["correct"]


def _results(out: Path) -> dict[str, int]:
    """Modification times of the job's files (the lock file is the job's, not a result)."""
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != LOCK}


def test_finished_job_is_not_redone(
    reference: Path, server: ServerProcess, fashion: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    before = _results(reference)
    assert (
        run(
            "classify",
            fashion["images"],
            "--labels",
            fashion["labels"],
            "-o",
            reference,
            "--server",
            server.address,
            "--chunk-size",
            CHUNK,
            "--progress",
            "none",
        )
        == 0
    )
    assert "already complete" in capsys.readouterr().err
    assert _results(reference) == before
    # Another job into the same folder is refused, and names what differs.
    assert (
        run(
            "classify",
            fashion["images"],
            "-o",
            reference,
            "--server",
            server.address,
            "--chunk-size",
            64,
            "--progress",
            "none",
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "different job" in err and "chunk_size: 32 there, 64 now" in err and "--restart" in err


def _rows_done(out: Path) -> int:
    try:
        return json.loads((out / ".partial" / "journal.json").read_text())["rows_done"]
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _stop_at(process: subprocess.Popen, proxy: HoldingProxy, out: Path, sig: signal.Signals, start: int) -> int:
    """Wait until the job (resumed at row ``start``) has written every chunk the proxy let
    through (it then waits for the next answer, which the proxy holds), send ``sig``, wait for the
    exit; the rows written."""
    assert proxy.hold_after is not None
    rows = start + proxy.hold_after * CHUNK
    wait_for(lambda: _rows_done(out) == rows or process.poll() is not None, f"the journal at row {rows}")
    assert process.poll() is None, f"job ended (rc {process.returncode}) at row {_rows_done(out)}, before {rows}"
    process.send_signal(sig)
    process.wait(120)
    assert _rows_done(out) == rows  # not a row further: the answers after them never came
    return rows


def test_kill_and_sigterm_mid_run_then_resume_give_exactly_the_full_result(
    reference: Path, server: ServerProcess, fashion: dict[str, Path], tmp_path: Path
) -> None:
    """The job talks to the server through a proxy that holds the stream's answers after a set
    number of chunks, so each interruption comes at an exact row: SIGKILL (nothing runs after
    it), then SIGTERM (the job stops like Ctrl-C: exit 130, a message, the journal intact), then
    the rest in-process. The result is exactly the uninterrupted run's."""
    out = tmp_path / "job"
    job = [
        "classify",
        str(fashion["images"]),
        "--labels",
        str(fashion["labels"]),
        "-o",
        str(out),
        "--chunk-size",
        str(CHUNK),
        "--progress",
        "none",
    ]
    base = [sys.executable, "-m", "service.jobs", *job]

    def popen(command: list[str]) -> subprocess.Popen:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # The first run under the job's old module name, which must keep working: SIGKILL at row 1,280.
    with HoldingProxy(server.address, hold_after=40) as proxy:
        first = popen([sys.executable, "-m", "service.batch", *job, "--server", proxy.address])
        killed_at = _stop_at(first, proxy, out, signal.SIGKILL, start=0)
        first.communicate()
    assert first.returncode == -signal.SIGKILL and killed_at == 40 * CHUNK
    assert not (out / "summary.json").exists() and not (out / "probabilities.npy").exists()
    # Resumed, 100 chunks more, then SIGTERM.
    with HoldingProxy(server.address, hold_after=100) as proxy:
        second = popen([*base, "--server", proxy.address])
        stopped_at = _stop_at(second, proxy, out, signal.SIGTERM, start=killed_at)
        _, stderr = second.communicate()
    assert second.returncode == 130, stderr
    assert f"resuming at row {killed_at:,}" in stderr
    assert "interrupted; re-run the same command to resume where it stopped" in stderr
    assert "Traceback" not in stderr and not (out / "summary.json").exists()
    # Finished in-process.
    finish = subprocess.run(
        [*base, "--local", "--model-repository", str(MODELS)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finish.returncode == 0, finish.stderr
    assert f"resuming at row {stopped_at:,}" in finish.stderr
    assert_same_results(out, reference)
    summary = json.loads((out / "summary.json").read_text())
    assert [(r["mode"], r["start_row"]) for r in summary["runs"]] == [
        ("remote", 0),
        ("remote", killed_at),
        ("local", stopped_at),
    ]
    assert not (out / ".partial").exists()


def test_restart_throws_away_a_finished_and_an_unfinished_job(server: ServerProcess, tmp_path: Path) -> None:
    """--restart: the folder's earlier result (finished, of another job) or partial run (with
    other settings) is discarded and the job runs from row 0; without it, both are refused."""
    np.save(tmp_path / "x.npy", SMALL)
    out = tmp_path / "out"
    common = ["classify", tmp_path / "x.npy", "-o", out, "--server", server.address, "--progress", "none"]
    assert run(*common, "--chunk-size", 20) == 0
    assert run(*common, "--chunk-size", 25) == 1  # another job's finished result is there
    assert run(*common, "--chunk-size", 25, "--restart") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["spec"]["chunk_size"] == 25 and [r["start_row"] for r in summary["runs"]] == [0]
    clean = tmp_path / "clean"
    assert run("classify", tmp_path / "x.npy", "-o", clean, "--server", server.address, "--chunk-size", 25) == 0
    for name in ("probabilities.npy", "predictions.csv"):
        assert (out / name).read_bytes() == (clean / name).read_bytes()
    # An unfinished job (a journal at row 40) with other settings: refused, then restarted.
    with connect(server.address) as client:
        backend = RemoteBackend(client, "classify", None)
        with pytest.raises(InputError):
            Job("classify", FailingSource(NpyImages(tmp_path / "x.npy"), good=2), backend, quiet(tmp_path / "p")).run()
    assert _rows_done(tmp_path / "p") == 40
    again = ["classify", tmp_path / "x.npy", "-o", tmp_path / "p", "--server", server.address, "--progress", "none"]
    assert run(*again, "--chunk-size", 25) == 1
    assert run(*again, "--chunk-size", 25, "--restart") == 0
    restarted = json.loads((tmp_path / "p" / "summary.json").read_text())
    assert [r["start_row"] for r in restarted["runs"]] == [0]
    assert (tmp_path / "p" / "probabilities.npy").read_bytes() == (clean / "probabilities.npy").read_bytes()


@pytest.mark.parametrize("where", ["under a file", "an existing file", "in /proc"])
def test_an_output_folder_that_cannot_be_written_is_one_clear_line(
    tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """(The tests run as root, so permissions cannot make a folder unwritable: these are places
    nobody can write to.)"""
    np.save(tmp_path / "x.npy", SMALL[:10])
    (tmp_path / "a-file").write_text("not a folder\n")
    out = {
        "under a file": tmp_path / "a-file" / "out",
        "an existing file": tmp_path / "a-file",
        "in /proc": Path("/proc") / f"no-such-output-{os.getpid()}",
    }[where]
    status = run("classify", tmp_path / "x.npy", "-o", out, "--local", "--model-repository", MODELS)
    err = capsys.readouterr().err
    assert status == 1, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("model-batch: error: ") and str(out) in lines[-1], err
    assert "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "not a folder\n"  # nothing written over


# -- corrupt inputs ------------------------------------------------------------------------------

rng = np.random.default_rng(6)
SMALL = rng.integers(0, 256, size=(100, 28, 28), dtype=np.uint8)


def _truncated_gzip(d: Path) -> Path:
    good = gzip.compress(bytes([0, 0, 8, 3]) + b"".join(x.to_bytes(4, "big") for x in SMALL.shape) + SMALL.tobytes())
    (d / "t.gz").write_bytes(good[: len(good) // 2])
    return d / "t.gz"


def _flipped_gzip(d: Path) -> Path:
    data = bytearray(write_idx(d / "f.gz", SMALL).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / "f.gz").write_bytes(bytes(data))
    return d / "f.gz"


def _short_idx(d: Path) -> Path:
    raw = write_idx(d / "s-idx3-ubyte", SMALL, compress=False).read_bytes()
    (d / "s-idx3-ubyte").write_bytes(raw[:-100])
    return d / "s-idx3-ubyte"


def _not_images(d: Path) -> Path:
    (d / "labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + b"\x01\x02\x03")
    return d / "labels-idx1-ubyte"


def _short_npy(d: Path) -> Path:
    np.save(d / "x.npy", SMALL)
    raw = (d / "x.npy").read_bytes()
    (d / "x.npy").write_bytes(raw[:-784])
    return d / "x.npy"


def _float_npy(d: Path) -> Path:
    np.save(d / "x.npy", SMALL.astype(np.float32))
    return d / "x.npy"


def _broken_png(d: Path) -> Path:
    image_module = pytest.importorskip("PIL.Image")
    folder = d / "pngs"
    folder.mkdir()
    for i in range(3):
        image_module.fromarray(SMALL[i]).save(folder / f"{i}.png")
    (folder / "1.png").write_bytes((folder / "1.png").read_bytes()[:60])
    return folder


CORRUPT = {
    "truncated gzip": (_truncated_gzip, "corrupt or truncated gzip stream"),
    "gzip CRC": (_flipped_gzip, "corrupt or truncated gzip stream"),
    "IDX shorter than its header says": (_short_idx, "truncated"),
    "IDX of labels": (_not_images, "not an IDX file of uint8 images"),
    "truncated .npy": (_short_npy, ".npy"),
    "float .npy": (_float_npy, "expected uint8 images"),
    "broken PNG": (_broken_png, "1.png: corrupt or unreadable PNG"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_input_fails_clearly_before_any_output(
    case: str, tmp_path: Path, server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    make, message = CORRUPT[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    assert run("classify", path, "-o", out, "--server", server.address, "--progress", "none") == 2
    err = capsys.readouterr().err
    assert "bad input" in err and message in err and path.name in err
    assert not out.exists()  # nothing written, so nothing can pass for a result


def test_bad_labels_and_csv_values_are_reported(
    tmp_path: Path, server: ServerProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    images = write_idx(tmp_path / "i.gz", SMALL)
    np.save(tmp_path / "few.npy", np.zeros(99, np.int64))
    assert (
        run("classify", images, "--labels", tmp_path / "few.npy", "-o", tmp_path / "a", "--server", server.address) == 2
    )
    assert "99 labels for 100 input rows" in capsys.readouterr().err
    np.save(tmp_path / "big.npy", np.full(100, 12, np.int64))
    assert (
        run("classify", images, "--labels", tmp_path / "big.npy", "-o", tmp_path / "b", "--server", server.address) == 2
    )
    assert "classes 0 to 9" in capsys.readouterr().err
    (tmp_path / "p.csv").write_text("city,population\na,35000\nb,lots\n")
    assert run("profit", tmp_path / "p.csv", "-o", tmp_path / "c", "--server", server.address) == 2
    assert "line 3: population must be a finite number, got 'lots'" in capsys.readouterr().err
    (tmp_path / "two.csv").write_text("6.1101,17.592\n5.5277,9.1302\n")
    assert run("profit", tmp_path / "two.csv", "-o", tmp_path / "d", "--server", server.address) == 2
    assert "2 columns and no header" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abcd")


class FailingSource(Source):
    """Wraps a source; its chunks fail after ``good`` chunks (a file that went bad mid-run)."""

    def __init__(self, inner: Source, good: int) -> None:
        self.inner, self.good = inner, good
        self.kind, self.path, self.rows = inner.kind, inner.path, inner.rows
        self.item_shape, self.dtype = inner.item_shape, inner.dtype

    def verify(self) -> None:
        self.inner.verify()
        self.sha256 = self.inner.sha256

    def chunks(self, start: int, size: int):
        for i, chunk in enumerate(self.inner.chunks(start, size)):
            if i == self.good:
                raise InputError(f"{self.path}: read error at row {start + i * size}")
            yield chunk


def test_input_failing_mid_run_leaves_an_unfinished_job_only(server: ServerProcess, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", SMALL)
    out = tmp_path / "out"
    with connect(server.address) as client:
        backend = RemoteBackend(client, "classify", None)
        with pytest.raises(InputError, match="read error at row 60"):
            Job("classify", FailingSource(NpyImages(tmp_path / "x.npy"), good=3), backend, quiet(out)).run()
        assert _rows_done(out) == 60 and not (out / "summary.json").exists()
        assert sorted(p.name for p in out.iterdir() if p.name != LOCK) == [".partial"]
        # Resuming with other settings is refused; with the same ones it completes.
        config = quiet(out)
        config.chunk_size = 25
        with pytest.raises(JobError, match="unfinished job that differs.*chunk_size: 20 there, 25 now"):
            Job("classify", NpyImages(tmp_path / "x.npy"), backend, config).run()
        summary = Job("classify", NpyImages(tmp_path / "x.npy"), backend, quiet(out)).run()
        assert summary["complete"] and summary["runs"][-1]["start_row"] == 60
        clean = Job("classify", NpyImages(tmp_path / "x.npy"), backend, quiet(tmp_path / "clean")).run()
    for name in ("probabilities.npy", "predictions.csv"):
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert summary["outputs"] == clean["outputs"]


def test_a_second_job_into_a_folder_in_use_is_refused_and_touches_nothing(
    server: ServerProcess, tmp_path: Path
) -> None:
    np.save(tmp_path / "x.npy", SMALL)
    out = tmp_path / "out"
    out.mkdir()
    with connect(server.address) as client, _exclusive(out):  # another job holds the folder
        backend = RemoteBackend(client, "classify", None)
        with pytest.raises(JobError, match="in use by another batch job"):
            Job("classify", NpyImages(tmp_path / "x.npy"), backend, quiet(out)).run()
        assert [p.name for p in out.iterdir()] == [LOCK]
    # Once the other job lets go, this one runs.
    with connect(server.address) as client:
        summary = Job(
            "classify", NpyImages(tmp_path / "x.npy"), RemoteBackend(client, "classify", None), quiet(out)
        ).run()
    assert summary["complete"]


# -- other inputs --------------------------------------------------------------------------------


def test_npy_and_png_inputs_match_the_idx_result(reference: Path, fashion: dict[str, Path], tmp_path: Path) -> None:
    image_module = pytest.importorskip("PIL.Image")
    images = next(open_images(fashion["images"]).chunks(0, 2 * CHUNK))  # two full chunks
    np.save(tmp_path / "n.npy", images[:, 0])
    np.save(tmp_path / "n1.npy", images)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images[:, 0]):
        image_module.fromarray(image).convert("RGB").save(folder / f"img{i:03d}.png")  # colour → grayscale
    expected = np.load(reference / "probabilities.npy")[: 2 * CHUNK]
    for path in (tmp_path / "n.npy", tmp_path / "n1.npy", folder):
        out = tmp_path / f"out-{path.name}"
        assert (
            run(
                "classify",
                path,
                "-o",
                out,
                "--local",
                "--model-repository",
                MODELS,
                "--chunk-size",
                CHUNK,
                "--progress",
                "none",
            )
            == 0
        )
        np.testing.assert_array_equal(np.load(out / "probabilities.npy"), expected)
    lines = (tmp_path / "out-pngs" / "predictions.csv").read_text().splitlines()
    assert lines[0] == "row,file,predicted,label,probability" and lines[1].startswith("0,img000.png,")


def test_profit_csv_remote_and_local(server: ServerProcess, tmp_path: Path) -> None:
    populations = np.linspace(20_000, 250_000, 50).round()
    (tmp_path / "p.csv").write_text("city,population\n" + "".join(f"c{i},{p:g}\n" for i, p in enumerate(populations)))
    (tmp_path / "one.csv").write_text("35000\n\n70000\n")
    for mode in (["--server", server.address], ["--local", "--model-repository", MODELS]):
        assert (
            run("profit", tmp_path / "p.csv", "-o", tmp_path / mode[0], *mode, "--chunk-size", 16, "--progress", "none")
            == 0
        )
    remote, local = tmp_path / "--server", tmp_path / "--local"
    for name in ("profits.csv", "profits.npy"):
        assert (remote / name).read_bytes() == (local / name).read_bytes()
    profits = np.load(remote / "profits.npy")
    assert profits.shape == (50,)
    assert run("profit", tmp_path / "one.csv", "-o", tmp_path / "one", "--server", server.address) == 0
    header, *rows = (tmp_path / "one" / "profits.csv").read_text().splitlines()
    assert header == "row,population,profit_usd"
    assert [row.split(",")[:2] for row in rows] == [["0", "35000"], ["1", "70000"]]  # the blank line skipped
    # The expectation, derived apart from the model: the least-squares line through the course
    # data (what the bundled model was trained to); the model is float32, the CSV has cents.
    expected = closed_form_profit([35_000, 70_000])
    assert [float(row.split(",")[2]) for row in rows] == pytest.approx(expected, abs=1.0)
    assert all(len(row.split(",")[2].split(".")[1]) == 2 for row in rows)  # written to the cent


# -- one definition of the default models ---------------------------------------------------------


def test_the_batch_job_and_the_typed_api_default_to_the_same_model(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --model, a --local batch job and a typed Classify without a model name (both take
    service.core.tasks.DEFAULT_MODELS) use the same model; so do profit jobs and PredictProfit."""
    np.save(tmp_path / "x.npy", SMALL[:4])
    (tmp_path / "p.csv").write_text("35000\n")
    assert (
        run(
            "classify",
            tmp_path / "x.npy",
            "-o",
            tmp_path / "c",
            "--local",
            "--model-repository",
            MODELS,
            "--progress",
            "none",
        )
        == 0
    )
    assert (
        run(
            "profit",
            tmp_path / "p.csv",
            "-o",
            tmp_path / "p",
            "--local",
            "--model-repository",
            MODELS,
            "--progress",
            "none",
        )
        == 0
    )
    job_models = [json.loads((tmp_path / d / "summary.json").read_text())["model"]["name"] for d in "cp"]
    with server.channel() as channel:
        stub = pb_grpc.ModelServiceStub(channel)
        images = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=[4, 1, 28, 28], data=SMALL[:4].tobytes())
        typed = [
            stub.Classify(pb.ClassifyRequest(images=images), timeout=10).model.name,
            stub.PredictProfit(pb.PredictProfitRequest(population=[35000]), timeout=10).model.name,
        ]
    assert job_models == typed == ["fashion_softmax", "profit"]
