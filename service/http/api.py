"""The Open Inference Protocol over HTTP/REST: routes, admission, and the endpoints.

Every request goes: route (404/405) → auth (401; health and the OpenAPI document exempt) → the
call gate shared with gRPC (429 busy, 503 draining) → the endpoint, which decodes, calls the data
plane and encodes. An inference request is resolved to its model version *before* its body is
read, so the body is bounded by what that model's largest legitimate request can need (413).
Errors are ``{"error": "..."}`` with the status from :mod:`.status`; messages are the same as over
gRPC. Each request has one :class:`~service.core.context.RequestContext` (protocol ``http``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import v2_common as common
from ..core.context import RequestContext
from ..core.dataplane import DataPlane
from ..core.registry import ModelVersion
from ..errors import InvalidArgument, NotFound, RequestTooLarge, ServingError, UnsupportedMediaType, clip
from ..limits import DRAINING, CallGate, MessageLimits
from ..security import PERMISSION_DENIED, Authenticator
from . import codec
from .openapi import openapi_document
from .status import status_of

JSON = "application/json"
BINARY = "application/octet-stream"
#: Content types an inference body may have (curl's default form type is read as JSON).
ACCEPTED_TYPES = ("", JSON, BINARY, "application/x-www-form-urlencoded")
EXTENSIONS = [*common.EXTENSIONS, "binary_tensor_data"]
#: Room for the JSON of a binary request around its tensor bytes (names, shapes, parameters).
HEADER_ALLOWANCE = 64 * 1024

Headers = list[tuple[str, str]]
ReadBody = Callable[[int], Awaitable[bytes]]


@dataclass
class Request:
    """What an endpoint sees of an HTTP request (the server adapter builds it)."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names; repeated headers joined with ","
    authorization: list[str]  # every Authorization header, as sent
    read_body: ReadBody  # at most ``limit`` bytes (RequestTooLarge past it, RequestTimeout if too slow)


@dataclass
class Response:
    status: int
    body: bytes
    headers: Headers = field(default_factory=list)
    close: bool = False  # ask the client to close the connection (draining)


def json_response(status: int, value: object, headers: Headers | None = None, close: bool = False) -> Response:
    return Response(status, codec.dumps(value), [("content-type", JSON), *(headers or [])], close)


def error_response(status: int, message: str, headers: Headers | None = None, close: bool = False) -> Response:
    return json_response(status, {"error": clip(message)}, headers, close)


# -- routing ---------------------------------------------------------------------------------------

_MODEL = r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("GET", re.compile(r"/v2/?"), "server_metadata"),
    ("GET", re.compile(r"/v2/health/live"), "live"),
    ("GET", re.compile(r"/v2/health/ready"), "ready"),
    ("GET", re.compile(r"/v2/openapi\.json"), "openapi"),
    ("GET", re.compile(r"/v2/models/stats"), "statistics"),  # before the model routes, as in Triton
    ("GET", re.compile(_MODEL), "model_metadata"),
    ("GET", re.compile(_MODEL + r"/ready"), "model_ready"),
    ("GET", re.compile(_MODEL + r"/config"), "model_config"),
    ("GET", re.compile(_MODEL + r"/stats"), "statistics"),
    ("GET", re.compile(r"/v2/models/(?P<model>[^/]+)/rollout"), "rollout_status"),
    ("POST", re.compile(_MODEL + r"/infer"), "infer"),
    ("POST", re.compile(r"/v2/repository/index"), "repository_index"),
    ("POST", re.compile(r"/v2/repository/models/(?P<model>[^/]+)/load"), "load"),
    ("POST", re.compile(r"/v2/repository/models/(?P<model>[^/]+)/unload"), "unload"),
]
_GROUPS = (
    (re.compile(r"\(\?:/versions/\(\?P<version>\[\^/\]\+\)\)\?"), "/versions/{version}"),
    (re.compile(r"\(\?P<(\w+)>\[\^/\]\+\)"), r"{\1}"),
)


def route_template(method: str, path: str) -> str:
    """The route ``path`` matched, as a template (``/v2/models/{model}/versions/{version}/infer``):
    the ``http.route`` of its trace span. "" when no route matches."""
    for verb, pattern, _ in ROUTES:
        match = pattern.fullmatch(path)
        if match is None or not (verb == method or (verb == "GET" and method == "HEAD")):
            continue
        versions, names = _GROUPS
        template = versions[0].sub(versions[1] if match.groupdict().get("version") else "", pattern.pattern)
        return names[0].sub(names[1], template).replace("\\.", ".").replace("/?", "")
    return ""


#: No token needed (probes, load balancers, and the API description).
OPEN = frozenset({"live", "ready", "openapi"})
#: Not counted by the call gate, never refused while busy or draining.
UNGATED = frozenset({"live", "ready"})
#: Model control: an admin token when auth is on (403 for an inference token).
CONTROL = frozenset({"load", "unload"})


