"""Triton's model configuration: a model folder's ``config.pbtxt``, next to this server's
``config.json``, resolved into what one model's versions are loaded with.

``<root>/<name>/config.pbtxt`` is parsed with protobuf's text format on Triton's
``model_config.proto`` (the subset in ``proto/inference/model_config.proto``: same message and
field names and numbers, so Triton's files parse unchanged). What this server reads:

* ``max_batch_size``: N > 0 caps the rows of one request (with the server's ``max_request_rows``
  above it) and of one executed batch; 0 turns dynamic batching off (the batch axis is then part
  of the declared dims, as in Triton);
* ``dynamic_batching { max_queue_delay_microseconds, preferred_batch_size }``;
* ``version_policy { latest { num_versions } | all {} | specific { versions } }`` (default:
  Triton's, the latest version only) — applied by the registry, see :class:`VersionPolicy`;
* ``instance_group [{ count, kind }]``: the batches of one version that run at once, each on an
  inference thread of the version's own (one shared onnxruntime session: its ``run`` is
  thread-safe); ``KIND_CPU`` runs the version on CPU whatever ``--provider`` says, ``KIND_GPU``
  needs the server on CUDA;
* ``model_warmup``: samples of zeros or random data run at load, before the version is served;
* ``name``, ``platform``/``backend``, ``default_model_filename``, ``input``/``output`` are checked
  against the folder and the ONNX graph.

Anything else — a field of Triton's full proto this server has no use for, a typo, two values for
one field, a value that contradicts the graph or config.json — is a load error naming the file,
line and field. Sections left out take the server's settings (``dynamic_batching`` too: with the
default delay 0 this server's batcher adds no waiting, where Triton would run requests one by one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from ..generated._pool import POOL
from ..generated.inference import model_config_pb2 as config_pb
from ..rollout.config import NO_ROLLOUT, RolloutConfig
from ..settings import Settings
from .batching import CONFIG_FILE, BatchingConfig, config_json
from .discovery import MODEL_FILE, Signature, file_signature
from .spec import ModelSpec

CONFIG_PBTXT = "config.pbtxt"
PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

Kind = config_pb.ModelInstanceGroup.Kind


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions on disk are served: Triton's ``ModelVersionPolicy``.

    ``latest`` N serves the N highest-numbered versions that load (a version that fails to load
    is passed over, so the one before it serves on); ``all`` serves every version; ``specific``
    the versions listed (a listed version not on disk is reported, the others serve)."""

    kind: str = "latest"  # latest | all | specific
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {{ num_versions: {self.num_versions} }}"
        if self.kind == "specific":
            return f"specific {{ versions: {list(self.versions)} }}"
        return "all { }"

    @property
    def limit(self) -> int | None:
        """How many versions to serve at most (None: no limit)."""
        return self.num_versions if self.kind == "latest" else None

    def order(self, on_disk: Sequence[int]) -> list[int]:
        """The versions to consider, in the order to try them."""
        if self.kind == "latest":
            return sorted(on_disk, reverse=True)
        if self.kind == "specific":
            return [v for v in sorted(self.versions) if v in on_disk]
        return sorted(on_disk)

    def missing(self, on_disk: Sequence[int]) -> list[int]:
        """Versions the policy names that are not on disk."""
        return [v for v in sorted(self.versions) if v not in on_disk] if self.kind == "specific" else []

    def proto(self) -> config_pb.ModelVersionPolicy:
        if self.kind == "latest":
            return config_pb.ModelVersionPolicy(
                latest=config_pb.ModelVersionPolicy.Latest(num_versions=self.num_versions)
            )
        if self.kind == "specific":
            return config_pb.ModelVersionPolicy(
                specific=config_pb.ModelVersionPolicy.Specific(versions=list(self.versions))
            )
        return config_pb.ModelVersionPolicy(all=config_pb.ModelVersionPolicy.All())


#: Triton's default: serve the latest version only.
DEFAULT_POLICY = VersionPolicy()


