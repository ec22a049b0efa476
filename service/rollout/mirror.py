"""The mirror: answered requests run again on another version of the same model, in the
background, at low priority, through a bounded queue.

A :class:`Job` is queued once the client has its answer (the data plane's ``finish``): the
request's decoded inputs and the answer it got. One worker task per model takes jobs in order and
joins those of the same shape into one batch (up to :data:`MAX_ROWS` rows, :data:`MAX_JOBS` jobs),
one batch at a time. Where the batch runs (``rollout_mirror``, docs/rollout.md):

* a :class:`~.mirror_process.MirrorProcess` (``process``): a child at idle CPU priority, after
  the jobs gathered for :data:`GATHER_S`;
* the target's own batcher (``batcher``, and always a canary's checks, which feed its agreement
  rule): once neither the version that answered nor the target has client work queued or
  running. A batch that started keeps its CPU while client requests arrive.

The answers go to ``done`` (the controller compares them). Bounded: at most ``capacity`` jobs and
``max_bytes`` of their arrays wait; beyond either a job is dropped and counted, never queued.
Nothing here can fail a client request: the client was answered before its job existed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ..core.registry import ModelVersion
    from .mirror_process import MirrorProcess

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
#: Most rows and jobs in one mirrored batch.
MAX_ROWS = 256
MAX_JOBS = 64
#: Seconds jobs gather before a batch goes to a mirror process.
GATHER_S = 0.02


class Job:
    """One answered request to run on ``target``: its inputs, and ``answer`` (the first output the
    client got, from version ``answered``). ``check``: a canary's answer checked against the
    primary (else a primary's answer mirrored to the shadow)."""

    __slots__ = ("target", "answered", "check", "feeds", "output", "answer", "rows", "nbytes", "key")

    def __init__(self, target: int, answered: int, check: bool, feeds: Arrays, output: str, answer: np.ndarray) -> None:
        self.target = target
        self.answered = answered
        self.check = check
        self.feeds = feeds
        self.output = output
        self.answer = answer
        self.rows = len(answer)
        self.nbytes = sum(a.nbytes for a in feeds.values()) + answer.nbytes
        shapes = tuple((n, a.shape[1:], a.dtype.str) for n, a in feeds.items())
        self.key = (target, answered, check, output, shapes)


Done = Callable[[list[Job], "np.ndarray | None", "BaseException | None"], None]


class Mirror:
    """The bounded queue and worker of one model (see the module docstring)."""

    def __init__(
        self,
        name: str,
        capacity: int,
        max_bytes: int,
        resolve: Callable[[int], ModelVersion | None],
        done: Done,
        process: MirrorProcess | None = None,
    ) -> None:
        self.name = name
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._resolve = resolve
        self._done = done
        #: Where mirrored batches run: this child process, or (None) the target's own batcher.
        self.process = process
        self._queue: deque[Job] = deque()
        self.queued_bytes = 0
        #: Jobs dropped before running, by reason: queue_full, queue_bytes, not_served.
        self.dropped: dict[str, int] = {"queue_full": 0, "queue_bytes": 0, "not_served": 0}
        self.batches = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def depth(self) -> int:
        return len(self._queue)

    def offer(self, job: Job) -> bool:
        """Queue ``job`` (event loop); False when it was dropped (counted)."""
        if len(self._queue) >= self.capacity:
            self.dropped["queue_full"] += 1
            return False
        if self.queued_bytes + job.nbytes > self.max_bytes:
            self.dropped["queue_bytes"] += 1
            return False
        self._queue.append(job)
        self.queued_bytes += job.nbytes
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"mirror-{self.name}")
        assert self._wake is not None
        self._wake.set()
        return True

    async def stop(self) -> None:
        """Stop the worker; what still waits is dropped (uncounted: the server is stopping)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._queue.clear()
        self.queued_bytes = 0
        if self.process is not None:
            await self.process.stop()

    def _take(self) -> list[Job]:
        """The head job and those after it that batch with it."""
        queue = self._queue
        first = queue.popleft()
        jobs, rows = [first], first.rows
        while queue and len(jobs) < MAX_JOBS and queue[0].key == first.key and rows + queue[0].rows <= MAX_ROWS:
            job = queue.popleft()
            jobs.append(job)
            rows += job.rows
        self.queued_bytes -= sum(j.nbytes for j in jobs)
        return jobs

    async def _run(self) -> None:
        assert self._wake is not None
        wake = self._wake
        while True:
            while not self._queue:
                wake.clear()
                await wake.wait()
            head = self._queue[0]
            # A canary's checks feed its agreement rule: they run at the server's priority.
            process = None if head.check else self.process
            if process is not None and len(self._queue) < MAX_JOBS:
                # Nobody waits for a mirrored answer: let jobs gather, so that the server's share
                # of a batch (pickling, the pipe, comparing) is paid once for many requests.
                await asyncio.sleep(GATHER_S)
            else:
                await asyncio.sleep(0)  # client requests that arrived in this turn go first
            if process is None:
                # Low priority: only while neither the answering version (the primary, or a canary)
                # nor the target has client work queued or running.
                for version in (head.answered, head.target):
                    model = self._resolve(version)
                    if model is not None and model.batcher.busy:
                        await model.batcher.wait_idle()
            if not self._queue:
                continue
            jobs = self._take()
            target = self._resolve(jobs[0].target)  # again: a round may have replaced it meanwhile
            if target is None:
                self.dropped["not_served"] += len(jobs)
                continue
            if len(jobs) == 1:
                feeds = jobs[0].feeds
            else:
                feeds = {name: np.concatenate([j.feeds[name] for j in jobs]) for name in jobs[0].feeds}
            output = jobs[0].output
            self.batches += 1
            try:
                if process is None:
                    answer = (await target.batcher.submit(feeds, [output]))[output]
                else:
                    answer = await process.run(target, feeds, output)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failing shadow: counted, never seen by a client
                self._report(jobs, None, exc)
                continue
            self._report(jobs, answer, None)

    def _report(self, jobs: list[Job], output: np.ndarray | None, error: BaseException | None) -> None:
        try:
            self._done(jobs, output, error)
        except Exception:  # the worker must not die
            log.exception("mirror comparison failed", extra={"model": self.name})
