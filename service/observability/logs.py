"""Structured logging: JSON lines (or text), and one DEBUG line per request (:class:`RequestLog`)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone
from typing import Any

from ..core.context import RequestContext

log = logging.getLogger("service.requests")

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, then any ``extra=`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the ``extra=`` fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        return super().format(record) + (" " + fields if fields else "")


def configure_logging(level: str = "INFO", fmt: str = "json") -> str:
    """Route all logs to stderr in the chosen format and level; return the format used
    (``auto``: text when stderr is a terminal, else JSON)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Library internals stay out of our per-request debug lines.
    for noisy in ("grpc", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.INFO))
    return fmt


class RequestLog:
    """One DEBUG line per finished request (``"msg": "request"``), read from its context:
    method, status code, milliseconds, model, version, rows (``batch``), request id and any
    annotated fields. Installed only at DEBUG (elsewhere it would cost every request a call)."""

    def finish(self, context: RequestContext) -> None:
        fields: dict[str, Any] = {
            "method": context.method,
            "code": context.status,
            "ms": round(context.seconds() * 1000, 3),
        }
        if context.model:
            fields.update(model=context.model, version=context.version)
        if context.rows:
            fields["batch"] = context.rows
        if context.request_id:
            fields["request_id"] = context.request_id
        if context.fields:
            fields.update(context.fields)
        log.debug("request", extra=fields)
