"""KServe V2 / Open Inference Protocol adapter (placeholder until the V2 adapter lands)."""
from __future__ import annotations

from typing import Any


def add_to_server(server: Any, repository: Any, settings: Any) -> list[str]:
    """Register the V2 servicer on ``server``; return the full service names for reflection."""
    return []