@dataclass(frozen=True)
class ModelSettings:
    """What one model folder's files say, resolved with the server's settings."""

    name: str
    version_policy: VersionPolicy = DEFAULT_POLICY
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    #: config.pbtxt's ``max_batch_size``; None when the file does not set it.
    max_batch_size: int | None = None
    #: Batches that may run at once (instance_group counts summed); None: ``inference_workers``.
    instances: int | None = None
    #: Execution providers for this model's sessions (None: the server's).
    providers: tuple[str, ...] | None = None
    #: The parsed config.pbtxt (None without one): its tensors and warm-up samples.
    triton: config_pb.ModelConfig | None = None
    #: (config.pbtxt, config.json) file signatures: a change reloads the model's versions.
    signature: tuple[Signature | None, Signature | None] = (None, None)
    #: Guarded rollout: roles, shares, rules (the ``rollout`` setting and config.json).
    rollout: RolloutConfig = NO_ROLLOUT

    @property
    def batched(self) -> bool:
        """Triton's view: the first dimension is the batch axis, left out of declared dims."""
        return self.max_batch_size != 0

    def max_request_rows(self, server_max: int) -> int:
        """Rows one request may carry: the server's cap, lowered by ``max_batch_size``."""
        return min(server_max, self.max_batch_size) if self.max_batch_size else server_max

    # -- per version: checks against the graph and warm-up ---------------------------------------

    def check(self, spec: ModelSpec) -> None:
        """The config.pbtxt against one version's graph (ValueError on any disagreement)."""
        if self.triton is None:
            return
        where = f"{self.name}/{CONFIG_PBTXT}"
        if self.max_batch_size and not spec.batchable:
            raise ValueError(
                f"{where}: max_batch_size {self.max_batch_size} needs a dynamic first (batch) dimension on every "
                f"input and output, but the graph has inputs {spec.signature()[0]}, outputs {spec.signature()[1]}; "
                "use max_batch_size: 0"
            )
        for what, declared, actual in (
            ("input", self.triton.input, spec.inputs),
            ("output", self.triton.output, spec.outputs),
        ):
            if not declared:
                continue
            names = [d.name for d in declared]
            if sorted(names) != sorted(s.name for s in actual) or len(set(names)) != len(names):
                raise ValueError(f"{where} declares {what}s {names}, but the graph has {[s.name for s in actual]}")
            by_name = {d.name: d for d in declared}
            for tensor in actual:
                d = by_name[tensor.name]
                datatype = config_pb.DataType.Name(d.data_type)
                dims = list(tensor.shape[1:] if self.batched else tensor.shape)
                if datatype != f"TYPE_{tensor.datatype}" or list(d.dims) != dims:
                    raise ValueError(
                        f"{where}: {what} '{d.name}' is declared {datatype} dims {list(d.dims)}, but the graph has "
                        f"TYPE_{tensor.datatype} dims {dims}"
                        + (" (without the batch axis, as max_batch_size > 0)" if self.batched else "")
                    )

    def warmup(self, spec: ModelSpec) -> list[tuple[str, dict[str, np.ndarray], int]]:
        """The ``model_warmup`` samples as (name, feeds, runs), checked against ``spec``."""
        if self.triton is None:
            return []
        samples = []
        for index, sample in enumerate(self.triton.model_warmup):
            label = f"{self.name}/{CONFIG_PBTXT}: model_warmup '{sample.name or index}'"
            batch = sample.batch_size or 1
            if self.batched and batch > spec.max_rows:
                raise ValueError(f"{label}: batch_size {batch} is over the model's maximum of {spec.max_rows}")
            if not self.batched and batch != 1:
                raise ValueError(f"{label}: batch_size must be 1 when max_batch_size is 0")
            if sorted(sample.inputs) != sorted(spec.input_names):
                raise ValueError(
                    f"{label}: has inputs {sorted(sample.inputs)}, the model takes {list(spec.input_names)}"
                )
            rng = np.random.default_rng(index)
            feeds: dict[str, np.ndarray] = {}
            for tensor in spec.inputs:
                given = sample.inputs[tensor.name]
                datatype = config_pb.DataType.Name(given.data_type)
                want = tensor.shape[1:] if self.batched else tensor.shape
                dims = tuple(given.dims)
                if (
                    datatype != f"TYPE_{tensor.datatype}"
                    or len(dims) != len(want)
                    or any(d < 1 or (w >= 0 and d != w) for d, w in zip(dims, want))
                ):
                    raise ValueError(
                        f"{label}: input '{tensor.name}' is {datatype} dims {list(dims)}; the model takes "
                        f"TYPE_{tensor.datatype} dims {list(want)} (a concrete size for each -1)"
                    )
                source = given.WhichOneof("input_data_type")
                shape = (batch, *dims) if self.batched else dims
                if source == "zero_data" and given.zero_data:
                    feeds[tensor.name] = np.zeros(shape, tensor.dtype)
                elif source == "random_data" and given.random_data:
                    feeds[tensor.name] = _random(rng, shape, tensor.dtype)
                elif source == "input_data_file":
                    raise ValueError(f"{label}: input_data_file is not supported; use zero_data or random_data")
                else:
                    raise ValueError(f"{label}: input '{tensor.name}' needs zero_data: true or random_data: true")
            samples.append((sample.name or str(index), feeds, sample.count or 1))
        return samples


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    if dtype.kind == "f":
        return rng.random(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 100, shape).astype(dtype)


