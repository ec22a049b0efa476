"""The container stack for real: the image built from ./Dockerfile, run by ./docker-compose.yml on a
container engine (podman through its Docker-compatible API, or Docker), checked from the host
through the **published ports** only.

Run by ``./scripts/container-test.sh`` (which installs the engine, builds the image and sets the
``CONTAINER_*`` variables read below); skipped in a plain ``./scripts/test.sh`` run. Each check
records its figures (sizes, times, drain counts, accuracies) in ``$CONTAINER_REPORT`` (JSON), which
the script prints at the end. docs/deployment.md describes every check.

Order matters and is the file's order: the image, then the stack serving (health, typed API, V2,
metrics, HTTP, read-only/non-root, the batch profile), then ``docker compose stop`` under load
(which ends the stack), then a second stack with a corrupt model in its repository.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from fixtures.servers import MODELS, REPO_ROOT, free_port

if os.environ.get("CONTAINER_STACK") != "1":
    pytest.skip(
        "the container check: ./scripts/container-test.sh runs it (builds the image, starts the engine)",
        allow_module_level=True,
    )
pytestmark = pytest.mark.container

ENGINE = os.environ.get("CONTAINER_ENGINE", "podman")
COMPOSE = shlex.split(os.environ.get("CONTAINER_COMPOSE", "docker compose"))
IMAGE = os.environ.get("CONTAINER_IMAGE", "model-serving:cpu")
BASE_IMAGE = os.environ.get("CONTAINER_BASE_IMAGE", "")
PROJECT = os.environ.get("CONTAINER_PROJECT", f"model-serving-check-{os.getpid()}")
REPORT = Path(os.environ.get("CONTAINER_REPORT", "/dev/null"))
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"

# Deadlines (seconds): generous, every wait polls a state and ends as soon as it is reached.
START_S = 180  # container start → healthy (a busy 2-core machine)
CALL_S = 120  # one client call or one engine command
BATCH_S = 300  # the batch job over the 10,000 test images
LOAD_CALLERS = 200  # requests kept in flight from the host while `docker compose stop` runs
DRAIN_ID = "drain-"  # request ids of the drain check (the batch job's requests have ids too)
ACCURACY_TOLERANCE = 0.001  # 10 of the 10,000 test images: the served graph is the card's graph
USD_TOLERANCE = 1.0

# Knobs of docker-compose.yml that the check sets itself (an inherited value would change what runs).
COMPOSE_KNOBS = {
    "MODELS_DIR",
    "GRPC_PORT",
    "METRICS_PORT",
    "HTTP_PORT",
    "FASHION_DATA_DIR",
    "BATCH_OUTPUT",
    "COMPOSE_FILE",
    "COMPOSE_PROJECT_NAME",
    "COMPOSE_PROFILES",
}


def card(model: str) -> dict:
    return json.loads((MODELS / model / "1" / "card.json").read_text())


# -- figures ---------------------------------------------------------------------------------------

FIGURES: dict[str, dict] = {}


def record(check: str, **figures: object) -> None:
    """Keep ``figures`` under ``check`` in $CONTAINER_REPORT (rewritten after each check)."""
    FIGURES.setdefault(check, {}).update(figures)
    if str(REPORT) != "/dev/null":
        REPORT.write_text(json.dumps(FIGURES, indent=1, sort_keys=True))


# -- engine and compose ----------------------------------------------------------------------------


def run(
    args: list[str], *, env: dict | None = None, timeout: float = CALL_S, check: bool = True, what: str = ""
) -> subprocess.CompletedProcess:
    """Run a command; on failure raise with the command, its exit code and the end of its output."""
    try:
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{what or shlex.join(args)}: no answer after {timeout:g} s") from exc
    if check and result.returncode != 0:
        tail = (result.stdout[-2000:] + "\n" + result.stderr[-3000:]).strip()
        raise AssertionError(f"{what or shlex.join(args)} exited {result.returncode}:\n{tail}")
    return result


def engine(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run([ENGINE, *args], **kwargs)


@dataclass
class Stack:
    """One compose project of docker-compose.yml, its published ports and its environment."""

    project: str
    env: dict[str, str]
    grpc_port: int
    metrics_port: int
    http_port: int
    tmp: Path
    figures: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def compose(self, *args: str, timeout: float = CALL_S, check: bool = True) -> subprocess.CompletedProcess:
        return run(
            [*COMPOSE, "-f", str(COMPOSE_FILE), "-p", self.project, *args],
            env=self.env,
            timeout=timeout,
            check=check,
            what=f"docker compose -p {self.project} {' '.join(args)}",
        )

    def container(self, service: str = "server") -> str:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: expected one container, found {ids}"
        return ids[0]

    def inspect(self, service: str = "server") -> dict:
        return json.loads(engine("inspect", self.container(service)).stdout)[0]

    def logs(self, service: str = "server") -> str:
        result = self.compose("logs", "--no-color", "--no-log-prefix", service, check=False)
        return result.stdout + result.stderr

    def log_records(self, service: str = "server") -> list[dict]:
        records = []
        for line in self.logs(service).splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return records

    def published(self, container_port: int, service: str = "server") -> int | None:
        """The host port docker-compose.yml publishes ``container_port`` on, None if it does not."""
        result = self.compose("port", service, str(container_port), check=False)
        text = result.stdout.strip()
        return int(text.rsplit(":", 1)[1]) if result.returncode == 0 and text else None

    def wait_healthy(self, service: str = "server", deadline_s: float = START_S) -> float:
        """Wait until the engine reports the container healthy (its own HEALTHCHECK, the probe
        inside the container); return the seconds waited. podman runs no health timers without
        systemd, so here the probe is triggered (`podman healthcheck run`) at each poll."""
        start = time.monotonic()
        container = self.container(service)
        last = ""
        while time.monotonic() - start < deadline_s:
            state = json.loads(engine("inspect", container).stdout)[0]["State"]
            if state.get("Status") in ("exited", "dead") or (
                state.get("Running") is False and state.get("Status") != "created"
            ):
                raise AssertionError(
                    f"{service} stopped while starting (exit {state.get('ExitCode')}):\n{self.logs(service)[-4000:]}"
                )
            if ENGINE.endswith("podman"):
                probe = engine("healthcheck", "run", container, check=False)
                last = (probe.stdout + probe.stderr).strip()
                if probe.returncode == 0:
                    return time.monotonic() - start
            else:
                health = (state.get("Health") or {}).get("Status", "none")
                last = health
                if health == "healthy":
                    return time.monotonic() - start
            time.sleep(0.5)
        raise AssertionError(
            f"{service} not healthy after {deadline_s} s (last probe: {last!r}):\n{self.logs(service)[-4000:]}"
        )

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False, timeout=180)


def _compose_env(tmp: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVING_") and k not in COMPOSE_KNOBS}
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def fashion_data_dir(fashion_files: dict[str, Path]) -> Path:
    """The folder holding the test split's .gz files (what compose mounts at /data)."""
    folder = fashion_files["t10k-images-idx3-ubyte"].parent
    if not (folder / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"{folder} has no t10k-images-idx3-ubyte.gz (the name docker-compose.yml's batch job reads)")
    return folder


