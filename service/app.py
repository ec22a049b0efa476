"""One serving process: the model registry, the data plane, the call gate, the front ends and
the metrics endpoint, wired together; :func:`serve` runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from . import installed_version
from .core.dataplane import DataPlane, Observer
from .core.registry import ModelRegistry, RepositoryPoller
from .grpc.server import GrpcFrontEnd, build_grpc
from .http.api import HttpApi
from .http.server import HttpFrontEnd
from .limits import CallGate, MessageLimits
from .observability.logs import RequestLog
from .observability.metrics import Metrics
from .rollout.controller import Rollout
from .rollout.metrics import RolloutCollector
from .security import Authenticator
from .settings import Settings

if TYPE_CHECKING:
    from .observability.tracing import Tracing

log = logging.getLogger("service")


@dataclass
class ServingApp:
    """The assembled process; health reports NOT_SERVING until :meth:`load_models` succeeds."""

    settings: Settings
    registry: ModelRegistry
    plane: DataPlane
    gate: CallGate
    grpc: GrpcFrontEnd
    http: HttpFrontEnd | None
    metrics: Metrics
    poller: RepositoryPoller
    limits: MessageLimits
    rollout: Rollout

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    async def start(self) -> None:
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()

    async def load_models(self) -> None:
        """Load the repository (off the event loop) unless :func:`serve` did already, let health
        and the message limit follow it, start polling."""
        if self.registry.loaded:
            await self._follow_registry()
        else:
            await self.registry.start()
        self.poller.start()

    async def _follow_registry(self) -> None:
        """After every change of the served versions: health, and the largest request accepted."""
        self.limits.follow(self.registry.largest_request())
        await self.grpc.health.refresh(self.registry)

    async def stop(self, grace: float | None = None, worker: WorkerHooks | None = None) -> None:
        """Health → NOT_SERVING; new calls are held for UNAVAILABLE while the running ones finish
        (within ``grace`` seconds); a ``worker`` then waits for its siblings to have drained too;
        then the transports stop, and the models close."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.grpc.health.shutting_down()
        figures: dict[str, Any] = await self.gate.drain(max(deadline - loop.time(), 0.0))
        if worker is not None:  # new calls are still held meanwhile
            waited = loop.time()
            figures["with_every_worker"] = await worker.drained(max(deadline - loop.time(), 0.0))
            figures["waited_for_workers_seconds"] = round(loop.time() - waited, 3)
        log.info("drained: stopping gRPC", extra=figures)
        remaining = max(deadline - loop.time(), 0.0)
        if self.http is not None:
            await asyncio.gather(self.grpc.stop(remaining), self.http.stop(remaining))
        else:
            await self.grpc.stop(remaining)
        await self.poller.stop()
        await self.rollout.stop()  # mirrored requests dropped; captured ones written
        await self.registry.stop()
        self.plane.close()  # flushes pending trace spans

    async def close(self) -> None:
        """Release whatever was created, started or not, without draining: the path of a start-up
        that is refused after :func:`build_app` (a busy metrics port, a missing repository, strict
        model loading). Nothing is left for garbage collection to close after the event loop."""
        await self.grpc.server.stop(None)
        if self.http is not None:
            await self.http.stop(0.0)
        await self.poller.stop()
        await self.rollout.stop()
        await self.registry.stop()
        self.metrics.close()


