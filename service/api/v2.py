"""KServe V2 / Open Inference Protocol adapter (Triton's ``inference.GRPCInferenceService``).

A thin layer over the same core as the typed API: decode the V2 request, call
``repository.get(...).infer(...)``, encode the V2 response. Core errors (:class:`ServingError`)
become gRPC statuses via :func:`service.errors.abort`.

Implemented: the KServe core (ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata,
ModelInfer) and, from Triton's extensions, ModelConfig, ModelStreamInfer, RepositoryIndex and
RepositoryModelLoad/Unload (hot reload through :mod:`service.reload`; only with the
``allow_model_control`` setting, else FAILED_PRECONDITION). The other Triton RPCs (statistics,
shared memory, trace, logging) answer UNIMPLEMENTED with a message naming what is supported.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from importlib import metadata
from typing import Any

import grpc

from service.api.observed import inference_rpc
from service.codecs import v2 as codec
from service.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServingError,
    Unavailable,
    abort,
    clip,
)
from service.generated.inference import grpc_service_pb2 as pb
from service.generated.inference import grpc_service_pb2_grpc as pb_grpc
from service.generated.inference import model_config_pb2 as config_pb
from service.logs import annotate
from service.metrics import V2, resolved, status_code

log = logging.getLogger(__name__)

SERVER_NAME = "model-serving"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
#: Triton extensions this adapter implements, as reported by ServerMetadata.
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


def _server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def _config_type(datatype: str) -> int:
    """V2 datatype string → Triton's ``DataType`` enum value (``FP32`` → ``TYPE_FP32``)."""
    return config_pb.DataType.Value(f"TYPE_{datatype}")


def _version(version: str) -> str | None:
    """Empty version string → None (latest)."""
    return version or None