def start_stack(name: str, tmp: Path, **env: str) -> Stack:
    stack = Stack(
        project=name,
        tmp=tmp,
        grpc_port=free_port(),
        metrics_port=free_port(),
        http_port=free_port(),
        env={},
    )
    stack.env = _compose_env(
        tmp, GRPC_PORT=str(stack.grpc_port), METRICS_PORT=str(stack.metrics_port), HTTP_PORT=str(stack.http_port), **env
    )
    start = time.monotonic()
    try:
        stack.compose("up", "-d", "--no-build", "--pull", "never", "server", timeout=START_S)
        waited = stack.wait_healthy()
    except BaseException:
        print(stack.logs()[-4000:])
        stack.down()
        raise
    stack.figures["up_to_healthy_s"] = round(time.monotonic() - start, 2)
    stack.figures["health_wait_s"] = round(waited, 2)
    return stack


def _start_server_stack(project: str, tmp: Path, fashion_data_dir: Path) -> Stack:
    """docker-compose.yml's `server` with the bundled models, request logging on (the drain check
    counts the accepted requests in the server's own log), the batch output on a host folder."""
    output = tmp / "batch-output"
    output.mkdir()
    if os.geteuid() == 0:
        os.chown(output, 10001, 10001)  # the image's user
    else:
        output.chmod(0o777)
    return start_stack(
        project, tmp, SERVING_LOG_LEVEL="DEBUG", FASHION_DATA_DIR=str(fashion_data_dir), BATCH_OUTPUT=str(output)
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fashion_data_dir: Path) -> Iterator[Stack]:
    """The stack the checks share (tests run in any order; none stops it)."""
    stack = _start_server_stack(PROJECT, tmp_path_factory.mktemp("stack"), fashion_data_dir)
    record("stack start", **stack.figures)
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture
def stack_to_stop(tmp_path: Path, fashion_data_dir: Path) -> Iterator[Stack]:
    """A stack of its own for the test that stops it."""
    stack = _start_server_stack(f"{PROJECT}-stop", tmp_path, fashion_data_dir)
    try:
        yield stack
    finally:
        stack.down()