# -- reading the files --------------------------------------------------------------------------------


def config_signature(model_dir: Path) -> tuple[Signature | None, Signature | None]:
    return file_signature(model_dir / CONFIG_PBTXT), file_signature(model_dir / CONFIG_FILE)


def _top_level_fields(text: str) -> set[str]:
    """Names of the fields set at the top level of a text-format message (what proto3 cannot tell:
    ``max_batch_size: 0`` written out, or left out)."""
    tokenizer = text_format.Tokenizer(text.splitlines())
    depth, names, previous = 0, set(), ""
    while not tokenizer.AtEnd():
        token = tokenizer.token
        if token in ("{", "<", "["):
            if depth == 0 and previous:
                names.add(previous)
            depth += 1
        elif token in ("}", ">", "]"):
            depth -= 1
        elif token == ":" and depth == 0 and previous:
            names.add(previous)
        previous = token if token.isidentifier() else ""
        tokenizer.NextToken()
    return names


_NO_FIELD = re.compile(r'Message type "inference\.([\w.]+)" has no field named "(\w+)"')


def _explain(where: str, exc: text_format.ParseError) -> str:
    message = str(exc).split(" : ", 1)[-1]
    line = exc.GetLine()
    found = _NO_FIELD.search(message)
    if found:
        kind, name = found.groups()
        fields = sorted(f.name for f in POOL.FindMessageTypeByName(f"inference.{kind}").fields)
        message = f"field '{name}' of {kind} is not supported by this server (it reads {', '.join(fields)})"
    return f"{where} line {line}: {message}" if line else f"{where}: {message}"


def parse_pbtxt(text: str, where: str = CONFIG_PBTXT) -> tuple[config_pb.ModelConfig, set[str]]:
    """A config.pbtxt's message and the names of its top-level fields (ValueError if it does not parse)."""
    config = config_pb.ModelConfig()
    try:
        text_format.Parse(text, config, descriptor_pool=POOL)
    except text_format.ParseError as exc:
        raise ValueError(_explain(where, exc)) from None
    return config, _top_level_fields(text)


def _policy(config: config_pb.ModelConfig, where: str) -> VersionPolicy:
    if not config.HasField("version_policy"):
        return DEFAULT_POLICY
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "latest":
        if policy.latest.num_versions < 1:
            raise ValueError(f"{where}: version_policy latest needs num_versions of at least 1")
        return VersionPolicy("latest", policy.latest.num_versions)
    if kind == "specific":
        versions = tuple(sorted(set(policy.specific.versions)))
        if not versions or versions[0] < 1:
            raise ValueError(f"{where}: version_policy specific needs versions, each at least 1; got {versions}")
        return VersionPolicy("specific", versions=versions)
    if kind == "all":
        return VersionPolicy("all")
    raise ValueError(f"{where}: version_policy names no policy; use latest, all or specific")


def _instances(
    config: config_pb.ModelConfig, where: str, server_providers: Sequence[str]
) -> tuple[int | None, tuple[str, ...] | None]:
    """(instances, providers) from instance_group."""
    if not config.instance_group:
        return None, None
    count, kinds = 0, set()
    for group in config.instance_group:
        kind = Kind.Name(group.kind)
        if group.count < 0:
            raise ValueError(f"{where}: instance_group count must be at least 1, got {group.count}")
        if group.gpus:
            raise ValueError(
                f"{where}: instance_group gpus is not supported; leave it out (the device is the one --provider picks)"
            )
        if kind == "KIND_MODEL":
            raise ValueError(f"{where}: instance_group kind KIND_MODEL does not apply to ONNX models here")
        kinds.add(kind)
        count += group.count or 1
    if {"KIND_CPU", "KIND_GPU"} <= kinds:
        raise ValueError(f"{where}: instance_group mixes KIND_CPU and KIND_GPU; one kind per model")
    providers: tuple[str, ...] | None = None
    if "KIND_GPU" in kinds:
        if not server_providers or server_providers[0] != CUDA_PROVIDER:
            raise ValueError(
                f"{where}: instance_group kind KIND_GPU, but this server runs on {list(server_providers)} "
                "(start it with --provider cuda or auto on a CUDA machine, or use KIND_CPU / KIND_AUTO)"
            )
    elif "KIND_CPU" in kinds:
        providers = (CPU_PROVIDER,)
    return count, providers


