"""What the deployment files name, run for real on this machine (no Docker engine, no cluster):
the compose batch command and health probe against the session server; a server started with the
Kubernetes ConfigMap's settings answering the kubelet's gRPC probe and draining on SIGTERM within
the pod's budget; a client connecting as the headless Service says (round_robin over the
addresses its DNS returns) reaches every pod and rides out a draining one by retrying.
(Static checks of the same files: tests/unit/deploy.)"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures.deploy import container_env, one, server_container
from fixtures.onnx_models import linear, save
from fixtures.servers import REPO_ROOT, ServerProcess, free_port, start_server, wait_for

from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc
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
    probe = container["startupProbe"]
    assert probe["grpc"]["port"] == int(env["SERVING_PORT"])  # here: mapped to a free port

    def kubelet_probe(port: int) -> int | None:
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

    for attempt in range(5):  # ports picked free can be taken before the server binds them: others
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
        log_path = tmp_path / f"server-{attempt}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "service"], cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
            )
        # The startup probe's budget is the pod's: a server slower than that would be restarted.
        deadline = time.monotonic() + probe["periodSeconds"] * probe["failureThreshold"]
        while process.poll() is None and kubelet_probe(port) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "startup probe budget exceeded:\n" + log_path.read_text()
            time.sleep(0.2)
        if process.poll() is None or attempt == 4 or "Address already in use" not in log_path.read_text():
            break

    try:
        assert process.poll() is None, log_path.read_text()
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


def _documented_client_options() -> list[tuple[str, str]]:
    """The channel options the headless Service tells clients to use (its header comment)."""
    text = (REPO_ROOT / "deploy" / "k8s" / "base" / "service-headless.yaml").read_text()
    found = re.search(r"options=(\[.*?\])\)", text)
    assert found, "the headless Service no longer shows how to connect"
    return [tuple(option) for option in ast.literal_eval(found.group(1))]


def test_round_robin_over_the_headless_service_rides_out_a_draining_pod(
    rendered: dict[str, list[dict]], tmp_path: Path
) -> None:
    """What deploy/k8s promises clients: the headless Service's DNS name resolves to every ready
    pod and connect(..., options=<what the manifest says>) spreads calls over them; when one pod
    drains (SIGTERM), a call it holds is answered UNAVAILABLE and service.client's default retry
    policy lands it on the other pod. Two local servers stand in for two pods (pod 1 answers
    2x + 1, pod 2 3x + 1, so an answer says who replied).

    Made exact with process states, not timing: pod 2 is stopped (SIGSTOP) while the client
    connects, so its only ready pod is pod 1; pod 1 is kept draining by a call queued behind a
    60 s batching delay; a health check on the client's channel, answered after the client's
    call has been taken (and held) by pod 1, says when to let things go."""
    from service.client import connect

    headless = one(rendered["base"], "Service", "model-serving-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is False
    grpc_port = next(p for p in headless["spec"]["ports"] if p["name"] == "grpc")
    deployment = one(rendered["base"], "Deployment")
    container = server_container(deployment["spec"]["template"]["spec"])
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[grpc_port["targetPort"]] == int(container_env(container, rendered["base"])["SERVING_PORT"])
    options = _documented_client_options()
    assert options == [("grpc.lb_policy_name", "round_robin")]

    repos = []
    for pod, weight in ((1, 2.0), (2, 3.0)):
        repo = tmp_path / f"pod{pod}"
        save(linear(1, [weight], 1.0, "population", "profit"), repo, "profit")
        save(linear(1, [1.0], 0.0, "population", "profit"), repo, "held")
        repos.append(repo)
    batching = json.dumps({"held": {"max_queue_delay_us": 60_000_000}})
    pod_args = ["--batching", batching, "--shutdown-grace-seconds", "60"]
    with (
        start_server(tmp_path, "--model-repository", str(repos[0]), *pod_args, metrics=True) as pod1,
        start_server(tmp_path, "--model-repository", str(repos[1]), *pod_args) as pod2,
    ):
        target = f"ipv4:127.0.0.1:{pod1.port},127.0.0.1:{pod2.port}"  # what the DNS name resolves to
        with connect(target, options=options, timeout=60) as balanced:
            assert {float(balanced.predict_profit([3.0])[0]) for _ in range(8)} == {7.0, 10.0}  # both pods
        os.kill(pod2.process.pid, signal.SIGSTOP)
        try:
            with connect(target, options=options, timeout=60) as client, pod1.channel() as direct:
                held = pb_grpc.ModelServiceStub(direct).PredictProfit.future(
                    pb.PredictProfitRequest(model=pb.ModelRef(name="held"), population=[1.0]), timeout=120
                )
                wait_for(lambda: pod1.metric("serving_queue_depth", model="held", version="1") == 1, "a held call")
                pod1.process.send_signal(signal.SIGTERM)
                pod1.wait_log("shutting down")
                answers: list[object] = []
                caller = threading.Thread(target=lambda: answers.append(_try(lambda: client.predict_profit([3.0]))))
                caller.start()
                assert client.health() == "NOT_SERVING"  # pod 1, after it took the call above: held
                os.kill(pod2.process.pid, signal.SIGCONT)
                held.cancel()  # pod 1's drain ends: the held call is answered UNAVAILABLE...
                caller.join(120)
                assert pod1.process.wait(60) == 0
                assert float(client.predict_profit([3.0])[0]) == 10.0  # pod 2 from now on
        finally:
            os.kill(pod2.process.pid, signal.SIGCONT)
    assert len(answers) == 1 and not isinstance(answers[0], Exception), answers
    assert float(answers[0][0]) == 10.0  # ...and the client's retry reached pod 2
    (drained,) = pod1.log_lines("drained: stopping gRPC")
    assert drained["held_for_unavailable"] == 1


def _try(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as exc:
        return exc