# -- the image -------------------------------------------------------------------------------------


def _size(image: str) -> int:
    return int(json.loads(engine("image", "inspect", image).stdout)[0]["Size"])


def test_image_is_small_and_holds_no_build_tools() -> None:
    """No compiler, no pip (nor its cache), no tests, no torch; its size, above its base too."""
    info = json.loads(engine("image", "inspect", IMAGE).stdout)[0]
    config = info.get("Config") or {}
    assert config.get("User") == "10001:10001", config.get("User")
    script = r"""
set -u
site=$(python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
echo "venv_kib=$(du -sk /opt/venv | cut -f1)"
echo "site_kib=$(du -sk "$site" | cut -f1)"
echo "pyc_kib=$(find /opt/venv -name '*.pyc' -print0 | du -ck --files0-from=- | tail -1 | cut -f1)"
echo "models_kib=$(du -sk /models | cut -f1)"
for tool in gcc cc c++ g++ make ld; do command -v "$tool" >/dev/null && echo "compiler=$tool"; done
for module in pip setuptools torch; do python -c "import $module" 2>/dev/null && echo "module=$module"; done
find / -xdev \( -path /proc -o -path /sys \) -prune -o \( -type d -name 'pip' -path '*/.cache/*' \) -print 2>/dev/null | sed 's/^/pipcache=/'
find "$site" -type d \( -name tests -o -name test \) -print | sed 's/^/tests=/'
ours="/opt/venv /models /home/serving /output /root /src /tmp"  # what the Dockerfile adds to its base
find $ours -name 'conftest.py' -print 2>/dev/null | sed 's/^/conftest=/'
find $ours \( -name '*.whl' -o -name '*.tar.gz' \) -print 2>/dev/null | sed 's/^/wheel=/'
test -e /src && echo "leftover=/src"
python -c 'import onnxruntime, numpy, grpc, sys; print("versions=python", sys.version.split()[0], "onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__, "grpcio", grpc.__version__)'
"""
    out = engine(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", IMAGE, "-c", script, what="look inside the image"
    ).stdout
    lines = [line for line in out.splitlines() if "=" in line]
    facts = dict(
        line.split("=", 1) for line in lines if line.split("=", 1)[0].endswith("_kib") or line.startswith("versions=")
    )
    found = [
        line
        for line in lines
        if line.split("=", 1)[0] in ("compiler", "module", "pipcache", "tests", "conftest", "wheel", "leftover")
    ]
    size = _size(IMAGE)
    figures = {
        "image_mb": round(size / 1e6, 1),
        "venv_mb": round(int(facts["venv_kib"]) * 1024 / 1e6, 1),
        "venv_bytecode_mb": round(int(facts["pyc_kib"]) * 1024 / 1e6, 1),
        "models_mb": round(int(facts["models_kib"]) * 1024 / 1e6, 1),
        "versions": facts.get("versions", ""),
    }
    if BASE_IMAGE:
        base = _size(BASE_IMAGE)
        figures.update(base_image=BASE_IMAGE, base_mb=round(base / 1e6, 1), above_base_mb=round((size - base) / 1e6, 1))
    record("image", **figures)
    print(f"image: {figures}")
    assert found == [], f"the image holds what the server never runs: {found}"
    assert "torch" not in out


# -- the running stack -----------------------------------------------------------------------------


