"""The control channel between the supervisor and one worker: JSON objects, one per line, over a
Unix socket pair (the worker's end is inherited as a file descriptor).

Both sides send requests (``{"id": n, "op": ...}``, answered by ``{"id": n, "reply": {...}}``
or ``{"id": n, "error": {"kind": ..., "message": ...}}``) and notices (no ``id``, no answer).
A :class:`~service.errors.ServingError` raised by the side that answers is raised again, of the
same class and with the same message, by the side that asked; so a model control request that
one worker forwards fails for its caller exactly as it would have in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from .. import errors

log = logging.getLogger(__name__)

Message = dict[str, Any]
Handler = Callable[[Message], Awaitable[Message | None]]
#: A line may carry a worker's whole /metrics page.
LINE_LIMIT = 64 * 1024 * 1024


class ChannelClosed(ConnectionError):
    """The other side went away (its process exited) before answering."""


def error_of(kind: str, message: str) -> errors.ServingError:
    """The :class:`ServingError` subclass called ``kind`` (Internal when there is none)."""
    cls = getattr(errors, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, errors.ServingError)):
        cls = errors.Internal
    return cls(message)


class Channel:
    """One end of a control channel. :meth:`start` reads in a task of its own; a request from
    the other side is answered by ``handler`` (in a task, so a slow one blocks nothing)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer)

    def start(self, handler: Handler, notice: Callable[[Message], None] | None = None) -> None:
        self._reading = asyncio.get_running_loop().create_task(self._read(handler, notice), name="control-channel")

    async def receive(self) -> Message:
        """The next message, read directly (before :meth:`start`: the worker's configuration)."""
        line = await self._reader.readline()
        if not line:
            raise ChannelClosed("the control channel closed")
        message: Message = json.loads(line)
        return message

    async def request(self, op: str, timeout: float | None = None, **fields: Any) -> Message:
        """Send a request; its reply, or the other side's error raised here."""
        if self.closed.is_set():
            raise ChannelClosed("the control channel is closed")
        self._next_id += 1
        ident = self._next_id
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            self._write({"id": ident, "op": op, **fields})
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(ident, None)

    def notify(self, op: str, **fields: Any) -> None:
        if not self.closed.is_set():
            self._write({"op": op, **fields})

    async def flush(self) -> None:
        """Wait until what was written has been handed to the socket."""
        with contextlib.suppress(ConnectionError):
            await self._writer.drain()

    def _write(self, message: Message) -> None:
        self._writer.write(json.dumps(message, default=str).encode() + b"\n")

    async def _read(self, handler: Handler, notice: Callable[[Message], None] | None) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                message: Message = json.loads(line)
                ident = message.get("id")
                if "reply" in message or "error" in message:
                    future = self._pending.get(ident) if isinstance(ident, int) else None
                    if future is not None and not future.done():
                        if "error" in message:
                            future.set_exception(error_of(message["error"]["kind"], message["error"]["message"]))
                        else:
                            future.set_result(message["reply"])
                elif ident is not None:
                    task = asyncio.get_running_loop().create_task(self._answer(handler, message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif notice is not None:
                    notice(message)
        except (ConnectionError, ValueError) as exc:  # the other side died mid-line
            log.debug("control channel read failed", extra={"error": str(exc)})
        finally:
            self._close()

    async def _answer(self, handler: Handler, message: Message) -> None:
        try:
            reply = await handler(message)
            answer: Message = {"id": message["id"], "reply": reply or {}}
        except errors.ServingError as err:
            answer = {"id": message["id"], "error": {"kind": type(err).__name__, "message": str(err)}}
        except Exception as exc:  # a bug: said to the other side as INTERNAL, logged here
            log.exception("control request failed", extra={"op": message.get("op")})
            answer = {"id": message["id"], "error": {"kind": "Internal", "message": f"{type(exc).__name__}: {exc}"}}
        if not self.closed.is_set():
            self._write(answer)

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed("the other side of the control channel went away"))
        with contextlib.suppress(Exception):
            self._writer.close()

    async def aclose(self) -> None:
        self._close()
        if self._reading is not None and self._reading is not asyncio.current_task():
            self._reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reading
