"""What both V2 (Open Inference Protocol) front ends report, gRPC and HTTP alike: server
metadata, model metadata, Triton's model configuration, the repository index, and the checks
of model-control requests."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from . import installed_version
from .core.registry import ModelRegistry, ModelVersion
from .errors import InvalidArgument
from .generated.inference import model_config_pb2 as config_pb

#: The server's name in V2 ServerMetadata (the distribution is onnx-v2-serving; its version is reported).
SERVER_NAME = "model-serving"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
#: Triton extensions both V2 front ends implement, as reported by server metadata.
EXTENSIONS = ["model_configuration", "model_repository"]
#: Unload parameter Triton clients may send; there are no ensembles here, so it changes nothing.
IGNORED_UNLOAD_PARAMETERS = frozenset({"unload_dependents"})


def server_version() -> str:
    """The installed distribution's version (onnx-v2-serving; ``0+unknown`` from a source tree
    that was never installed)."""
    return installed_version()


def model_metadata(model: ModelVersion, versions: Sequence[int]) -> dict[str, Any]:
    """``$metadata_model_response``: name, versions, platform, input and output tensors."""
    spec = model.spec
    return {
        "name": spec.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in spec.inputs],
        "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in spec.outputs],
    }


def _config_type(datatype: str) -> config_pb.DataType:
    """V2 datatype name → Triton's ``DataType`` enum value (``FP32`` → ``TYPE_FP32``)."""
    return config_pb.DataType.Value(f"TYPE_{datatype}")  # type: ignore[no-any-return]


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
            config_pb.ModelInput(name=s.name, data_type=_config_type(s.datatype), dims=_dims(s.shape, batched))
            for s in spec.inputs
        ],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=_config_type(s.datatype), dims=_dims(s.shape, batched))
            for s in spec.outputs
        ],
        instance_group=[config_pb.ModelInstanceGroup(name=spec.name, count=1, kind=kind)],
        default_model_filename="model.onnx",
    )


def model_config_json(model: ModelVersion) -> dict[str, Any]:
    """:func:`model_config` as Triton's HTTP API shows it (field names as in the proto, numbers as
    numbers: protobuf's JSON mapping would quote the int64 ``dims``)."""
    from google.protobuf import json_format

    config: dict[str, Any] = json_format.MessageToDict(model_config(model), preserving_proto_field_name=True)
    for tensor in (*config.get("input", []), *config.get("output", [])):
        tensor["dims"] = [int(d) for d in tensor.get("dims", [])]
    return config


def repository_index(registry: ModelRegistry) -> list[dict[str, str]]:
    """Every loaded model version, READY (this server lists what it has loaded)."""
    return [{"name": m.name, "version": str(m.version), "state": "READY", "reason": ""} for m in registry.models()]


def one_repository(repository_name: str) -> None:
    if repository_name:
        raise InvalidArgument(
            f"unknown repository {repository_name!r}; this server has one repository, leave repository_name empty"
        )


def control_parameters(parameters: Collection[str], ignored: frozenset[str] = frozenset()) -> None:
    """Model load/unload requests take no parameters (but the ignored ones)."""
    unsupported = sorted(set(parameters) - ignored)
    if unsupported:
        raise InvalidArgument(
            f"parameters {unsupported} are not supported: models load from the repository "
            "directory only (no config override or file upload)"
        )


def check_inference_parameters(where: str, parameters: Mapping[str, Any]) -> None:
    """Triton-only parameters this server does not honour are rejected rather than ignored."""
    for key, why in UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise InvalidArgument(f"{where}: parameter {key!r}: {why}")


UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported by this server",
    "classification": "the classification extension is not supported; request the raw output",
}
