"""Dynamic batching: one queue per model version, shared by both protocol adapters.

Requests for the same model version that arrive while its inference workers are busy (or within
``max_queue_delay_us`` of the oldest waiting request) are concatenated along the batch axis, run
as one onnxruntime call, and split back by row offsets: every caller gets exactly its own rows.

* **Batch size.** At most ``max_batch_rows`` rows per executed batch. A request with more rows is
  *split*: its rows are taken in order across consecutive batches (sharing them with other
  requests) and its outputs joined again, so large requests neither block small ones for long nor
  make one huge allocation. (The per-request limit is the separate server setting
  ``max_request_rows``; over it a request is INVALID_ARGUMENT before it is queued.)
* **When a batch runs.** As soon as a worker slot is free (at most ``inference_workers`` batches of
  one model version run at once, or the version's ``instance_group`` count) and either the queue
  holds ``max_batch_rows`` rows (or a preferred batch size) or the oldest request has waited
  ``max_queue_delay_us``. With the default delay 0 nothing waits on purpose: a batch is whatever
  queued while the previous batches ran, which is where batching pays off. With Triton's
  ``preferred_batch_size`` list, a batch is cut at the largest preferred size the waiting rows
  reach (rows are split freely, so a preferred size is met exactly).
* **Backpressure.** More than ``queue_capacity`` waiting requests → RESOURCE_EXHAUSTED at once.
  A request whose deadline passes while it waits is answered DEADLINE_EXCEEDED and dropped before
  compute; a caller that goes away (cancelled RPC) is dropped the same way. Both are counted.
* **Off** (``enabled: false``, or a model whose inputs/outputs have no dynamic batch axis): each
  request is its own batch, unsplit, through the same queue, limits and metrics.

All queue state lives on the event loop thread (no locks). onnxruntime (plus the input
concatenation) runs on the inference threads, except a batch expected to take less than
``inline_compute_us`` (100 µs by default: the linear models, the softmax classifier up to ~450 rows),
which runs on the event loop thread because handing it to a thread and back costs more CPU than
the computation itself; the expectation comes from timing the model at load (1 and 16 rows, best
of 3). It is not corrected from live timings: under load those include waits for the GIL (which
onnxruntime releases while it runs), and "learning" them pushed cheap batches onto threads.
Inputs are used as given (views over the request bytes); the only copies are the concatenation of
several requests and the caller's own encoding of its output rows, which are views into the batch
output.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import DeadlineExceeded, Internal, ResourceExhausted, ServingError, Unavailable
from ..settings import BatchingOverride, Settings
from .context import DEADLINE_SLACK_SECONDS, RequestContext

if TYPE_CHECKING:
    from ..observability.metrics import ModelMetrics
    from ..observability.statistics import ModelStats

log = logging.getLogger(__name__)

#: Optional per-model file, next to the version directories: {"batching": {...}}.
CONFIG_FILE = "config.json"

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays, list[str]], Arrays]
#: perf_counter() times of one batch: launched (left the queue), started (on its thread),
#: running (onnxruntime called), computed (onnxruntime returned).
Times = tuple[float, float, float, float]
Outcome = tuple[Arrays, int, Times]  # a batch's outputs, rows, times


@dataclass(frozen=True)
class BatchingConfig:
    """Resolved batching settings of one model version."""

    enabled: bool = True
    max_batch_rows: int = 64
    max_queue_delay_us: int = 0
    queue_capacity: int = 512
    #: Triton's ``dynamic_batching.preferred_batch_size`` (config.pbtxt only), ascending.
    preferred_batch_sizes: tuple[int, ...] = ()

    @classmethod
    def resolve(
        cls,
        settings: Settings,
        name: str,
        model_dir: Path | None = None,
        triton: dict[str, tuple[Any, str]] | None = None,
    ) -> BatchingConfig:
        """Server defaults, then the model's files — ``<model_dir>/config.json`` "batching" and
        the batching fields ``triton`` derived from its config.pbtxt (field → (value, what the
        file says)), which must agree — then ``settings.batching``, which wins.

        Raises ValueError when config.json is not valid JSON or has unknown/invalid fields, or
        when it contradicts config.pbtxt.
        """
        values: dict[str, Any] = {
            "enabled": settings.dynamic_batching,
            "max_batch_rows": settings.max_batch_rows,
            "max_queue_delay_us": settings.batch_max_queue_delay_us,
            "queue_capacity": settings.batch_queue_capacity,
        }
        from_json = config_json_batching(model_dir)
        from_triton = {key: value for key, (value, _) in (triton or {}).items()}
        for key, (value, said) in (triton or {}).items():
            if key not in from_json or from_json[key] == value:
                continue
            if key == "max_batch_rows" and from_json[key] < value:
                del from_triton[key]  # config.json may make executed batches smaller than max_batch_size
                continue
            raise ValueError(
                f"{name}/{CONFIG_FILE} sets batching.{key} = {json.dumps(from_json[key])}, which contradicts "
                f"{name}/config.pbtxt ({said}); say it in one file"
            )
        values.update(from_json)
        values.update(from_triton)
        if name in settings.batching:
            values.update(settings.batching[name].model_dump(exclude_none=True))
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "enabled": self.enabled,
            "max_batch_rows": self.max_batch_rows,
            "max_queue_delay_us": self.max_queue_delay_us,
            "queue_capacity": self.queue_capacity,
        }
        if self.preferred_batch_sizes:
            described["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return described


#: The sections ``config.json`` may hold.
CONFIG_JSON_SECTIONS = ("batching", "rollout")


def config_json(model_dir: Path | None) -> dict[str, Any]:
    """``<model_dir>/config.json`` as a dict of its sections ({} without the file); ValueError when
    it is not valid JSON or has a section other than :data:`CONFIG_JSON_SECTIONS`."""
    path = model_dir / CONFIG_FILE if model_dir is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    unknown = sorted(set(data) - set(CONFIG_JSON_SECTIONS)) if isinstance(data, dict) else None
    if unknown is None or unknown:
        raise ValueError(f'{path}: expected {{"batching": {{...}}, "rollout": {{...}}}}, got keys {unknown}')
    sections: dict[str, Any] = data
    return sections


def config_json_batching(model_dir: Path | None) -> dict[str, Any]:
    """The batching fields ``<model_dir>/config.json`` sets ({} without the file); ValueError when
    it is not valid JSON or has unknown/invalid fields."""
    data = config_json(model_dir)
    try:
        override = BatchingOverride.model_validate(data.get("batching", {}))
    except Exception as exc:  # pydantic.ValidationError: say which file
        raise ValueError(f"{model_dir}/{CONFIG_FILE}: {exc}") from None
    return override.model_dump(exclude_none=True)


class _Item:
    """One queued request."""

    __slots__ = (
        "feeds",
        "names",
        "rows",
        "key",
        "future",
        "enqueued",
        "deadline",
        "timer",
        "taken",
        "done_rows",
        "pieces",
        "counted",
        "context",
    )

    def __init__(
        self,
        feeds: Arrays,
        names: list[str],
        rows: int,
        future: asyncio.Future[Arrays],
        now: float,
        context: RequestContext | None,
    ) -> None:
        self.feeds = feeds
        self.context = context
        self.names = names
        self.rows = rows
        # Requests batch together when their non-batch dimensions and outputs agree.
        self.key = (tuple(a.shape[1:] for a in feeds.values()), tuple(names))
        self.future = future
        self.enqueued = now
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.taken = 0  # rows handed to batches so far
        self.done_rows = 0  # rows whose outputs came back
        self.pieces: dict[int, Arrays] = {}  # start row → outputs (split requests)
        self.counted = False  # already counted as dropped


Part = tuple[_Item, int, int]  # item, first row, end row

#: A request arriving this long after the previous one is dispatched at once, not on the next
#: turn of the event loop (which lets requests that arrive together share a batch).
_IDLE_S = 250e-6


class Batcher:
    """The queue and batch scheduler of one model version (see the module docstring)."""

    def __init__(
        self,
        label: str,
        run: RunFn,
        executor: Executor | None,
        config: BatchingConfig,
        max_in_flight: int,
        metrics: ModelMetrics | None = None,
        batchable: bool = True,
        inline_compute_us: int = 0,
        stats: ModelStats | None = None,
    ) -> None:
        self.label = label
        self.config = config
        self.batching = config.enabled and batchable
        self._run = run
        self._executor = executor
        self._max_in_flight = max(1, max_in_flight)
        self._metrics = metrics
        self._stats = stats
        # Triton's preferred batch sizes, capped by max_batch_rows (only when batching).
        self._preferred = tuple(s for s in config.preferred_batch_sizes if s <= config.max_batch_rows)
        self._delay = config.max_queue_delay_us / 1e6
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Item] = deque()
        self._in_flight = 0
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._last_submit = float("-inf")
        self._inline_limit = inline_compute_us / 1e6
        self._cost: tuple[float, float] | None = None  # seconds: fixed, per row
        self._idle_waiters: list[asyncio.Future[None]] = []

    # -- cost model (inline or thread) ---------------------------------------------------------

    def calibrate(self, fixed_s: float, per_row_s: float) -> None:
        """Expected compute time of a batch: ``fixed_s + rows * per_row_s`` (from load-time runs)."""
        self._cost = (max(fixed_s, 0.0), max(per_row_s, 0.0))

    def expected_seconds(self, rows: int) -> float | None:
        if self._cost is None:
            return None
        return self._cost[0] + rows * self._cost[1]

    def _inline(self, rows: int) -> bool:
        if self._cost is None or self._inline_limit <= 0:
            return False
        return self._cost[0] + rows * self._cost[1] < self._inline_limit

    # -- state read by the metrics scrape ----------------------------------------------------

    @property
    def depth(self) -> int:
        """Requests waiting (not yet fully handed to a batch)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """Batches of this version that may run at once (its instances)."""
        return self._max_in_flight

    @property
    def busy(self) -> bool:
        """Requests queued or batches running."""
        return bool(self._queue or self._in_flight)

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running (True), or ``timeout`` seconds pass (False)."""
        if not self.busy:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)

    def _settle(self) -> None:
        """Wake :meth:`wait_idle` callers once nothing is queued or running."""
        if self._idle_waiters and not self._queue and not self._in_flight:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._idle_waiters.clear()

    # -- callers -------------------------------------------------------------------------------

    async def submit(
        self, feeds: Arrays, names: list[str], timeout: float | None = None, context: RequestContext | None = None
    ) -> Arrays:
        """Queue validated ``feeds`` (all with the same number of rows ≥ 1); return this request's
        outputs ``names`` once computed. Raises ResourceExhausted (queue full), DeadlineExceeded
        (``timeout`` seconds passed first), Unavailable (closed) or the run's ServingError.
        ``context`` (when given) receives the queue wait, compute time and batch size."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._bind(loop)
        if self._closed:
            raise Unavailable(f"{self.label} is being unloaded; retry")
        if len(self._queue) >= self.config.queue_capacity:
            self._drop("queue_full")
            raise ResourceExhausted(f"{self.label} has {len(self._queue)} requests queued, its capacity; retry later")
        rows = len(next(iter(feeds.values())))
        now = loop.time()
        item = _Item(feeds, names, rows, loop.create_future(), now, context)
        if timeout is not None:
            if timeout <= 0:
                self._drop("deadline")
                raise DeadlineExceeded(f"deadline already passed before {self.label} ran")
            item.deadline = now + timeout
            item.timer = loop.call_at(item.deadline, self._expire, item)
        self._queue.append(item)
        idle = now - self._last_submit > _IDLE_S
        self._last_submit = now
        if not self._scheduled:
            if idle and len(self._queue) == 1 and self._in_flight < self._max_in_flight and not self._delay:
                # Nothing else arrived lately: start at once (an unloaded request skips two turns
                # of the event loop; a request run inline is done before it is awaited).
                self._dispatch()
            else:
                self._scheduled = True
                loop.call_soon(self._dispatch)  # requests arriving in this loop turn batch together
        try:
            result: Arrays = await item.future
            return result
        except asyncio.CancelledError:  # the caller went away (client cancelled, or its deadline)
            self._forget(item, "cancelled")
            raise
        finally:
            if item.timer is not None:
                item.timer.cancel()

    def close(self) -> None:
        """Fail waiting requests with UNAVAILABLE and refuse new ones (running batches finish)."""
        self._closed = True
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Unavailable(f"{self.label} was unloaded before it ran"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._settle()

    # -- scheduling (event loop thread) --------------------------------------------------------

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the running loop (a new loop, e.g. another asyncio.run, starts afresh)."""
        self._loop = loop
        self._queue.clear()
        self._in_flight = 0
        self._scheduled = False
        self._timer = None

    def _drop(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.dropped(reason)

    def _expire(self, item: _Item) -> None:
        """The item's deadline passed: answer it now and take it out of the queue."""
        item.timer = None
        if item.future.done():
            return
        where = "in the queue" if item.taken == 0 else "while running"
        item.future.set_exception(DeadlineExceeded(f"{self.label}: the request's deadline passed {where}"))
        self._forget(item, "deadline")

    def _forget(self, item: _Item, reason: str) -> None:
        """Drop an answered or abandoned request from the queue; count it if it never ran."""
        if item.counted:
            return
        item.counted = True
        if item.taken < item.rows:
            try:
                self._queue.remove(item)
            except ValueError:
                pass
        if item.taken == 0:
            loop = self._loop
            if (
                reason == "cancelled"
                and item.deadline is not None
                and loop is not None
                and loop.time() >= item.deadline - DEADLINE_SLACK_SECONDS
            ):
                reason = "deadline"  # gRPC cancelled the call at its deadline (or its client's, just before)
            self._drop(reason)
        self._settle()

    def _on_timer(self) -> None:
        self._timer = None
        self._dispatch()

    def _dispatch(self) -> None:
        """Start batches while worker slots are free and the queue has something due."""
        self._start_batches()
        if self._idle_waiters:
            self._settle()

    def _start_batches(self) -> None:
        self._scheduled = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        queue = self._queue
        loop = self._loop
        assert loop is not None
        while queue and self._in_flight < self._max_in_flight:
            now = loop.time()
            self._purge(now)
            if not queue:
                return
            if self.batching and self._delay > 0:
                due = queue[0].enqueued + self._delay
                if now < due and not self._full(self._waiting_rows()):
                    self._timer = loop.call_at(due, self._on_timer)
                    return
            parts = self._gather()
            if parts:
                self._launch(parts, now)

    def _waiting_rows(self) -> int:
        total = 0
        for item in self._queue:
            total += item.rows - item.taken
            if total >= self.config.max_batch_rows:
                break
        return total

    def _full(self, rows: int) -> bool:
        """Enough rows wait to start a batch before the delay: max_batch_rows, or a preferred size."""
        return (
            rows >= self.config.max_batch_rows
            or rows in self._preferred
            or bool(self._preferred and rows >= self._preferred[-1])
        )

    def _limit(self) -> int:
        """Rows of the next batch: max_batch_rows, or the largest preferred size the waiting rows
        reach (none reached: all of them, up to max_batch_rows)."""
        limit = self.config.max_batch_rows
        if self._preferred:
            waiting = self._waiting_rows()
            reached = [s for s in self._preferred if s <= waiting]
            if reached:
                return reached[-1]
        return limit

    def _purge(self, now: float) -> None:
        """Drop answered (expired) or cancelled requests from the head of the queue."""
        queue = self._queue
        while queue:
            item = queue[0]
            if item.future.done():
                self._forget(item, "cancelled")  # safety net: normally removed already
                if queue and queue[0] is item:
                    queue.popleft()
            elif item.deadline is not None and now >= item.deadline:
                self._expire(item)  # removes it
            else:
                return

    def _gather(self) -> list[Part]:
        """Take rows from the head of the queue into one batch."""
        queue = self._queue
        item = queue[0]
        if not self.batching:
            queue.popleft()
            item.taken = item.rows
            return [(item, 0, item.rows)]
        limit = self._limit() if self._preferred else self.config.max_batch_rows
        parts: list[Part] = []
        rows = 0
        key = item.key
        while queue and rows < limit:
            item = queue[0]
            if item.future.done():  # answered or cancelled meanwhile
                self._forget(item, "cancelled")
                if queue and queue[0] is item:
                    queue.popleft()
                continue
            if item.key != key:
                break  # different shape or outputs: next batch
            start = item.taken
            take = min(item.rows - start, limit - rows)
            parts.append((item, start, start + take))
            item.taken = start + take
            rows += take
            if item.taken == item.rows:
                queue.popleft()
        return parts

    def _launch(self, parts: list[Part], now: float) -> None:
        launched = time.perf_counter()
        observe = self._metrics.queue_wait.observe if self._metrics is not None else None
        for item, start, _ in parts:
            if start == 0:
                if observe is not None:
                    observe(now - item.enqueued)
                if item.context is not None:
                    item.context.queue_seconds = now - item.enqueued
        names = parts[0][0].names
        if self._inline(sum(end - start for _, start, end in parts)):
            try:
                outcome: Outcome | BaseException = self._compute(parts, names, launched)
            except Exception as exc:
                outcome = exc
            self._complete(parts, outcome)
            return
        loop = self._loop
        assert loop is not None
        self._in_flight += 1
        done = partial(self._finished, parts, loop)
        if self._executor is None:  # a batcher made without one (tests): threads of its own
            self._executor = ThreadPoolExecutor(self._max_in_flight, thread_name_prefix="infer")
        try:
            future = self._executor.submit(self._compute, parts, names, launched)
        except RuntimeError as exc:  # executor shut down
            self._in_flight -= 1
            self._fail(parts, Unavailable(f"{self.label}: server is shutting down ({exc})"))
            return

        def wake(f: Future[Outcome]) -> None:
            try:
                loop.call_soon_threadsafe(done, f)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                pass

        future.add_done_callback(wake)

    def _compute(self, parts: list[Part], names: list[str], launched: float) -> Outcome:
        """Inference thread: build the batch, run it, check the outputs have one row per input row."""
        started = time.perf_counter()
        if len(parts) == 1:
            item, start, end = parts[0]
            whole = start == 0 and end == item.rows
            feeds = item.feeds if whole else {k: v[start:end] for k, v in item.feeds.items()}
            rows = end - start
        else:
            first = parts[0][0].feeds
            feeds = {k: np.concatenate([item.feeds[k][start:end] for item, start, end in parts]) for k in first}
            rows = sum(end - start for _, start, end in parts)
        running = time.perf_counter()
        outputs = self._run(feeds, names)
        computed = time.perf_counter()
        if self.batching:
            bad = {k: list(v.shape) for k, v in outputs.items() if v.ndim == 0 or len(v) != rows}
            if bad:
                raise Internal(
                    f"{self.label} returned {bad} for a batch of {rows} rows; "
                    "outputs must have one row per input row to be batched"
                )
        return outputs, rows, (launched, started, running, computed)

    def _finished(self, parts: list[Part], loop: asyncio.AbstractEventLoop, future: Future[Outcome]) -> None:
        """Event loop, after an inference thread ran a batch: results out, next batch in."""
        if loop is not self._loop:
            return  # from an event loop that is gone
        self._in_flight -= 1
        try:
            outcome: Outcome | BaseException = future.result()
        except BaseException as exc:
            outcome = exc
        self._complete(parts, outcome)
        if self._queue and not self._scheduled:
            self._dispatch()
        else:
            self._settle()

    def _complete(self, parts: list[Part], outcome: Outcome | BaseException) -> None:
        """Hand each caller its rows of the batch outputs (or the batch's error)."""
        if isinstance(outcome, BaseException):
            err = (
                outcome
                if isinstance(outcome, ServingError)
                else Internal(f"inference failed in {self.label}: {outcome}")
            )
            self._fail(parts, err)
        else:
            outputs, rows, (launched, started, running, computed) = outcome
            if self._metrics is not None:
                self._metrics.compute.observe(computed - started)  # concatenation + onnxruntime
                self._metrics.batch_size.observe(rows)
            input_s, infer_s = running - launched, computed - running
            offset = 0
            for item, start, end in parts:
                count = end - start
                context = item.context
                if context is not None:
                    context.input_seconds += input_s
                    context.compute_seconds += infer_s
                    context.computed = computed
                    context.batch_rows = max(context.batch_rows, rows)
                if not item.future.done():
                    mine = {k: v[offset : offset + count] for k, v in outputs.items()}
                    if count == item.rows:
                        item.future.set_result(mine)
                    else:
                        self._piece(item, start, count, mine)
                offset += count
            if self._stats is not None:  # Triton's per-batch-size statistics
                self._stats.batch(rows, input_s, infer_s, time.perf_counter() - computed)

    @staticmethod
    def _piece(item: _Item, start: int, count: int, outputs: Arrays) -> None:
        """One batch's share of a split request; join the pieces once all rows are back."""
        item.pieces[start] = outputs
        item.done_rows += count
        if item.done_rows == item.rows:
            ordered = [item.pieces[s] for s in sorted(item.pieces)]
            item.pieces = {}
            item.future.set_result({k: np.concatenate([p[k] for p in ordered]) for k in ordered[0]})

    def _fail(self, parts: list[Part], err: ServingError) -> None:
        for item, _, _ in parts:
            if not item.future.done():
                item.future.set_exception(type(err)(str(err)))
