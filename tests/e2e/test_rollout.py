"""Guarded rollout end to end (docs/rollout.md): real servers over their own repositories, real
clients on every front end (typed gRPC, V2 gRPC through grpc stubs, V2 HTTP through tritonclient).

Mirrored work runs after the client's answer, so the tests wait for the server's rollout status to
reach the expected counts (generous deadlines), never for a fixed time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from fixtures.metrics import sample
from fixtures.onnx_models import failing_classifier, image_classifier, linear, save, slow
from fixtures.servers import REPO_ROOT, ServerProcess, scrape, start_server, v2_request
from onnx import ModelProto

from service.generated.inference import grpc_service_pb2 as v2
from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

MODEL = "fashion_softmax"  # the typed API's Classify default
LABELS = json.dumps([f"class{i}" for i in range(10)])
DEADLINE_S = 60.0


def classifier_repository(repo: Path, v1: ModelProto, v2: ModelProto) -> Path:
    """``fashion_softmax`` versions 1 and 2 (the default version policy serves version 2 only)."""
    save(v1, repo, MODEL, 1, class_names=LABELS)
    save(v2, repo, MODEL, 2, class_names=LABELS)
    return repo


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)


def status(server: ServerProcess, model: str = MODEL) -> dict[str, Any]:
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{model}/rollout"
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


def wait_for(server: ServerProcess, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The rollout status once ``done`` holds for it (polled until :data:`DEADLINE_S`)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        figures = status(server)
        if done(figures):
            return figures
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {DEADLINE_S:g} s; status {figures}")
        time.sleep(0.02)


class Clients:
    """One client per front end, each sending ``n`` requests of ``rows`` images."""

    def __init__(self, server: ServerProcess) -> None:
        self.channel = grpc.insecure_channel(server.address)
        self.typed = pb_grpc.ModelServiceStub(self.channel)
        self.v2 = v2_grpc.GRPCInferenceServiceStub(self.channel)
        self.http = triton_http.InferenceServerClient(f"127.0.0.1:{server.http_port}", network_timeout=60)

    def close(self) -> None:
        self.channel.close()
        self.http.close()

    def typed_grpc(self, x: np.ndarray, caller: str | None = None) -> tuple[str, np.ndarray]:
        tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=list(x.shape), data=x.tobytes())
        metadata = [("x-caller-id", caller)] if caller else None
        response = self.typed.Classify(pb.ClassifyRequest(images=tensor), timeout=30, metadata=metadata)
        probabilities = np.array([list(r.probabilities) for r in response.results], np.float32)
        return str(response.model.version), probabilities

    def v2_grpc(self, x: np.ndarray, caller: str | None = None) -> tuple[str, np.ndarray]:
        metadata = [("x-caller-id", caller)] if caller else None
        response = self.v2.ModelInfer(v2_request(MODEL, "image", x, "UINT8"), timeout=30, metadata=metadata)
        return response.model_version, np.frombuffer(response.raw_output_contents[0], np.float32).reshape(len(x), -1)

    def v2_http(self, x: np.ndarray, caller: str | None = None) -> tuple[str, np.ndarray]:
        tensor = triton_http.InferInput("image", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        result = self.http.infer(MODEL, [tensor], headers={"x-caller-id": caller} if caller else None)
        return result.get_response()["model_version"], result.as_numpy("probabilities")


@pytest.fixture
def clients_for() -> Iterator[Callable[[ServerProcess], Clients]]:
    made: list[Clients] = []

    def make(server: ServerProcess) -> Clients:
        made.append(Clients(server))
        return made[-1]

    yield make
    for clients in made:
        clients.close()


FRONT_ENDS = ("typed_grpc", "v2_grpc", "v2_http")


def child_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def mirrored(figures: dict[str, Any]) -> int:
    return int(figures["mirror"]["ok"]) + int(figures["mirror"]["failed"])


@pytest.mark.parametrize("runs_in", ["process", "batcher"])
def test_shadow_mirrors_every_front_end_and_compares(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients], runs_in: str
) -> None:
    """Every answered request of each front end runs again on the shadow (version 1) after the
    primary (version 2) answered, in a mirror process or the shadow's own batcher; the
    comparator's figures are served by the rollout status and as Prometheus metrics."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), image_classifier(1))
    rollout = json.dumps({MODEL: {"shadow_version": 1}})
    args = ["--model-repository", str(repo), "--rollout", rollout, "--rollout-mirror", runs_in]
    with start_server(tmp_path, *args, metrics=True) as server:
        clients = clients_for(server)
        figures = status(server)
        assert figures["primary"] == 2 and figures["shadow"] == {"version": 1, "share": 1.0, "served": True}
        assert figures["mirror"]["runs_in"] == runs_in
        sent = rows = 0
        for i, front_end in enumerate(FRONT_ENDS):
            for n in (1, 3, 5):
                version, probabilities = getattr(clients, front_end)(images(n, seed=10 * i + n))
                assert version == "2" and probabilities.shape == (n, 10)  # the primary answers
                sent, rows = sent + 1, rows + n
            # This front end's requests were all mirrored (before the next one sends any).
            figures = wait_for(server, lambda f, sent=sent: mirrored(f) == sent, f"{front_end} mirrored")
            assert figures["mirror"]["failed"] == 0
        (pair,) = figures["agreement"]
        assert pair["primary"] == "2" and pair["version"] == "1" and pair["kind"] == "classifier"
        assert pair["rows"] == rows
        assert 0.0 <= pair["agreement"] <= 1.0 and pair["mean_abs_diff"] > 0  # different weights
        assert figures["mirror"]["dropped"] == {"queue_full": 0, "queue_bytes": 0, "not_served": 0}
        samples = scrape(server.metrics_port)
        labels = {"model": MODEL, "primary": "2", "version": "1"}
        assert sample(samples, "serving_rollout_compared_rows_total", **labels) == rows
        assert sample(samples, "serving_rollout_agreement", **labels, measure="agreement") == pair["agreement"]
        assert sample(samples, "serving_rollout_agreement", **labels, measure="mean_abs_diff") > 0
        assert (
            sample(samples, "serving_rollout_mirrored_requests_total", model=MODEL, version="1", outcome="ok") == sent
        )
        assert sample(samples, "serving_rollout_role", model=MODEL, version="1", role="shadow") == 1
        assert sample(samples, "serving_rollout_role", model=MODEL, version="2", role="primary") == 1
        # The shadow is not what unversioned requests get, but a client may name it.
        index = clients.http.get_model_repository_index()
        assert any(e["version"] == "1" and e["reason"].startswith("rollout: shadow") for e in index), index
        if runs_in == "process":  # one child, alive, not the server
            process = figures["mirror"]["process"]
            assert process["starts"] == 1 and process["deaths"] == 0, process
            assert process["pid"] != server.process.pid and child_alive(process["pid"])


