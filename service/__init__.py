"""gRPC model server on onnxruntime: typed API and KServe V2 protocol over one model repository."""

from __future__ import annotations

from importlib import metadata

#: The distribution (pip) name; the import packages are ``service`` and ``training``.
DISTRIBUTION = "onnx-v2-serving"


def installed_version() -> str:
    """The version of the installed distribution (what the server reports), or ``0+unknown``
    when running from a source tree that was never installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