def test_health_serving_on_the_published_port(stack: Stack) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(stack.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = {
            name: health_pb2.HealthCheckResponse.ServingStatus.Name(
                stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            )
            for name in ["", "fashion_softmax", "fashion_cnn", "profit", "house_price"]
        }
    assert set(statuses.values()) == {"SERVING"}, statuses
    started = [r for r in stack.log_records() if r.get("msg") == "server started"]
    assert started and started[0].get("failed") in ({}, None), started
    record("health", grpc_port=stack.grpc_port, statuses=statuses)


def test_typed_api_answers_with_the_model_cards_figures(stack: Stack, fashion_test_set) -> None:
    from service.client import connect

    images, labels = fashion_test_set
    profit, house, softmax = (
        card("profit")["metrics"],
        card("house_price")["metrics"],
        card("fashion_softmax")["metrics"],
    )
    populations = np.array([35_000, 70_000], np.float64)
    expected_profit = (profit["slope_per_10k"] * populations / 10_000 + profit["intercept_10k_usd"]) * 10_000
    expected_house = house["weights"][0] * 1650 + house["weights"][1] * 3 + house["intercept_usd"]
    start = time.monotonic()
    with connect(stack.address, timeout=CALL_S) as client:
        result = client.classify(images, model="fashion_softmax")
        got_profit = np.asarray(client.predict_profit(populations.tolist()), np.float64)
        got_house = float(np.asarray(client.predict_house_price([(1650, 3)]))[0])
    seconds = time.monotonic() - start
    accuracy = float(np.mean(np.asarray(result.class_index) == labels))
    record(
        "typed API",
        fashion_softmax_accuracy=accuracy,
        card_accuracy=softmax["test_accuracy"],
        profit_35000_usd=round(float(got_profit[0]), 2),
        closed_form_35000_usd=round(float(expected_profit[0]), 2),
        house_1650sqft_3br_usd=round(got_house, 2),
        seconds=round(seconds, 2),
    )
    assert len(result.class_index) == len(labels) == softmax["test_images"]
    assert abs(accuracy - softmax["test_accuracy"]) <= ACCURACY_TOLERANCE, (accuracy, softmax["test_accuracy"])
    assert np.all(np.abs(got_profit - expected_profit) <= USD_TOLERANCE), (got_profit, expected_profit)
    assert abs(got_house - expected_house) <= USD_TOLERANCE, (got_house, expected_house)


def test_v2_tritonclient_answers_with_the_model_cards_figures(stack: Stack, fashion_test_set) -> None:
    import tritonclient.grpc as triton

    images, labels = fashion_test_set
    cnn, profit = card("fashion_cnn")["metrics"], card("profit")["metrics"]
    client = triton.InferenceServerClient(stack.address)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("fashion_cnn")
        metadata = client.get_model_metadata("fashion_cnn", as_json=True)
        assert [i["name"] for i in metadata["inputs"]] == ["image"]
        start = time.monotonic()
        predictions = []
        for first in range(0, len(images), 1000):
            batch = images[first : first + 1000]
            tensor = triton.InferInput("image", list(batch.shape), "UINT8")
            tensor.set_data_from_numpy(batch)
            response = client.infer("fashion_cnn", [tensor], client_timeout=CALL_S)
            predictions.append(response.as_numpy("probabilities").argmax(axis=1))
        seconds = time.monotonic() - start
        population = np.array([[35_000.0]], np.float32)
        tensor = triton.InferInput("population", [1, 1], "FP32")
        tensor.set_data_from_numpy(population)
        got_profit = float(client.infer("profit", [tensor], client_timeout=CALL_S).as_numpy("profit")[0, 0])
    finally:
        client.close()
    accuracy = float(np.mean(np.concatenate(predictions) == labels))
    expected_profit = (profit["slope_per_10k"] * 3.5 + profit["intercept_10k_usd"]) * 10_000
    record(
        "V2 (tritonclient)",
        fashion_cnn_accuracy=accuracy,
        card_accuracy=cnn["test_accuracy"],
        fashion_cnn_10000_images_s=round(seconds, 2),
        profit_35000_usd=round(got_profit, 2),
    )
    assert abs(accuracy - cnn["test_accuracy"]) <= ACCURACY_TOLERANCE, (accuracy, cnn["test_accuracy"])
    assert abs(got_profit - expected_profit) <= USD_TOLERANCE, (got_profit, expected_profit)


def _scrape(stack: Stack) -> tuple[str, dict]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=30) as response:
        assert response.status == 200
        content_type = response.headers.get("Content-Type", "")
        text = response.read().decode()
    return content_type, {f.name: f for f in text_string_to_metric_families(text)}


