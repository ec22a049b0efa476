"""The one table from :mod:`service.errors` to HTTP status codes."""

from __future__ import annotations

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

STATUS: dict[type[ServingError], int] = {
    InvalidArgument: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    RequestTimeout: 408,
    FailedPrecondition: 409,
    RequestTooLarge: 413,
    UnsupportedMediaType: 415,
    ResourceExhausted: 429,
    Internal: 500,
    Unavailable: 503,
    DeadlineExceeded: 504,
}


def status_of(err: ServingError) -> int:
    """The HTTP status of ``err`` (its class or nearest base in :data:`STATUS`; 500 if none)."""
    for cls in type(err).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    return 500
