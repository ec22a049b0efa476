"""gRPC health (``grpc.health.v1``) that follows the model registry: the server ("") and each of
our services are SERVING while at least one model version is served; each model name is
SERVING while one of its versions is, NOT_SERVING once it failed or was unloaded.

The servicer is our own: every Watch stream has its own wake-up, so each watcher hears every
change (grpc_health's aio servicer shares one per service, and a watcher that went away took the
others' notifications with it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..core.registry import ModelRegistry

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class _Watcher:
    __slots__ = ("changed", "status")

    def __init__(self, status: int) -> None:
        self.status = status
        self.changed = asyncio.Event()


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # generated code, no hints
    """Check and Watch over a service → status table."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._watchers: dict[str, set[_Watcher]] = {}
        self._shutting_down = False

    def status(self, service: str) -> int | None:
        return self._status.get(service)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"the server has no health status for {request.service[:200]!r}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        service = request.service
        watcher = _Watcher(self._status.get(service, SERVICE_UNKNOWN))
        self._watchers.setdefault(service, set()).add(watcher)
        try:
            sent = watcher.status
            yield health_pb2.HealthCheckResponse(status=sent)
            while True:
                await watcher.changed.wait()
                watcher.changed.clear()
                if watcher.status != sent:
                    sent = watcher.status
                    yield health_pb2.HealthCheckResponse(status=sent)
        finally:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(watcher)
                if not watchers:
                    del self._watchers[service]

    def set(self, service: str, status: int) -> None:
        """Record ``status`` and wake every watcher of ``service`` (ignored once shutting down)."""
        if self._shutting_down:
            return
        self._set(service, status)

    def _set(self, service: str, status: int) -> None:
        self._status[service] = status
        for watcher in self._watchers.get(service, ()):
            watcher.status = status
            watcher.changed.set()

    def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING everywhere from now on; watchers are told."""
        self._shutting_down = True
        for service in list(self._status):
            self._set(service, NOT_SERVING)


class Health:
    """The health servicer and the statuses it reports."""

    def __init__(self, services: list[str]) -> None:
        self.servicer = HealthServicer()
        self.services = services
        self._models: set[str] = set()

    async def start(self) -> None:
        """Everything NOT_SERVING until the first refresh."""
        for service in ["", *self.services]:
            self.servicer.set(service, NOT_SERVING)

    async def refresh(self, registry: ModelRegistry) -> None:
        loaded = set(registry.names())
        for name in loaded:
            self.servicer.set(name, SERVING)
        failed = {failure.model for failure in registry.failures}
        for name in (failed | self._models) - loaded:
            self.servicer.set(name, NOT_SERVING)  # every version failed, or was unloaded
        self._models |= loaded | failed
        status = SERVING if registry.ready else NOT_SERVING
        for service in ["", *self.services]:
            self.servicer.set(service, status)

    async def shutting_down(self) -> None:
        """NOT_SERVING everywhere from now on (Watch streams are told)."""
        self.servicer.enter_graceful_shutdown()
