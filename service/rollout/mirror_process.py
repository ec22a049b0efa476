"""The server's side of a mirror process (:mod:`.mirror_worker`): one child per model, started on
the first mirrored batch, restarted with a back-off when it dies, stopped with the mirror."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import sys
import weakref
from itertools import count
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.runtime import CPU
from ..errors import Internal, Unavailable
from .mirror_worker import HEADER

if TYPE_CHECKING:
    from ..core.registry import ModelVersion

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
#: Seconds before a process that died is started again: doubling from the first to the last.
RESTART_BACKOFF = (0.5, 30.0)
#: Seconds a stopping process has to exit after its stdin closes, before it is killed.
STOP_GRACE = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class MirrorProcess:
    """Runs mirrored batches in a child process at idle CPU priority (one batch at a time: the
    mirror's worker awaits each)."""

    def __init__(self, name: str, intra_op_threads: int, inter_op_threads: int) -> None:
        self.name = name
        self._argv = [
            sys.executable,
            "-m",
            "service.rollout.mirror_worker",
            f"--intra-op-threads={intra_op_threads}",
            f"--inter-op-threads={inter_op_threads}",
        ]
        self._proc: asyncio.subprocess.Process | None = None
        self.pid: int | None = None
        self.priority: str | None = None
        #: Processes started, and those that died under the server.
        self.starts = 0
        self.deaths = 0
        self._backoff = RESTART_BACKOFF[0]
        self._retry_at = 0.0
        self._keys: weakref.WeakKeyDictionary[ModelVersion, int] = weakref.WeakKeyDictionary()
        self._next_key = count()

    def figures(self) -> dict[str, Any]:
        return {"pid": self.pid, "priority": self.priority, "starts": self.starts, "deaths": self.deaths}

    async def run(self, model: ModelVersion, feeds: Arrays, output: str) -> np.ndarray:
        """``model``'s ``output`` for ``feeds``, computed in the child; Internal when the model
        fails there, Unavailable when the child died (it is started again on a later call)."""
        proc = await self._started()
        assert proc.stdin is not None and proc.stdout is not None
        key = self._keys.get(model)
        if key is None:
            key = self._keys[model] = next(self._next_key)
        providers = list(dict.fromkeys((model.provider, CPU)))  # the provider that runs it here, CPU behind
        body = pickle.dumps((key, str(model.path), providers, feeds, output), protocol=5)
        try:
            proc.stdin.write(HEADER.pack(len(body)))
            proc.stdin.write(body)
            await proc.stdin.drain()
            ok, value = await self._reply(proc)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if self._proc is not proc:  # stopped meanwhile (stop()): not a death
                raise Unavailable(f"the mirror process of model '{self.name}' was stopped") from exc
            code = await self._died()
            raise Unavailable(f"the mirror process of model '{self.name}' exited (code {code})") from exc
        self._backoff = RESTART_BACKOFF[0]
        if not ok:
            raise Internal(f"inference failed in the mirror process: {value}")
        return value  # type: ignore[no-any-return]

    @property
    def running(self) -> bool:
        return self._proc is not None

    async def stop(self) -> None:
        """Close the child's stdin (it exits at EOF); kill it after :data:`STOP_GRACE`. A later
        :meth:`run` starts a new one."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    @staticmethod
    async def _reply(proc: asyncio.subprocess.Process) -> Any:
        assert proc.stdout is not None
        (size,) = HEADER.unpack(await proc.stdout.readexactly(HEADER.size))
        return pickle.loads(await proc.stdout.readexactly(size))

    async def _started(self) -> asyncio.subprocess.Process:
        if self._proc is not None:
            return self._proc
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            await asyncio.sleep(self._retry_at - loop.time())
        env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}  # no settings, no secrets
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
            )
        except OSError as exc:  # no process could be made (memory, process limits): back off too
            await self._died()
            raise Unavailable(f"the mirror process of model '{self.name}' could not start: {exc}") from exc
        self._proc = proc
        self.starts += 1
        try:
            hello = await self._reply(proc)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            code = await self._died()
            raise Unavailable(f"the mirror process of model '{self.name}' did not start (code {code})") from exc
        self.pid, self.priority = hello["pid"], hello["priority"]
        log.info("mirror process started", extra={"model": self.name, "pid": self.pid, "priority": self.priority})
        return proc

    async def _died(self) -> int | None:
        """Reap the child and schedule its restart after the back-off."""
        proc, self._proc = self._proc, None
        code = None
        if proc is not None:
            if proc.returncode is None:
                proc.kill()
            code = await proc.wait()
        self.deaths += 1
        self._retry_at = asyncio.get_running_loop().time() + self._backoff
        log.warning(
            "mirror process exited",
            extra={"model": self.name, "pid": self.pid, "code": code, "restart_in_s": self._backoff},
        )
        self._backoff = min(self._backoff * 2, RESTART_BACKOFF[1])
        return code
