"""Payload capture: inference requests and their responses written to rotating JSON-lines files.

On with the ``capture_dir`` setting. A request is captured once answered (the data plane's
``finish``), sampled with ``capture_share``, for the models in ``capture_models`` (all when empty):
its decoded inputs and outputs are queued by reference — at most ``capture_queue_capacity``
records and ``capture_queue_bytes`` (reckoned from the arrays) waiting; beyond either a record is
dropped and counted, the request never waits. Every :data:`FLUSH_SECONDS` the event loop encodes
what is queued into JSON lines, :data:`ENCODE_SLICE` records per turn of the loop, and a writer
thread appends the lines to ``capture-<UTC time>-<pid>-<n>.jsonl`` (mode 0600), rotated past
``capture_max_file_bytes`` or ``capture_max_file_seconds``, at most ``capture_max_files`` kept
(the oldest deleted). Why encode in batches on the loop rather than per request or in the writer
thread: docs/rollout.md, "Capture".

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

import asyncio
import binascii
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
#: Records encoded in one turn of the event loop; the loop serves requests before the next ones.
ENCODE_SLICE = 32
#: What a record's line takes besides its tensors' base64 (reckoned; bounds the queue's bytes).
RECORD_BYTES = 512
#: Tensor heads (model, name, dtype, shape) kept before the cache starts again.
HEAD_CACHE = 1024


def estimate(inputs: Arrays, outputs: Arrays | None) -> int:
    """Bytes of the arrays of a request (their base64 is 4/3 of it)."""
    return sum(a.nbytes for a in inputs.values()) + (sum(a.nbytes for a in outputs.values()) if outputs else 0)


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
        #: Answered requests waiting to be encoded (by reference: the request is over, nothing
        #: changes them), with the bytes their line is reckoned to take.
        self._pending: deque[tuple[float, RequestContext, str, Arrays, Arrays | None, int]] = deque()
        self._queue: deque[tuple[bytes, int]] = deque()  # encoded lines, waiting to be written
        self._timer: asyncio.Handle | None = None
        # Each counter has one writer: queued_*, failed_bytes and encode_failed on the event
        # loop, written_* and write_failed on the writer thread.
        self.queued = 0
        self.queued_bytes = 0
        self.failed_bytes = 0
        self.written = 0
        self.written_bytes = 0
        self.dropped: dict[str, int] = {"queue_full": 0, "queue_bytes": 0}
        self.encode_failed = 0  # on the event loop
        self.write_failed = 0  # on the writer thread
        self.files_opened = 0
        self._file: IO[bytes] | None = None
        self._file_size = 0
        self._file_opened = 0.0
        self._heads: dict[tuple[str, str, np.dtype, tuple[int, ...]], tuple[bytes, bool]] = {}
        self._second = -1
        self._second_text = ""
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
        """Queue one answered request (sampled) for encoding; False when it was not captured."""
        if (self.models and model not in self.models) or (self.share < 1 and random.random() >= self.share):
            return False
        if len(self._pending) + len(self._queue) >= self.capacity:
            self.dropped["queue_full"] += 1
            return False
        size = 4 * estimate(inputs, outputs) // 3 + RECORD_BYTES  # about what its line will take
        if self.queued_bytes - self.written_bytes - self.failed_bytes + size > self.max_bytes:
            self.dropped["queue_bytes"] += 1
            return False
        self._pending.append((time.time(), context, model, inputs, outputs, size))
        self.queued += 1
        self.queued_bytes += size
        if self._timer is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a tool, a test): at once
                self.encode_pending()
            else:
                self._timer = loop.call_later(FLUSH_SECONDS, self._encode_slice)
        return True

    def _encode_slice(self) -> None:
        """Encode up to :data:`ENCODE_SLICE` pending records; the rest in the loop's next turn."""
        self._timer = None
        self._encode_some(ENCODE_SLICE)
        if self._pending:
            self._timer = asyncio.get_running_loop().call_soon(self._encode_slice)

    def encode_pending(self) -> None:
        """Encode every pending record now (on the loop's thread, or with no loop running)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._encode_some(len(self._pending))

    def _encode_some(self, count: int) -> None:
        pending, queue = self._pending, self._queue
        for _ in range(min(count, len(pending))):
            when, context, model, inputs, outputs, size = pending.popleft()
            try:
                queue.append((self._encode(when, context, model, inputs, outputs), size))
            except Exception:  # the client has its answer: never let capture fail anything
                self.encode_failed += 1
                self.failed_bytes += size
                log.exception("capture record could not be encoded", extra={"model": model})

    @property
    def failed(self) -> int:
        return self.encode_failed + self.write_failed

    @property
    def depth(self) -> int:
        return len(self._pending) + len(self._queue)

    def close(self) -> None:
        """Encode and write what is queued, close the file, stop the thread (call it on the
        loop's thread, or once the loop has stopped)."""
        self.encode_pending()
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
        queue = self._queue
        batch = [queue.popleft() for _ in range(len(queue))]
        lines = [line for line, _ in batch]
        before = self.written
        try:
            if lines:
                self._write(lines)
            elif self._file is not None and time.monotonic() - self._file_opened >= self.max_file_seconds:
                self._rotate()
        except OSError as exc:
            self.write_failed += len(lines) - (self.written - before)
            log.error("capture file cannot be written", extra={"dir": str(self.dir), "error": str(exc)})
        self.written_bytes += sum(size for _, size in batch)

    # -- encoding (on the event loop, in offer) ------------------------------------------------

    def _tensor(self, model: str, name: str, array: np.ndarray) -> bytes:
        """One tensor's JSON object: a cached head (name, datatype, shape) and the base64 data."""
        key = (model, name, array.dtype, array.shape)
        cached = self._heads.get(key)
        if cached is None:
            fields: dict[str, Any] = {"name": name, "datatype": datatype_of(array.dtype), "shape": list(array.shape)}
            redacted = name in self.redact or f"{model}/{name}" in self.redact
            if redacted:
                fields["redacted"] = True
            head = orjson.dumps(fields)
            cached = (head, True) if redacted else (head[:-1] + b',"data":"', False)
            if len(self._heads) >= HEAD_CACHE:
                self._heads.clear()
            self._heads[key] = cached
        head, redacted = cached
        if redacted:
            return head
        return head + binascii.b2a_base64(to_bytes(array), newline=False) + b'"}'

    def _stamp(self, when: float) -> str:
        """``when`` as an RFC 3339 UTC time with microseconds (the seconds part cached)."""
        second = int(when)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((when - second) * 1e6):06d}Z"

    def _encode(
        self, when: float, context: RequestContext, model: str, inputs: Arrays, outputs: Arrays | None
    ) -> bytes:
        head = orjson.dumps(
            {
                "time": self._stamp(when),
                "request_id": context.request_id,
                "protocol": context.protocol,
                "method": context.method,
                "model": model,
                "version": context.version,
                "status": context.status,
                "latency_ms": round(context.seconds() * 1000, 3),
            }
        )
        parts = [head[:-1], b',"inputs":[', b",".join([self._tensor(model, n, a) for n, a in inputs.items()])]
        if outputs is not None:
            parts.append(b'],"outputs":[')
            parts.append(b",".join([self._tensor(model, n, a) for n, a in outputs.items()]))
        parts.append(b"]}\n")
        return b"".join(parts)

    # -- writer thread: files ------------------------------------------------------------------

    def _write(self, lines: list[bytes]) -> None:
        """Append ``lines``, rotating before a line once the file is past its size or age."""
        chunk: list[bytes] = []
        for line in lines:
            if self._file is not None and (
                self._file_size >= self.max_file_bytes or time.monotonic() - self._file_opened >= self.max_file_seconds
            ):
                self._append(chunk)
                self._rotate()
            if self._file is None:
                self._open()
            chunk.append(line)
            self._file_size += len(line)
        self._append(chunk)

    def _append(self, chunk: list[bytes]) -> None:
        """Write ``chunk`` to the open file in one call, then empty it."""
        if chunk and self._file is not None:
            self._file.write(b"".join(chunk))
            self._file.flush()
            self.written += len(chunk)
            chunk.clear()

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
