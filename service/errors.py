"""Errors a client should see, independent of the protocol it speaks.

The core and the data plane raise these; each front end maps them to its own status codes in one
table (``service/grpc/status.py`` for gRPC). Messages say what was expected and what came.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a failure reported to the client with its message."""


class InvalidArgument(ServingError):
    """The request is malformed: shape, dtype, byte length, batch size, non-finite values."""


class UnsupportedMediaType(InvalidArgument):
    """A content type or encoding the server does not read."""


class NotFound(ServingError):
    """Unknown model or version."""


class Internal(ServingError):
    """The server failed to run a valid request (a bug or a broken model)."""


class ResourceExhausted(ServingError):
    """The server is out of capacity (queue full, too many calls, a request too large)."""


class RequestTooLarge(ResourceExhausted):
    """The request is larger than any request the served models accept."""


class Unavailable(ServingError):
    """Not ready yet (models loading), being unloaded, or shutting down."""


class DeadlineExceeded(ServingError):
    """The request's deadline passed before inference finished."""


class RequestTimeout(DeadlineExceeded):
    """The client took too long to send its request."""


class Unauthenticated(ServingError):
    """Missing or invalid credentials."""


class PermissionDenied(ServingError):
    """Valid credentials that do not allow this operation."""


class FailedPrecondition(ServingError):
    """The operation is refused in the server's current state (model control disabled, a model
    on disk that does not load)."""


#: Longest message sent (characters). Messages quote client input (names, shapes), and over gRPC
#: the message travels in a trailer: one over the client's metadata limit (16 KiB by default)
#: would reach the client as RESOURCE_EXHAUSTED instead of the real error.
MAX_MESSAGE_CHARS = 1000


def clip(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` cut to ``limit`` characters (marked), and to ASCII-safe size once
    percent-encoded (non-ASCII characters take up to 12 bytes on the wire)."""
    if len(message) > limit:
        message = message[: limit - 15] + " …(truncated)"
    if not message.isascii() and len(message.encode()) * 3 > 4 * limit:
        message = message.encode()[: (4 * limit) // 3].decode(errors="ignore") + " …(truncated)"
    return message
