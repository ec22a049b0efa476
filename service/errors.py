"""Domain errors and their gRPC status codes, in one place.

The core (repository, runtime) raises these; protocol adapters turn them into a gRPC status with
:func:`abort`. Messages say what was expected and what came.
"""
from __future__ import annotations

from typing import ClassVar, NoReturn

import grpc


class ServingError(Exception):
    """Base class: an error a client should see, with the gRPC code it maps to."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    """The request is malformed: shape, dtype, byte length, batch size, non-finite values."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    """Unknown model or version."""

    code = grpc.StatusCode.NOT_FOUND


class Internal(ServingError):
    """The server failed to run a valid request (a bug or a broken model)."""

    code = grpc.StatusCode.INTERNAL


class ResourceExhausted(ServingError):
    """The server is out of capacity (queue full, memory)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServingError):
    """Not ready yet (models loading) or shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    """The request's deadline passed before inference finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(ServingError):
    """Missing or invalid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(ServingError):
    """The operation is refused in the server's current state (model control disabled, a model
    on disk that does not load)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


#: Longest status message sent (characters). Messages quote client input (names, shapes), and the
#: message travels in a trailer: one over the client's metadata limit (16 KiB by default) would
#: reach the client as RESOURCE_EXHAUSTED instead of the real error.
MAX_MESSAGE_CHARS = 1000


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters (marked), and to ASCII-safe size once
    percent-encoded (non-ASCII characters take up to 12 bytes on the wire)."""
    if len(message) > limit:
        message = message[: limit - 15] + " …(truncated)"
    if not message.isascii() and len(message.encode()) * 3 > 4 * limit:
        message = message.encode()[: (4 * limit) // 3].decode(errors="ignore") + " …(truncated)"
    return message


async def abort(context: grpc.aio.ServicerContext, err: ServingError) -> NoReturn:
    """End the current RPC with ``err``'s status code and message (clipped, see :func:`clip`)."""
    await context.abort(err.code, clip(str(err)))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