def _requests_total(families: dict) -> float:
    requests = families.get("serving_requests")
    assert requests is not None, f"no serving_requests_total family among {sorted(families)}"
    return sum(s.value for s in requests.samples if s.name == "serving_requests_total")


def test_metrics_scrape_on_the_published_port(stack: Stack) -> None:
    import tritonclient.grpc as triton_grpc

    before = _requests_total(_scrape(stack)[1])
    client = triton_grpc.InferenceServerClient(stack.address)
    population = triton_grpc.InferInput("population", [5, 1], "FP32")
    population.set_data_from_numpy(np.full((5, 1), 3.5, np.float32))
    for _ in range(7):
        client.infer("profit", [population], client_timeout=CALL_S)
    content_type, families = _scrape(stack)
    assert content_type.startswith("text/plain"), content_type
    total = _requests_total(families)
    assert total - before >= 7, (before, total)  # the 7 calls just made are counted (others may run too)
    record("metrics", metrics_port=stack.metrics_port, families=len(families), requests_counted=int(total))


def test_http_rest_on_the_published_port(stack: Stack) -> None:
    """HTTP/REST (KServe V2 over HTTP, Triton's port 8000) once the server serves it and
    docker-compose.yml publishes it (e.g. "${HTTP_PORT:-8000}:8000" with SERVING_HTTP_PORT=8000);
    until then this check is skipped. The check sets HTTP_PORT to a free port already."""
    port = stack.published(8000)
    if port is None:
        pytest.skip("docker-compose.yml publishes no HTTP/REST port (container port 8000) yet")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30) as response:
        assert response.status == 200
    body = json.dumps({"inputs": [{"name": "population", "shape": [1, 1], "datatype": "FP32", "data": [35000.0]}]})
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/models/profit/infer",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.loads(response.read())
    profit = card("profit")["metrics"]
    expected = (profit["slope_per_10k"] * 3.5 + profit["intercept_10k_usd"]) * 10_000
    got = float(np.ravel(answer["outputs"][0]["data"])[0])
    record("HTTP/REST", http_port=port, profit_35000_usd=round(got, 2))
    assert abs(got - expected) <= USD_TOLERANCE, (got, expected)


def test_runs_as_non_root_on_a_read_only_root_filesystem(stack: Stack) -> None:
    info = stack.inspect()
    assert info["HostConfig"].get("ReadonlyRootfs") is True, "docker-compose.yml's server is not read_only"
    container = info["Id"]
    status = engine("exec", container, "cat", "/proc/1/status").stdout
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert set(uids) == {"10001"}, f"the server (pid 1) runs as uid {uids}"
    writes = {}
    for path in ["/opt/venv/probe", "/models/probe", "/home/serving/probe", "/probe", "/tmp/probe"]:
        result = engine("exec", container, "python", "-c", f"open({path!r}, 'w').write('x')", check=False)
        writes[path] = "writable" if result.returncode == 0 else result.stderr.strip().splitlines()[-1]
    record("non-root, read-only", server_uid=uids[0], read_only_rootfs=True, writes=writes)
    assert writes.pop("/tmp/probe") == "writable"  # the tmpfs compose mounts
    assert all("Read-only file system" in why for why in writes.values()), writes


def test_batch_profile_writes_its_outputs_to_a_host_folder(stack: Stack) -> None:
    """`docker compose --profile batch run --rm batch`: the Fashion-MNIST test set through the
    server, in a container on the stack's network, results in BATCH_OUTPUT on the host."""
    start = time.monotonic()
    result = stack.compose(
        "--profile", "batch", "run", "--rm", "--no-deps", "--pull", "never", "batch", timeout=BATCH_S
    )
    seconds = time.monotonic() - start
    output = Path(stack.env["BATCH_OUTPUT"]) / "fashion-test"
    summary = json.loads((output / "summary.json").read_text())
    expected = card("fashion_softmax")["metrics"]
    record(
        "batch profile",
        accuracy=summary.get("accuracy"),
        card_accuracy=expected["test_accuracy"],
        rows=summary.get("rows"),
        seconds=round(seconds, 1),
        files=sorted(p.name for p in output.iterdir()),
    )
    assert summary["complete"] is True and summary["rows"] == expected["test_images"], summary
    assert abs(summary["accuracy"] - expected["test_accuracy"]) <= ACCURACY_TOLERANCE, summary
    predictions = np.load(output / "predictions.npy")
    assert predictions.shape == (expected["test_images"],)
    assert (output / "summary.json").stat().st_uid == 10001  # written by the image's user, on the host
    assert "Traceback" not in result.stdout + result.stderr


