"""Payload capture: inference requests and their responses written to rotating JSON-lines files.

On with the ``capture_dir`` setting. A request is captured once answered (the data plane's
``finish``), sampled with ``capture_share``, for the models in ``capture_models`` (all when empty):
its decoded inputs and its outputs go, by reference, into a bounded queue — at most
``capture_queue_capacity`` records and ``capture_queue_bytes`` of arrays; beyond either a record is
dropped and counted, the request never waits. A writer thread encodes and appends them every
:data:`FLUSH_SECONDS` to ``capture-<UTC time>-<pid>-<n>.jsonl`` (mode 0600), rotated past
``capture_max_file_bytes`` or ``capture_max_file_seconds``, at most ``capture_max_files`` kept
(the oldest deleted).

One record per line::

    {"time": "...Z", "request_id": "...", "protocol": "v2", "method": "...", "model": "m",
     "version": "2", "status": "OK", "latency_ms": 0.41,
     "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 28, 28], "data": "<base64>"}],
     "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [1, 10], "data": "<base64>"}]}

``data`` is the tensor's raw little-endian bytes in base64 (so a replay sends exactly these bytes
and can compare answers bit for bit). A tensor named in ``capture_redact`` (``name`` or
``model/name``) keeps its name, datatype and shape and gets ``"redacted": true`` instead of
``data``. Nothing of the request's metadata or headers is captured — no ``authorization``, no
caller id: a record holds only the fields above. A failed request that reached inference has its
inputs and no ``outputs``.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import orjson

from ..core.datatypes import datatype_of
from ..core.tensors import to_bytes

if TYPE_CHECKING:
    from ..core.context import RequestContext
    from ..settings import Settings

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.05
PATTERN = "capture-*.jsonl"
Arrays = dict[str, np.ndarray]


class Record:
    """What one captured request holds until the writer encodes it."""

    __slots__ = ("time", "context", "model", "version", "inputs", "outputs", "nbytes")

    def __init__(self, context: RequestContext, model: str, inputs: Arrays, outputs: Arrays | None) -> None:
        self.time = time.time()
        self.context = context  # read-only from here on: the request has been answered
        self.model = model
        self.version = context.version
        self.inputs = inputs
        self.outputs = outputs
        self.nbytes = sum(a.nbytes for a in inputs.values()) + sum(a.nbytes for a in (outputs or {}).values())


class Capture:
    """The capture queue, its writer thread and its files (see the module docstring)."""

    def __init__(self, settings: Settings, start: bool = True) -> None:
        assert settings.capture_dir is not None
        self.dir = Path(settings.capture_dir)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.share = settings.capture_share
        self.models = frozenset(settings.capture_models)
        self.redact = frozenset(settings.capture_redact)
        self.capacity = settings.capture_queue_capacity
        self.max_bytes = settings.capture_queue_bytes
        self.max_file_bytes = settings.capture_max_file_bytes
        self.max_file_seconds = settings.capture_max_file_seconds
        self.max_files = settings.capture_max_files
        self._queue: deque[Record] = deque()
        # Each counter has one writer: queued_* on the event loop, written_* on the writer thread.
        self.queued = 0
        self.queued_bytes = 0
        self.written = 0
        self.written_bytes = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "queue_bytes": 0}
        self.failed = 0
        self.files_opened = 0
        self._file: IO[bytes] | None = None
        self._file_size = 0
        self._file_opened = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the writer thread (made without it: ``start=False``)."""
        self._thread.start()

    # -- event loop ---------------------------------------------------------------------------

    def wants(self, model: str) -> bool:
        return not self.models or model in self.models

    def offer(self, context: RequestContext, model: str, inputs: Arrays, outputs: Arrays | None) -> bool:
        """Queue one answered request (sampled); False when it was not captured."""
        if (self.models and model not in self.models) or (self.share < 1 and random.random() >= self.share):
            return False
        if len(self._queue) >= self.capacity:
            self.dropped["queue_full"] += 1
            return False
        record = Record(context, model, inputs, outputs)
        if self.queued_bytes - self.written_bytes + record.nbytes > self.max_bytes:
            self.dropped["queue_bytes"] += 1
            return False
        self._queue.append(record)
        self.queued += 1
        self.queued_bytes += record.nbytes
        return True

    @property
    def depth(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Write what is queued, close the file, stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    # -- writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(FLUSH_SECONDS):
            self._drain()
        self._drain()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _drain(self) -> None:
        lines: list[bytes] = []
        queue = self._queue
        written = 0
        while queue:
            record = queue.popleft()
            try:
                lines.append(self._encode(record))
            except Exception:  # never let the writer die
                self.failed += 1
                log.exception("capture record could not be encoded")
            written += record.nbytes
        before = self.written
        try:
            if lines:
                self._write(lines)
            elif self._file is not None and time.monotonic() - self._file_opened >= self.max_file_seconds:
                self._rotate()
        except OSError as exc:
            self.failed += len(lines) - (self.written - before)
            log.error("capture file cannot be written", extra={"dir": str(self.dir), "error": str(exc)})
        self.written_bytes += written

    def _tensor(self, model: str, name: str, array: np.ndarray) -> dict[str, Any]:
        tensor: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
        if name in self.redact or f"{model}/{name}" in self.redact:
            tensor["redacted"] = True
        else:
            tensor["data"] = base64.b64encode(to_bytes(array)).decode("ascii")
        return tensor

    def _encode(self, record: Record) -> bytes:
        context = record.context
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.time, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "request_id": context.request_id,
            "protocol": context.protocol,
            "method": context.method,
            "model": record.model,
            "version": record.version,
            "status": context.status,
            "latency_ms": round(context.seconds() * 1000, 3),
            "inputs": [self._tensor(record.model, n, a) for n, a in record.inputs.items()],
        }
        if record.outputs is not None:
            entry["outputs"] = [self._tensor(record.model, n, a) for n, a in record.outputs.items()]
        return orjson.dumps(entry) + b"\n"

    def _write(self, lines: list[bytes]) -> None:
        """Append ``lines``, rotating before a line once the file is past its size or age."""
        for line in lines:
            if self._file is not None and (
                self._file_size >= self.max_file_bytes or time.monotonic() - self._file_opened >= self.max_file_seconds
            ):
                self._rotate()
            if self._file is None:
                self._open()
            assert self._file is not None
            self._file.write(line)
            self._file_size += len(line)
            self.written += 1
        if self._file is not None:
            self._file.flush()

    def _open(self) -> None:
        self.files_opened += 1
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.dir / f"capture-{stamp}-{os.getpid()}-{self.files_opened:05d}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file = os.fdopen(fd, "wb")
        self._file_size = 0
        self._file_opened = time.monotonic()
        self._prune()

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _prune(self) -> None:
        """Keep the newest ``max_files`` capture files (the open one included)."""
        files = sorted(self.dir.glob(PATTERN))  # the names sort by the time they were opened
        for old in files[: max(0, len(files) - self.max_files)]:
            try:
                old.unlink()
            except OSError:
                pass

    def describe(self) -> dict[str, Any]:
        return {
            "dir": str(self.dir),
            "share": self.share,
            "queued": self.queued,
            "written": self.written,
            "dropped": dict(self.dropped),
            "failed": self.failed,
            "queue_depth": self.depth,
            "files_opened": self.files_opened,
        }
