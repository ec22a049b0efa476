"""The supervisor of ``--workers N``: N whole server processes on one gRPC (and HTTP) port.

It loads no model and answers no call. It holds the ports (:mod:`.ports`), starts the workers
(``python -m service.workers``, each with a control channel, :mod:`.control`), and:

* **start-up**: every worker loads, then all are told to serve (a worker refusing, e.g. a model
  that fails under strict loading, stops the others: the server refuses with that worker's
  reason, as one process would); one ``listening`` and one ``server started`` line, with the
  real ports;
* **model control and polls**: a ``RepositoryModelLoad``/``Unload`` any worker receives is done
  by every running worker, one request at a time, and answered when all have; with
  ``--reload-interval-seconds`` the supervisor asks every worker for a repository round in turn
  (workers do not poll on their own, so they change together); models unloaded by request stay
  unloaded in a worker that is restarted;
* **metrics**: one endpoint on ``--metrics-port``, the workers' pages added up (:mod:`.merge`),
  plus ``serving_workers``, ``serving_worker_up``, ``serving_worker_restarts_total`` and
  ``serving_worker_requests_total`` (which worker answered how many inference requests);
* **a worker that exits** on its own is logged (``"worker exited"``), counted and started again
  after a backoff (0.5 s, doubling to 30 s; reset once a worker has served for a minute);
  ``"worker restarted"`` once it serves again;
* **SIGTERM/SIGINT**: every worker is told at once and drains as one process does (health
  NOT_SERVING, running calls finish, new ones are answered UNAVAILABLE); the supervisor exits
  once all have.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import installed_version
from ..app import _exposure_warnings
from ..errors import FailedPrecondition, NotFound, ServingError, Unavailable
from ..settings import Settings
from .control import Channel, ChannelClosed, Message
from .merge import Page, merge
from .ports import Reserved, reserve

log = logging.getLogger("service.workers")
#: The lines a single process writes too (listening, server started, shutting down, server stopped).
server_log = logging.getLogger("service")

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
#: A worker that served this long before exiting is restarted without the backoff it had built up.
STABLE_S = 60.0
SCRAPE_TIMEOUT_S = 10.0
#: After the grace: time a worker still draining gets before it is killed.
STOP_MARGIN_S = 15.0


def _describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit status {code}"


class Interrupted(Exception):
    """SIGTERM/SIGINT before every worker had started."""


class Slot:
    """One worker place: the process in it now, and what outlives that process (its number,
    restarts, the metrics counted by its earlier processes)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        #: down → starting → loaded (waits for go) → serving (told to go) → gone (exited)
        self.state = "down"
        self.listening: dict[str, Any] | None = None
        self.started: dict[str, Any] | None = None
        self.refused: str | None = None
        self.restarts = 0
        self.failures_in_a_row = 0
        self.up_since = 0.0
        self.page = Page()  # the last page read from the process in this slot now
        self.retired = Page()  # counters and histograms of the processes that exited

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def serving(self) -> bool:
        """Told to serve and still there: model control and polls go to it."""
        return self.state == "serving" and self.alive and self.channel is not None