def route(method: str, path: str) -> tuple[str, dict[str, str]] | Response:
    """The endpoint for ``method path`` and its path parameters, or the 404/405 response."""
    allowed = []
    for verb, pattern, name in ROUTES:
        match = pattern.fullmatch(path)
        if match is not None:
            if verb == method or (verb == "GET" and method == "HEAD"):
                return name, {k: v for k, v in match.groupdict().items() if v is not None}
            allowed.append(verb)
    if allowed:
        return error_response(
            405,
            f"{method} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}",
            [("allow", ", ".join(sorted(set(allowed))))],
        )
    return error_response(404, f"no endpoint {path}; see GET /v2/openapi.json for the API")


# -- the API ---------------------------------------------------------------------------------------


class HttpApi:
    """The endpoints over the data plane, behind auth and the call gate."""

    def __init__(
        self, plane: DataPlane, gate: CallGate, authenticator: Authenticator | None, limits: MessageLimits
    ) -> None:
        self.plane = plane
        self.gate = gate
        self.authenticator = authenticator
        self.limits = limits
        self._endpoints: dict[str, Callable[..., Awaitable[Response]]] = {
            name: getattr(self, name) for _, _, name in ROUTES
        }

    async def handle(self, request: Request) -> Response:
        found = route(request.method, request.path)
        if isinstance(found, Response):
            return found
        name, params = found
        if name not in OPEN and self.authenticator is not None:
            refusal = self.authenticator.check(request.authorization, control=name in CONTROL)
            if refusal is not None:
                self.authenticator.refused(f"{request.method} {request.path}", refusal)
                if refusal.status == PERMISSION_DENIED:
                    return error_response(403, refusal.message)
                return error_response(401, refusal.message, [("www-authenticate", 'Bearer realm="model-serving"')])
        if name in UNGATED:
            return await self._endpoints[name](request, **params)
        why = self.gate.admit()
        if why == DRAINING:
            return error_response(
                503,
                "the server is shutting down and takes no new requests; retry (another replica)",
                [("retry-after", "1")],
                close=True,
            )
        if why is not None:
            return error_response(429, self.gate.busy_message(), [("retry-after", "1")])
        self.gate.active += 1
        try:
            return await self._endpoints[name](request, **params)
        finally:
            self.gate.active -= 1

    async def _call(
        self, request: Request, inference: bool, work: Callable[[RequestContext], Awaitable[Response]]
    ) -> Response:
        """Run one endpoint under its request context; errors become their status."""
        context = RequestContext("http", f"{request.method} {request.path}", inference=inference)
        carrier = self.plane.headers
        if carrier is not None:  # tracing or a canary: the request's headers
            carrier.http(context, request.headers)
        try:
            response = await work(context)
        except ServingError as err:
            status = status_of(err)
            context.status, context.error = str(status), str(err)
            self.plane.finish(context)
            headers: Headers = [("retry-after", "1")] if status in (429, 503) else []
            return error_response(status, str(err), headers)
        except BaseException:  # cancelled (the client went away), or a bug
            context.status = "499"
            self.plane.finish(context)
            raise
        context.status = str(response.status)
        self.plane.finish(context)
        return response

    # -- health and metadata -------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return json_response(200, {"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.plane.ready and not self.gate.draining
        return json_response(200 if ready else 503, {"ready": ready})

    async def openapi(self, request: Request) -> Response:
        return json_response(200, openapi_document())

    async def server_metadata(self, request: Request) -> Response:
        return json_response(
            200, {"name": common.SERVER_NAME, "version": common.server_version(), "extensions": EXTENSIONS}
        )

    async def model_ready(self, request: Request, model: str, version: str = "") -> Response:
        async def work(context: RequestContext) -> Response:
            ready = self.plane.model_ready(model, version)
            return json_response(200 if ready else 503, {"name": model, "ready": ready})

        return await self._call(request, False, work)

    async def model_metadata(self, request: Request, model: str, version: str = "") -> Response:
        async def work(context: RequestContext) -> Response:
            found = self.plane.model(context, model, version)
            return json_response(200, common.model_metadata(found, self.plane.registry.versions(found.name)))

        return await self._call(request, False, work)

    async def model_config(self, request: Request, model: str, version: str = "") -> Response:
        async def work(context: RequestContext) -> Response:
            return json_response(200, common.model_config_json(self.plane.model(context, model, version)))

        return await self._call(request, False, work)

    async def rollout_status(self, request: Request, model: str) -> Response:
        """The model's rollout: roles, shares, rules, windows, agreement, mirror, audit records."""

        async def work(context: RequestContext) -> Response:
            self.plane.model(None, model)  # NotFound with the available models
            rollout = self.plane.rollout
            if rollout is None:
                raise NotFound("this server has no rollout controller")
            return json_response(200, rollout.status(model))

        return await self._call(request, False, work)

    async def statistics(self, request: Request, model: str = "", version: str = "") -> Response:
        async def work(context: RequestContext) -> Response:
            return json_response(200, common.model_statistics(self.plane.registry, model, version))

        return await self._call(request, False, work)

    # -- inference -----------------------------------------------------------------------------

    async def infer(self, request: Request, model: str, version: str = "") -> Response:
        async def work(context: RequestContext) -> Response:
            served = self.plane.model(context, model, version)
            body = await self._body(request, served)
            header_length = _header_length(request.headers)
            parsed = codec.parse_infer(body, header_length)
            context.request_id = parsed.id
            outputs = await self.plane.infer(context, served, parsed.inputs, parsed.outputs)
            order = parsed.outputs or served.spec.output_names
            payload, json_length = codec.encode_infer(served.name, context.version, parsed, outputs, order)
            if json_length is None:
                return Response(200, payload, [("content-type", JSON)])
            return Response(
                200, payload, [("content-type", BINARY), ("inference-header-content-length", str(json_length))]
            )

        return await self._call(request, True, work)

    async def _body(self, request: Request, model: ModelVersion) -> bytes:
        """The request body, bounded by what ``model``'s largest legitimate request needs."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ACCEPTED_TYPES:
            raise UnsupportedMediaType(
                f"Content-Type {content_type!r} is not accepted; send application/json, or "
                "application/octet-stream with Inference-Header-Content-Length for binary tensors"
            )
        binary = "inference-header-content-length" in request.headers
        limit = request_limit(model, binary, self.limits.transport)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding == "identity":
            return await request.read_body(limit)
        if encoding not in ("gzip", "deflate"):
            raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
        compressed = await request.read_body(limit)
        return inflate(compressed, encoding, limit)

    # -- model repository ----------------------------------------------------------------------

    async def _json_body(self, request: Request) -> dict[str, Any]:
        raw = await request.read_body(HEADER_ALLOWANCE)
        if not raw.strip():
            return {}
        value = codec.loads(raw)
        if not isinstance(value, dict):
            raise InvalidArgument("the request body must be a JSON object")
        return value

    async def repository_index(self, request: Request) -> Response:
        async def work(context: RequestContext) -> Response:
            body = await self._json_body(request)
            ready = body.get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidArgument(f"'ready' must be true or false, got {codec.dumps(ready).decode()[:40]}")
            roles = self.plane.rollout.roles() if self.plane.rollout is not None else None
            return json_response(200, common.repository_index(self.plane.registry, ready, roles))

        return await self._call(request, False, work)

    async def load(self, request: Request, model: str) -> Response:
        async def work(context: RequestContext) -> Response:
            body = await self._json_body(request)
            parameters = common.load_parameters(_object(body.get("parameters", {})))
            await self.plane.load_model(model, parameters, f"{context.protocol} {context.method}")
            return json_response(200, {})

        return await self._call(request, False, work)

    async def unload(self, request: Request, model: str) -> Response:
        async def work(context: RequestContext) -> Response:
            body = await self._json_body(request)
            common.control_parameters(_object(body.get("parameters", {})), common.IGNORED_UNLOAD_PARAMETERS)
            await self.plane.unload_model(model)
            return json_response(200, {})

        return await self._call(request, False, work)


def _object(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument("parameters must be a JSON object")
    return value


def _header_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("inference-header-content-length")
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        length = -1
    if length < 0:
        raise InvalidArgument(f"Inference-Header-Content-Length must be a non-negative integer, got {value[:40]!r}")
    return length


#: Most characters one JSON number of each type can take ("-2147483648, " and so on).
_JSON_CHARS = {
    "BOOL": 7,
    "UINT8": 5,
    "INT8": 6,
    "UINT16": 7,
    "INT16": 8,
    "UINT32": 12,
    "INT32": 13,
    "UINT64": 22,
    "INT64": 22,
    "FP16": 26,
    "FP32": 26,
    "FP64": 26,
}


def request_limit(model: ModelVersion, binary: bool, fallback: int) -> int:
    """The largest body a legitimate request to ``model`` can need: ``max_rows`` of every input as
    binary data (or as JSON numbers) plus room for the JSON around them; ``fallback`` when a
    non-batch dimension is dynamic (no bound follows from the contract)."""
    spec = model.spec
    total = HEADER_ALLOWANCE
    for tensor in spec.inputs:
        row_bytes = tensor.row_bytes
        if row_bytes is None:
            return fallback
        per_row = row_bytes if binary else (row_bytes // tensor.dtype.itemsize) * _JSON_CHARS[tensor.datatype]
        total += spec.max_rows * per_row
    return min(total, fallback)


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """Decompress a gzip/deflate body to at most ``limit`` bytes (RequestTooLarge past it)."""
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    decompressor = zlib.decompressobj(wbits)
    try:
        out = decompressor.decompress(data, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > limit or decompressor.unconsumed_tail:
        raise RequestTooLarge(f"the decompressed body is over {limit} bytes, more than any request to this model needs")
    if not decompressor.eof:
        raise InvalidArgument(f"the {encoding} body is truncated")
    return out