# -- docker compose stop under load ----------------------------------------------------------------


async def _load_until_stopped(stack: Stack, images: np.ndarray) -> dict:
    """LOAD_CALLERS callers, each sending V2 ModelInfer calls (fashion_cnn, 16 images, a unique
    request id) one after another until its first failure, as a client that then fails over
    would. Once every caller has had answers, `docker compose stop server` runs."""
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput
    from tritonclient.utils import InferenceServerException

    outcomes: dict[str, str] = {}
    answers: dict[str, np.ndarray] = {}
    in_flight = 0
    stopping = asyncio.Event()
    client = triton_aio.InferenceServerClient(stack.address)
    tensor = InferInput("image", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images)

    async def caller(index: int) -> None:
        nonlocal in_flight
        for n in range(100_000):
            request_id = f"{DRAIN_ID}{index}-{n}"
            in_flight += 1
            try:
                response = await client.infer("fashion_cnn", [tensor], request_id=request_id, client_timeout=CALL_S)
                outcomes[request_id] = "OK"
                answers[request_id] = response.as_numpy("probabilities").argmax(axis=1)
            except InferenceServerException as exc:
                outcomes[request_id] = str(exc.status()).removeprefix("StatusCode.")
                return
            finally:
                in_flight -= 1
            if stopping.is_set() and outcomes[request_id] != "OK":
                return

    tasks = [asyncio.create_task(caller(i)) for i in range(LOAD_CALLERS)]
    try:
        warm = time.monotonic()
        while sum(code == "OK" for code in outcomes.values()) < 2 * LOAD_CALLERS:
            assert time.monotonic() - warm < START_S, f"load did not get going: {Counter(outcomes.values())}"
            assert not any(t.done() for t in tasks), f"a caller ended before the stop: {Counter(outcomes.values())}"
            await asyncio.sleep(0.05)
        ok_before = sum(code == "OK" for code in outcomes.values())
        in_flight_at_stop = in_flight
        stopping.set()
        start = time.monotonic()
        stop = await asyncio.get_running_loop().run_in_executor(
            None, lambda: stack.compose("stop", "server", timeout=CALL_S, check=False)
        )
        stop_s = time.monotonic() - start
        _done, pending = await asyncio.wait(tasks, timeout=CALL_S)
        for task in pending:
            task.cancel()
        assert not pending, f"{len(pending)} callers still waiting {CALL_S} s after the stop"
    finally:
        await client.close()
    return {
        "outcomes": outcomes,
        "answers": answers,
        "ok_before": ok_before,
        "in_flight_at_stop": in_flight_at_stop,
        "stop": stop,
        "stop_s": stop_s,
    }


