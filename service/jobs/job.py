"""A resumable batch job: rows go through a backend chunk by chunk into preallocated outputs, and a
small journal records, atomically, how far the outputs are valid.

Layout of ``--output DIR`` while the job runs (nothing at the final names yet)::

    DIR/.partial/journal.json        spec of the job + rows_done + csv_bytes (temp file + os.replace)
    DIR/.partial/probabilities.npy   preallocated .npy, rows written in place (pwrite)
    DIR/.partial/predictions.npy     "
    DIR/.partial/predictions.csv     appended; truncated back to csv_bytes on resume

After each chunk: the chunk's rows are written, the files are flushed (fsync unless disabled),
then the journal is replaced. A job killed at any instant therefore resumes from the last journal:
rows past ``rows_done`` are simply written again, the CSV is cut back to ``csv_bytes``. No row is
lost or written twice. When every row is done the files move to their final names and
``DIR/summary.json`` — written last, ``"complete": true`` — marks the job finished; without it
the directory holds no finished result. Inputs are checked whole before the first row runs, so a
corrupt input fails before any output exists.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from . import report
from .backends import Backend, is_transient
from .inputs import InputError, Source, read_labels
from .progress import Progress

FORMAT = 1
PARTIAL = ".partial"
JOURNAL = "journal.json"
SUMMARY = "summary.json"
CONFUSION_CSV = "confusion_matrix.csv"
CONFUSION_PNG = "confusion_matrix.png"


class JobError(Exception):
    """The job cannot run or finish (other job in the output dir, retries exhausted, ...)."""


@dataclass
class JobConfig:
    output: Path
    chunk_size: int = 256
    retries: int = 5
    progress: str = "auto"
    sync: bool = True
    restart: bool = False
    backoff: float = 0.5  # seconds before the first retry; doubles per retry, capped at 30
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr, flush=True))


# -- files ---------------------------------------------------------------------------------------


#: The output folder's lock file: one job at a time per folder.
LOCK = ".lock"


@contextlib.contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` for the whole job; JobError at once when another job
    holds it (nothing of that job is touched). The lock goes with the process, also on SIGKILL."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise JobError(
                f"{out} is in use by another batch job (it holds {out / LOCK}); wait for it to finish, "
                "or choose another --output"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """Replace ``path`` with ``data`` all at once (a temp file of its own in the same folder +
    os.replace)."""
    fd, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    if sync:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


class NpyRows:
    """A ``.npy`` file of ``shape`` preallocated on disk, written row range by row range (pwrite):
    memory holds one chunk, never the whole array."""

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], *, create: bool) -> None:
        self.path = path
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.shape = shape
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        nbytes = shape[0] * self.row_bytes
        if create:
            with open(path, "wb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_1_0(f, header)
                self.offset = f.tell()
                f.truncate(self.offset + nbytes)
        else:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                got_shape, fortran, got_dtype = read(f)
                self.offset = f.tell()
            size = path.stat().st_size
            if got_shape != shape or fortran or got_dtype != self.dtype or size != self.offset + nbytes:
                raise JobError(f"{path}: partial output does not match the job; re-run with --restart")
        self.fd = os.open(path, os.O_RDWR)

    def write(self, row: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=self.dtype).tobytes()
        if len(data) != len(array) * self.row_bytes:
            raise JobError(
                f"{self.path.name}: got rows of shape {list(array.shape[1:])}, expected {list(self.shape[1:])}"
            )
        os.pwrite(self.fd, data, self.offset + row * self.row_bytes)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _chunks_of(path: Path, size: int) -> Iterator[np.ndarray]:
    array = np.load(path, mmap_mode="r")
    for start in range(0, len(array), size):
        yield np.asarray(array[start : start + size])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- what each task writes -----------------------------------------------------------------------


class Task:
    """Outputs, CSV layout and per-chunk rows of one kind of job."""

    name: str
    csv_name: str

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        raise NotImplementedError

    def csv_header(self) -> list[str]:
        raise NotImplementedError

    def rows(self, start: int, output: np.ndarray) -> tuple[dict[str, np.ndarray], list[list[Any]]]:
        """Arrays to write at ``start`` and CSV rows, for one chunk of backend output."""
        raise NotImplementedError


class ClassifyTask(Task):
    name = "classify"
    csv_name = "predictions.csv"

    def __init__(self, rows: int, class_names: list[str], source: Source, labels: np.ndarray | None) -> None:
        self.n = rows
        self.class_names = class_names
        self.source = source
        self.labels = labels
        self.with_names = source.names(0, 0) is not None

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {
            "probabilities.npy": (np.dtype(np.float32), (self.n, len(self.class_names))),
            "predictions.npy": (np.dtype(np.int64), (self.n,)),
        }

    def csv_header(self) -> list[str]:
        head = ["row"] + (["file"] if self.with_names else []) + ["predicted", "label", "probability"]
        return head + (["true", "true_label", "correct"] if self.labels is not None else [])

    def rows(self, start: int, output: np.ndarray) -> tuple[dict[str, np.ndarray], list[list[Any]]]:
        probabilities = np.asarray(output, dtype=np.float32)
        if probabilities.ndim != 2 or probabilities.shape[1] != len(self.class_names):
            raise JobError(
                f"the model returned probabilities of shape {list(probabilities.shape)}, "
                f"expected [n, {len(self.class_names)}]"
            )
        stop = start + len(probabilities)
        predicted = probabilities.argmax(axis=1).astype(np.int64)
        best = probabilities[np.arange(len(predicted)), predicted]
        names = self.source.names(start, stop) if self.with_names else None
        truth = self.labels[start:stop] if self.labels is not None else None
        lines = []
        for i, (p, score) in enumerate(zip(predicted.tolist(), best.tolist())):
            line: list[Any] = [start + i]
            if names is not None:
                line.append(names[i])
            line += [p, self.class_names[p], f"{score:.6f}"]
            if truth is not None:
                t = int(truth[i])
                line += [t, self.class_names[t], int(t == p)]
            lines.append(line)
        return {"probabilities.npy": probabilities, "predictions.npy": predicted}, lines


class ProfitTask(Task):
    name = "profit"
    csv_name = "profits.csv"

    def __init__(self, rows: int, source: Source) -> None:
        self.n = rows
        self.source = source
        self._last_inputs: tuple[int, np.ndarray | None] = (-1, None)

    def arrays(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        return {"profits.npy": (np.dtype(np.float32), (self.n,))}

    def csv_header(self) -> list[str]:
        return ["row", "population", "profit_usd"]

    def inputs_seen(self, start: int, chunk: np.ndarray) -> None:
        """The populations chunk starting at ``start`` (repeated in the CSV next to its profit)."""
        self._last_inputs = (start, chunk)

    def rows(self, start: int, output: np.ndarray) -> tuple[dict[str, np.ndarray], list[list[Any]]]:
        profits = np.asarray(output, dtype=np.float32).reshape(-1)
        seen_at, populations = self._last_inputs
        if seen_at != start or populations is None or len(populations) != len(profits):
            raise JobError(f"internal error: no populations recorded for the chunk at row {start}")
        pairs = zip(populations.tolist(), profits.tolist())
        lines = [[start + i, format(p, ".9g"), f"{v:.2f}"] for i, (p, v) in enumerate(pairs)]
        return {"profits.npy": profits}, lines


# -- the job -------------------------------------------------------------------------------------


class Job:
    """Runs one task over one source through one backend into ``config.output``."""

    def __init__(
        self,
        task_name: str,
        source: Source,
        backend: Backend,
        config: JobConfig,
        labels_path: Path | None = None,
    ) -> None:
        self.task_name = task_name
        self.source = source
        self.backend = backend
        self.config = config
        self.labels_path = labels_path
        self.out = Path(config.output)
        self.partial = self.out / PARTIAL
        self.log = config.log
        self._arrays: dict[str, NpyRows] = {}
        self._csv: Any = None
        self.rate = 0.0

    # -- checks before any output ------------------------------------------------------------

    def _prepare(self) -> None:
        cfg, model = self.config, self.backend.model
        if cfg.chunk_size < 1:
            raise JobError(f"--chunk-size must be at least 1, got {cfg.chunk_size}")
        if cfg.chunk_size > model.max_batch_size:
            raise JobError(
                f"--chunk-size {cfg.chunk_size} is over the largest batch model '{model.name}' accepts "
                f"({model.max_batch_size})"
            )
        self.log(f"checking {self.source.path} ...")
        self.source.verify()
        self.labels, labels_sha = None, None
        if self.labels_path is not None:
            if self.task_name != "classify":
                raise JobError("--labels applies to classify jobs only")
            self.labels, labels_sha = read_labels(self.labels_path, self.source.rows)
        if self.task_name == "classify":
            want = tuple(model.input_shape[1:])
            got = self.source.item_shape
            if len(want) != len(got) or any(w >= 0 and w != g for w, g in zip(want, got)):
                raise InputError(
                    f"{self.source.path}: images are {list(got)} each but model '{model.name}' takes "
                    f"{list(want)} (input [N, {', '.join(map(str, want))}])"
                )
            names = list(model.class_names)
            n_classes = len(names)
            if not names:
                raise JobError(f"model '{model.name}' declares no class names")
            if (
                self.labels is not None
                and len(self.labels)
                and (self.labels.min() < 0 or self.labels.max() >= n_classes)
            ):
                raise InputError(
                    f"{self.labels_path}: labels range from {self.labels.min()} to {self.labels.max()}; "
                    f"model '{model.name}' has classes 0 to {n_classes - 1}"
                )
            self.task: Task = ClassifyTask(self.source.rows, names, self.source, self.labels)
        else:
            self.task = ProfitTask(self.source.rows, self.source)
        self.spec: dict[str, Any] = {
            "format": FORMAT,
            "task": self.task_name,
            "input": self.source.describe(),
            "labels": None if self.labels_path is None else {"path": str(self.labels_path), "sha256": labels_sha},
            "model": {"name": model.name, "version": model.version},
            "chunk_size": cfg.chunk_size,
        }

    def _differences(self, other: dict[str, Any]) -> list[str]:
        def flat(d: Any, prefix: str = "") -> dict[str, Any]:
            if not isinstance(d, dict):
                return {prefix: d}
            items: dict[str, Any] = {}
            for k, v in d.items():
                items.update(flat(v, f"{prefix}.{k}" if prefix else k))
            return items

        mine, theirs = flat(self.spec), flat(other)
        return [
            f"{k}: {theirs.get(k)!r} there, {mine.get(k)!r} now"
            for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)
        ]

    def _final_names(self) -> list[str]:
        names = [*self.task.arrays(), self.task.csv_name]
        if self.labels is not None:
            names += [CONFUSION_CSV, CONFUSION_PNG]
        return names

    def _clear(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
        for name in [*self._final_names(), SUMMARY]:
            (self.out / name).unlink(missing_ok=True)

    # -- run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self._prepare()
        self.out.mkdir(parents=True, exist_ok=True)
        with _exclusive(self.out):
            return self._run_locked()

    def _run_locked(self) -> dict[str, Any]:
        if self.config.restart:
            self._clear()
        summary_path = self.out / SUMMARY
        if summary_path.exists():
            done: dict[str, Any] = json.loads(summary_path.read_text())
            if done.get("spec") == self.spec and done.get("complete"):
                shutil.rmtree(self.partial, ignore_errors=True)
                self.log(f"{self.out}: this job is already complete ({done['rows']:,} rows); nothing to do")
                return done
            raise JobError(
                f"{self.out} holds the finished result of a different job ("
                + "; ".join(self._differences(done.get("spec", {})))
                + "); choose another --output or pass --restart"
            )
        journal = self._open_journal()
        try:
            if journal["rows_done"] < self.source.rows:
                self._compute(journal)
            return self._finish(journal)
        finally:
            for array in self._arrays.values():
                array.close()
            if self._csv is not None:
                self._csv.close()

    def _open_journal(self) -> dict[str, Any]:
        path = self.partial / JOURNAL
        journal: dict[str, Any] | None = json.loads(path.read_text()) if path.exists() else None
        arrays = self.task.arrays()
        if journal is not None and journal.get("spec") != self.spec:
            raise JobError(
                f"{self.out} holds an unfinished job that differs from this one ("
                + "; ".join(self._differences(journal.get("spec", {})))
                + "); re-run that job to finish it, choose another --output, or pass --restart"
            )
        if journal is None:  # new job (or one killed before its first journal)
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            self._arrays = {n: NpyRows(self.partial / n, d, s, create=True) for n, (d, s) in arrays.items()}
            header = io.StringIO()
            csv.writer(header, lineterminator="\n").writerow(self.task.csv_header())
            (self.partial / self.task.csv_name).write_bytes(header.getvalue().encode())
            journal = {
                "spec": self.spec,
                "state": "running",
                "rows_done": 0,
                "csv_bytes": len(header.getvalue().encode()),
                "runs": [],
            }
            self._csv = open(self.partial / self.task.csv_name, "r+b")  # noqa: SIM115 - open for the whole job
            self._commit(journal)
        elif journal["state"] == "running":
            self.log(f"resuming at row {journal['rows_done']:,} of {self.source.rows:,}")
            self._arrays = {n: NpyRows(self.partial / n, d, s, create=False) for n, (d, s) in arrays.items()}
            self._csv = open(self.partial / self.task.csv_name, "r+b")  # noqa: SIM115 - open for the whole job
            self._csv.truncate(journal["csv_bytes"])
        else:  # interrupted while finishing: every row is done, some files may have moved already
            return journal
        self._csv.seek(journal["csv_bytes"])
        return journal

    def _commit(self, journal: dict[str, Any]) -> None:
        if self.config.sync:
            for array in self._arrays.values():
                array.sync()
            os.fsync(self._csv.fileno())
        write_atomic(self.partial / JOURNAL, _json(journal), self.config.sync)

    def _compute(self, journal: dict[str, Any]) -> None:
        cfg, n = self.config, self.source.rows
        run = {"mode": self.backend.mode, "start_row": journal["rows_done"], "rows": 0, "seconds": 0.0}
        journal["runs"].append(run)
        started = time.monotonic()
        progress = Progress(n, initial=journal["rows_done"], label="rows", mode=cfg.progress)
        failures = 0
        try:
            while journal["rows_done"] < n:
                start = journal["rows_done"]
                chunks = self.source.chunks(start, cfg.chunk_size)
                if isinstance(self.task, ProfitTask):
                    chunks = self._remember_inputs(chunks, start)
                limit = getattr(self.backend, "stream_chunks", None)
                if limit:
                    chunks = itertools.islice(chunks, limit)
                try:
                    for output in self.backend.run(self.task_name, chunks):
                        row = journal["rows_done"]
                        expected = min(cfg.chunk_size, n - row)
                        if len(output) != expected:
                            raise JobError(f"the backend returned {len(output)} rows for a chunk of {expected}")
                        arrays, lines = self.task.rows(row, output)
                        for name, values in arrays.items():
                            self._arrays[name].write(row, values)
                        text = io.StringIO()
                        csv.writer(text, lineterminator="\n").writerows(lines)
                        self._csv.write(text.getvalue().encode())
                        self._csv.flush()
                        journal["rows_done"] = row + expected
                        journal["csv_bytes"] = self._csv.tell()
                        run["rows"] += expected
                        run["seconds"] = round(time.monotonic() - started, 3)
                        self._commit(journal)
                        progress.update(expected)
                        failures = 0
                except Exception as exc:
                    if not is_transient(exc):
                        raise
                    failures += 1
                    if failures > cfg.retries:
                        raise JobError(
                            f"giving up after {cfg.retries} retries at row {journal['rows_done']:,}: {exc}; "
                            "re-run the same command to resume"
                        ) from exc
                    pause = min(30.0, cfg.backoff * 2 ** (failures - 1))
                    progress_note = f"row {journal['rows_done']:,}/{n:,}"
                    newline = "\n" if progress.mode == "bar" else ""  # off the bar's line
                    self.log(
                        f"{newline}transient error at {progress_note} ({exc}); "
                        f"retry {failures}/{cfg.retries} in {pause:.1f} s"
                    )
                    time.sleep(pause)
        finally:
            progress.close()
        self.rate = run["rows"] / max(time.monotonic() - started, 1e-9)

    def _remember_inputs(self, chunks: Iterator[np.ndarray], start: int) -> Iterator[np.ndarray]:
        """Hand each populations chunk to the task too (the profit CSV repeats the input)."""
        assert isinstance(self.task, ProfitTask)
        row = start
        for chunk in chunks:
            self.task.inputs_seen(row, chunk)
            yield chunk
            row += len(chunk)

    # -- finish ------------------------------------------------------------------------------

    def _where(self, name: str) -> Path:
        """A result file: still under .partial/, or already moved by an interrupted finish."""
        partial = self.partial / name
        return partial if partial.exists() else self.out / name

    def _finish(self, journal: dict[str, Any]) -> dict[str, Any]:
        if journal["state"] != "finishing":
            journal["state"] = "finishing"
            self._commit(journal)
        summary: dict[str, Any] = {
            "complete": True,
            "format": FORMAT,
            "spec": self.spec,
            "task": self.task_name,
            "rows": self.source.rows,
            "model": self.spec["model"],
            "runs": journal["runs"],
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if self.labels is not None:
            assert isinstance(self.task, ClassifyTask)
            names = self.task.class_names
            predicted = _chunks_of(self._where("predictions.npy"), 65536)
            truth = (self.labels[i : i + 65536] for i in range(0, len(self.labels), 65536))
            matrix = report.confusion_matrix(zip(truth, predicted), len(names))
            accuracy = report.accuracy(matrix)
            summary.update(accuracy=round(accuracy, 6), correct=int(np.trace(matrix)))
            write_atomic(self.partial / CONFUSION_CSV, report.confusion_csv(matrix, names), self.config.sync)
            model = self.spec["model"]
            skipped = report.confusion_png(
                matrix,
                names,
                self.partial / CONFUSION_PNG,
                f"{model['name']} v{model['version']}: accuracy {accuracy:.2%} on {self.source.rows:,} rows",
            )
            if skipped:
                self.log(f"confusion_matrix.png skipped: {skipped}; {CONFUSION_CSV} has the counts")
            self.log(f"accuracy {accuracy:.4f} ({int(np.trace(matrix)):,}/{self.source.rows:,} correct)")
        outputs = {}
        for name in self._final_names():
            source = self.partial / name
            if source.exists():
                os.replace(source, self.out / name)
            if (self.out / name).exists():
                outputs[name] = {"bytes": (self.out / name).stat().st_size, "sha256": _sha256(self.out / name)}
        summary["outputs"] = outputs
        write_atomic(self.out / SUMMARY, _json(summary), self.config.sync)
        shutil.rmtree(self.partial, ignore_errors=True)
        return summary
