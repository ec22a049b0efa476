"""What the deployment files name, run for real on this machine (no Docker engine, no cluster):
the compose batch command and health probe against the session server; a server started with the
Kubernetes ConfigMap's settings answering the kubelet's gRPC probe and draining on SIGTERM within
the pod's budget; round_robin over the addresses a headless Service's DNS returns.
(Static checks of the same files: tests/unit/deploy.)"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fixtures.deploy import container_env, one, server_container
from fixtures.servers import REPO_ROOT, ServerProcess, free_port, start_server

from service.jobs.__main__ import main

# -- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_batch_command_really_runs(
    compose: dict,
    server: ServerProcess,
    fashion_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    """The compose batch command, with /data, /output and server:8001 mapped onto this machine
    (its entrypoint: python -m service.jobs)."""
    data = fashion_files["t10k-images-idx3-ubyte"].parent
    if not (data / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("the Fashion-MNIST files here are not the .gz names the compose command uses")
    mapping = {"/data": str(data), "/output": str(tmp_path), "server:8001": server.address}
    command = []
    for arg in compose["services"]["batch"]["command"]:
        for old, new in mapping.items():
            arg = arg.replace(old, new) if arg.startswith(old) else arg
        command.append(arg)
    assert main(command) == 0
    summary = json.loads((tmp_path / "fashion-test" / "summary.json").read_text())
    assert summary["complete"] and summary["rows"] == 10_000 and summary["accuracy"] > 0.8


def test_healthcheck_command_really_runs(compose: dict, server: ServerProcess) -> None:
    """The compose/Dockerfile probe, as the container runs it (SERVING_PORT in the environment)."""
    test = compose["services"]["server"]["healthcheck"]["test"]
    env = {**os.environ, "SERVING_PORT": str(server.port)}
    probe = subprocess.run(
        [sys.executable, *test[2:]], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert probe.returncode == 0 and "SERVING" in probe.stdout
    env["SERVING_PORT"] = "1"
    assert (
        subprocess.run([sys.executable, *test[2:]], cwd=REPO_ROOT, env=env, capture_output=True, timeout=30).returncode
        == 1
    )


# -- deploy/k8s ------------------------------------------------------------------------------------


def test_server_with_the_configmap_settings_answers_the_kubelet_probe(
    rendered: dict[str, list[dict]], tmp_path: Path
) -> None:
    """`python -m service` (the image's ENTRYPOINT) with the ConfigMap as its environment; only the
    address (loopback, a free port) and the model repository path are mapped to this machine."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    docs = rendered["base"]
    deployment = one(docs, "Deployment")
    container = server_container(deployment["spec"]["template"]["spec"])
    env = container_env(container, docs)
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    mapped = {
        **env,
        "SERVING_HOST": "127.0.0.1",
        "SERVING_PORT": str(port),
        "SERVING_HTTP_PORT": str(http_port),
        "SERVING_METRICS_PORT": str(metrics_port),
        "SERVING_MODEL_REPOSITORY": str(REPO_ROOT / "models"),
    }
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_")}
    full_env.update(mapped, PYTHONUNBUFFERED="1")
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
        )
    probe = container["startupProbe"]
    assert probe["grpc"]["port"] == int(env["SERVING_PORT"])  # here: mapped to `port`

    def kubelet_probe() -> int | None:
        """What the kubelet's gRPC probe does: Health/Check, service "" (probe.grpc.service unset)."""
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                return (
                    health_pb2_grpc.HealthStub(channel)
                    .Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                        timeout=probe["timeoutSeconds"],
                    )
                    .status
                )
            except grpc.RpcError:
                return None

    try:
        deadline = time.monotonic() + probe["periodSeconds"] * probe["failureThreshold"]
        while kubelet_probe() != health_pb2.HealthCheckResponse.SERVING:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "startup probe budget exceeded:\n" + log_path.read_text()
            time.sleep(0.2)
        import urllib.request

        # What the pod's prometheus.io annotations tell Prometheus to scrape.
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        url = f"http://127.0.0.1:{metrics_port}{annotations['prometheus.io/path']}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200 and b"# TYPE" in response.read()
        # What the http-probes variant's kubelet asks instead.
        http_probe = server_container(one(rendered["http-probes"], "Deployment")["spec"]["template"]["spec"])
        path = http_probe["readinessProbe"]["httpGet"]["path"]
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=10) as response:
            assert response.status == 200
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=grace - pre_stop) == 0, log_path.read_text()
        assert time.monotonic() - stopping < grace - pre_stop
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_round_robin_spreads_calls_over_the_addresses_dns_returns(tmp_path: Path) -> None:
    """The headless Service's DNS name resolves to every ready pod; with round_robin the client
    uses all of them. Two local servers stand in for two pods (each serves a different version of
    the same model, so an answer says which one replied)."""
    from service.client import NO_RETRY, connect

    repositories = []
    for version in (1, 2):
        repo = tmp_path / f"repo{version}" / "fashion_softmax" / str(version)
        repo.mkdir(parents=True)
        shutil.copy(REPO_ROOT / "models" / "fashion_softmax" / "1" / "model.onnx", repo / "model.onnx")
        repositories.append(repo.parents[1])
    with (
        start_server(tmp_path, "--model-repository", str(repositories[0])) as first,
        start_server(tmp_path, "--model-repository", str(repositories[1])) as second,
    ):
        target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{second.port}"

        def versions(options: list[tuple[str, str]]) -> set[int]:
            with connect(target, options=options, retry=NO_RETRY, timeout=10) as client:
                return {client.metadata("fashion_softmax").version for _ in range(8)}

        assert versions([("grpc.lb_policy_name", "round_robin")]) == {1, 2}
        assert len(versions([])) == 1  # pick_first: one connection, one pod