def test_compose_stop_under_load_drains_and_loses_nothing(stack_to_stop: Stack, fashion_test_set) -> None:
    """Every call either completed (OK, with the right answer) or was refused before the server
    accepted it: the server's request log (one line per accepted call, with its request id) holds
    exactly the calls the host saw succeed, and no other ModelInfer line but OK; the stop exits 0
    within the grace period and the log has the drain line.

    Refused means UNAVAILABLE (the server's drain holds a new call and answers it so) or, for a
    call that reaches gRPC after it has begun to stop, CANCELLED from gRPC itself (the window
    service/guards.py describes). Neither was accepted; both are counted apart. The in-process
    test (tests/test_load_faults.py) is the one that requires UNAVAILABLE only."""
    stack = stack_to_stop
    images = fashion_test_set[0][:16]
    result = asyncio.run(_load_until_stopped(stack, images))
    outcomes, stop = result["outcomes"], result["stop"]
    state = stack.inspect()["State"]
    records = stack.log_records()
    served = {
        r["request_id"]: r.get("code")
        for r in records
        if r.get("msg") == "request" and str(r.get("request_id", "")).startswith(DRAIN_ID)
    }
    drained = next((r for r in records if r.get("msg") == "drained: stopping gRPC"), None)
    client_ok = {rid for rid, code in outcomes.items() if code == "OK"}
    refused = {rid for rid, code in outcomes.items() if code in ("UNAVAILABLE", "CANCELLED")}
    other = Counter(code for code in outcomes.values() if code not in ("OK", "UNAVAILABLE", "CANCELLED"))
    # The drain's refusals are logged without a request id (the adapter never saw them), as
    # UNAVAILABLE; an accepted call that ended otherwise before the adapter noted its id would be
    # logged without one too: no such line may have another code.
    unidentified = Counter(
        r.get("code")
        for r in records
        if r.get("msg") == "request"
        and not r.get("request_id")
        and str(r.get("method", "")).endswith("ModelInfer")
        and r.get("code") != "OK"
    )
    reference = next(iter(result["answers"].values()))
    wrong = [rid for rid, answer in result["answers"].items() if not np.array_equal(answer, reference)]
    lost = len({rid for rid, code in served.items() if code == "OK"} - client_ok) + sum(
        c != "OK" for c in served.values()
    )
    figures = {
        "callers": LOAD_CALLERS,
        "calls": len(outcomes),
        "completed": len(client_ok),
        "completed_before_stop": result["ok_before"],
        "in_flight_from_host_at_stop": result["in_flight_at_stop"],
        "running_in_server_at_sigterm": (drained or {}).get("running_at_signal"),
        "held_then_refused": (drained or {}).get("held_for_unavailable"),
        "drain_s": (drained or {}).get("drain_seconds"),
        "refused_unavailable": sum(code == "UNAVAILABLE" for code in outcomes.values()),
        "refused_cancelled_by_grpc": sum(code == "CANCELLED" for code in outcomes.values()),
        "other_codes": dict(other),
        "server_refusals_logged": unidentified["UNAVAILABLE"],
        "server_accepted": len(served),
        "lost": lost,
        "refused_after_acceptance": len(refused & set(served)),
        "answered_but_not_logged": len(client_ok - set(served)),
        "wrong_answers": len(wrong),
        "compose_stop_exit": stop.returncode,
        "compose_stop_s": round(result["stop_s"], 2),
        "container_exit": state.get("ExitCode"),
    }
    record("compose stop under load", **figures)
    print(f"compose stop under load: {figures}")
    assert served, (
        "the server logged no request lines (SERVING_LOG_LEVEL=DEBUG, msg 'request' with "
        "'request_id'): its log format changed? the check counts accepted calls there"
    )
    assert stop.returncode == 0, stop.stderr
    assert state.get("ExitCode") == 0 and state.get("Status") == "exited", state
    assert drained is not None, "no 'drained: stopping gRPC' line in the server log"
    assert drained["still_running"] == 0, drained
    assert any(r.get("msg") == "server stopped" for r in records)
    assert result["stop_s"] < 15, "the stop took the whole stop_grace_period: the server was killed?"
    assert other == {}, f"calls ended with codes other than OK/UNAVAILABLE/CANCELLED: {other}"
    assert set(unidentified) <= {"UNAVAILABLE"}, f"ModelInfer calls that ended otherwise: {unidentified}"
    assert unidentified["UNAVAILABLE"] <= figures["refused_unavailable"], "refusals the callers did not see"
    assert lost == 0 and figures["refused_after_acceptance"] == 0 and figures["answered_but_not_logged"] == 0
    assert wrong == []
    assert figures["in_flight_from_host_at_stop"] >= LOAD_CALLERS // 2, (
        "too few calls in flight: the check proves little"
    )
    assert drained["running_at_signal"] > 0, "no call was running at SIGTERM: the check proves little"


# -- a corrupt model in the mounted repository -----------------------------------------------------


