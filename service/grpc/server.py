"""Assembles the gRPC front end: one grpc.aio server with the typed and V2 services, health and
reflection, behind the call guard, bound to its port (TLS when configured)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from ..core.dataplane import DataPlane
from ..generated._pool import POOL
from ..generated.inference import grpc_service_pb2_grpc as v2_grpc
from ..generated.serving.v1 import serving_pb2_grpc as typed_grpc
from ..limits import CallGate, MessageLimits
from ..security import Authenticator
from ..settings import Settings
from . import typed, v2
from .health import Health
from .interceptor import CallGuard, Gates

#: After the drain: time gRPC gets to send the last answers before it cancels what is still open.
FLUSH_SECONDS = 2.0


def credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The TLS credentials, or None; RuntimeError naming the file when one cannot be read or is
    not a usable PEM certificate / key (gRPC would only log its own error and fail to bind)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None

    def read(path: Path, what: str, marker: bytes) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise RuntimeError(f"cannot read TLS file {path}: {exc.strerror or exc}") from None
        if marker not in data:
            raise RuntimeError(f"TLS file {path} holds no PEM {what} (no '{marker.decode()}' line)")
        return data

    key = read(settings.tls_key, "private key", b"PRIVATE KEY-----")
    certificate = read(settings.tls_cert, "certificate", b"-----BEGIN CERTIFICATE-----")
    client_ca = (
        read(settings.tls_client_ca, "certificate", b"-----BEGIN CERTIFICATE-----") if settings.tls_client_ca else None
    )
    # The same check OpenSSL makes for gRPC, said plainly: parseable, unencrypted, a matching pair.
    check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        check.load_cert_chain(settings.tls_cert, settings.tls_key, password=lambda: b"")
    except ssl.SSLError as exc:
        raise RuntimeError(
            f"TLS certificate {settings.tls_cert} and key {settings.tls_key} cannot be used: {exc.reason or exc} "
            "(expected a PEM certificate chain and the unencrypted PEM private key that goes with it)"
        ) from None
    if settings.tls_client_ca is not None:
        try:
            check.load_verify_locations(settings.tls_client_ca)
        except ssl.SSLError as exc:
            raise RuntimeError(f"TLS client CA {settings.tls_client_ca} cannot be used: {exc.reason or exc}") from None
    return grpc.ssl_server_credentials(
        [(key, certificate)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


@dataclass
class GrpcFrontEnd:
    """The gRPC server, its bound port and its health."""

    server: grpc.aio.Server
    port: int
    health: Health
    gate: CallGate

    @property
    def services(self) -> list[str]:
        return self.health.services

    async def start(self) -> None:
        await self.server.start()

    async def stop(self, remaining: float) -> None:
        """Stop gRPC once our calls drained (:meth:`CallGate.drain`): what gRPC still has open is
        answers on their way out and health Watch streams, which get :data:`FLUSH_SECONDS` rather
        than the whole grace; held calls are answered UNAVAILABLE once gRPC has begun to stop."""
        flush = remaining if self.gate.active else min(remaining, FLUSH_SECONDS)
        stopping = asyncio.ensure_future(self.server.stop(flush))
        for _ in range(3):  # let gRPC close the port and send GOAWAY first
            await asyncio.sleep(0)
        self.gate.release_held()
        await stopping


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def server_options(settings: Settings, limits: MessageLimits, reuse_port: bool = False) -> list[tuple[str, int]]:
    """grpc.aio server options: message and metadata sizes, connection limits and keepalive.
    ``reuse_port``: a worker of a supervised server (``--workers``), sharing the port with its
    siblings; the supervisor has checked that nobody else listens there (service/workers)."""
    options = [
        ("grpc.max_receive_message_length", limits.transport),
        ("grpc.max_send_message_length", max(limits.transport, 64 * 1024 * 1024)),
        # One limit, not gRPC's soft (random rejections) + hard pair.
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        # Requests are never decompressed: a compressed message is refused (UNIMPLEMENTED) before
        # it is inflated (400 MiB of zeros in 400 KB of gzip cost the server 425 MiB otherwise).
        ("grpc.compression_enabled_algorithms_bitset", 1),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # Find dead peers; refuse clients that ping more often than every 10 s.
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # A port already in use is an error, not a second server silently sharing it (a worker
        # shares it with its siblings only: the supervisor checked the port before starting them).
        ("grpc.so_reuseport", int(reuse_port)),
    ]
    if settings.max_connection_age_seconds:
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_seconds)),
            ("grpc.max_connection_age_grace_ms", _ms(max(settings.shutdown_grace_seconds, 1.0))),
        ]
    if settings.max_connection_idle_seconds:
        options.append(("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_seconds)))
    return options


async def build_grpc(
    settings: Settings,
    plane: DataPlane,
    gate: CallGate,
    authenticator: Authenticator | None,
    limits: MessageLimits,
    reuse_port: bool = False,
) -> GrpcFrontEnd:
    """The gRPC server with every service registered and its port bound (not yet started).
    RuntimeError, with nothing left open, when a TLS file cannot be read or the port is taken.
    ``reuse_port``: see :func:`server_options`."""
    server_credentials = credentials(settings)
    if not reuse_port:
        check_port_free(settings)
    guard = CallGuard(
        Gates(
            gate,
            streams=CallGate(settings.max_inference_streams),
            watches=CallGate(settings.max_health_watches, "max_health_watches"),
            reflection=CallGate(settings.max_reflection_calls, "max_reflection_calls"),
        ),
        authenticator,
        limits,
    )
    server = grpc.aio.server(interceptors=[guard], options=server_options(settings, limits, reuse_port))
    # (generated registration functions carry no type hints)
    typed_grpc.add_ModelServiceServicer_to_server(typed.TypedModelService(plane), server)  # type: ignore[no-untyped-call]
    v2_grpc.add_GRPCInferenceServiceServicer_to_server(v2.V2Servicer(plane), server)  # type: ignore[no-untyped-call]
    services = [typed.SERVICE_NAME, v2.SERVICE_NAME]

    health = Health(services)
    await health.start()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    # Our generated code lives in a private descriptor pool; reflection serves that pool, so the
    # health and reflection protos (from the default pool) are added to it too (idempotent).
    for module in (health_pb2, reflection_pb2):
        POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    reflection.enable_server_reflection(
        [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
        pool=POOL,
    )

    try:
        if server_credentials is None:
            port = server.add_insecure_port(settings.address)
        else:
            port = server.add_secure_port(settings.address, server_credentials)
    except RuntimeError:  # lost a race for the port since check_port_free, or an unusable address
        await server.stop(None)  # never left to __del__ after the event loop closed
        raise RuntimeError(f"cannot serve gRPC on {settings.address}: the address cannot be bound") from None
    return GrpcFrontEnd(server, port, health, gate)


def check_port_free(settings: Settings) -> None:
    """RuntimeError (``cannot serve gRPC on HOST:PORT: Address already in use``) when the gRPC
    port cannot be bound: said plainly, before gRPC logs its own bind error."""
    if settings.port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            settings.host.strip("[]"), settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError:
        return  # gRPC resolves it itself (and says so)
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
        try:
            probe.bind(address)
        except OSError as exc:
            raise RuntimeError(f"cannot serve gRPC on {settings.address}: {exc.strerror or exc}") from None