class Supervisor:
    def __init__(self, settings: Settings, log_format: str) -> None:
        self.settings = settings
        self.log_format = log_format
        self.slots = [Slot(i) for i in range(settings.workers)]
        self.phase = "starting"  # → running → stopping; or → aborting
        self.unloaded: set[str] = set()  # models unloaded by request, across workers
        self._abort_reason: str | None = None
        self._control = asyncio.Lock()
        self._changed = asyncio.Event()
        self._drained: set[int] = set()  # slots whose worker has drained, while stopping
        self._all_drained = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._go: asyncio.Future[None] | None = None
        self._ports: Reserved | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._http: Any = None
        self.metrics_port: int | None = None

    # -- the whole life ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT. RuntimeError (the reason) when start-up is refused."""
        loop = self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._signalled)
        self._go = loop.create_future()
        settings = self.settings
        _exposure_warnings(settings)  # once here, not in every worker
        try:
            self._ports = reserve(settings.host, settings.port, settings.http_port)
            if settings.metrics_port:
                self.metrics_port = self._serve_metrics(settings.metrics_port, settings.host)
            for slot in self.slots:
                await self._spawn(slot)
            await self._wait_started()
        except Interrupted:  # stopped before serving: the workers stop too, exit 0 as one process would
            server_log.info("shutting down", extra={"during": "start-up", "workers": len(self.slots)})
            await self._abort("the server is stopping")
            self._close()
            server_log.info("server stopped")
            return
        except BaseException as exc:
            reason = str(exc) if isinstance(exc, RuntimeError) else "start-up interrupted"
            await self._abort(reason)
            self._close()
            raise
        self.phase = "running"
        first = self.slots[0]
        assert first.listening is not None and first.started is not None and self._ports is not None
        pids = [slot.pid for slot in self.slots]
        server_log.info(
            "listening",
            extra={
                **first.listening,
                "grpc_port": self._ports.grpc_port,
                "http_port": self._ports.http_port,
                "metrics_port": self.metrics_port,
                "workers": len(self.slots),
                "worker_pids": pids,
            },
        )
        server_log.info(
            "server started",
            extra={
                **first.started,
                "version": installed_version(),
                "address": f"{settings.host}:{self._ports.grpc_port}",
                "http_port": self._ports.http_port,
                "metrics_port": self.metrics_port,
                "reload_interval_seconds": settings.reload_interval_seconds,
                "workers": len(self.slots),
                "worker_pids": pids,
            },
        )
        if settings.reload_interval_seconds > 0:
            self._task(self._poll(settings.reload_interval_seconds))
            log.info("watching the model repository", extra={"interval_seconds": settings.reload_interval_seconds})
        await self._stop.wait()
        server_log.info(
            "shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds, "workers": len(self.slots)}
        )
        self.phase = "stopping"
        self._pulse()
        await self._stop_workers(settings.shutdown_grace_seconds + STOP_MARGIN_S)
        self._close()
        server_log.info("server stopped")

    def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._ports is not None:
            self._ports.close()

    def _task(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _pulse(self) -> None:
        self._changed.set()
        if self.phase == "stopping" and all(s.index in self._drained or not s.alive for s in self.slots):
            self._all_drained.set()

    def _signalled(self) -> None:
        self._stop.set()
        self._pulse()

    # -- start-up ------------------------------------------------------------------------------------

    def _worker_settings(self) -> dict[str, Any]:
        assert self._ports is not None
        values: dict[str, Any] = self.settings.model_dump(mode="json")
        values.update(
            workers=1,
            port=self._ports.grpc_port,
            http_port=self._ports.http_port or 0,
            metrics_port=0,  # one endpoint: the supervisor's
            reload_interval_seconds=0.0,  # the supervisor asks for rounds, so workers change together
        )
        return values

    async def _spawn(self, slot: Slot) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "service.workers",
                "--control-fd",
                str(child.fileno()),
                "--index",
                str(slot.index),
                "--log-level",
                self.settings.log_level,
                "--log-format",
                self.log_format,
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        channel = await Channel.open(parent)
        slot.process, slot.channel = process, channel
        slot.state, slot.listening, slot.started, slot.refused = "starting", None, None, None
        slot.page = Page()
        channel.start(partial(self._handle, slot), partial(self._notice, slot))
        channel.notify("config", settings=self._worker_settings(), unloaded=sorted(self.unloaded))
        self._task(self._watch(slot, process))

    async def _wait_started(self) -> None:
        while True:
            if self._stop.is_set():
                raise Interrupted()
            failed = [slot for slot in self.slots if slot.state == "gone"]
            if failed:
                slot = failed[0]
                code = slot.process.returncode if slot.process is not None else None
                raise RuntimeError(
                    slot.refused
                    or f"worker {slot.index} exited during start-up ({_describe_exit(code or 0)}); see its log lines"
                )
            if self._go is not None and not self._go.done() and all(s.state == "loaded" for s in self.slots):
                self._go.set_result(None)  # every worker has loaded: all serve
            if all(slot.started is not None for slot in self.slots):
                return
            self._changed.clear()
            await self._changed.wait()

    async def _abort(self, reason: str) -> None:
        """Start-up refused: the workers that loaded are told so, the others stopped."""
        self.phase = "aborting"
        self._abort_reason = reason
        if self._go is not None and not self._go.done():
            self._go.set_result(None)
        await self._stop_workers(STOP_MARGIN_S)

    async def _stop_workers(self, timeout: float) -> None:
        processes = [slot.process for slot in self.slots if slot.alive]
        for process in processes:
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)

        async def wait(process: asyncio.subprocess.Process) -> None:
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.error("worker did not stop in time: killed", extra={"pid": process.pid})
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

        await asyncio.gather(*(wait(p) for p in processes if p is not None))

    # -- one worker process ---------------------------------------------------------------------------

    async def _watch(self, slot: Slot, process: asyncio.subprocess.Process) -> None:
        code = await process.wait()
        served = time.monotonic() - slot.up_since if slot.started is not None else 0.0
        slot.state = "gone"
        slot.retired.add_counts(slot.page)
        slot.page = Page()
        if slot.channel is not None:
            await slot.channel.aclose()
        self._pulse()
        if self.phase != "running":
            return
        slot.failures_in_a_row = 0 if served >= STABLE_S else slot.failures_in_a_row + 1
        delay = min(BACKOFF_FIRST_S * 2 ** (slot.failures_in_a_row - 1), BACKOFF_MAX_S)
        log.warning(
            "worker exited",
            extra={
                "worker": slot.index,
                "pid": process.pid,
                "exit": _describe_exit(code),
                "served_seconds": round(served, 1),
                "restart_in_seconds": delay,
                "reason": slot.refused,
            },
        )
        while True:
            await asyncio.sleep(delay)
            if self.phase != "running":
                return
            try:
                await self._spawn(slot)
            except OSError as exc:  # no process could be started (out of memory, no PIDs): later
                delay = BACKOFF_MAX_S
                log.error("worker could not be started", extra={"worker": slot.index, "error": str(exc)})
                continue
            slot.restarts += 1
            return

    async def _handle(self, slot: Slot, message: Message) -> Message | None:
        op = message.get("op")
        if op == "loaded":
            return await self._loaded(slot, message)
        if op == "control":
            return await self._model_control(str(message.get("action")), str(message.get("name")))
        if op == "drained":
            return await self._worker_drained(slot)
        raise ServingError(f"unknown request {op!r}")

    async def _worker_drained(self, slot: Slot) -> Message:
        """A worker has drained (it holds new calls, none runs): while the server stops, it waits
        until every worker has, so that all stop their transports at once. A worker that stopped
        first would send its clients, reconnecting, to a sibling about to stop, and gRPC cancels
        the calls that reach it then (docs/serving.md, "Worker processes")."""
        if self.phase != "stopping":  # this worker alone was told to stop: nothing to wait for
            return {"together": False}
        self._drained.add(slot.index)
        self._pulse()
        await self._all_drained.wait()
        return {"together": True}

    def _notice(self, slot: Slot, message: Message) -> None:
        op = message.get("op")
        if op == "refused":
            slot.refused = str(message.get("reason"))
        elif op == "report" and message.get("msg") == "listening":
            slot.listening = message.get("fields") or {}
        elif op == "report" and message.get("msg") == "server started":
            slot.started = message.get("fields") or {}
            slot.up_since = time.monotonic()
            if self.phase == "running":
                log.info("worker restarted", extra={"worker": slot.index, "pid": slot.pid, "restarts": slot.restarts})
        self._pulse()

    async def _loaded(self, slot: Slot, message: Message) -> Message:
        """A worker has loaded its models: it serves once every worker has (at start-up), or at
        once (a restarted worker), with the models held unloaded as they are now."""
        if self.phase == "starting":
            slot.state = "loaded"
            self._pulse()
            assert self._go is not None
            await self._go
        if self.phase not in ("starting", "running"):
            return {"abort": self._abort_reason or "the server is stopping"}
        async with self._control:
            slot.state = "serving"
            return {"unloaded": sorted(self.unloaded)}

    # -- every worker together ------------------------------------------------------------------------

    async def _everywhere(self, **request: Any) -> list[Message | BaseException]:
        """Send ``apply`` to every serving worker; their replies (or errors). A worker that dies
        meanwhile is left out: it loads the repository as it is when it restarts."""
        targets = [slot for slot in self.slots if slot.serving]
        if not targets:
            raise Unavailable("no worker is serving now (restarting); retry shortly")
        results = await asyncio.gather(
            *(slot.channel.request("apply", **request) for slot in targets if slot.channel is not None),
            return_exceptions=True,
        )
        return [r for r in results if not isinstance(r, ChannelClosed)]

    async def _model_control(self, action: str, name: str) -> Message:
        """``RepositoryModelLoad``/``Unload`` as one process does it, done by every worker."""
        async with self._control:
            results = await self._everywhere(action=action, name=name)
        errors = [r for r in results if isinstance(r, BaseException)]
        replies = [r for r in results if not isinstance(r, BaseException)]
        if action == "unload" and replies:
            self.unloaded.add(name)
        if action == "load" and (replies or any(isinstance(e, FailedPrecondition) for e in errors)):
            self.unloaded.discard(name)
        if errors:
            first = errors[0]
            raise first if isinstance(first, ServingError) else ServingError(str(first))
        if not replies:
            raise Unavailable("every worker went away while the request was carried out; retry shortly")
        log.info(
            f"model {action}ed by every worker",
            extra={
                "model": name,
                "workers": len(replies),
                "loaded": replies[0].get("loaded"),
                "unloaded": replies[0].get("unloaded"),
            },
        )
        return replies[0]

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                async with self._control:
                    results = await self._everywhere(action="reload")
            except Unavailable:
                continue
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, NotFound):
                    log.error("model repository round failed in a worker", extra={"error": str(result)})

    # -- metrics -------------------------------------------------------------------------------------

    def _serve_metrics(self, port: int, host: str) -> int:
        registry = CollectorRegistry()
        registry.register(_WorkersCollector(self))
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise RuntimeError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self._http = server
        return int(server.server_address[1])

    async def scrape(self) -> None:
        """Read every serving worker's page (a worker that does not answer keeps its last)."""

        async def read(slot: Slot) -> None:
            channel = slot.channel
            if channel is None or slot.listening is None or not slot.alive:
                return
            try:
                reply = await channel.request("metrics", timeout=SCRAPE_TIMEOUT_S)
            except (ChannelClosed, ServingError, TimeoutError):
                return
            if slot.channel is channel and slot.alive:
                slot.page = Page.parse(str(reply.get("text", "")))

        await asyncio.gather(*(read(slot) for slot in self.slots))

    def collect(self) -> Iterator[Any]:
        """The merged families and the supervisor's own (called by the metrics thread)."""
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self.scrape(), self._loop).result(SCRAPE_TIMEOUT_S + 5)
        slots = list(self.slots)
        yield from merge([s.page for s in slots if s.alive], [s.retired for s in slots])
        workers = GaugeMetricFamily("serving_workers", "Worker processes the server runs (--workers)")
        workers.add_metric([], len(slots))
        yield workers
        up = GaugeMetricFamily(
            "serving_worker_up", "1 = the worker process serves; 0 = starting or restarting", labels=["worker"]
        )
        restarts = CounterMetricFamily(
            "serving_worker_restarts",
            "Times a worker process exited on its own and was started again",
            labels=["worker"],
        )
        requests = CounterMetricFamily(
            "serving_worker_requests",
            "Inference requests answered by each worker (serving_requests_total by worker, all codes)",
            labels=["worker"],
        )
        for slot in slots:
            label = [str(slot.index)]
            up.add_metric(label, 1 if slot.alive and slot.started is not None else 0)
            restarts.add_metric(label, slot.restarts)
            requests.add_metric(
                label, slot.retired.total("serving_requests_total") + slot.page.total("serving_requests_total")
            )
        yield up
        yield restarts
        yield requests


class _WorkersCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        return self._supervisor.collect()


def supervise(settings: Settings, log_format: str) -> None:
    """Run ``settings.workers`` worker processes until SIGTERM/SIGINT (``python -m service``
    with ``--workers`` > 1). RuntimeError/OSError: start-up refused, with the reason."""
    asyncio.run(Supervisor(settings, log_format).run())
