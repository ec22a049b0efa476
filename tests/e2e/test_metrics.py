"""Prometheus endpoint of a real server (service.observability.metrics): after known traffic over
both protocols the counts add up. (The exporter in process: tests/unit/observability/test_metrics.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from fixtures.metrics import sample
from fixtures.servers import MODELS, REPO_ROOT, scrape, start_server, v2_request

from service.generated.inference import grpc_service_pb2_grpc as v2_grpc
from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

BUNDLED = ("fashion_cnn", "fashion_softmax", "house_price", "profit")


def test_scrape_after_traffic_adds_up(tmp_path: Path) -> None:
    args = ["--model-repository", str(MODELS)]
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    tensor = pb.Tensor(dtype=pb.DATA_TYPE_UINT8, shape=images.shape, data=images.tobytes())
    with start_server(tmp_path, *args, metrics=True) as proc, proc.channel() as channel:
        assert proc.metrics_port is not None
        metrics_port = proc.metrics_port
        empty = scrape(metrics_port)
        typed, infer = pb_grpc.ModelServiceStub(channel), v2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(5):  # 5 typed OK, 3 rows each
            typed.Classify(pb.ClassifyRequest(model=pb.ModelRef(name="fashion_cnn"), images=tensor), timeout=10)
        for _ in range(4):  # 4 V2 OK, 3 rows each
            infer.ModelInfer(v2_request("fashion_softmax", "image", images, "UINT8"), timeout=10)
        typed.PredictProfit(pb.PredictProfitRequest(population=[1.0, 2.0]), timeout=10)  # 1 typed OK, 2 rows
        failures = [
            (
                lambda: typed.Classify(pb.ClassifyRequest(model=pb.ModelRef(name="nope"), images=tensor), timeout=10),
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                lambda: infer.ModelInfer(v2_request("nope", "image", images, "UINT8"), timeout=10),
                grpc.StatusCode.NOT_FOUND,
            ),
            (
                lambda: infer.ModelInfer(v2_request("fashion_softmax", "image", images[:, 0], "UINT8"), timeout=10),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
        ]
        for call, code in failures:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == code
        samples = scrape(metrics_port)

    # Before any traffic: every model loaded, queues empty, nothing counted.
    for name in BUNDLED:
        assert sample(empty, "serving_model_loaded", model=name, version="1") == 1
        assert sample(empty, "serving_queue_depth", model=name, version="1") == 0
    assert not [k for k in empty if k[0] == "serving_requests_total"]

    def requests(**labels: str) -> float:
        return sum(
            v
            for (name, lab), v in samples.items()
            if name == "serving_requests_total" and labels.items() <= dict(lab).items()
        )

    assert requests(protocol="typed", model="fashion_cnn", version="1", code="OK") == 5
    assert requests(protocol="v2", model="fashion_softmax", version="1", code="OK") == 4
    assert requests(protocol="typed", model="profit", version="1", code="OK") == 1
    assert requests(protocol="typed", model="", code="NOT_FOUND") == 1  # unknown names are not labels
    assert requests(protocol="v2", model="", code="NOT_FOUND") == 1
    assert requests(protocol="v2", model="fashion_softmax", code="INVALID_ARGUMENT") == 1
    assert requests() == 13
    # One latency observation per request, per protocol.
    for protocol, count in (("typed", 7), ("v2", 6)):
        observed = sum(
            v
            for (name, lab), v in samples.items()
            if name == "serving_request_duration_seconds_count" and dict(lab)["protocol"] == protocol
        )
        assert observed == count
    # The batcher saw exactly the valid requests' rows; queue wait once per computed request.
    for name, reqs, rows in (("fashion_cnn", 5, 15), ("fashion_softmax", 4, 12), ("profit", 1, 2)):
        labels = {"model": name, "version": "1"}
        assert sample(samples, "serving_batch_size_sum", **labels) == rows
        assert sample(samples, "serving_queue_wait_seconds_count", **labels) == reqs
        batches = sample(samples, "serving_batch_size_count", **labels)
        assert sample(samples, "serving_compute_duration_seconds_count", **labels) == batches
        assert 1 <= batches <= reqs
        assert sample(samples, "serving_queue_depth", **labels) == 0
        assert sample(samples, "serving_batches_in_flight", **labels) == 0


def test_metrics_port_in_use_is_refused(tmp_path: Path) -> None:
    """The metrics port of a running server: the second server says so and exits 1. Its gRPC port
    is bound by the system (0) and HTTP is off, so the metrics port is the only one that can clash."""
    with start_server(tmp_path, "--model-repository", str(MODELS), metrics=True, http=False) as running:
        port = running.metrics_port
        command = [
            sys.executable,
            "-m",
            "service",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            "--model-repository",
            str(MODELS),
            "--metrics-port",
            str(port),
        ]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr
