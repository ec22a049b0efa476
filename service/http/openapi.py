"""The OpenAPI 3.0 document of what the HTTP front end serves (``GET /v2/openapi.json``): the Open
Inference Protocol REST endpoints, Triton's binary tensor data, model repository and statistics
extensions."""

from __future__ import annotations

import functools
from typing import Any

from ..v2_common import server_version


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


ERROR = {"description": "error", "content": _json(_ref("error_response"))}
MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION = {
    "name": "version",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "a model version number",
}
AUTH_ERRORS = {"401": ERROR, "429": ERROR, "503": ERROR}


def _model_paths(suffix: str, operation: dict[str, Any], verb: str = "get") -> dict[str, Any]:
    """The same operation at /v2/models/{model}{suffix} and /v2/models/{model}/versions/{version}{suffix}."""
    latest = {verb: {**operation, "operationId": operation["operationId"], "parameters": [MODEL]}}
    pinned = {verb: {**operation, "operationId": operation["operationId"] + "-version", "parameters": [MODEL, VERSION]}}
    return {f"/v2/models/{{model}}{suffix}": latest, f"/v2/models/{{model}}/versions/{{version}}{suffix}": pinned}


@functools.lru_cache(maxsize=1)
def openapi_document() -> dict[str, Any]:
    tensor_data = {"type": "array", "items": {}, "description": "the tensor's elements, row-major, flat or nested"}
    parameters = {"type": "object", "additionalProperties": True}
    infer = {
        "operationId": "infer",
        "summary": "Inference",
        "description": "JSON request, or with Triton's binary tensor data extension: the JSON (its length in the "
        "Inference-Header-Content-Length header) followed by each input with a binary_data_size parameter, in "
        "order. Outputs come back as binary data when asked for (binary_data, binary_data_output).",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("inference_request")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "description": "the outputs",
                "content": {
                    "application/json": {"schema": _ref("inference_response")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "400": ERROR,
            "404": ERROR,
            "413": ERROR,
            "415": ERROR,
            **AUTH_ERRORS,
        },
    }
    duration = _ref("statistic_duration")
    statistics = {
        "operationId": "statistics",
        "summary": "Triton's statistics extension: every served version, a model's, or one version's",
        "responses": {
            "200": {"description": "per model version", "content": _json(_ref("model_statistics_response"))},
            "400": ERROR,
            "404": ERROR,
            **AUTH_ERRORS,
        },
    }
    paths: dict[str, Any] = {
        "/v2": {
            "get": {
                "operationId": "server-metadata",
                "summary": "Server metadata",
                "responses": {
                    "200": {
                        "description": "name, version, extensions",
                        "content": _json(_ref("metadata_server_response")),
                    },
                    **AUTH_ERRORS,
                },
            }
        },
        "/v2/health/live": {
            "get": {
                "operationId": "server-live",
                "summary": "Server live (no token needed)",
                "responses": {"200": {"description": "live", "content": _json(_ref("live_response"))}},
            }
        },
        "/v2/health/ready": {
            "get": {
                "operationId": "server-ready",
                "summary": "Server ready (no token needed)",
                "responses": {
                    "200": {"description": "ready", "content": _json(_ref("ready_response"))},
                    "503": {"description": "not ready (loading or draining)", "content": _json(_ref("ready_response"))},
                },
            }
        },
        "/v2/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document (no token needed)",
                "responses": {"200": {"description": "OpenAPI 3.0", "content": _json({"type": "object"})}},
            }
        },
        **_model_paths(
            "",
            {
                "operationId": "model-metadata",
                "summary": "Model metadata",
                "responses": {
                    "200": {"description": "the model's tensors", "content": _json(_ref("metadata_model_response"))},
                    "400": ERROR,
                    "404": ERROR,
                    **AUTH_ERRORS,
                },
            },
        ),
        **_model_paths(
            "/ready",
            {
                "operationId": "model-ready",
                "summary": "Model ready",
                "responses": {
                    "200": {"description": "ready", "content": _json(_ref("model_ready_response"))},
                    "503": {"description": "not ready or not loaded", "content": _json(_ref("model_ready_response"))},
                    "400": ERROR,
                    "401": ERROR,
                    "429": ERROR,
                },
            },
        ),
        **_model_paths(
            "/config",
            {
                "operationId": "model-config",
                "summary": "Triton model configuration",
                "responses": {
                    "200": {"description": "Triton ModelConfig as JSON", "content": _json({"type": "object"})},
                    "400": ERROR,
                    "404": ERROR,
                    **AUTH_ERRORS,
                },
            },
        ),
        **_model_paths("/infer", infer, verb="post"),
        "/v2/models/stats": {"get": {**statistics, "operationId": "statistics-all"}},
        **_model_paths("/stats", statistics),
        "/v2/models/{model}/rollout": {
            "get": {
                "operationId": "rollout-status",
                "summary": "The model's guarded rollout: roles, shares, rules, windows, agreement, audit",
                "parameters": [MODEL],
                "responses": {
                    "200": {"description": "the rollout status", "content": _json({"type": "object"})},
                    "400": ERROR,
                    "404": ERROR,
                    **AUTH_ERRORS,
                },
            }
        },
        "/v2/repository/index": {
            "post": {
                "operationId": "repository-index",
                "summary": "Models in the repository (Triton extension)",
                "requestBody": {
                    "required": False,
                    "content": _json({"type": "object", "properties": {"ready": {"type": "boolean"}}}),
                },
                "responses": {
                    "200": {
                        "description": "one entry per model version",
                        "content": _json({"type": "array", "items": _ref("repository_index_entry")}),
                    },
                    "400": ERROR,
                    **AUTH_ERRORS,
                },
            }
        },
    }
    for action in ("load", "unload"):
        paths[f"/v2/repository/models/{{model}}/{action}"] = {
            "post": {
                "operationId": f"repository-{action}",
                "summary": f"{action.capitalize()} a model (Triton extension; needs model control on)"
                + (
                    ": with parameters, change its rollout (shadow, canary, promote, rollback)"
                    if action == "load"
                    else ""
                ),
                "parameters": [MODEL],
                "requestBody": {
                    "required": False,
                    "content": _json({"type": "object", "properties": {"parameters": parameters}}),
                },
                "responses": {
                    "200": {"description": "done", "content": _json({"type": "object"})},
                    "400": ERROR,
                    "403": ERROR,
                    "404": ERROR,
                    "409": ERROR,
                    **AUTH_ERRORS,
                },
            }
        }
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    schemas = {
        "error_response": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "live_response": {"type": "object", "properties": {"live": {"type": "boolean"}}},
        "ready_response": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        "model_ready_response": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        },
        "metadata_server_response": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "metadata_model_response": {
            "type": "object",
            "required": ["name", "platform"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": tensor},
                "outputs": {"type": "array", "items": tensor},
            },
        },
        "inference_request": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": parameters,
                "inputs": {"type": "array", "items": _ref("request_input")},
                "outputs": {"type": "array", "items": _ref("request_output")},
            },
        },
        "request_input": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}},
                "datatype": {"type": "string"},
                "parameters": parameters,
                "data": tensor_data,
            },
        },
        "request_output": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "parameters": parameters},
        },
        "inference_response": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": parameters,
                "outputs": {"type": "array", "items": _ref("response_output")},
            },
        },
        "response_output": {
            "type": "object",
            "required": ["name", "shape", "datatype"],
            "properties": {
                "name": {"type": "string"},
                "shape": {"type": "array", "items": {"type": "integer"}},
                "datatype": {"type": "string"},
                "parameters": parameters,
                "data": tensor_data,
            },
        },
        "statistic_duration": {
            "type": "object",
            "properties": {"count": {"type": "integer"}, "ns": {"type": "integer"}},
        },
        "model_statistics_response": {
            "type": "object",
            "required": ["model_stats"],
            "properties": {
                "model_stats": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "version"],
                        "properties": {
                            "name": {"type": "string"},
                            "version": {"type": "string"},
                            "last_inference": {"type": "integer", "description": "ms since the epoch"},
                            "inference_count": {"type": "integer"},
                            "execution_count": {"type": "integer"},
                            "inference_stats": {
                                "type": "object",
                                "properties": {
                                    k: duration
                                    for k in (
                                        "success",
                                        "fail",
                                        "queue",
                                        "compute_input",
                                        "compute_infer",
                                        "compute_output",
                                        "cache_hit",
                                        "cache_miss",
                                    )
                                },
                            },
                            "batch_stats": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "batch_size": {"type": "integer"},
                                        "compute_input": duration,
                                        "compute_infer": duration,
                                        "compute_output": duration,
                                    },
                                },
                            },
                            "memory_usage": {"type": "array", "items": {"type": "object"}},
                        },
                    },
                }
            },
        },
        "repository_index_entry": {
            "type": "object",
            "required": ["name", "state"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string"},
                "reason": {"type": "string"},
            },
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "model-serving: Open Inference Protocol (KServe V2) over HTTP/REST",
            "version": server_version(),
            "description": 'https://github.com/kserve/open-inference-protocol; errors are {"error": message}; '
            "with auth on, every path but the health endpoints and this document needs "
            "'Authorization: Bearer <token>'.",
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
