"""Audit records of rollout changes: who did what, why, with the figures behind it.

Each record is logged (``"rollout audit"``, WARNING for a rollback, INFO otherwise), appended as one
JSON line to the ``rollout_audit_file`` setting's file (flushed and fsync'ed: a rollback must be
on disk when it is announced), and the last :data:`KEPT` are kept for the rollout status
endpoint. Records never hold tokens: "who" is ``automatic`` (a rule), ``configuration``, or the
model-control call's protocol and method.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import orjson

log = logging.getLogger("service.rollout")

KEPT = 200


class Audit:
    """Where audit records go (see the module docstring)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.records: deque[dict[str, Any]] = deque(maxlen=KEPT)

    def record(
        self, action: str, model: str, version: int | None, who: str, why: str, **figures: Any
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z",
            "action": action,
            "model": model,
            "version": None if version is None else str(version),
            "who": who,
            "why": why,
            **figures,
        }
        self.records.append(entry)
        level = logging.WARNING if action == "rollback" else logging.INFO
        log.log(level, "rollout audit", extra={"audit": True, **entry})
        if self.path is not None:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, orjson.dumps(entry, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("rollout audit file cannot be written", extra={"path": str(self.path), "error": str(exc)})
        return entry

    def for_model(self, model: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["model"] == model]
