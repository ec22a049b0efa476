"""Property-based fuzzing (hypothesis) of request decoding in process, both protocols: the V2
codec (service.grpc.v2_codec) and the data plane's admission on the server's own path, the
typed API's image decoding (service.grpc.typed_codec), and the protobuf guard — on random
datatypes, shapes, byte strings and typed contents, the only exception allowed is InvalidArgument.
(Through a real server: tests/e2e/test_fuzz.py.) More examples for a deeper run:
``FUZZ_EXAMPLES=20000 pytest tests/unit/grpc/test_fuzz.py tests/e2e/test_fuzz.py``."""

from __future__ import annotations

import asyncio

import numpy as np
from fixtures.fuzzing import FUZZ, MAX_BATCH, image_tensors, infer_requests
from fixtures.inprocess import TINY_MAX_ROWS
from hypothesis import given
from hypothesis import strategies as st

from service.core.context import RequestContext
from service.core.dataplane import DataPlane, admit
from service.core.registry import ModelRegistry
from service.core.spec import ModelSpec, TensorSpec
from service.core.tensors import check_finite
from service.errors import InvalidArgument, NotFound
from service.generated.inference import grpc_service_pb2 as v2
from service.generated.serving.v1 import serving_pb2 as pb
from service.grpc import v2_codec as codec
from service.grpc.interceptor import _Refused, safe_deserializer
from service.grpc.typed_codec import image_tensor

assert MAX_BATCH == TINY_MAX_ROWS  # the strategies aim at the tiny registry's row limit


@FUZZ
@given(request=infer_requests())
def test_v2_decoding_only_raises_invalid_argument(tiny_registry: ModelRegistry, request: v2.ModelInferRequest) -> None:
    """The V2 servicer's steps in its order: resolve the model, requested outputs, then the data
    plane (admit, decode, finite check, infer) and the encoding of the answer."""
    plane = DataPlane(tiny_registry, tiny_registry.settings)
    context = RequestContext("v2", "/inference.GRPCInferenceService/ModelInfer", inference=True)
    try:
        model = plane.model(context, request.model_name, request.model_version or None)
    except (InvalidArgument, NotFound):
        model = plane.model(context, "profit")
    try:
        requested = codec.requested_outputs(request)
        outputs = asyncio.run(plane.infer(context, model, codec.request_tensors(request), requested))
        codec.encode_outputs(v2.ModelInferResponse(), outputs, requested or model.spec.output_names)
    except InvalidArgument:
        pass
    try:
        codec.decode_inputs(request)  # without a model's contract: the codec must hold on its own too
    except InvalidArgument:
        pass


@FUZZ
@given(tensor=image_tensors(), model=st.sampled_from(["fashion_softmax", "fashion_softmax_float"]))
def test_typed_image_decoding_only_raises_invalid_argument(tensor: pb.Tensor, model: str) -> None:
    """The typed Classify's steps: the image tensor for the model's input, admission, decoding
    (with pixel conversion), the finite check."""
    want = np.dtype(np.uint8) if model == "fashion_softmax" else np.dtype(np.float32)
    image = TensorSpec("image", want, (-1, 1, 28, 28))
    spec = ModelSpec(model, 1, (image,), (TensorSpec("probabilities", np.dtype(np.float32), (-1, 10)),), {}, MAX_BATCH)
    try:
        request_tensor = image_tensor(tensor, image)
        admit(spec, [request_tensor])
        images = request_tensor.decode()
        assert images.dtype == want and images.shape == request_tensor.shape
        check_finite(images, "images")
    except InvalidArgument:
        pass


@FUZZ
@given(
    data=st.binary(max_size=256),
    message=st.sampled_from([v2.ModelInferRequest, pb.ClassifyRequest, pb.PredictProfitRequest]),
)
def test_the_protobuf_guard_never_raises(data: bytes, message: type) -> None:
    result = safe_deserializer(message.FromString)(data)
    assert isinstance(result, (message, _Refused))
