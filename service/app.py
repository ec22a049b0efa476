"""One serving process: the model registry, the data plane, the call gate, the front ends and
the metrics endpoint, wired together; :func:`serve` runs them until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .core.dataplane import DataPlane, Observer
from .core.registry import ModelRegistry, RepositoryPoller
from .grpc.server import GrpcFrontEnd, build_grpc
from .http.api import HttpApi
from .http.server import HttpFrontEnd
from .limits import CallGate
from .observability.logs import RequestLog
from .observability.metrics import Metrics
from .security import Authenticator, TokenStore
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
        """Load the repository (off the event loop), let health follow it, start polling."""
        self.registry.listeners.append(self._refresh_health)
        await self.registry.start()
        self.poller.start()

    async def _refresh_health(self) -> None:
        await self.grpc.health.refresh(self.registry)

    async def stop(self, grace: float | None = None) -> None:
        """Health → NOT_SERVING; new calls are held for UNAVAILABLE while the running ones finish
        (within ``grace`` seconds); then the transports stop, and the models close."""
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.grpc.health.shutting_down()
        figures = await self.gate.drain(max(deadline - loop.time(), 0.0))
        log.info("drained: stopping gRPC", extra=figures)
        remaining = max(deadline - loop.time(), 0.0)
        if self.http is not None:
            await asyncio.gather(self.grpc.stop(remaining), self.http.stop(remaining))
        else:
            await self.grpc.stop(remaining)
        await self.poller.stop()
        await self.registry.stop()
        self.plane.close()  # flushes pending trace spans


async def build_app(settings: Settings, registry: ModelRegistry | None = None) -> ServingApp:
    """Everything created and bound (not yet started, no model loaded). Refuses to build on a
    provider that is not available (ProviderUnavailable) or an unusable token file
    (AuthConfigError)."""
    metrics = Metrics()
    if registry is None:
        registry = ModelRegistry(settings.model_repository, settings, metrics=metrics)  # provider check
    metrics.attach(registry)
    observers: list[Observer] = [metrics, registry.statistics]
    if settings.log_level == "DEBUG":  # elsewhere it would cost every request a call
        observers.append(RequestLog())
    tracing = _tracing(settings)
    if tracing is not None:
        observers.append(tracing)
    plane = DataPlane(registry, settings, observers, tracing)
    gate = CallGate(settings.max_concurrent_requests)
    tokens = TokenStore.from_settings(settings)
    authenticator = Authenticator(tokens) if tokens is not None else None
    front = await build_grpc(settings, plane, gate, authenticator)
    http = HttpFrontEnd(HttpApi(plane, gate, authenticator), settings) if settings.http_port else None
    poller = RepositoryPoller(registry, settings.reload_interval_seconds)
    return ServingApp(settings, registry, plane, gate, front, http, metrics, poller)


def _tracing(settings: Settings) -> Tracing | None:
    """The tracer when the ``tracing`` setting is on; OpenTelemetry is imported only then."""
    if not settings.tracing:
        return None
    try:
        from .observability.tracing import Tracing
    except ImportError as exc:
        raise RuntimeError(
            f"tracing is on but OpenTelemetry is not installed ({exc}); pip install 'model-serving[otel]'"
        ) from None
    return Tracing(tls=settings.tls_cert is not None)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    app = await build_app(settings)
    await app.start()
    metrics_port = None
    if settings.metrics_port:
        metrics_port = app.metrics.serve(settings.metrics_port, settings.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The bound ports, before the models load (port 0 settings read back from here).
    log.info("listening", extra={"grpc_port": app.port, "http_port": app.http_port, "metrics_port": metrics_port})

    await app.load_models()
    registry = app.registry
    log.info(
        "server started",
        extra={
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
        },
    )
    if not registry.ready:
        log.error("no model could be loaded; health stays NOT_SERVING", extra={"failed": registry.failed})

    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await app.stop()
    app.metrics.close()
    log.info("server stopped")
