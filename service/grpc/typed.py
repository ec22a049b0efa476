"""The typed API (``serving.v1.ModelService``): decode protobuf → data plane → encode protobuf."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core import tasks
from ..core.context import RequestContext
from ..core.dataplane import DataPlane
from ..core.registry import ModelVersion
from ..errors import InvalidArgument, ServingError
from ..generated.serving.v1 import serving_pb2 as pb
from ..generated.serving.v1 import serving_pb2_grpc as pb_grpc
from . import typed_codec as codec
from .calls import Rpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelService"].full_name

rpc = Rpc("typed", SERVICE_NAME)


def _stream_error(request: pb.ClassifyRequest, err: ServingError, index: int) -> pb.ClassifyResponse:
    """A failed batch ends the stream, naming the batch."""
    raise type(err)(f"batch {index} (request_id {request.request_id!r}): {err}")


class TypedModelService(pb_grpc.ModelServiceServicer):
    """serving.v1.ModelService over the data plane."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    def _model(self, context: RequestContext, ref: pb.ModelRef, default: str) -> ModelVersion:
        if ref.version < 0:
            raise InvalidArgument(f"model.version must be >= 0 (0 = latest), got {ref.version}")
        return self.plane.model(context, ref.name or default, ref.version)

    # -- classification -------------------------------------------------------------------------

    async def _classify(self, request: pb.ClassifyRequest, context: RequestContext) -> pb.ClassifyResponse:
        model = self._model(context, request.model, tasks.DEFAULT_MODELS["classify"])
        context.request_id = request.request_id
        image, output = tasks.classifier_io(model.spec)
        tensor = codec.image_tensor(request.images, image)
        probs = (await self.plane.infer(context, model, [tensor], [output.name]))[output.name]
        labels = tasks.class_labels(model.spec, probs.shape[1])
        if not request.top_k:
            # The common case, without a message object per image: the results' wire bytes are
            # laid out from the probabilities' raw bytes and parsed in C (see classifications()).
            response: pb.ClassifyResponse = pb.ClassifyResponse.FromString(codec.classifications(probs, labels))
            response.model.CopyFrom(codec.model_ref(model, context.version))
            response.request_id = request.request_id
            return response
        ranked = tasks.top_classes(probs, request.top_k).tolist()
        response = pb.ClassifyResponse(model=codec.model_ref(model, context.version), request_id=request.request_id)
        add = response.results.add
        for row, order in zip(probs.tolist(), ranked):
            best = order[0]
            top = [pb.ClassScore(index=i, label=labels[i], probability=row[i]) for i in order]
            add(probabilities=row, class_index=best, label=labels[best], top_k=top)
        return response

    Classify = rpc.unary("Classify", inference=True)(_classify)
    ClassifyStream = rpc.stream(_classify, "ClassifyStream", on_error=_stream_error, inference=True)

    # -- regression -----------------------------------------------------------------------------

    async def _regress(
        self,
        context: RequestContext,
        ref: pb.ModelRef,
        task: str,
        rows: int,
        columns: int,
        values: Callable[[], object],
    ) -> tuple[pb.ModelRef, list[float]]:
        """A one-input regression model on float32 [rows, columns] features: N values."""
        model = self._model(context, ref, tasks.DEFAULT_MODELS[task])
        features, output = tasks.regression_io(model.spec)
        tensor = codec.features_tensor(features.name, rows, columns, values)
        result = (await self.plane.infer(context, model, [tensor], [output.name]))[output.name]
        return codec.model_ref(model, context.version), tasks.one_value_per_row(
            model.spec, output, result, rows
        ).tolist()

    @rpc.unary(inference=True)
    async def PredictProfit(
        self, request: pb.PredictProfitRequest, context: RequestContext
    ) -> pb.PredictProfitResponse:
        populations = request.population
        ref, profit = await self._regress(context, request.model, "profit", len(populations), 1, lambda: populations)
        return pb.PredictProfitResponse(model=ref, profit_usd=profit)

    @rpc.unary(inference=True)
    async def PredictHousePrice(
        self, request: pb.PredictHousePriceRequest, context: RequestContext
    ) -> pb.PredictHousePriceResponse:
        houses = request.houses
        ref, prices = await self._regress(
            context,
            request.model,
            "house_price",
            len(houses),
            2,
            lambda: np.array([(h.size_sqft, h.bedrooms) for h in houses], dtype=np.float32),
        )
        return pb.PredictHousePriceResponse(model=ref, price_usd=prices)

    # -- metadata -------------------------------------------------------------------------------

    @rpc.unary()
    async def ListModels(self, request: pb.ListModelsRequest, context: RequestContext) -> pb.ListModelsResponse:
        registry = self.plane.registry
        if request.name:
            self.plane.model(context, request.name)  # NotFound with the available names
        models = [m for m in registry.models() if not request.name or m.name == request.name]
        return pb.ListModelsResponse(
            models=[codec.model_metadata(m, registry.versions(m.name)) for m in models], failed=registry.failed
        )

    @rpc.unary()
    async def GetModelMetadata(self, request: pb.GetModelMetadataRequest, context: RequestContext) -> pb.ModelMetadata:
        if not request.model.name:
            raise InvalidArgument(f"model.name is required; available models: {self.plane.registry.names()}")
        model = self._model(context, request.model, "")
        return codec.model_metadata(model, self.plane.registry.versions(model.name))
