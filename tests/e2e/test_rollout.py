"""Guarded rollout end to end (docs/rollout.md): real servers over their own repositories, real
clients on every front end (typed gRPC, V2 gRPC through grpc stubs, V2 HTTP through tritonclient).

Mirrored work runs after the client's answer, so the tests wait for the server's rollout status to
reach the expected counts (generous deadlines), never for a fixed time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.http as triton_http
from fixtures.onnx_models import OPSET, image_classifier, linear, save
from fixtures.servers import REPO_ROOT, ServerProcess, sample, scrape, start_server, v2_request
from onnx import ModelProto, TensorProto, helper, numpy_helper

from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

MODEL = "fashion_softmax"  # the typed API's Classify default
LABELS = json.dumps([f"class{i}" for i in range(10)])
DEADLINE_S = 60.0


def failing_classifier(classes: int = 10) -> ModelProto:
    """The classifier's signature (uint8 [N, 1, 28, 28] → float32 [N, classes]), but every run
    fails: its Reshape to [-1, 785] cannot take N × 784 values."""
    shape = numpy_helper.from_array(np.array([-1, 785], np.int64), "shape")
    w = numpy_helper.from_array(np.zeros((785, classes), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", ["f", "shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        "failing",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [w, shape],
    )
    return helper.make_model(graph, opset_imports=OPSET)


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

    def typed_grpc(self, x: np.ndarray) -> tuple[str, np.ndarray]:
        tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=list(x.shape), data=x.tobytes())
        response = self.typed.Classify(pb.ClassifyRequest(images=tensor), timeout=30)
        probabilities = np.array([list(r.probabilities) for r in response.results], np.float32)
        return str(response.model.version), probabilities

    def v2_grpc(self, x: np.ndarray) -> tuple[str, np.ndarray]:
        response = self.v2.ModelInfer(v2_request(MODEL, "image", x, "UINT8"), timeout=30)
        return response.model_version, np.frombuffer(response.raw_output_contents[0], np.float32).reshape(len(x), -1)

    def v2_http(self, x: np.ndarray) -> tuple[str, np.ndarray]:
        tensor = triton_http.InferInput("image", list(x.shape), "UINT8")
        tensor.set_data_from_numpy(x)
        result = self.http.infer(MODEL, [tensor])
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


def mirrored(figures: dict[str, Any]) -> int:
    return int(figures["mirror"]["ok"]) + int(figures["mirror"]["failed"])


def test_shadow_mirrors_every_front_end_and_compares(
    tmp_path: Path, clients_for: Callable[[ServerProcess], Clients]
) -> None:
    """Every answered request of each front end runs again on the shadow (version 1) after the
    primary (version 2) answered; the comparator's figures are served by the rollout status and as
    Prometheus metrics."""
    repo = classifier_repository(tmp_path / "models", image_classifier(0), image_classifier(1))
    rollout = json.dumps({MODEL: {"shadow_version": 1}})
    with start_server(tmp_path, "--model-repository", str(repo), "--rollout", rollout, metrics=True) as server:
        clients = clients_for(server)
        figures = status(server)
        assert figures["primary"] == 2 and figures["shadow"] == {"version": 1, "share": 1.0, "served": True}
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
