"""The one scanner of the model repository: ``<root>/<name>/<version>/model.onnx`` (Triton's layout).

Entries starting with ``.`` or ``_`` are skipped (staging folders, ``__pycache__``). Version
folders are positive integers in ASCII digits. A problem with one entry is recorded and the scan
goes on: one bad folder never stops a scan, a poll or start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

MODEL_FILE = "model.onnx"
#: (st_mtime_ns, st_size, st_ino) of a model file: a changed or replaced file changes it.
Signature = tuple[int, int, int]


class Failure(NamedTuple):
    """What failed: a whole model (``version`` "") or one version folder (its name as on disk)."""

    model: str
    version: str = ""

    def __str__(self) -> str:
        return f"{self.model}/{self.version}" if self.version else self.model


@dataclass
class Scan:
    """What one scan found under the root."""

    found: dict[str, dict[int, Path]] = field(default_factory=dict)  # model → version → model file
    on_disk: dict[str, set[str]] = field(default_factory=dict)  # model → version folder names
    problems: dict[Failure, str] = field(default_factory=dict)  # folders that cannot be versions


def _visible(name: str) -> bool:
    return not name.startswith((".", "_"))


def version_number(folder: str) -> int | None:
    """The version a folder name stands for: ASCII digits, at least 1; else None."""
    if not folder.isascii() or not folder.isdigit():
        return None
    number = int(folder)
    return number if number >= 1 else None


def file_signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def scan(root: Path, scope: set[str] | None = None) -> Scan | None:
    """Every model folder under ``root`` (only those named in ``scope``, when given), or None when
    ``root`` itself cannot be listed."""
    try:
        entries = [p for p in root.iterdir() if _visible(p.name) and p.is_dir()]
    except OSError:
        return None
    result = Scan()
    for model_dir in entries:
        name = model_dir.name
        if scope is not None and name not in scope:
            continue
        try:
            version_dirs = [p for p in model_dir.iterdir() if _visible(p.name) and p.is_dir()]
        except OSError as exc:
            result.problems[Failure(name)] = f"model directory cannot be read: {exc.strerror or exc}"
            continue
        result.on_disk[name] = {p.name for p in version_dirs}
        if not version_dirs:
            result.problems[Failure(name)] = f"no version directories; expected {name}/<version>/{MODEL_FILE}"
        for version_dir in version_dirs:
            version = version_number(version_dir.name)
            if version is None:
                result.problems[Failure(name, version_dir.name)] = (
                    f"version directory must be a positive integer, got {version_dir.name!r}"
                )
                continue
            result.found.setdefault(name, {})[version] = version_dir / MODEL_FILE
    return result


def is_model_dir(root: Path, name: str) -> bool:
    """Whether ``name`` is a model folder of the repository: matched against the listing, never
    joined into a path (no ``..``, ``/``, NUL or over-long names reach the filesystem)."""
    if not name or not _visible(name) or len(name) > 255:
        return False
    try:
        return any(p.name == name and p.is_dir() for p in root.iterdir())
    except OSError:
        return False
