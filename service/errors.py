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


async def abort(context: grpc.aio.ServicerContext, err: ServingError) -> NoReturn:
    """End the current RPC with ``err``'s status code and message."""
    await context.abort(err.code, str(err))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