def _batching_fields(config: config_pb.ModelConfig, present: set[str], where: str) -> dict[str, tuple[Any, str]]:
    """The batching settings config.pbtxt implies: field → (value, what the file says)."""
    fields: dict[str, tuple[Any, str]] = {}
    dynamic = config.HasField("dynamic_batching")
    max_batch = config.max_batch_size if "max_batch_size" in present else None
    if max_batch is not None:
        if max_batch < 0:
            raise ValueError(f"{where}: max_batch_size must be 0 or more, got {max_batch}")
        if max_batch == 0:
            if dynamic:
                raise ValueError(
                    f"{where}: dynamic_batching needs max_batch_size > 0 (0 means the model takes no batches)"
                )
            fields["enabled"] = (False, "max_batch_size: 0")
        else:
            fields["max_batch_rows"] = (max_batch, f"max_batch_size: {max_batch}")
    if dynamic:
        batching = config.dynamic_batching
        preferred = tuple(sorted(set(batching.preferred_batch_size)))
        if preferred and (preferred[0] < 1 or (max_batch and preferred[-1] > max_batch)):
            raise ValueError(
                f"{where}: dynamic_batching preferred_batch_size {list(batching.preferred_batch_size)} must be "
                f"between 1 and max_batch_size ({max_batch})"
            )
        fields["enabled"] = (True, "dynamic_batching { }")
        delay = int(batching.max_queue_delay_microseconds)
        fields["max_queue_delay_us"] = (delay, f"dynamic_batching.max_queue_delay_microseconds: {delay}")
        if preferred:
            fields["preferred_batch_sizes"] = (preferred, f"preferred_batch_size: {list(preferred)}")
    return fields


def load_model_settings(
    settings: Settings, model_dir: Path, server_providers: Sequence[str] = (CPU_PROVIDER,)
) -> ModelSettings:
    """The resolved configuration of the model in ``model_dir`` (ValueError when its config.pbtxt or
    config.json is unusable, or they contradict each other)."""
    name = model_dir.name
    signature = config_signature(model_dir)
    where = f"{name}/{CONFIG_PBTXT}"
    path = model_dir / CONFIG_PBTXT
    rollout = _rollout(settings, name, model_dir)
    if signature[0] is None:
        batching = BatchingConfig.resolve(settings, name, model_dir)
        return ModelSettings(name, batching=batching, signature=signature, rollout=rollout)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} cannot be read: {exc}") from None
    config, present = parse_pbtxt(text, where)
    if config.name and config.name != name:
        raise ValueError(f"{where}: name '{config.name}' differs from the model's directory name '{name}'")
    if config.platform not in ("", PLATFORM) or config.backend not in ("", BACKEND):
        raise ValueError(
            f"{where}: platform '{config.platform}' / backend '{config.backend}' is not served here; this server "
            f'runs ONNX models (platform: "{PLATFORM}" or backend: "{BACKEND}")'
        )
    if config.default_model_filename not in ("", MODEL_FILE):
        raise ValueError(
            f"{where}: default_model_filename '{config.default_model_filename}' is not supported; "
            f"each version is <version>/{MODEL_FILE}"
        )
    policy = _policy(config, where)
    instances, providers = _instances(config, where, server_providers)
    batching = BatchingConfig.resolve(settings, name, model_dir, _batching_fields(config, present, where))
    max_batch = config.max_batch_size if "max_batch_size" in present else None
    return ModelSettings(name, policy, batching, max_batch, instances, providers, config, signature, rollout)


def _rollout(settings: Settings, name: str, model_dir: Path) -> RolloutConfig:
    """The model's rollout: the ``rollout`` setting and config.json's ``"rollout"`` section."""
    section = config_json(model_dir).get("rollout")
    if section is not None and not isinstance(section, dict):
        raise ValueError(f"{name}/{CONFIG_FILE}: rollout must be a JSON object")
    try:
        return RolloutConfig.resolve(settings, name, section)
    except Exception as exc:  # pydantic.ValidationError or a role collision: say which file
        raise ValueError(f"{name}/{CONFIG_FILE} or the rollout setting: {exc}") from None
