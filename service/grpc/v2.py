"""KServe V2 / Open Inference Protocol over gRPC (Triton's ``inference.GRPCInferenceService``).

Implemented: the KServe core (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer) and, from Triton's extensions, ModelConfig, ModelStatistics, ModelStreamInfer,
RepositoryIndex and RepositoryModelLoad/Unload (only with the ``allow_model_control`` setting,
else FAILED_PRECONDITION). The other Triton RPCs (shared memory, trace settings, logging) answer
UNIMPLEMENTED with a message naming what is supported.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import json_format

from .. import v2_common as common
from ..core.context import RequestContext
from ..core.dataplane import DataPlane
from ..errors import InvalidArgument, ServingError, clip
from ..generated.inference import grpc_service_pb2 as pb
from ..generated.inference import grpc_service_pb2_grpc as pb_grpc
from . import v2_codec as codec
from .calls import Rpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SUPPORTED_RPCS = (
    "ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer, "
    "ModelStreamInfer, ModelConfig, ModelStatistics, RepositoryIndex, RepositoryModelLoad, RepositoryModelUnload"
)
_UNIMPLEMENTED_RPCS = (
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


def _control_request(request: Any) -> str:
    """The model name of a RepositoryModelLoad/Unload request, after checking the repository."""
    common.one_repository(request.repository_name)
    if not request.model_name:
        raise InvalidArgument("model_name is required")
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
        return pb.ServerMetadataResponse(
            name=common.SERVER_NAME, version=common.server_version(), extensions=common.EXTENSIONS
        )

    @rpc.unary()
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: RequestContext
    ) -> pb.ModelMetadataResponse:
        model = self.plane.model(context, request.name, request.version)
        response: pb.ModelMetadataResponse = json_format.ParseDict(
            common.model_metadata(model, self.plane.registry.versions(model.name)), pb.ModelMetadataResponse()
        )
        return response

    @rpc.unary()
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: RequestContext) -> pb.ModelConfigResponse:
        model = self.plane.model(context, request.name, request.version)
        return pb.ModelConfigResponse(config=common.model_config(model))

    @rpc.unary()
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: RequestContext
    ) -> pb.ModelStatisticsResponse:
        """Triton's statistics of every served version (no name), of a model's served versions
        (no version), or of one version."""
        stats = common.model_statistics(self.plane.registry, request.name, request.version)
        response: pb.ModelStatisticsResponse = json_format.ParseDict(stats, pb.ModelStatisticsResponse())
        return response

    # --- inference ----------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, context: RequestContext) -> pb.ModelInferResponse:
        model = self.plane.model(context, request.model_name, request.model_version)
        context.request_id = request.id
        requested = codec.requested_outputs(request)
        outputs = await self.plane.infer(context, model, codec.request_tensors(request), requested)
        response = pb.ModelInferResponse(model_name=model.name, model_version=context.version, id=request.id)
        codec.encode_outputs(response, outputs, requested or model.spec.output_names)
        return response

    async def _stream_infer(
        self, request: pb.ModelInferRequest, context: RequestContext
    ) -> pb.ModelStreamInferResponse:
        return pb.ModelStreamInferResponse(infer_response=await self._infer(request, context))

    ModelInfer = rpc.unary("ModelInfer", inference=True)(_infer)
    ModelStreamInfer = rpc.stream(_stream_infer, "ModelStreamInfer", on_error=_stream_error, inference=True)

    # --- Triton repository index and model control --------------------------------------------

    @rpc.unary()
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: RequestContext
    ) -> pb.RepositoryIndexResponse:
        """Every model version the repository has: READY when served, else UNAVAILABLE with the
        reason (failed, unloaded, outside the version policy); ``ready``: the READY ones only."""
        common.one_repository(request.repository_name)
        roles = self.plane.rollout.roles() if self.plane.rollout is not None else None
        index: pb.RepositoryIndexResponse = json_format.ParseDict(
            {"models": common.repository_index(self.plane.registry, request.ready, roles)},
            pb.RepositoryIndexResponse(),
        )
        return index

    @rpc.unary()
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: RequestContext
    ) -> pb.RepositoryModelLoadResponse:
        """(Re)load a model from its directory: new versions served, removed ones drained,
        changed files swapped; answers once done. A model unloaded by request is served again.
        FAILED_PRECONDITION when a version on disk is rejected (the previous one keeps serving).
        With rollout parameters (shadow, canary, promote, rollback): changes the model's rollout."""
        name = _control_request(request)
        parameters = common.load_parameters(request.parameters)
        report = await self.plane.load_model(name, parameters, f"{context.protocol} {context.method}")
        log.info(
            "model load requested",
            extra={
                "model": name,
                "loaded": [str(k) for k in report.loaded],
                "unloaded": [str(k) for k in report.unloaded],
            },
        )
        return pb.RepositoryModelLoadResponse()

    @rpc.unary()
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: RequestContext
    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving every version of a model; answers once its requests drained. It stays
        unloaded (also across repository polls) until loaded by request."""
        name = _control_request(request)
        common.control_parameters(request.parameters, common.IGNORED_UNLOAD_PARAMETERS)
        report = await self.plane.unload_model(name)
        log.info("model unload requested", extra={"model": name, "unloaded": [str(k) for k in report.unloaded]})
        return pb.RepositoryModelUnloadResponse()


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
