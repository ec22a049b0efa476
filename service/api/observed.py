"""The error and metrics wrapper shared by both protocol adapters' unary inference RPCs."""
from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..errors import ServingError, abort
from ..metrics import status_code

Req = TypeVar("Req")
Resp = TypeVar("Resp")


def inference_rpc(
    method: Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]:
    """A unary inference RPC whose ServingError becomes its gRPC status, and whose outcome and
    duration are counted through the servicer's ``_observe(code, start)`` (request metrics)."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        start = time.perf_counter()
        try:
            response = await method(self, request, context)
        except ServingError as err:
            self._observe(status_code(context, err), start)
            await abort(context, err)
        except BaseException as exc:  # cancelled, or a bug (UNKNOWN)
            self._observe(status_code(context, exc), start)
            raise
        self._observe("OK", start)
        return response

    return wrapper