async def build_app(
    settings: Settings,
    registry: ModelRegistry | None = None,
    metrics: Metrics | None = None,
    limits: MessageLimits | None = None,
    rollout: Rollout | None = None,
    reuse_port: bool = False,
) -> ServingApp:
    """Everything created and bound (not yet started). Refuses to build on a provider that is
    not available (ProviderUnavailable) or an unusable token file (AuthConfigError). The rollout
    controller is made with the registry (before its first round: it names the versions to load).
    ``reuse_port``: a worker sharing its ports with its siblings (service/workers)."""
    metrics = metrics if metrics is not None else Metrics()
    if registry is None:
        registry = ModelRegistry(settings.model_repository, settings, metrics=metrics)  # provider check
    if rollout is None:
        rollout = Rollout(settings, registry)
    metrics.attach(registry)
    metrics.registry.register(RolloutCollector(rollout))
    limits = limits if limits is not None else MessageLimits(settings.max_message_bytes)
    observers: list[Observer] = [metrics, registry.statistics]
    if settings.log_level == "DEBUG":  # elsewhere it would cost every request a call
        observers.append(RequestLog())
    tracing = _tracing(settings)
    if tracing is not None:
        observers.append(tracing)
    plane = DataPlane(registry, settings, observers, tracing)
    rollout.bind(plane)
    registry.listeners.insert(0, rollout.sync)  # first: roles follow a round before anything yields
    if registry.loaded:
        await rollout.sync()
    gate = CallGate(settings.max_concurrent_requests)
    authenticator = Authenticator.from_settings(settings)
    front = await build_grpc(settings, plane, gate, authenticator, limits, reuse_port)
    try:
        api = HttpApi(plane, gate, authenticator, limits)
        http = HttpFrontEnd(api, settings, reuse_port) if settings.http_port else None
    except BaseException:  # the HTTP port is taken: the bound gRPC server must not outlive the loop
        await front.server.stop(None)
        await rollout.stop()
        await registry.stop()
        raise
    poller = RepositoryPoller(registry, settings.reload_interval_seconds)
    app = ServingApp(settings, registry, plane, gate, front, http, metrics, poller, limits, rollout)
    registry.listeners.append(app._follow_registry)
    return app


def _exposure_warnings(settings: Settings) -> None:
    """Say so when the defaults a person chose leave the server open."""
    loopback = settings.host in ("127.0.0.1", "::1", "localhost") or settings.host.startswith("127.")
    auth = bool(settings.auth_tokens or settings.auth_token_file)
    if not loopback and (settings.tls_cert is None or not auth):
        log.warning(
            "listening on a non-loopback address without "
            + " and ".join(w for w, on in (("TLS", settings.tls_cert is not None), ("bearer tokens", auth)) if not on)
            + ": anyone who reaches this host can call the server (see docs/hardening.md)",
            extra={"host": settings.host},
        )
    if settings.allow_model_control and not auth and not (settings.admin_tokens or settings.admin_token_file):
        log.warning("model control is on without any token: anyone can load and unload models")


class StrictLoadingError(RuntimeError):
    """Strict model loading: a model failed to load at start-up, or there is none."""


def check_first_load(registry: ModelRegistry, strict: bool) -> None:
    """After the first load: what failed (each version and why) or that nothing is there is a
    WARNING, the server carrying on NOT_SERVING while nothing is loaded; in strict mode the same
    is a :class:`StrictLoadingError` (start-up refused)."""
    failed = {key: " ".join(why.split()) for key, why in registry.failed.items()}
    if strict and (failed or not registry.ready):
        what = "; ".join(f"{key}: {why}" for key, why in failed.items())
        if failed:
            count = f"{len(failed)} model version{'s' if len(failed) > 1 else ''}"
            raise StrictLoadingError(f"strict model loading: {count} failed to load: {what}")
        raise StrictLoadingError(f"strict model loading: model repository {registry.root} holds no model")
    if failed:
        log.warning(
            "models failed to load",
            extra={"failed": failed, "serving": {m: registry.versions(m) for m in registry.names()}},
        )
    if not registry.ready:
        log.warning(
            "no model loaded: not ready",
            extra={"root": str(registry.root), "empty": not failed, "health": "NOT_SERVING"},
        )


def _tracing(settings: Settings) -> Tracing | None:
    """The tracer when the ``tracing`` setting is on; OpenTelemetry is imported only then."""
    if not settings.tracing:
        return None
    try:
        from .observability.tracing import Tracing
    except ImportError as exc:
        raise RuntimeError(
            f"tracing is on but OpenTelemetry is not installed ({exc}); "
            "pip install 'onnx-v2-serving[otel]' (or '.[otel]' from a clone)"
        ) from None
    return Tracing(tls=settings.tls_cert is not None)


