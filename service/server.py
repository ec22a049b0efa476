"""Assembles one grpc.aio server: typed + V2 adapters, health, reflection; runs it until a signal."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2

from .api import typed, v2
from .auth import BearerAuthInterceptor, TokenStore
from .generated._pool import POOL
from .guards import GuardInterceptor
from .logs import RequestLogInterceptor
from .reload import ModelReloader
from .repository import ModelRepository
from .settings import Settings

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: After the drain: time gRPC gets to send the last answers before it cancels what is still open.
FLUSH_SECONDS = 2.0


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass
class ServingServer:
    """The assembled server; health reports NOT_SERVING until :meth:`load_models` succeeds."""

    settings: Settings
    server: grpc.aio.Server
    repository: ModelRepository
    health: health_aio.HealthServicer
    port: int
    services: list[str] = field(default_factory=list)
    reloader: ModelReloader | None = None
    guard: GuardInterceptor | None = None
    _health_models: set[str] = field(default_factory=set)

    async def start(self) -> None:
        await self.server.start()

    async def load_models(self) -> None:
        """Load the repository off the event loop, flip health to SERVING, start the reloader."""
        await asyncio.get_running_loop().run_in_executor(None, self.repository.load)
        await self.refresh_health()
        if self.reloader is not None:
            self.reloader.listeners.append(self.refresh_health)
            self.reloader.start()

    async def refresh_health(self) -> None:
        """Health from what is served now: each model, then the server and its services."""
        loaded = set(self.repository.names())
        for name in loaded:
            await self.health.set(name, SERVING)
        failed = {key.split("/")[0] for key in self.repository.failed}
        for name in (failed | self._health_models) - loaded:
            await self.health.set(name, NOT_SERVING)  # every version failed, or was unloaded
        self._health_models |= loaded | failed
        status = SERVING if self.repository.ready else NOT_SERVING
        for service in ["", *self.services]:
            await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Health → NOT_SERVING; new calls → UNAVAILABLE while the running ones finish (within
        ``grace`` seconds); then gRPC stops (cancelling whatever still runs) and so do we.

        New calls are held during the drain and answered UNAVAILABLE only once gRPC has begun
        to stop: gRPC cancels (CANCELLED) the calls that reach it as it stops, and a refused
        client retrying at once would land there (:class:`service.guards.GuardInterceptor`).
        """
        grace = self.settings.shutdown_grace_seconds if grace is None else grace
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.health.enter_graceful_shutdown()
        if self.guard is None:
            await self.server.stop(grace)
        else:
            figures = await self.guard.drain(max(deadline - loop.time(), 0.0))
            log.info("drained: stopping gRPC", extra=figures)
            remaining = max(deadline - loop.time(), 0.0)
            # Once our calls are done, what gRPC still has open is answers on their way out and
            # health Watch streams (which would otherwise hold the exit for the whole grace).
            flush = remaining if self.guard.active else min(remaining, FLUSH_SECONDS)
            stopping = asyncio.ensure_future(self.server.stop(flush))
            for _ in range(3):  # let gRPC close the port and send GOAWAY first
                await asyncio.sleep(0)
            self.guard.release_held()
            await stopping
        if self.reloader is not None:
            await self.reloader.stop()
        self.repository.close()


async def build_server(settings: Settings, repository: ModelRepository | None = None) -> ServingServer:
    """Create the server with every service registered and its port bound (not yet started)."""
    if repository is None:
        repository = ModelRepository(settings.model_repository, settings)
    # Outermost first: the request log sees every outcome, auth refuses before anything is
    # decoded, the guard applies max_concurrent_requests and turns unparsable messages into
    # INVALID_ARGUMENT.
    # The request log only exists at DEBUG: at other levels it would be a pass-through that
    # still costs every call an interceptor hop.
    interceptors: list[grpc.aio.ServerInterceptor] = (
        [RequestLogInterceptor()] if settings.log_level == "DEBUG" else []
    )
    tokens = TokenStore.from_settings(settings)  # AuthConfigError (refuse to start) on a bad file
    if tokens is not None:
        interceptors.append(BearerAuthInterceptor(tokens))
    guard = GuardInterceptor(settings.max_concurrent_requests)
    interceptors.append(guard)
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            # One limit, not gRPC's soft (random rejections) + hard pair.
            ("grpc.max_metadata_size", settings.max_metadata_bytes),
            ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
            # A port already in use is an error, not a second server silently sharing it.
            ("grpc.so_reuseport", 0),
        ],
    )
    reloader = ModelReloader(repository, settings)
    services = typed.add_to_server(server, repository, settings)
    services += v2.add_to_server(server, repository, settings, reloader=reloader)

    health = health_aio.HealthServicer()
    for service in ["", *services]:
        await health.set(service, NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Our generated code lives in a private descriptor pool; reflection serves that pool, so the
    # health and reflection protos (from the default pool) are added to it too (idempotent).
    for module in (health_pb2, reflection_pb2):
        POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    reflection.enable_server_reflection(
        [*services, HEALTH_SERVICE, reflection.SERVICE_NAME], server, pool=POOL
    )

    credentials = _credentials(settings)
    if credentials is None:
        port = server.add_insecure_port(settings.address)
    else:
        port = server.add_secure_port(settings.address, credentials)
    return ServingServer(settings, server, repository, health, port, services, reloader, guard)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    repository = ModelRepository(settings.model_repository, settings)  # provider check first
    app = await build_server(settings, repository)
    await app.start()
    metrics_port = None
    if settings.metrics_port:
        metrics_port = repository.metrics.serve(settings.metrics_port, settings.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await app.load_models()
    log.info(
        "server started",
        extra={
            "address": f"{settings.host}:{app.port}",
            "metrics_port": metrics_port,
            "tls": settings.tls_cert is not None,
            "mutual_tls": settings.tls_client_ca is not None,
            "auth": bool(settings.auth_tokens or settings.auth_token_file),
            "reload_interval_seconds": settings.reload_interval_seconds,
            "providers": sorted({m.provider for m in repository.models()}),
            "models": {m: repository.versions(m) for m in repository.names()},
            "failed": repository.failed,
            "services": app.services,
            "ready": repository.ready,
        },
    )
    if not repository.ready:
        log.error("no model could be loaded; health stays NOT_SERVING", extra={"failed": repository.failed})

    await stop.wait()
    log.info("shutting down", extra={"grace_seconds": settings.shutdown_grace_seconds})
    await app.stop()
    repository.metrics.close()
    log.info("server stopped")