def test_killed_mirror_process_costs_clients_nothing_and_is_started_again(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """SIGKILL to the shadow's mirror process: every client request still succeeds, the batch it
    took down is counted failed, a new process takes the next ones, and the exit is a metric."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), image_classifier(1))
    rollout = json.dumps({MODEL: {"shadow_version": 1}})
    with start_server(tmp_path, "--model-repository", str(repo), "--rollout", rollout, metrics=True) as server:
        clients = clients_for(server)
        assert clients.v2_grpc(images(2, seed=1))[0] == "2"
        figures = wait_for(server, lambda f: f["mirror"]["ok"] == 1, "first request mirrored")
        first = figures["mirror"]["process"]["pid"]
        os.kill(first, signal.SIGKILL)
        sent = 1
        deadline = time.monotonic() + DEADLINE_S
        while True:  # until a new process ran a mirrored request
            for front_end in FRONT_ENDS:
                version, probabilities = getattr(clients, front_end)(images(3, seed=sent))
                assert version == "2" and probabilities.shape == (3, 10)
                sent += 1
            figures = wait_for(server, lambda f, sent=sent: mirrored(f) == sent, "mirrored after the kill")
            if figures["mirror"]["process"]["starts"] == 2 and figures["mirror"]["ok"] > 1:
                break
            assert time.monotonic() < deadline, figures
        process = figures["mirror"]["process"]
        assert process["deaths"] == 1 and process["pid"] != first, process
        assert figures["mirror"]["failed"] >= 1 and figures["mirror"]["ok"] + figures["mirror"]["failed"] == sent
        samples = scrape(server.metrics_port)
        assert sample(samples, "serving_rollout_mirror_process_exits_total", model=MODEL) == 1
        codes = {k: v for k, v in samples.items() if k[0] == "serving_requests_total" and ("model", MODEL) in k[1]}
        assert all(dict(labels)["code"] in ("OK", "200") for _, labels in codes) and sum(codes.values()) == sent


def test_failing_shadow_costs_clients_nothing(tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]) -> None:
    """A shadow that fails on every call: every client request succeeds; the failures are counted."""
    repo = classifier_repository(tmp_path / "models", failing_classifier(), image_classifier(1))
    rollout = json.dumps({MODEL: {"shadow_version": 1}})
    with start_server(tmp_path, "--model-repository", str(repo), "--rollout", rollout, metrics=True) as server:
        clients = clients_for(server)
        sent = 0
        for i, front_end in enumerate(FRONT_ENDS):
            for n in (1, 4):
                version, probabilities = getattr(clients, front_end)(images(n, seed=i + n))
                assert version == "2" and np.all(np.isfinite(probabilities))
                sent += 1
        figures = wait_for(server, lambda f: mirrored(f) == sent, "failing shadow mirrored")
        assert figures["mirror"]["failed"] == sent and figures["mirror"]["ok"] == 0
        assert figures["agreement"] == []
        samples = scrape(server.metrics_port)
        mirrored_total = "serving_rollout_mirrored_requests_total"
        assert sample(samples, mirrored_total, model=MODEL, version="1", outcome="failed") == sent
        assert sample(samples, mirrored_total, model=MODEL, version="1", outcome="ok") == 0
        # What clients saw: every inference request OK, none counted as another status.
        codes = {k: v for k, v in samples.items() if k[0] == "serving_requests_total" and ("model", MODEL) in k[1]}
        assert codes and all(dict(labels)["code"] in ("OK", "200") for _, labels in codes), codes
        assert sum(codes.values()) == sent


# -- capture and replay ---------------------------------------------------------------------------


def run_replay(*args: str) -> tuple[int, dict[str, Any]]:
    """``python -m service.rollout.replay *args``: exit status and its JSON report."""
    done = subprocess.run(
        [sys.executable, "-m", "service.rollout.replay", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if not k.startswith("SERVING_")},
    )
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def test_capture_every_front_end_then_replay_bit_for_bit(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """Requests of every front end are captured (redacted tensors without their values, files
    rotated); replaying them in process and against the server reproduces every output bit for bit
    on the captured version, and another version is reported as differing."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), image_classifier(1))
    save(linear(2, [139.2, -8738.0], 89597.9), repo, "house")
    capture = tmp_path / "capture"
    args = ["--model-repository", str(repo), "--provider", "cpu", "--capture-dir", str(capture)]
    args += ["--capture-redact", "house/x", "--capture-max-file-bytes", "4096", "--capture-max-files", "1000"]
    with start_server(tmp_path, *args, metrics=True) as server:
        clients = clients_for(server)
        sent = 0
        for i, front_end in enumerate(FRONT_ENDS):
            for n in (1, 2, 7):
                getattr(clients, front_end)(images(n, seed=100 + 10 * i + n))
                sent += 1
        house = triton_http.InferInput("x", [2, 2], "FP32")
        house.set_data_from_numpy(np.array([[1650, 3], [3000, 4]], np.float32))
        clients.http.infer("house", [house])
        figures = wait_for(server, lambda f: f["capture"]["written"] == sent + 1, "captured")
        assert figures["capture"]["dropped"] == {"queue_full": 0, "queue_bytes": 0}
        samples = scrape(server.metrics_port)
        assert sample(samples, "serving_capture_records_total", outcome="written") == sent + 1
        files = sorted(capture.glob("capture-*.jsonl"))
        assert len(files) > 1  # rotated past 4096 bytes
        records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
        assert {r["protocol"] for r in records} == {"typed", "v2", "http"}
        (house_record,) = [r for r in records if r["model"] == "house"]
        assert house_record["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [2, 2], "redacted": True}]
        assert "data" in house_record["outputs"][0]
        assert all(r["version"] == "2" and r["status"] in ("OK", "200") for r in records if r["model"] == MODEL)

        # Against the server, the captured version (2), bit for bit.
        code, report = run_replay(str(capture), "--server", server.address, "--require-identical")
        assert code == 0, report
        assert report["replayed"] == sent and report["bit_identical"] == sent
        assert report["skipped"]["redacted"] == 1

    # The replayed requests were captured too (the server captures whoever calls it): 2 × sent.
    # In process, on the CPU provider: the same bytes.
    local = ["--local", "--model-repository", str(repo), "--provider", "cpu"]
    code, report = run_replay(str(capture), *local, "--require-identical")
    assert code == 0, report
    assert report["records"] == 2 * sent + 1 and report["replayed"] == report["bit_identical"] == 2 * sent
    (pair,) = report["agreement"]
    assert pair["model"] == MODEL and pair["version"] == "2" and pair["agreement"] == 1.0
    assert pair["max_abs_diff"] == 0.0 and pair["rows"] == 2 * 3 * (1 + 2 + 7)
    # Another version: reported, and refused by --require-identical.
    code, report = run_replay(str(capture), *local, "--version", "1", "--require-identical")
    assert code == 1 and report["differing"] == 2 * sent
    (pair,) = report["agreement"]
    assert pair["version"] == "1" and pair["mean_abs_diff"] > 0


# -- canary, rollback, promotion -----------------------------------------------------------------


#: Windows of 10 make a p99 of one request: the latency rule is left out of the tests of the other
#: rules (tests/unit/rollout/test_rules.py has it), so that a slow moment of a busy machine cannot
#: roll a canary back first.
CALM = {"max_latency_ratio": 1000.0}


def http_load(server: ServerProcess, parameters: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST /v2/repository/models/{MODEL}/load with ``parameters``: status and JSON body."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v2/repository/models/{MODEL}/load",
        data=json.dumps({"parameters": parameters}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def audit_file(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_canary_share_is_sticky_per_caller_and_promotion_is_audited(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """Version 2 as a canary at a 50 % share: a caller id keeps its version on every front end (the
    bucket is CRC-32 of the id), requests without one are spread; promoting by request (V2 gRPC
    model control) sends every unversioned request to version 2 and writes an audit record."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), image_classifier(1))
    audit = tmp_path / "audit.jsonl"
    rollout = json.dumps({MODEL: {"canary_version": 2, "canary_share": 0.5, "min_agreement": 0.0, **CALM}})
    args = ["--model-repository", str(repo), "--rollout", rollout, "--rollout-audit-file", str(audit)]
    with start_server(tmp_path, *args, "--allow-model-control", "true", metrics=True) as server:
        clients = clients_for(server)
        figures = status(server)
        assert figures["primary"] == 1 and figures["canary"]["version"] == 2 and figures["canary"]["share"] == 0.5
        x = images(1, seed=3)
        seen: dict[str, set[str]] = {}
        for caller in (f"caller-{i}" for i in range(16)):
            expected = "2" if zlib.crc32(caller.encode()) / 2**32 < 0.5 else "1"
            seen[caller] = {getattr(clients, f)(x, caller)[0] for f in FRONT_ENDS for _ in range(2)}
            assert seen[caller] == {expected}, caller
        assert set().union(*seen.values()) == {"1", "2"}
        spread = {clients.v2_grpc(x)[0] for _ in range(40)}
        assert spread == {"1", "2"}  # without a caller id: each request drawn (2^-39 to fail)
        samples = scrape(server.metrics_port)
        routed = "serving_rollout_routed_requests_total"
        canary_ok = sample(samples, routed, model=MODEL, version="2", arm="canary", outcome="ok")
        primary_ok = sample(samples, routed, model=MODEL, version="1", arm="primary", outcome="ok")
        assert canary_ok + primary_ok == 16 * 6 + 40 and canary_ok > 0 and primary_ok > 0

        load = v2.RepositoryModelLoadRequest(model_name=MODEL)
        load.parameters["promote"].int64_param = 2
        clients.v2.RepositoryModelLoad(load, timeout=60)
        assert {clients.v2_grpc(x, caller)[0] for caller in seen} == {"2"}
        figures = status(server)
        assert figures["primary"] == 2 and figures["canary"] is None
        (record,) = [r for r in figures["audit"] if r["action"] == "promote"]
        assert record["version"] == "2" and record["previous_primary"] == 1
        assert (
            record["who"] == "v2 /inference.GRPCInferenceService/RepositoryModelLoad"
            and record["why"] == "promoted by request"
        )
        assert [r["action"] for r in audit_file(audit)] == ["configure", "promote"]
        samples = scrape(server.metrics_port)
        assert sample(samples, "serving_rollout_promotions_total", model=MODEL, version="2", trigger="request") == 1


def test_failing_canary_is_rolled_back_with_no_client_error(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """A canary failing every call (10 % share, window of 10): its failed requests are answered by
    the primary, and once its window is full the error rule rolls it back; an audit record says
    why, with the figures."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), failing_classifier())
    audit = tmp_path / "audit.jsonl"
    rollout = json.dumps({MODEL: {"canary_version": 2, "canary_share": 0.1, "window": 10, **CALM}})
    args = ["--model-repository", str(repo), "--rollout", rollout, "--rollout-audit-file", str(audit)]
    with start_server(tmp_path, *args, metrics=True) as server:
        clients = clients_for(server)
        x = images(2, seed=4)
        sent = 0
        deadline = time.monotonic() + DEADLINE_S
        while status(server)["canary"] is not None:
            assert time.monotonic() < deadline and sent < 5000, status(server)
            version, probabilities = getattr(clients, FRONT_ENDS[sent % 3])(x)
            assert version == "1" and np.all(np.isfinite(probabilities))  # the primary answered
            sent += 1
        figures = status(server)
        (record,) = [r for r in figures["audit"] if r["action"] == "rollback"]
        assert record["version"] == "2" and record["who"] == "automatic" and record["rule"] == "errors"
        assert record["primary"] == 1 and record["canary"] is None  # roles after the rollback
        assert record["figures"]["canary_error_rate"] == 1.0 and record["figures"]["primary_error_rate"] == 0.0
        assert record["canary_figures"]["routed"] == 10 and record["canary_figures"]["fallbacks"] == 10
        assert "2" in figures["held"] and figures["held"]["2"].startswith("rolled back (errors)")
        assert audit_file(audit)[-1] == record
        assert {clients.v2_grpc(x)[0] for _ in range(20)} == {"1"}
        samples = scrape(server.metrics_port)
        assert sample(samples, "serving_rollout_rollbacks_total", model=MODEL, version="2", rule="errors") == 1
        codes = {k: v for k, v in samples.items() if k[0] == "serving_requests_total" and ("model", MODEL) in k[1]}
        assert all(dict(labels)["code"] in ("OK", "200") for _, labels in codes), codes
        # Taken out of service: the repository index says why.
        index = clients.http.get_model_repository_index()
        (entry,) = [e for e in index if e["name"] == MODEL and e["version"] == "2"]
        assert entry["state"] == "UNAVAILABLE" and "rolled back" in entry["reason"]


def test_disagreeing_canary_is_rolled_back_and_rollback_by_request(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """A canary whose answers disagree with the primary's (other weights) is rolled back by the
    agreement rule; a canary set by model control (V2 HTTP) is rolled back by request."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), image_classifier(7))
    save(image_classifier(0), repo, MODEL, 3, class_names=LABELS)  # agrees with version 1
    rollout = json.dumps({MODEL: {"primary": 1, "canary_version": 2, "canary_share": 0.5, "window": 10, **CALM}})
    args = ["--model-repository", str(repo), "--rollout", rollout, "--allow-model-control", "true"]
    with start_server(tmp_path, *args) as server:
        clients = clients_for(server)
        sent = 0
        deadline = time.monotonic() + DEADLINE_S
        while status(server)["canary"] is not None:
            assert time.monotonic() < deadline and sent < 5000, status(server)
            assert clients.v2_http(images(4, seed=sent))[0] in ("1", "2")
            sent += 1
        figures = status(server)
        (record,) = [r for r in figures["audit"] if r["action"] == "rollback"]
        assert record["rule"] == "agreement" and record["figures"]["agreement"] < 0.9

        assert http_load(server, {"canary_version": 3, "canary_share": 0.5}) == (200, {})
        figures = status(server)
        assert figures["primary"] == 1 and figures["canary"]["version"] == 3
        assert {clients.v2_grpc(images(1, seed=9), f"c{i}")[0] for i in range(32)} == {"1", "3"}
        code, body = http_load(server, {"rollback": "canary", "window": 10})
        assert code == 400 and "alone" in body["error"]
        assert http_load(server, {"rollback": "3"}) == (200, {})
        figures = status(server)
        assert figures["canary"] is None
        record = figures["audit"][-1]
        assert (
            record["action"] == "rollback" and record["who"] == "http POST /v2/repository/models/fashion_softmax/load"
        )
        assert {clients.v2_grpc(images(1, seed=9), f"c{i}")[0] for i in range(32)} == {"1"}


def test_new_version_starts_as_canary_and_is_promoted_after_a_clean_window(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """``--rollout-new-versions canary``: a version that appears on disk (loaded by request) takes
    a canary share instead of all traffic; agreeing with the primary over a clean window, it is
    promoted automatically (``auto_promote``), both steps audited."""
    repo = tmp_path / "models"
    save(image_classifier(0), repo, MODEL, 1, class_names=LABELS)
    rollout = json.dumps({"*": {"auto_promote": True, "window": 10, "canary_share": 0.5, **CALM}})
    args = ["--model-repository", str(repo), "--rollout", rollout, "--rollout-new-versions", "canary"]
    with start_server(tmp_path, *args, "--allow-model-control", "true") as server:
        clients = clients_for(server)
        assert status(server)["primary"] == 1 and status(server)["canary"] is None
        save(image_classifier(0), repo, MODEL, 2, class_names=LABELS)  # the same answers: a clean canary
        assert http_load(server, {}) == (200, {})
        figures = status(server)
        assert figures["primary"] == 1 and figures["canary"]["version"] == 2, figures
        assert figures["audit"][-1]["action"] == "canary" and figures["audit"][-1]["who"] == "automatic"
        sent = 0
        deadline = time.monotonic() + DEADLINE_S
        while status(server)["primary"] != 2:
            assert time.monotonic() < deadline and sent < 5000, status(server)
            assert getattr(clients, FRONT_ENDS[sent % 3])(images(1, seed=sent))[0] in ("1", "2")
            sent += 1
        figures = wait_for(server, lambda f: f["versions"] == [2], "version 1 retired")
        assert figures["canary"] is None
        record = figures["audit"][-1]
        assert record["action"] == "promote" and record["who"] == "automatic" and record["previous_primary"] == 1
        assert {clients.v2_grpc(images(1, seed=1))[0] for _ in range(10)} == {"2"}


def test_shadow_set_and_removed_by_model_control(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """V2 gRPC ``RepositoryModelLoad`` parameters add a shadow at run time (audited, a sampled
    share) and remove it; a version that is not in the repository is refused, nothing changed."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), image_classifier(1))
    with start_server(tmp_path, "--model-repository", str(repo), "--allow-model-control", "true") as server:
        clients = clients_for(server)
        assert status(server)["shadow"] is None
        load = v2.RepositoryModelLoadRequest(model_name=MODEL)
        load.parameters["shadow_version"].int64_param = 1
        load.parameters["shadow_share"].string_param = "0.5"
        clients.v2.RepositoryModelLoad(load, timeout=60)
        figures = status(server)
        assert figures["primary"] == 2 and figures["shadow"] == {"version": 1, "share": 0.5, "served": True}
        assert figures["audit"][-1]["action"] == "configure" and figures["audit"][-1]["shadow"] == 1
        for i in range(60):
            assert clients.v2_grpc(images(1, seed=i))[0] == "2"
        figures = wait_for(server, lambda f: f["mirror"]["queued"] == 0 and mirrored(f) > 0, "mirrored")
        assert 0 < mirrored(figures) < 60  # half of them, drawn (2^-59 to fail either way)
        child = figures["mirror"]["process"]["pid"]

        missing = v2.RepositoryModelLoadRequest(model_name=MODEL)
        missing.parameters["canary_version"].int64_param = 9
        with pytest.raises(grpc.RpcError) as refused:
            clients.v2.RepositoryModelLoad(missing, timeout=60)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "[9]" in refused.value.details() and status(server)["canary"] is None

        off = v2.RepositoryModelLoadRequest(model_name=MODEL)
        off.parameters["shadow_version"].string_param = "none"
        clients.v2.RepositoryModelLoad(off, timeout=60)
        figures = wait_for(server, lambda f: f["versions"] == [2], "version 1 retired")
        assert figures["shadow"] is None
        deadline = time.monotonic() + DEADLINE_S
        while child_alive(child):  # nothing left to mirror to: the mirror process was stopped
            assert time.monotonic() < deadline, f"mirror process {child} still runs"
            time.sleep(0.05)


def test_full_mirror_queue_drops_and_counts(tmp_path: Path) -> None:
    """A shadow far slower than the primary, and a mirror queue of one request: while the shadow
    runs its first mirrored request, one more waits and the rest are dropped and counted; clients
    get every answer from the primary."""
    repo = tmp_path / "models"
    save(linear(1, [2.0], 1.0), repo, "m", 1)
    save(slow(layers=20, width=256), repo, "m", 2)  # the same signature: x [N, 1] → y [N, 1]
    rollout = json.dumps({"m": {"primary": 1, "shadow_version": 2}})
    args = ["--model-repository", str(repo), "--rollout", rollout, "--rollout-queue-capacity", "1"]
    with start_server(tmp_path, *args, metrics=True) as server, grpc.insecure_channel(server.address) as channel:
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        x = np.arange(64, dtype=np.float32).reshape(64, 1)
        for _ in range(20):  # each answered in well under the shadow's time for one request
            response = stub.ModelInfer(v2_request("m", "x", x, "FP32"), timeout=30)
            y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(64, 1)
            assert response.model_version == "1" and np.array_equal(y, 2 * x + 1)

        def settled(figures: dict[str, Any]) -> bool:
            return mirrored(figures) + sum(figures["mirror"]["dropped"].values()) == 20

        url = f"http://127.0.0.1:{server.http_port}/v2/models/m/rollout"
        deadline = time.monotonic() + DEADLINE_S
        while not settled(figures := json.loads(urllib.request.urlopen(url, timeout=10).read())):
            assert time.monotonic() < deadline, figures
            time.sleep(0.05)
        dropped = figures["mirror"]["dropped"]["queue_full"]
        assert dropped >= 15 and figures["mirror"]["ok"] == 20 - dropped, figures
        samples = scrape(server.metrics_port)
        assert sample(samples, "serving_rollout_mirror_dropped_requests_total", model="m", reason="queue_full") == (
            dropped
        )
