"""The worker's side: a whole server process (:func:`service.app.serve`) that shares its ports with
its siblings and does what the supervisor asks over the control channel.

* Start-up: load the models, report ``loaded`` and wait for the supervisor's go (every worker
  has loaded), then bind and serve; ``listening`` and ``server started`` go to the supervisor,
  which logs them once for all.
* Model control (V2 ``RepositoryModelLoad``/``Unload``) arriving here is forwarded to the
  supervisor, which has every worker apply it (this one included) and answers once all have;
  repository polls come from the supervisor the same way (the worker itself does not poll).
* Its metrics page is read by the supervisor when the supervisor's endpoint is scraped.
* Stopping: once drained it tells the supervisor and waits until every worker has drained, so
  that all stop their transports at once (:meth:`WorkerLink.drained`).
* The control channel closing (the supervisor died) stops the worker, as SIGTERM does.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest

from ..app import check_first_load
from ..core.registry import ModelRegistry, ReloadReport
from ..core.spec import ModelKey
from ..errors import Internal, NotFound, Unavailable
from .control import Channel, ChannelClosed, Message

if TYPE_CHECKING:
    from ..app import ServingApp

log = logging.getLogger("service.workers")


class Aborted(RuntimeError):
    """The supervisor called start-up off (another worker failed)."""


def report_dict(report: ReloadReport) -> Message:
    return {
        "loaded": [list(k) for k in report.loaded],
        "unloaded": [list(k) for k in report.unloaded],
        "rejected": {str(k): why for k, why in report.rejected.items()},
        "skipped": report.skipped,
    }


def report_of(message: Message) -> ReloadReport:
    return ReloadReport(
        loaded=[ModelKey(name, int(version)) for name, version in message.get("loaded", [])],
        unloaded=[ModelKey(name, int(version)) for name, version in message.get("unloaded", [])],
        skipped=bool(message.get("skipped")),
    )


class WorkerLink:
    """:class:`service.app.WorkerHooks` and the model control of a worker's data plane."""

    def __init__(self, channel: Channel, index: int, unloaded: list[str], strict: bool) -> None:
        self.channel = channel
        self.index = index
        self.strict = strict
        #: Models the supervisor keeps unloaded by request (they are on disk, not served).
        self._held: set[str] = set(unloaded)
        self.registry: ModelRegistry | None = None
        self.app: ServingApp | None = None
        self._stop: asyncio.Event | None = None

    # -- the steps of service.app.serve ----------------------------------------------------------

    def attach_stop(self, stop: asyncio.Event) -> None:
        self._stop = stop
        if self.channel.closed.is_set():
            stop.set()

    def channel_closed(self) -> None:
        """The supervisor went away: stop as on SIGTERM."""
        if self._stop is not None and not self._stop.is_set():
            log.warning("the supervisor went away: stopping", extra={"worker": self.index})
            self._stop.set()

    async def loaded(self, registry: ModelRegistry) -> None:
        self.registry = registry
        for name in sorted(self._held):
            await self._unload_quietly(name)
        if self.strict:
            check_first_load(registry, True)  # StrictLoadingError: this worker refuses, so does the server
        reply = await self.channel.request("loaded", ready=registry.ready, failed=registry.failed)
        if reply.get("abort"):
            raise Aborted(reply["abort"])
        await self._follow(set(reply.get("unloaded", [])))

    def attach(self, app: ServingApp) -> None:
        self.app = app
        app.plane.control = self

    def report(self, msg: str, *, extra: dict[str, Any]) -> None:
        self.channel.notify("report", msg=msg, fields=extra)

    async def drained(self, timeout: float) -> bool:
        """This worker has drained: wait (at most ``timeout`` s) until every worker has, then
        all stop together. False when it stops on its own (the supervisor stops only this one,
        went away, or did not answer in time)."""
        try:
            reply = await self.channel.request("drained", timeout=timeout)
        except (ChannelClosed, TimeoutError):
            return False
        except Exception:  # an older or confused supervisor: stop as a single server would
            log.exception("the supervisor did not answer drained", extra={"worker": self.index})
            return False
        return bool(reply.get("together"))

    # -- model control from this worker's clients: done by every worker --------------------------

    async def load(self, name: str) -> ReloadReport:
        return report_of(await self._forward("load", name))

    async def unload(self, name: str) -> ReloadReport:
        return report_of(await self._forward("unload", name))

    async def _forward(self, action: str, name: str) -> Message:
        try:
            return await self.channel.request("control", action=action, name=name)
        except ChannelClosed:
            raise Unavailable("the server is shutting down; model control is not available") from None

    # -- requests from the supervisor --------------------------------------------------------------

    async def handle(self, message: Message) -> Message | None:
        op = message.get("op")
        if op == "apply":
            return await self._apply(str(message["action"]), message.get("name"))
        if op == "metrics":
            metrics = self.app.metrics if self.app is not None else None
            return {"text": generate_latest(metrics.registry).decode() if metrics is not None else ""}
        raise Internal(f"unknown control request {op!r}")

    async def _apply(self, action: str, name: str | None) -> Message:
        registry = self.registry
        if registry is None:
            raise Unavailable("this worker is still loading")
        if action == "reload":
            return report_dict(await registry.reload())
        if not name:
            raise Internal(f"{action} without a model name")
        if action == "load":
            report = await registry.load(name)  # FailedPrecondition/NotFound: raised at the caller
            self._held.discard(name)
            return report_dict(report)
        if action == "unload":
            report = await registry.unload(name)
            self._held.add(name)
            return report_dict(report)
        raise Internal(f"unknown model control action {action!r}")

    async def _follow(self, unloaded: set[str]) -> None:
        """Bring the models held unloaded in step with the supervisor's list (it may have changed
        while this worker loaded)."""
        registry = self.registry
        assert registry is not None
        for name in sorted(unloaded - self._held):
            await self._unload_quietly(name)
        for name in sorted(self._held - unloaded):
            await registry.reload([name], explicit=True, trigger="request")
            self._held.discard(name)

    async def _unload_quietly(self, name: str) -> None:
        assert self.registry is not None
        try:
            await self.registry.unload(name)
        except NotFound:
            pass  # gone from the repository meanwhile
        self._held.add(name)
