"""The one table from :mod:`service.errors` to gRPC status codes."""

from __future__ import annotations

import grpc

from ..errors import (
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RequestTimeout,
    RequestTooLarge,
    ResourceExhausted,
    ServingError,
    Unauthenticated,
    Unavailable,
    UnsupportedMediaType,
)

CODES: dict[type[ServingError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Internal: grpc.StatusCode.INTERNAL,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RequestTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    RequestTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(err: ServingError) -> grpc.StatusCode:
    """The gRPC code of ``err`` (its class or nearest base in :data:`CODES`; INTERNAL if none)."""
    for cls in type(err).__mro__:
        code = CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
