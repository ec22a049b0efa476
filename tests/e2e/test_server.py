"""Server-level behaviour through real processes: reflection, a port in use, TLS. (Shutdown:
test_shutdown.py.)
(The assembled app in process: tests/unit/test_app.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from fixtures.onnx_models import linear, save
from fixtures.servers import MODELS, REPO_ROOT, ServerProcess, start_server
from fixtures.tls import tls_files
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_services(server: ServerProcess) -> None:
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        response = next(stub.ServerReflectionInfo(iter([request])))
    names = {s.name for s in response.list_services_response.service}
    assert {"serving.v1.ModelService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_call_through_reflection_without_proto_files(server: ServerProcess) -> None:
    """What grpcurl does: fetch descriptors by reflection, build messages, call."""
    with server.channel() as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        assert pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
        method = pool.FindServiceByName("serving.v1.ModelService").methods_by_name["PredictProfit"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/serving.v1.ModelService/PredictProfit",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        response = call(request_cls(population=[35000]), timeout=10)
    assert response.model.name == "profit"
    assert len(response.profit_usd) == 1


def test_port_in_use_is_refused(server: ServerProcess) -> None:
    command = [
        sys.executable,
        "-m",
        "service",
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        "--log-format",
        "text",
        "--model-repository",
        str(MODELS),
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    last = f"model-serving: error: cannot serve gRPC on 127.0.0.1:{server.port}: Address already in use"
    assert result.stderr.splitlines()[-1] == last
    assert server.health() == SERVING  # the running server is untouched


def test_every_health_watcher_is_told(tmp_path: Path) -> None:
    """Two Watch streams on one model; one is cancelled; the model is unloaded: the other still
    hears NOT_SERVING (grpcio-health-checking's aio servicer dropped the shared wait object)."""
    from service.generated.inference import grpc_service_pb2 as v2
    from service.generated.inference import grpc_service_pb2_grpc as v2_grpc

    repo = tmp_path / "models"
    save(linear(1, [2.0], 1.0, "population", "profit"), repo, "profit")
    args = ["--model-repository", str(repo), "--allow-model-control", "true"]
    with start_server(tmp_path, *args) as proc, proc.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="profit")
        first, second = health.Watch(request, timeout=60), health.Watch(request, timeout=60)
        assert next(first).status == SERVING and next(second).status == SERVING
        first.cancel()
        v2_grpc.GRPCInferenceServiceStub(channel).RepositoryModelUnload(
            v2.RepositoryModelUnloadRequest(model_name="profit"), timeout=30
        )
        assert next(second).status == NOT_SERVING  # a deadline (60 s), not a hang, if it never comes
        second.cancel()


def test_mutual_tls(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    files = tls_files(tmp_path)
    repo = tmp_path / "models"
    save(linear(1, [2.0], 1.0, "population", "profit"), repo, "profit")
    read = lambda key: files[key].read_bytes()  # noqa: E731
    client = grpc.ssl_channel_credentials(read("ca.crt"), read("client.key"), read("client.crt"))
    args = [
        "--model-repository",
        str(repo),
        "--tls-cert",
        str(files["server.crt"]),
        "--tls-key",
        str(files["server.key"]),
        "--tls-client-ca",
        str(files["ca.crt"]),
    ]
    with start_server(tmp_path, *args, credentials=client) as proc:
        with proc.channel() as channel:
            response = pb_grpc.ModelServiceStub(channel).PredictProfit(
                pb.PredictProfitRequest(population=[3]), timeout=10
            )
        assert list(response.profit_usd) == [7.0]
        # Without a client certificate, or without TLS at all, nothing gets through.
        for channel in (
            grpc.secure_channel(proc.address, grpc.ssl_channel_credentials(read("ca.crt"))),
            grpc.insecure_channel(proc.address),
        ):
            with channel, pytest.raises(grpc.RpcError) as info:
                pb_grpc.ModelServiceStub(channel).PredictProfit(pb.PredictProfitRequest(population=[3]), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
