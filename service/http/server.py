"""The HTTP/1.1 server under :class:`~.api.HttpApi`: uvicorn (httptools parser) on the same event
loop as gRPC, serving a bare ASGI application on a socket bound here (port 0 reads back, TLS as
for gRPC). uvicorn has no bound on header size or header time, so its protocol is extended:
a connection that takes longer than ``http_header_timeout_seconds`` to send a request's headers
(slowloris), or sends more than ``max_metadata_bytes`` of them, is answered 408 / 431 and closed.
Bodies are bounded per request by :class:`~.api.HttpApi` and read under ``http_body_timeout_seconds``;
idle keep-alive connections close after ``http_keep_alive_seconds``."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..errors import RequestTimeout, RequestTooLarge, ServingError
from ..settings import Settings
from .api import HttpApi, Request, Response, error_response
from .status import status_of

log = logging.getLogger(__name__)


#: A connection closed while the client may still be sending (a refused body) is closed the way
#: nginx's lingering close does it: our side is shut (FIN after the response) and what still
#: arrives is read and dropped for up to this long / this much, so that the client reads the
#: response instead of a reset (closing with unread data makes the kernel send RST, which can
#: discard the response before the client reads it).
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class _LingeringTransport:
    """The connection's transport, whose ``close`` is a lingering close (see :data:`LINGER_SECONDS`)."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedHttpToolsProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.linger()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self._protocol.lingering:  # nothing more once our side is shut
            self._transport.write(data)


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size cap on each request's headers,
    and a lingering close."""

    header_timeout = 10.0
    max_header_bytes = 16 * 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._raw: asyncio.Transport | None = None
        self._lingering: int | None = None  # bytes dropped since the lingering close began

    @property
    def lingering(self) -> bool:
        return self._lingering is not None

    def linger(self) -> None:
        """Close after the response is out: FIN now, then drop what arrives for a while."""
        raw = self._raw
        if raw is None or raw.is_closing() or self._lingering is not None:
            return
        if not raw.can_write_eof():  # TLS: no half-close
            raw.close()
            return
        self._lingering = 0
        self._disarm()
        try:
            raw.write_eof()
        except OSError:  # the peer is gone already
            raw.close()
            return
        raw.resume_reading()
        self.loop.call_later(LINGER_SECONDS, raw.close)

    def data_received(self, data: bytes) -> None:
        if self._lingering is None:
            super().data_received(data)
            return
        self._lingering += len(data)
        if self._lingering > LINGER_BYTES and self._raw is not None:
            self._raw.close()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _refuse(self, status: int, message: str) -> None:
        self._disarm()
        body = message.encode()
        head = (
            f"HTTP/1.1 {status} {'Request Timeout' if status == 408 else 'Request Header Fields Too Large'}\r\n"
            f"content-type: text/plain\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        if not self.transport.is_closing():
            self.transport.write(head.encode() + body)
            self.linger()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(408, f"the request headers did not arrive within {self.header_timeout:g} s")

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_LingeringTransport(transport, self))  # type: ignore[arg-type]
        self._arm()  # a connection that never sends a request is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > self.max_header_bytes and not self.lingering:
            self._refuse(431, f"the request line and headers are over {self.max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._disarm()
        if not self.lingering:  # refused while these headers were parsed: no request
            super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self.lingering:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self.lingering:
            super().on_message_complete()


class AsgiApp:
    """The ASGI application: each HTTP request → :meth:`HttpApi.handle` → one response."""

    def __init__(self, api: HttpApi, body_timeout: float) -> None:
        self.api = api
        self.body_timeout = body_timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers: dict[str, str] = {}
        authorization: list[str] = []
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            if name == "authorization":
                authorization.append(value)
            headers[name] = f"{headers[name]},{value}" if name in headers else value

        async def read_body(limit: int) -> bytes:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise RequestTooLarge(
                    f"the body is {int(declared)} bytes, over the {limit} bytes any request to this endpoint can need"
                )
            chunks: list[bytes] = []
            size = 0
            try:
                async with asyncio.timeout(self.body_timeout):
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            raise asyncio.CancelledError("the client went away")
                        chunk = message.get("body", b"")
                        size += len(chunk)
                        if size > limit:
                            raise RequestTooLarge(
                                f"the body is over the {limit} bytes any request to this endpoint can need"
                            )
                        chunks.append(chunk)
                        if not message.get("more_body"):
                            break
            except TimeoutError:
                raise RequestTimeout(f"the request body did not arrive within {self.body_timeout:g} s") from None
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        request = Request(scope["method"], scope["path"], headers, authorization, read_body)
        try:
            response = await self.api.handle(request)
        except ServingError as err:  # outside an endpoint's context (body limits are inside)
            response = error_response(status_of(err), str(err))
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: a 500, logged, never a dropped connection
            log.exception("HTTP request failed", extra={"method": scope["method"], "path": scope["path"]})
            response = error_response(500, "internal error; see the server log")
        await self._send(send, response, scope["method"] == "HEAD")

    @staticmethod
    async def _send(send: Any, response: Response, head: bool) -> None:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))
        if response.close or response.status in (408, 413):  # an unread body must not be parsed as a request
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else response.body})


def bind(settings: Settings, reuse_port: bool = False) -> socket.socket:
    """The listening socket (port 0 = a free one); RuntimeError when the address is taken.
    ``reuse_port``: a worker sharing the port with its siblings (SO_REUSEPORT; service/workers)."""
    host = settings.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say so (a response is written
    # in two parts; with Nagle the second waits for the client's delayed ACK, ~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, settings.http_port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(
            f"cannot serve HTTP on {settings.host}:{settings.http_port}: {exc.strerror or exc}"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HttpFrontEnd:
    """The HTTP server: started and stopped with the process, on its own port."""

    def __init__(self, api: HttpApi, settings: Settings, reuse_port: bool = False) -> None:
        self.api = api
        self.socket = bind(settings, reuse_port)
        self.port = int(self.socket.getsockname()[1])
        protocol = type(
            "Protocol",
            (BoundedHttpToolsProtocol,),
            {
                "header_timeout": settings.http_header_timeout_seconds,
                "max_header_bytes": settings.max_metadata_bytes,
            },
        )
        self._config = uvicorn.Config(
            AsgiApp(api, settings.http_body_timeout_seconds),
            http=protocol,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=max(1, round(settings.http_keep_alive_seconds)),
            proxy_headers=False,
            backlog=1024,
        )
        self._ssl = ssl_context(settings)
        self._server: uvicorn.Server | None = None

    async def start(self) -> None:
        config = self._config
        config.load()
        config.ssl = self._ssl
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        await server.startup(sockets=[self.socket])
        self._server = server

    async def stop(self, remaining: float) -> None:
        """Stop accepting, close idle connections, give open ones ``remaining`` seconds."""
        if self._server is None:
            self.socket.close()
            return
        self._server.config.timeout_graceful_shutdown = max(1, round(remaining))
        await self._server.shutdown(sockets=[self.socket])
