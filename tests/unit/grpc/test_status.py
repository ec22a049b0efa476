"""The one table from service.errors to gRPC status codes (service.grpc.status)."""

from __future__ import annotations

import grpc
import pytest

from service import errors
from service.grpc.status import CODES, status_of


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.Internal, grpc.StatusCode.INTERNAL),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_every_error_has_its_code(error: type[errors.ServingError], code: grpc.StatusCode) -> None:
    assert status_of(error("x")) is code


def test_every_error_class_is_in_the_table() -> None:
    classes = {c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.ServingError)}
    assert set(CODES) == classes - {errors.ServingError}


def test_subclasses_take_the_nearest_base_and_unknown_ones_are_internal() -> None:
    class BadShape(errors.InvalidArgument):
        pass

    assert status_of(BadShape("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(errors.ServingError("x")) is grpc.StatusCode.INTERNAL
