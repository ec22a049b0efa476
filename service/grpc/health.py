"""gRPC health (``grpc.health.v1``) that follows the model registry: the server ("") and each of
our services are SERVING while at least one model version is served; each model name is
SERVING while one of its versions is, NOT_SERVING once it failed or was unloaded."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from ..core.registry import ModelRegistry

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class Health:
    """The health servicer and the statuses it reports."""

    def __init__(self, services: list[str]) -> None:
        self.servicer = health_aio.HealthServicer()
        self.services = services
        self._models: set[str] = set()

    async def start(self) -> None:
        """Everything NOT_SERVING until the first refresh."""
        for service in ["", *self.services]:
            await self.servicer.set(service, NOT_SERVING)

    async def refresh(self, registry: ModelRegistry) -> None:
        loaded = set(registry.names())
        for name in loaded:
            await self.servicer.set(name, SERVING)
        failed = {failure.model for failure in registry.failures}
        for name in (failed | self._models) - loaded:
            await self.servicer.set(name, NOT_SERVING)  # every version failed, or was unloaded
        self._models |= loaded | failed
        status = SERVING if registry.ready else NOT_SERVING
        for service in ["", *self.services]:
            await self.servicer.set(service, status)

    async def shutting_down(self) -> None:
        """NOT_SERVING everywhere from now on (Watch streams are told)."""
        await self.servicer.enter_graceful_shutdown()