class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over a :class:`service.repository.ModelRepository`."""

    def __init__(self, repository: Any, settings: Any = None, reloader: Any = None) -> None:
        self._reloader = reloader
        self._repository = repository
        self._settings = settings
        self._metrics = getattr(repository, "metrics", None)

    def _observe(self, code: str, start: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_request(V2, code, time.perf_counter() - start)

    # --- health -----------------------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Any
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._repository.ready))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """Ready = loaded. An unknown model or version, or a repository still loading, is not
        ready (no error), as in Triton; a version that is not an integer is INVALID_ARGUMENT."""
        try:
            self._repository.get(request.name, _version(request.version))
        except (NotFound, Unavailable):
            return pb.ModelReadyResponse(ready=False)
        except ServingError as err:
            await abort(context, err)
        return pb.ModelReadyResponse(ready=True)

    # --- metadata ---------------------------------------------------------------------------

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        try:
            model = self._repository.get(request.name, _version(request.version))
            versions = self._repository.versions(model.name)
        except ServingError as err:
            await abort(context, err)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[str(v) for v in sorted(versions)],
            platform=PLATFORM,
            inputs=[
                tensor(name=s.name, datatype=codec.datatype_of(s.dtype), shape=s.shape)
                for s in model.inputs
            ],
            outputs=[
                tensor(name=s.name, datatype=codec.datatype_of(s.dtype), shape=s.shape)
                for s in model.outputs
            ],
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Any
    ) -> pb.ModelConfigResponse:
        try:
            model = self._repository.get(request.name, _version(request.version))
        except ServingError as err:
            await abort(context, err)
        return pb.ModelConfigResponse(config=model_config(model))

    # --- inference --------------------------------------------------------------------------

    @inference_rpc
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return await self._infer(request, context)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Triton's bidirectional stream: one response per request, in order. A failed request
        answers with ``error_message`` (plus its id) and the stream goes on."""
        async for request in request_iterator:
            start = time.perf_counter()
            try:
                response = await self._infer(request, context)
            except ServingError as err:
                self._observe(status_code(context, err), start)
                failed = pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                )
                yield pb.ModelStreamInferResponse(error_message=clip(str(err)), infer_response=failed)
            except BaseException as exc:
                self._observe(status_code(context, exc), start)
                raise
            else:
                self._observe("OK", start)
                yield pb.ModelStreamInferResponse(infer_response=response)

    async def _infer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        model = self._repository.get(request.model_name, _version(request.model_version))
        resolved(model.name, model.version)
        annotate(model=model.name, version=model.version, request_id=request.id)
        _check_datatypes(model, request)
        inputs = codec.decode_inputs(request)
        first = next(iter(inputs.values()), None)
        if first is not None and first.ndim:
            annotate(batch=int(first.shape[0]))
        requested = codec.requested_outputs(request)
        outputs = await model.infer(inputs, requested or None, timeout=context.time_remaining())
        response = pb.ModelInferResponse(
            model_name=model.name, model_version=str(model.version), id=request.id
        )
        order = requested or [s.name for s in model.outputs if s.name in outputs]
        codec.encode_outputs(response, outputs, order)
        return response

    # --- Triton repository index ------------------------------------------------------------

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        """Every loaded model version, all READY (this server only lists what it has loaded)."""
        if request.repository_name:
            err = InvalidArgument(
                f"unknown repository {request.repository_name!r}; this server has one "
                "repository, leave repository_name empty"
            )
            await abort(context, err)
        index = pb.RepositoryIndexResponse.ModelIndex
        models = sorted(self._repository.models(), key=lambda m: (m.name, m.version))
        return pb.RepositoryIndexResponse(
            models=[index(name=m.name, version=str(m.version), state="READY") for m in models]
        )

    # --- Triton model control (hot reload) --------------------------------------------------

    def _model_control(self, request: Any, ignored: frozenset[str] = frozenset()) -> Any:
        if self._reloader is None or not getattr(self._settings, "allow_model_control", False):
            raise FailedPrecondition(
                "model control is off on this server: start it with --allow-model-control true "
                "(env SERVING_ALLOW_MODEL_CONTROL=true) to load/unload models by RPC, or with "
                "--reload-interval-seconds N to follow the repository directory"
            )
        if request.repository_name:
            raise InvalidArgument(
                f"unknown repository {request.repository_name!r}; this server has one "
                "repository, leave repository_name empty"
            )
        if not request.model_name:
            raise InvalidArgument("model_name is required")
        unsupported = sorted(set(request.parameters) - ignored)
        if unsupported:
            raise InvalidArgument(
                f"parameters {unsupported} are not supported: models load from the repository "
                "directory only (no config override or file upload)"
            )
        return self._reloader

    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Any
    ) -> pb.RepositoryModelLoadResponse:
        """(Re)load a model from its directory: new versions served, removed ones drained,
        changed files swapped; answers once done. A model unloaded by RPC is served again.
        FAILED_PRECONDITION when a version on disk is rejected (the previous one keeps serving)."""
        try:
            report = await self._model_control(request).load(request.model_name)
        except ServingError as err:
            await abort(context, err)
        log.info(
            "model load requested",
            extra={"model": request.model_name, "loaded": report.loaded, "unloaded": report.unloaded},
        )
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Any
    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving every version of a model; answers once in-flight requests drained. It
        stays unloaded (also across repository polls) until RepositoryModelLoad."""
        try:
            control = self._model_control(request, _IGNORED_UNLOAD_PARAMETERS)
            report = await control.unload(request.model_name)
        except ServingError as err:
            await abort(context, err)
        log.info("model unload requested", extra={"model": request.model_name, "unloaded": report.unloaded})
        return pb.RepositoryModelUnloadResponse()


def _check_datatypes(model: Any, request: pb.ModelInferRequest) -> None:
    """Reject an input whose V2 datatype differs from the model's, in V2 terms (before decoding,
    so a wrong datatype is not misreported as a byte-length mismatch)."""
    specs = {s.name: s for s in model.inputs}
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"model {model.name!r} has no input {tensor.name!r}; its inputs are "
                f"{sorted(specs)}"
            )
        expected = codec.datatype_of(spec.dtype)
        if tensor.datatype != expected:
            raise InvalidArgument(
                f"input {tensor.name!r} of model {model.name!r} has datatype {expected}, "
                f"got {tensor.datatype or '(empty)'}"
            )


def _dims(shape: Sequence[int], batched: bool) -> list[int]:
    return list(shape[1:] if batched else shape)


def model_config(model: Any) -> config_pb.ModelConfig:
    """A minimal, truthful Triton ``ModelConfig`` for one loaded model version.

    As in Triton, ``dims`` leave out the batch axis when ``max_batch_size`` > 0; every loaded
    version is served (version policy ``all``); one instance on the provider the session uses.
    """
    batched = model.max_batch_size > 0
    gpu = "cuda" in str(model.provider).lower()
    kind = config_pb.ModelInstanceGroup.KIND_GPU if gpu else config_pb.ModelInstanceGroup.KIND_CPU
    return config_pb.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=config_pb.ModelVersionPolicy(all=config_pb.ModelVersionPolicy.All()),
        max_batch_size=model.max_batch_size,
        input=[
            config_pb.ModelInput(
                name=s.name,
                data_type=_config_type(codec.datatype_of(s.dtype)),
                dims=_dims(s.shape, batched),
            )
            for s in model.inputs
        ],
        output=[
            config_pb.ModelOutput(
                name=s.name,
                data_type=_config_type(codec.datatype_of(s.dtype)),
                dims=_dims(s.shape, batched),
            )
            for s in model.outputs
        ],
        instance_group=[config_pb.ModelInstanceGroup(name=model.name, count=1, kind=kind)],
        default_model_filename="model.onnx",
    )


def _unimplemented(rpc: str) -> Any:
    async def method(self: V2Servicer, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{rpc} is a Triton extension this server does not implement; "
            f"it serves {SUPPORTED_RPCS}",
        )

    method.__name__ = method.__qualname__ = rpc
    method.__doc__ = f"UNIMPLEMENTED: {rpc} is not supported by this server."
    return method


for _rpc in _UNIMPLEMENTED_RPCS:
    setattr(V2Servicer, _rpc, _unimplemented(_rpc))


def add_to_server(server: grpc.aio.Server, repository: Any, settings: Any, reloader: Any = None) -> list[str]:
    """Register the V2 servicer on ``server``; return the full service names for reflection.
    ``reloader`` (a :class:`service.reload.ModelReloader`) backs RepositoryModelLoad/Unload."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(V2Servicer(repository, settings, reloader), server)
    return [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]
