"""KServe V2 / Open Inference Protocol over gRPC (Triton's ``inference.GRPCInferenceService``).

Implemented: the KServe core (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer) and, from Triton's extensions, ModelConfig, ModelStreamInfer, RepositoryIndex and
RepositoryModelLoad/Unload (only with the ``allow_model_control`` setting, else
FAILED_PRECONDITION). The other Triton RPCs (statistics, shared memory, trace, logging) answer
UNIMPLEMENTED with a message naming what is supported.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import grpc

from ..core.context import RequestContext
from ..core.dataplane import DataPlane
from ..core.datatypes import datatype_of
from ..core.registry import ModelVersion
from ..errors import InvalidArgument, ServingError, clip
from ..generated.inference import grpc_service_pb2 as pb
from ..generated.inference import grpc_service_pb2_grpc as pb_grpc
from ..generated.inference import model_config_pb2 as config_pb
from . import v2_codec as codec
from .calls import Rpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "model-serving"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
#: Triton extensions this server implements, as reported by ServerMetadata.
EXTENSIONS = ["model_configuration", "model_repository"]
SUPPORTED_RPCS = (
    "ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, "
    "ModelStreamInfer, ModelConfig, RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload"
)
#: Unload parameter Triton clients may send; there are no ensembles here, so it changes nothing.
_IGNORED_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})
_UNIMPLEMENTED_RPCS = (
    "ModelStatistics",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)

rpc = Rpc("v2", SERVICE_NAME)


def server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _config_type(datatype: str) -> config_pb.DataType:
    """V2 datatype name → Triton's ``DataType`` enum value (``FP32`` → ``TYPE_FP32``)."""
    return config_pb.DataType.Value(f"TYPE_{datatype}")  # type: ignore[no-any-return]


def _one_repository(repository_name: str) -> None:
    if repository_name:
        raise InvalidArgument(
            f"unknown repository {repository_name!r}; this server has one repository, leave repository_name empty"
        )


def _control_request(request: Any, ignored: frozenset[str] = frozenset()) -> str:
    """The model name of a RepositoryModelLoad/Unload request, after checking the rest."""
    _one_repository(request.repository_name)
    if not request.model_name:
        raise InvalidArgument("model_name is required")
    unsupported = sorted(set(request.parameters) - ignored)
    if unsupported:
        raise InvalidArgument(
            f"parameters {unsupported} are not supported: models load from the repository "
            "directory only (no config override or file upload)"
        )
    return str(request.model_name)


def _stream_error(request: pb.ModelInferRequest, err: ServingError, index: int) -> pb.ModelStreamInferResponse:
    """Triton's stream: a failed request answers with ``error_message`` (plus its id); the
    stream goes on."""
    failed = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version, id=request.id)
    return pb.ModelStreamInferResponse(error_message=clip(str(err)), infer_response=failed)


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    # --- health -------------------------------------------------------------------------------

    @rpc.unary()
    async def ServerLive(self, request: pb.ServerLiveRequest, context: RequestContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc.unary()
    async def ServerReady(self, request: pb.ServerReadyRequest, context: RequestContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    @rpc.unary()
    async def ModelReady(self, request: pb.ModelReadyRequest, context: RequestContext) -> pb.ModelReadyResponse:
        """Ready = loaded (Triton: an unknown model or version is not ready, no error)."""
        return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version))

    # --- metadata -----------------------------------------------------------------------------

    @rpc.unary()
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: RequestContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS)

    @rpc.unary()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: RequestContext) -> pb.ModelMetadataResponse:
        model = self.plane.model(context, request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        spec = model.spec
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=[str(v) for v in self.plane.registry.versions(spec.name)],
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in spec.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in spec.outputs],
        )

    @rpc.unary()
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: RequestContext) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=model_config(self.plane.model(context, request.name, request.version)))

    # --- inference ----------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, context: RequestContext) -> pb.ModelInferResponse:
        model = self.plane.model(context, request.model_name, request.model_version)
        context.request_id = request.id
        requested = codec.requested_outputs(request)
        outputs = await self.plane.infer(context, model, codec.request_tensors(request), requested)
        response = pb.ModelInferResponse(model_name=model.name, model_version=context.version, id=request.id)
        codec.encode_outputs(response, outputs, requested or model.spec.output_names)
        return response

    async def _stream_infer(self, request: pb.ModelInferRequest, context: RequestContext) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))

    ModelInfer = rpc.unary("ModelInfer", inference=True)(_infer)
    ModelStreamInfer = rpc.stream(_stream_infer, "ModelStreamInfer", on_error=_stream_error, inference=True)

    # --- Triton repository index and model control --------------------------------------------

    @rpc.unary()
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: RequestContext
    ) -> pb.RepositoryIndexResponse:
        """Every loaded model version, all READY (this server only lists what it has loaded)."""
        _one_repository(request.repository_name)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(name=m.name, version=str(m.version), state="READY") for m in self.plane.registry.models()]
        )

    @rpc.unary()
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: RequestContext
    ) -> pb.RepositoryModelLoadResponse:
        """(Re)load a model from its directory: new versions served, removed ones drained,
        changed files swapped; answers once done. A model unloaded by request is served again.
        FAILED_PRECONDITION when a version on disk is rejected (the previous one keeps serving)."""
        name = _control_request(request)
        report = await self.plane.load_model(name)
        log.info(
            "model load requested",
            extra={"model": name, "loaded": [str(k) for k in report.loaded], "unloaded": [str(k) for k in report.unloaded]},
        )
        return pb.RepositoryModelLoadResponse()

    @rpc.unary()
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: RequestContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving every version of a model; answers once its requests drained. It stays
        unloaded (also across repository polls) until loaded by request."""
        name = _control_request(request, _IGNORED_UNLOAD_PARAMETERS)
        report = await self.plane.unload_model(name)
        log.info("model unload requested", extra={"model": name, "unloaded": [str(k) for k in report.unloaded]})
        return pb.RepositoryModelUnloadResponse()


def _dims(shape: Sequence[int], batched: bool) -> list[int]:
    return list(shape[1:] if batched else shape)


def model_config(model: ModelVersion) -> config_pb.ModelConfig:
    """A minimal, truthful Triton ``ModelConfig`` for one loaded model version.

    As in Triton, ``dims`` leave out the batch axis when ``max_batch_size`` > 0; every loaded
    version is served (version policy ``all``); one instance on the provider the session uses.
    """
    spec = model.spec
    batched = spec.max_rows > 0
    gpu = "cuda" in model.provider.lower()
    kind = config_pb.ModelInstanceGroup.KIND_GPU if gpu else config_pb.ModelInstanceGroup.KIND_CPU
    return config_pb.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=config_pb.ModelVersionPolicy(all=config_pb.ModelVersionPolicy.All()),
        max_batch_size=spec.max_rows,
        input=[
            config_pb.ModelInput(name=s.name, data_type=_config_type(datatype_of(s.dtype)), dims=_dims(s.shape, batched))
            for s in spec.inputs
        ],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=_config_type(datatype_of(s.dtype)), dims=_dims(s.shape, batched))
            for s in spec.outputs
        ],
        instance_group=[config_pb.ModelInstanceGroup(name=spec.name, count=1, kind=kind)],
        default_model_filename="model.onnx",
    )


def _unimplemented(name: str) -> Any:
    async def method(self: V2Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{name} is a Triton extension this server does not implement; it serves {SUPPORTED_RPCS}",
        )

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"UNIMPLEMENTED: {name} is not supported by this server."
    return method


for _name in _UNIMPLEMENTED_RPCS:
    setattr(V2Servicer, _name, _unimplemented(_name))
