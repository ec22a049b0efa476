"""An in-process stand-in for the server's typed API, for client and batch tests that need failures
on cue (UNAVAILABLE a set number of times, a stream cut mid-way, slow answers) or to see the
metadata a client sends. Answers are deterministic functions of the inputs.
"""
from __future__ import annotations

import contextlib
import datetime
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.generated.serving.v1 import serving_pb2 as pb
from service.generated.serving.v1 import serving_pb2_grpc as pb_grpc

CLASSES = [f"class{i}" for i in range(10)]


def fake_probabilities(images: np.ndarray) -> np.ndarray:
    """float32 [N, 10]: 0.91 on class (pixel sum mod 10), 0.01 elsewhere."""
    n = len(images)
    probs = np.full((n, 10), 0.01, dtype=np.float32)
    probs[np.arange(n), images.reshape(n, -1).sum(axis=1, dtype=np.int64) % 10] = 0.91
    return probs


class FakeModelService(pb_grpc.ModelServiceServicer):
    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.fail: Counter[str] = Counter()  # method → how many more calls answer UNAVAILABLE
        self.stream_cut_after: int | None = None  # cut the next stream after this many responses
        self.delay = 0.0
        self.metadata: list[dict[str, str]] = []
        self.lock = threading.Lock()

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] += 1
            self.metadata.append(dict(context.invocation_metadata()))
            failing = self.fail[method] > 0
            if failing:
                self.fail[method] -= 1
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"fake: {method} not available yet")
        if self.delay:
            time.sleep(self.delay)

    def _classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        shape = tuple(request.images.shape)
        if request.images.dtype != pb.DATA_TYPE_UINT8 or len(shape) != 4 or shape[1:] != (1, 28, 28):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"fake: expects uint8 [N, 1, 28, 28], got {list(shape)}")
        images = np.frombuffer(request.images.data, np.uint8).reshape(shape)
        probs = fake_probabilities(images)
        results = [
            pb.Classification(probabilities=row.tolist(), class_index=int(row.argmax()), label=CLASSES[int(row.argmax())])
            for row in probs
        ]
        return pb.ClassifyResponse(
            model=pb.ModelRef(name="fake_classifier", version=3), results=results, request_id=request.request_id
        )

    def Classify(self, request, context):  # noqa: N802
        self._enter("Classify", context)
        return self._classify(request, context)

    def ClassifyStream(self, request_iterator, context):  # noqa: N802
        self._enter("ClassifyStream", context)
        cut, self.stream_cut_after = self.stream_cut_after, None
        for count, request in enumerate(request_iterator):
            if cut is not None and count == cut:
                context.abort(grpc.StatusCode.UNAVAILABLE, "fake: stream cut")
            yield self._classify(request, context)

    def PredictProfit(self, request, context):  # noqa: N802
        self._enter("PredictProfit", context)
        values = np.asarray(request.population, dtype=np.float32)
        if (values < 0).any():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake: populations must be >= 0")
        return pb.PredictProfitResponse(model=pb.ModelRef(name="profit", version=1), profit_usd=(values * 2).tolist())

    def GetModelMetadata(self, request, context):  # noqa: N802
        self._enter("GetModelMetadata", context)
        if request.model.name == "profit":
            return pb.ModelMetadata(
                name="profit", version=1, versions=[1], platform="onnxruntime", max_batch_size=1024,
                inputs=[pb.TensorMetadata(name="population", dtype="float32", shape=[-1, 1])],
                outputs=[pb.TensorMetadata(name="profit", dtype="float32", shape=[-1, 1])],
            )
        if request.model.name != "fake_classifier":
            context.abort(grpc.StatusCode.NOT_FOUND, f"fake: model '{request.model.name}' not found")
        return pb.ModelMetadata(
            name="fake_classifier", version=3, versions=[3], platform="onnxruntime", max_batch_size=64,
            inputs=[pb.TensorMetadata(name="image", dtype="uint8", shape=[-1, 1, 28, 28])],
            outputs=[pb.TensorMetadata(name="probabilities", dtype="float32", shape=[-1, 10])],
            class_names=CLASSES,
        )


@contextlib.contextmanager
def fake_server(
    service: FakeModelService, credentials: grpc.ServerCredentials | None = None
) -> Iterator[str]:
    """Serve ``service`` (+ health: "" SERVING) on a free loopback port; yield ``host:port``."""
    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ModelServiceServicer_to_server(service, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("sleepy", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def tls_files(directory: Path) -> dict[str, Path]:
    """PEM files of a CA and the server (SAN 127.0.0.1) and client certificates it signed."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name, issuer=None, issuer_key=None, san=False, ca=False):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject if issuer else subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
            )
        return builder.sign(issuer_key or key, hashes.SHA256()), key

    ca_cert, ca_key = make("test-ca", ca=True)
    files: dict[str, Path] = {}
    for name, (cert, key) in {
        "ca": (ca_cert, ca_key),
        "server": make("127.0.0.1", ca_cert, ca_key, san=True),
        "client": make("client", ca_cert, ca_key),
    }.items():
        files[f"{name}.crt"] = directory / f"{name}.crt"
        files[f"{name}.crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}.key"] = directory / f"{name}.key"
        files[f"{name}.key"].write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return files