class WorkerHooks(Protocol):
    """A worker of a supervised server (``--workers N``; :mod:`service.workers`): its ports are
    shared with its siblings, it serves once every worker has loaded, and it tells the supervisor
    (which logs them once for all) what it would log as ``listening`` and ``server started``."""

    def attach_stop(self, stop: asyncio.Event) -> None:
        """``stop`` is to be set when the supervisor says so or goes away."""

    async def loaded(self, registry: ModelRegistry) -> None:
        """Returns once every worker has loaded; raises when start-up is called off."""

    def attach(self, app: ServingApp) -> None:
        """The app is built, not started: model control goes through the supervisor."""

    def report(self, msg: str, *, extra: dict[str, Any]) -> None:
        """``listening`` and ``server started``, to the supervisor instead of the log."""

    async def drained(self, timeout: float) -> bool:
        """This worker has drained; returns once every worker has (True), or at ``timeout``, or
        at once when this worker stops alone (False)."""


def freeze_startup_heap() -> int:
    """Collect, then move every object alive now to the collector's permanent generation; returns
    how many are frozen. Call it once a server process has imported what it serves with (modules,
    classes: most of the heap, alive as long as the process) and before it loads models: full
    collections then stop traversing that heap (docs/performance.md, "Garbage collection")."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def serve(settings: Settings, worker: WorkerHooks | None = None) -> None:
    """Load the models, start the transports, run until SIGTERM/SIGINT, shut down gracefully.
    ``worker``: this process is one of a supervisor's workers (:class:`WorkerHooks`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if worker is None:
        _exposure_warnings(settings)  # (the supervisor warns once for its workers)
    else:
        worker.attach_stop(stop)
    say = log.info if worker is None else worker.report
    if settings.gc_freeze:  # imports done, no model loaded yet
        freeze_startup_heap()
    metrics = Metrics()
    registry = ModelRegistry(settings.model_repository, settings, metrics=metrics)  # provider check
    rollout = Rollout(settings, registry)  # before the first round: shadows and canaries load too
    app: ServingApp | None = None
    try:
        # The models first: the transports' message limit follows the largest request they accept.
        await registry.start()
        if worker is not None:  # no worker serves before every worker has loaded
            await worker.loaded(registry)
        limits = MessageLimits(settings.max_message_bytes)
        limits.size_transport(registry.largest_request())
        app = await build_app(settings, registry, metrics, limits, rollout, reuse_port=worker is not None)
        if worker is not None:
            worker.attach(app)
        await app.start()
        metrics_port = None
        if settings.metrics_port:
            metrics_port = app.metrics.serve(settings.metrics_port, settings.host)
        # The bound ports (port 0 settings read back from here).
        say(
            "listening",
            extra={
                "grpc_port": app.port,
                "http_port": app.http_port,
                "metrics_port": metrics_port,
                "max_message_bytes": limits.transport,
            },
        )
        await app.load_models()
        check_first_load(app.registry, settings.strict_model_loading)
    except BaseException:  # refused: close what exists before the loop ends
        if app is not None:
            await app.close()
        else:
            await rollout.stop()
            await registry.stop()
            metrics.close()
        raise
    say(
        "server started",
        extra={
            "version": installed_version(),
            "address": f"{settings.host}:{app.port}",
            "http_port": app.http_port,
            "metrics_port": metrics_port,
            "tls": settings.tls_cert is not None,
            "mutual_tls": settings.tls_client_ca is not None,
            "auth": bool(settings.auth_tokens or settings.auth_token_file),
            "reload_interval_seconds": settings.reload_interval_seconds,
            "providers": sorted({m.provider for m in registry.models()}),
            "models": {m: registry.versions(m) for m in registry.names()},
            "failed": registry.failed,
            "services": app.grpc.services,
            "ready": registry.ready,
            "strict_model_loading": settings.strict_model_loading,
            "gc_frozen_objects": gc.get_freeze_count(),
        },
    )

    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await app.stop(worker=worker)
    app.metrics.close()
    log.info("server stopped")
