"""The one table from service.errors to HTTP status codes (service.http.status)."""

from __future__ import annotations

import pytest

from service import errors
from service.http.status import STATUS, status_of


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.InvalidArgument, 400),
        (errors.Unauthenticated, 401),
        (errors.PermissionDenied, 403),
        (errors.NotFound, 404),
        (errors.RequestTimeout, 408),
        (errors.FailedPrecondition, 409),
        (errors.RequestTooLarge, 413),
        (errors.UnsupportedMediaType, 415),
        (errors.ResourceExhausted, 429),
        (errors.Internal, 500),
        (errors.Unavailable, 503),
        (errors.DeadlineExceeded, 504),
    ],
)
def test_every_error_has_its_status(error: type[errors.ServingError], status: int) -> None:
    assert status_of(error("x")) == status


def test_every_error_class_is_in_the_table() -> None:
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ServingError)}
    assert classes - {errors.ServingError} == set(STATUS)
    assert status_of(errors.ServingError("x")) == 500  # the base class alone: a server fault
