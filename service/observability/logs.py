"""Logging: JSON lines for machines or text for a person (``auto``: text when stderr is a
terminal), and one DEBUG line per request (:class:`RequestLog`).

Both formats carry the same records; the text format writes the fields of a few records
(``listening``, ``model loaded``, ``server started``) as prose, the start-up line as a short
summary, and any other record's fields as ``key=value``."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
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
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Lines for a person: time, level, logger, message; the fields of the records in
    :data:`TEXT_RENDERERS` as prose, any other record's ``extra=`` fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        extras = _extras(record)
        head = super().format(record)
        worker = extras.pop("worker", None)
        if worker is not None:  # a worker's line (--workers), or the supervisor's about one
            head = head.replace(f" {record.name}: ", f" {record.name}[worker {worker}]: ", 1)
        render = TEXT_RENDERERS.get(record.getMessage())
        if render is not None:
            try:
                return head + render(extras)
            except (KeyError, TypeError, ValueError, AttributeError):
                pass  # fields not as expected: key=value below
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        return head + (" " + fields if fields else "")


def _on_off(value: object, on: str = "on") -> str:
    return on if value else "off"


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listening(fields: Mapping[str, Any]) -> str:
    ports = {"gRPC": fields["grpc_port"], "HTTP": fields["http_port"], "metrics": fields["metrics_port"]}
    workers = f" ({fields['workers']} workers)" if fields.get("workers") else ""
    return ": " + ", ".join(f"{name} {port if port else 'off'}" for name, port in ports.items()) + workers


def _model_loaded(fields: Mapping[str, Any]) -> str:
    batching = fields.get("batching") or {}
    rows = f", batches of up to {batching['max_batch_rows']} rows" if batching.get("enabled") else ", no batching"
    return (
        f" {fields['model']}/{fields['version']} on {fields['provider']}: "
        f"{', '.join(fields['inputs'])} → {', '.join(fields['outputs'])}{rows}"
    )


def _server_started(fields: Mapping[str, Any]) -> str:
    """The start-up summary: a few lines a person can scan."""
    host, _, grpc_port = str(fields["address"]).rpartition(":")
    models = fields["models"]
    failed = fields.get("failed") or {}
    state = "ready" if fields["ready"] else "NOT READY: no model loaded (health NOT_SERVING)"
    tls = "mutual TLS" if fields.get("mutual_tls") else _on_off(fields.get("tls"))
    reload = fields.get("reload_interval_seconds")
    http_port, metrics_port = fields["http_port"], fields["metrics_port"]
    lines = [
        f" (model-serving {fields.get('version', '?')}), {state}",
        f"gRPC      {host}:{grpc_port} ({', '.join(fields['services'])}, health, reflection)",
        "HTTP      " + (f"{host}:{http_port} (KServe V2 REST)" if http_port else "off"),
        "metrics   " + (f"http://{host}:{metrics_port}/metrics" if metrics_port else "off"),
        "models    "
        + (", ".join(f"{name} v{','.join(map(str, versions))}" for name, versions in models.items()) or "none"),
        f"provider  {', '.join(fields['providers']) or 'none'}",
        f"security  TLS {tls}, auth {_on_off(fields.get('auth'), 'bearer tokens')}",
        "reload    " + (f"every {reload:g} s" if reload else "off"),
        "loading   "
        + (
            "strict (a model that fails to load stops start-up)"
            if fields.get("strict_model_loading")
            else "lenient (the server starts with what loaded)"
        ),
        *(f"failed    {key}: {_clip(why)}" for key, why in failed.items()),
    ]
    if fields.get("workers"):
        pids = ", ".join(str(pid) for pid in fields.get("worker_pids") or [])
        lines.insert(1, f"workers   {fields['workers']} processes on these ports (pids {pids})")
    return "\n    ".join(lines)


def _providers(fields: Mapping[str, Any]) -> str:
    return f": {', '.join(fields['providers'])} ({fields['choice']}; available: {', '.join(fields['available'])})"


def _reloaded(fields: Mapping[str, Any]) -> str:
    counts = {"loaded": len(fields["loaded"]), "unloaded": len(fields["unloaded"]), "rejected": len(fields["rejected"])}
    return f" ({fields['trigger']}): " + ", ".join(f"{n} {what}" for what, n in counts.items())


def _failed(fields: Mapping[str, Any]) -> str:
    lines = [f"{key}: {_clip(why)}" for key, why in fields["failed"].items()]
    serving = fields.get("serving")
    return ":\n    " + "\n    ".join(lines) + ("\n    the others are served" if serving else "")


def _not_ready(fields: Mapping[str, Any]) -> str:
    why = "it holds no <name>/<version>/model.onnx" if fields.get("empty") else "every model failed"
    return f": model repository {fields['root']}: {why}; health NOT_SERVING until a model loads"


def _rollout_audit(fields: Mapping[str, Any]) -> str:
    version = f"/{fields['version']}" if fields.get("version") else ""
    return f": {fields['action']} {fields['model']}{version} by {fields['who']}: {_clip(fields['why'], 300)}"


#: Records whose fields the text format writes as prose, by message.
TEXT_RENDERERS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "execution providers selected": _providers,
    "listening": _listening,
    "model loaded": _model_loaded,
    "model repository reloaded": _reloaded,
    "server started": _server_started,
    "models failed to load": _failed,
    "no model loaded: not ready": _not_ready,
    "rollout audit": _rollout_audit,
}


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
