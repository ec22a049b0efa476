"""Structured logs (service.observability.logs): the per-request DEBUG line read from the request
context, and the JSON and text formats."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from service.core.context import RequestContext
from service.observability.logs import JsonFormatter, RequestLog, TextFormatter, configure_logging


@pytest.fixture
def request_lines() -> Iterator[io.StringIO]:
    """What the ``service.requests`` logger writes, as JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("service.requests")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def test_one_json_line_per_finished_request(request_lines: io.StringIO) -> None:
    context = RequestContext("typed", "/serving.v1.ModelService/PredictProfit", inference=True)
    context.resolved("profit", 1)
    context.rows, context.request_id, context.status = 3, "r-42", "OK"
    context.annotate(stream_index=2)
    RequestLog().finish(context)
    failed = RequestContext("v2", "/inference.GRPCInferenceService/ModelInfer", inference=True)
    failed.status, failed.error = "NOT_FOUND", "model 'nope' not found"
    RequestLog().finish(failed)
    first, second = (json.loads(line) for line in request_lines.getvalue().splitlines())
    assert first["msg"] == "request" and first["level"] == "DEBUG" and first["logger"] == "service.requests"
    assert {k: first[k] for k in ("method", "code", "model", "version", "batch", "request_id", "stream_index")} == {
        "method": "/serving.v1.ModelService/PredictProfit",
        "code": "OK",
        "model": "profit",
        "version": "1",
        "batch": 3,
        "request_id": "r-42",
        "stream_index": 2,
    }
    assert isinstance(first["ms"], float) and first["ms"] >= 0 and first["ts"].endswith("+00:00")
    # Unknown model, no rows, no id: those fields are left out rather than empty.
    assert second["code"] == "NOT_FOUND" and second["method"].endswith("/ModelInfer")
    assert not {"model", "version", "batch", "request_id"} & set(second)


def test_json_and_text_formats() -> None:
    record = logging.LogRecord("service", logging.ERROR, __file__, 1, "model %s", ("rejected",), None)
    record.model, record.version = "m", 3
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["msg"], entry["model"], entry["version"]) == (
        "ERROR",
        "service",
        "model rejected",
        "m",
        3,
    )
    text = TextFormatter().format(record)
    assert text.endswith("ERROR service: model rejected model=m version=3")
    try:
        raise ValueError("boom")
    except ValueError:
        with_exc = logging.LogRecord("service", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(with_exc))["exc"]


def test_configure_logging_routes_everything_to_one_handler() -> None:
    root = logging.getLogger()
    handlers, levels = root.handlers[:], {name: logging.getLogger(name).level for name in ("", "grpc", "asyncio")}
    try:
        configure_logging("DEBUG", "text")
        assert len(root.handlers) == 1 and isinstance(root.handlers[0].formatter, TextFormatter)
        assert root.level == logging.DEBUG and logging.getLogger("grpc").level == logging.INFO
        configure_logging("WARNING", "json")
        assert isinstance(root.handlers[0].formatter, JsonFormatter) and root.level == logging.WARNING
    finally:
        root.handlers[:] = handlers
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize("tty, expected", [(True, "text"), (False, "json")])
def test_auto_format_is_text_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch, tty: bool, expected: str) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    monkeypatch.setattr(sys, "stderr", _Stream(tty))
    try:
        assert configure_logging("INFO", "auto") == expected
        assert isinstance(root.handlers[0].formatter, TextFormatter if tty else JsonFormatter)
        assert configure_logging("INFO", "json") == "json"  # an explicit format always wins
        assert configure_logging("INFO", "text") == "text"
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


STARTED = {
    "version": "1.2.3",
    "address": "0.0.0.0:8001",
    "http_port": 8000,
    "metrics_port": None,
    "tls": True,
    "mutual_tls": False,
    "auth": True,
    "reload_interval_seconds": 5.0,
    "providers": ["CPUExecutionProvider"],
    "models": {"fashion_cnn": [1, 2], "profit": [1]},
    "failed": {"broken/1": "InvalidProtobuf: Protobuf\nparsing failed."},
    "services": ["serving.v1.ModelService", "inference.GRPCInferenceService"],
    "ready": True,
    "strict_model_loading": False,
}


def test_text_start_up_line_is_a_summary() -> None:
    """The same record as the JSON line (same fields), written as a few lines a person scans."""
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "server started", (), None)
    record.__dict__.update(STARTED)
    assert json.loads(JsonFormatter().format(record)).items() >= STARTED.items()
    text = TextFormatter().format(record)
    assert text.split("\n")[0].endswith("INFO service: server started (model-serving 1.2.3), ready")
    assert text.split("\n")[1:] == [
        "    gRPC      0.0.0.0:8001 (serving.v1.ModelService, inference.GRPCInferenceService, health, reflection)",
        "    HTTP      0.0.0.0:8000 (KServe V2 REST)",
        "    metrics   off",
        "    models    fashion_cnn v1,2, profit v1",
        "    provider  CPUExecutionProvider",
        "    security  TLS on, auth bearer tokens",
        "    reload    every 5 s",
        "    loading   lenient (the server starts with what loaded)",
        "    failed    broken/1: InvalidProtobuf: Protobuf parsing failed.",
    ]


def test_text_renderer_falls_back_to_key_value() -> None:
    """A record under a rendered message without the expected fields is still written."""
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "server started", (), None)
    record.address = "x"
    assert TextFormatter().format(record).endswith("INFO service: server started address=x")
