"""What both V2 (Open Inference Protocol) front ends report, gRPC and HTTP alike: server
metadata, model metadata, Triton's model configuration, the repository index, Triton's
statistics, and the checks of model-control requests."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from . import installed_version
from .core.model_config import BACKEND, PLATFORM
from .core.registry import ModelRegistry, ModelVersion
from .errors import InvalidArgument
from .generated.inference import model_config_pb2 as config_pb

#: The server's name in V2 ServerMetadata (the distribution is onnx-v2-serving; its version is reported).
SERVER_NAME = "model-serving"
#: Triton extensions both V2 front ends implement, as reported by server metadata.
EXTENSIONS = ["model_configuration", "model_repository", "statistics"]
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
    """Triton's ``ModelConfig`` for one loaded model version: what was applied, from its
    config.pbtxt / config.json and the server's settings.

    ``max_batch_size`` is the most rows one request may carry (0 when config.pbtxt turned
    batching off with ``max_batch_size: 0``); as in Triton, ``dims`` then leave out the batch
    axis. ``dynamic_batching`` is there when the batcher batches; ``instance_group`` counts the
    batches that may run at once, on the provider the session uses; ``model_warmup`` repeats the
    samples config.pbtxt had run at load.
    """
    spec = model.spec
    settings = model.settings
    batched = settings.batched
    gpu = "cuda" in model.provider.lower()
    kind = config_pb.ModelInstanceGroup.KIND_GPU if gpu else config_pb.ModelInstanceGroup.KIND_CPU
    batcher = model.batcher
    dynamic = None
    if batcher.batching:
        dynamic = config_pb.ModelDynamicBatching(
            preferred_batch_size=list(batcher.config.preferred_batch_sizes),
            max_queue_delay_microseconds=batcher.config.max_queue_delay_us,
        )
    return config_pb.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend=BACKEND,
        version_policy=settings.version_policy.proto(),
        max_batch_size=spec.max_rows if batched else 0,
        dynamic_batching=dynamic,
        model_warmup=list(settings.triton.model_warmup) if settings.triton is not None else [],
        input=[
            config_pb.ModelInput(name=s.name, data_type=_config_type(s.datatype), dims=_dims(s.shape, batched))
            for s in spec.inputs
        ],
        output=[
            config_pb.ModelOutput(name=s.name, data_type=_config_type(s.datatype), dims=_dims(s.shape, batched))
            for s in spec.outputs
        ],
        instance_group=[config_pb.ModelInstanceGroup(name=spec.name, count=batcher.max_in_flight, kind=kind)],
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


def repository_index(
    registry: ModelRegistry, ready_only: bool = False, roles: Mapping[tuple[str, int], str] | None = None
) -> list[dict[str, str]]:
    """Triton's repository index: served versions READY; versions on disk that are not served,
    failed versions and failed models (version "") UNAVAILABLE with the reason. ``ready_only``:
    the READY ones only. ``roles``: a served version's rollout role, given as its reason."""
    roles = roles or {}
    return [
        {
            "name": e.name,
            "version": e.version,
            "state": e.state,
            "reason": e.reason or roles.get((e.name, int(e.version) if e.version.isdigit() else 0), ""),
        }
        for e in registry.index(ready_only)
    ]


def model_statistics(registry: ModelRegistry, name: str = "", version: str = "") -> dict[str, Any]:
    """Triton's ``ModelStatisticsResponse`` as a dict: every served version (no name), every
    served version of ``name`` (no version), or that one version. NotFound / Unavailable /
    InvalidArgument as for any model lookup."""
    if not name:
        if version:
            raise InvalidArgument("a model version needs a model name")
        versions = [(m.name, m.version) for m in registry.models()]
    elif version:
        found = registry.get(name, version)
        versions = [(found.name, found.version)]
    else:
        registry.get(name)  # NotFound with the reason when it is not served
        versions = [(name, v) for v in registry.versions(name)]
    return {"model_stats": registry.statistics.report(versions)}


def one_repository(repository_name: str) -> None:
    if repository_name:
        raise InvalidArgument(
            f"unknown repository {repository_name!r}; this server has one repository, leave repository_name empty"
        )


def control_parameters(parameters: Collection[str], ignored: frozenset[str] = frozenset()) -> None:
    """Model unload requests take no parameters (but the ignored ones)."""
    unsupported = sorted(set(parameters) - ignored)
    if unsupported:
        raise InvalidArgument(
            f"parameters {unsupported} are not supported: models load from the repository "
            "directory only (no config override or file upload)"
        )


def load_parameters(parameters: Mapping[str, Any]) -> dict[str, str]:
    """A model load request's parameters as text: the rollout's (docs/rollout.md#model-control),
    each a gRPC ``ModelRepositoryParameter`` (string, int64 or bool) or a JSON string, number or
    boolean. Config overrides and file uploads are refused: models load from the repository."""
    values: dict[str, str] = {}
    for key, value in parameters.items():
        if key == "config" or key.startswith("file:"):
            raise InvalidArgument(
                f"parameter {key!r} is not supported: models load from the repository directory only "
                "(no config override or file upload)"
            )
        if hasattr(value, "WhichOneof"):  # gRPC ModelRepositoryParameter
            kind = value.WhichOneof("parameter_choice")
            if kind not in ("string_param", "int64_param", "bool_param"):
                raise InvalidArgument(f"parameter {key!r}: give a string, an integer or a boolean, got {kind}")
            value = getattr(value, kind)
        if isinstance(value, bool):
            values[key] = "true" if value else "false"
        elif isinstance(value, int | float | str):
            values[key] = str(value)
        else:
            raise InvalidArgument(f"parameter {key!r}: give a string, a number or a boolean")
    return values


def check_inference_parameters(where: str, parameters: Mapping[str, Any]) -> None:
    """Triton-only parameters this server does not honour are rejected rather than ignored."""
    for key, why in UNSUPPORTED_PARAMETERS.items():
        if key in parameters:
            raise InvalidArgument(f"{where}: parameter {key!r}: {why}")


UNSUPPORTED_PARAMETERS = {
    "shared_memory_region": "shared memory is not supported by this server",
    "classification": "the classification extension is not supported; request the raw output",
}
