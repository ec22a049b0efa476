"""The supervisor's hold on the ports its workers share.

A single server binds its ports without ``SO_REUSEPORT``, so a second server on a port in use
fails instead of silently sharing it. Workers must share, so the supervisor keeps the check:

1. **Probe** each fixed port as a single server would (``SO_REUSEADDR``, no ``SO_REUSEPORT``):
   if anything listens there already, start-up is refused with the single server's line
   (``cannot serve gRPC on 127.0.0.1:8001: Address already in use``).
2. **Reserve** the port with a socket of its own, bound with ``SO_REUSEPORT`` and never listening
   (so it is handed no connection): port 0 becomes a real port here, the same for every worker and
   for every restarted worker, and workers bind it with ``SO_REUSEPORT`` too; while they load,
   nobody else can bind it (:func:`reserve_one`).

Afterwards a server that binds without ``SO_REUSEPORT`` (ours with one process, most others)
fails on the port while any worker listens; a second supervisor fails its probe. What the kernel
cannot stop: a process of the same user that itself asks for ``SO_REUSEPORT`` joins the group
(Linux lets every socket of one user with that option share the port). See docs/serving.md.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Any


@dataclass
class Reserved:
    """The sockets holding the ports (closed with the supervisor) and the ports they hold."""

    sockets: list[socket.socket]
    grpc_port: int
    http_port: int | None

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()


def _address(host: str, port: int) -> tuple[int, int, int, Any]:
    family, kind, proto, _, address = socket.getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, kind, proto, address


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def probe(host: str, port: int, label: str) -> None:
    """RuntimeError (``cannot serve gRPC on HOST:PORT: Address already in use``) when something
    holds the port without letting us share it, as a single server would find it."""
    if port == 0:
        return
    try:
        family, kind, proto, address = _address(host, port)
    except OSError as exc:
        raise RuntimeError(f"cannot serve {label} on {_where(host, port)}: {exc.strerror or exc}") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and uvicorn bind
        try:
            sock.bind(address)
        except OSError as exc:
            raise RuntimeError(f"cannot serve {label} on {_where(host, port)}: {exc.strerror or exc}") from None


def reserve_one(host: str, port: int, label: str) -> socket.socket:
    """A bound, non-listening ``SO_REUSEPORT`` socket on ``host:port`` (0: a free port).

    Bound without ``SO_REUSEADDR`` when it can be: then, while the workers load their models and
    nothing listens yet, no other server can bind the port either (``SO_REUSEADDR`` lets sockets
    share a port none of them listens on). That fails only when connections of an earlier server
    without ``SO_REUSEPORT`` on this port linger in TIME_WAIT; the hold then takes
    ``SO_REUSEADDR`` too, and until the first worker listens another server that sets it (gRPC and
    uvicorn do) could take the port first: the workers then fail to bind it and the server
    refuses to start, loudly rather than sharing."""
    family, kind, proto, address = _address(host, port)
    for reuse_address in (False, True):
        sock = socket.socket(family, kind, proto)
        try:
            if reuse_address:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            return sock
        except OSError as exc:
            sock.close()
            if reuse_address or exc.errno != errno.EADDRINUSE or port == 0:
                raise RuntimeError(f"cannot serve {label} on {_where(host, port)}: {exc.strerror or exc}") from None
    raise AssertionError("unreachable")


def reserve(host: str, grpc_port: int, http_port: int) -> Reserved:
    """Probe and reserve the gRPC port and (unless 0: no HTTP) the HTTP port."""
    probe(host, grpc_port, "gRPC")
    if http_port:
        probe(host, http_port, "HTTP")
    held: list[socket.socket] = []
    try:
        grpc_sock = reserve_one(host, grpc_port, "gRPC")
        held.append(grpc_sock)
        bound_http: int | None = None
        if http_port:
            http_sock = reserve_one(host, http_port, "HTTP")
            held.append(http_sock)
            bound_http = int(http_sock.getsockname()[1])
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return Reserved(held, int(grpc_sock.getsockname()[1]), bound_http)
