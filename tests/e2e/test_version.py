"""The version the server reports is the installed distribution's (importlib.metadata), over V2
ServerMetadata on gRPC and ``GET /v2`` on HTTP, and in the start-up line. (The changelog and
pyproject agree: tests/unit/test_packaging.py.)"""

from __future__ import annotations

import json
import os
import urllib.request
from importlib import metadata
from pathlib import Path

import tritonclient.grpc as triton_grpc
from fixtures.servers import MODELS, REPO_ROOT, ServerProcess, start_server

from service import DISTRIBUTION


def reported(proc: ServerProcess) -> tuple[str, str, str]:
    """The version over gRPC (V2 ServerMetadata), HTTP (GET /v2) and in the start-up line."""
    over_grpc = triton_grpc.InferenceServerClient(proc.address).get_server_metadata().version
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.http_port}/v2", timeout=10) as response:
        over_http = json.load(response)["version"]
    started = next(
        json.loads(line) for line in proc.log().splitlines() if line.startswith("{") and '"server started"' in line
    )
    return over_grpc, over_http, started["version"]


def test_server_reports_the_installed_version(tmp_path: Path) -> None:
    with start_server(tmp_path, "--model-repository", str(MODELS)) as proc:
        versions = reported(proc)
    assert versions == (metadata.version(DISTRIBUTION),) * 3


def test_the_version_comes_from_the_distributions_metadata(tmp_path: Path) -> None:
    """Another installed version of the distribution (its metadata first on the path, as
    site-packages would hold it): the server reports that one, not a number in the source. The
    server runs outside the repository, whose own metadata (the editable install's egg-info)
    would come first on the path."""
    site = tmp_path / "site"
    dist_info = site / f"{DISTRIBUTION.replace('-', '_')}-9.8.7.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DISTRIBUTION}\nVersion: 9.8.7\n")
    pythonpath = os.pathsep.join([str(site), str(REPO_ROOT)])
    args = ["--model-repository", str(MODELS)]
    with start_server(tmp_path, *args, env={"PYTHONPATH": pythonpath}, cwd=tmp_path) as proc:
        versions = reported(proc)
    assert versions == ("9.8.7", "9.8.7", "9.8.7")