def test_a_corrupt_model_is_rejected_and_logged_while_the_others_serve(tmp_path: Path) -> None:
    """MODELS_DIR = the bundled models plus `broken/1/model.onnx` (not ONNX) and a truncated copy
    of a real model: both are refused and logged at start-up, health says NOT_SERVING for them,
    the server is healthy and the good models answer. The image's strict model loading is turned
    off for this (SERVING_STRICT_MODEL_LOADING=false): on, as by default, the server would stop
    (tests/e2e/test_startup_models.py runs that with the same setting)."""
    repository = tmp_path / "models"
    shutil.copytree(MODELS, repository)
    (repository / "broken" / "1").mkdir(parents=True)
    (repository / "broken" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model\n" * 40)
    truncated = (MODELS / "fashion_cnn" / "1" / "model.onnx").read_bytes()
    (repository / "truncated_cnn" / "1").mkdir(parents=True)
    (repository / "truncated_cnn" / "1" / "model.onnx").write_bytes(truncated[: len(truncated) // 2])
    for path in repository.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    stack = start_stack(
        f"{PROJECT}-corrupt", tmp_path, MODELS_DIR=str(repository), SERVING_STRICT_MODEL_LOADING="false"
    )
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from service.client import connect

        with grpc.insecure_channel(stack.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status(name: str) -> str:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

            statuses = {name: status(name) for name in ["", "broken", "truncated_cnn", "profit", "fashion_cnn"]}
        with connect(stack.address, timeout=CALL_S) as client:
            models, failed = client.list_models()
            profit = float(np.asarray(client.predict_profit([35_000]))[0])
        records = stack.log_records()
        # Logged: an ERROR or WARNING line that names the model (whatever its wording).
        problems = [json.dumps(r) for r in records if r.get("level") in ("ERROR", "WARNING")]
        refused = {name: next((p for p in problems if name in p), "") for name in ("broken", "truncated_cnn")}
        refused = {name: line for name, line in refused.items() if line}
        started = next(r for r in records if r.get("msg") == "server started")
        record(
            "corrupt model",
            statuses=statuses,
            failed=sorted(failed),
            logged=sorted(refused),
            served=sorted(started.get("models", {})),
            up_to_healthy_s=stack.figures["up_to_healthy_s"],
        )
    finally:
        stack.down()
    assert statuses == {
        "": "SERVING",
        "broken": "NOT_SERVING",
        "truncated_cnn": "NOT_SERVING",
        "profit": "SERVING",
        "fashion_cnn": "SERVING",
    }, statuses
    assert {key.split("/")[0] for key in failed} == {"broken", "truncated_cnn"}, failed
    assert set(refused) == {"broken", "truncated_cnn"}, f"not logged as an error: {refused}"
    assert {m.name for m in models} == {"fashion_cnn", "fashion_softmax", "house_price", "profit"}
    assert set(started.get("failed", {})) == set(failed)
    expected = card("profit")["metrics"]
    assert abs(profit - (expected["slope_per_10k"] * 3.5 + expected["intercept_10k_usd"]) * 10_000) <= USD_TOLERANCE


def test_a_shadow_runs_in_a_mirror_process_inside_the_container(tmp_path: Path) -> None:
    """fashion_cnn with a shadow (version 2, a copy of 1) from its config.json: inside the
    image (non-root, read-only root filesystem) the mirror process starts, runs at a lowered
    priority and mirrors every request, which agree with the primary's answers."""
    repository = tmp_path / "models"
    shutil.copytree(MODELS, repository)
    cnn = repository / "fashion_cnn"
    shutil.copytree(cnn / "1", cnn / "2")
    config = json.loads((cnn / "config.json").read_text())
    config["rollout"] = {"primary": 1, "shadow_version": 2}
    (cnn / "config.json").write_text(json.dumps(config))
    for path in repository.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    stack = start_stack(f"{PROJECT}-shadow", tmp_path, MODELS_DIR=str(repository))
    base = f"http://127.0.0.1:{stack.http_port}/v2/models/fashion_cnn"
    images = np.random.default_rng(3).integers(0, 256, (20, 1, 1, 28, 28), dtype=np.uint8)
    try:
        for image in images:
            body = {
                "inputs": [
                    {"name": "image", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": image.ravel().tolist()}
                ]
            }
            request = urllib.request.Request(
                f"{base}/infer", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=CALL_S) as response:
                assert json.loads(response.read())["model_version"] == "1"
        deadline = time.monotonic() + CALL_S
        while True:
            with urllib.request.urlopen(f"{base}/rollout", timeout=CALL_S) as response:
                figures = json.loads(response.read())
            if figures["mirror"]["ok"] + figures["mirror"]["failed"] == len(images) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        record("shadow in the container", mirror=figures["mirror"], agreement=figures["agreement"])
    finally:
        stack.down()
    mirror = figures["mirror"]
    assert mirror["runs_in"] == "process" and mirror["ok"] == len(images) and mirror["failed"] == 0, mirror
    assert mirror["process"]["priority"] in ("idle", "nice 19") and mirror["process"]["deaths"] == 0, mirror
    (pair,) = figures["agreement"]
    assert pair["rows"] == len(images) and pair["agreement"] == 1.0 and pair["max_abs_diff"] == 0.0, pair
