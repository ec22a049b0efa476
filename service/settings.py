"""Server settings: one pydantic-settings class, read from ``SERVING_*`` env vars and CLI flags."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

BUNDLED_MODELS = Path(__file__).resolve().parents[1] / "models"
MiB = 1024 * 1024
ENV_PREFIX = "SERVING_"
#: Settings renamed since 0.1.0: old name → new name. The old flag and env var still work.
RENAMED = {"max_batch_size": "max_request_rows", "batch_max_size": "max_batch_rows"}


class BatchingOverride(BaseModel):
    """Per-model dynamic batching settings; a field left out keeps the server-wide default.

    Given in ``models/<name>/config.json`` under ``"batching"`` and/or in the ``batching``
    setting (JSON object: model name → these fields), which wins."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    max_batch_rows: int | None = Field(
        None,
        ge=1,
        validation_alias=AliasChoices("max_batch_rows", "max_batch_size"),  # old spelling
    )
    max_queue_delay_us: int | None = Field(None, ge=0)
    queue_capacity: int | None = Field(None, ge=1)


class RolloutOverride(BaseModel):
    """Per-model guarded rollout (docs/rollout.md); a field left out keeps what the level below says.

    Given in ``models/<name>/config.json`` under ``"rollout"`` and/or in the ``rollout`` setting
    (JSON object: model name, or ``"*"`` for every model → these fields), which wins."""

    model_config = ConfigDict(extra="forbid")

    primary: int | None = Field(None, ge=1, description="the version unversioned requests get (default: the latest)")
    shadow_version: int | None = Field(None, ge=1, description="a version mirrored every (sampled) request")
    shadow_share: float | None = Field(None, gt=0, le=1, description="share of requests mirrored to the shadow")
    canary_version: int | None = Field(None, ge=1, description="a version taking a share of live traffic")
    canary_share: float | None = Field(None, gt=0, le=1, description="share of unversioned requests it takes")
    new_versions: Literal["serve", "shadow", "canary"] | None = Field(
        None, description="a version appearing on disk: serve it (the policy), or start it as shadow or canary"
    )
    compare_share: float | None = Field(
        None, ge=0, le=1, description="share of canary requests also run on the primary to measure agreement"
    )
    window: int | None = Field(None, ge=10, le=100_000, description="requests per rule window")
    max_error_ratio: float | None = Field(None, gt=0, description="roll back above this × the primary's error rate")
    min_error_rate: float | None = Field(None, ge=0, le=1, description="error rates at or below this never roll back")
    min_agreement: float | None = Field(None, ge=0, le=1, description="roll back below this agreement")
    max_latency_ratio: float | None = Field(None, gt=0, description="roll back above this × the primary's p99")
    regression_tolerance: float | None = Field(
        None, ge=0, description="a regression row agrees when |Δ| <= this × |primary| (or 1e-6)"
    )
    auto_promote: bool | None = Field(None, description="promote the canary after a clean window")


class Settings(BaseSettings):
    """Everything the server can be told. Env var = ``SERVING_`` + upper-case field name;
    CLI flag = ``--`` + field name with dashes (flags override env vars)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field("0.0.0.0", description="interface to listen on")
    port: int = Field(8001, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    model_repository: Path = Field(BUNDLED_MODELS, description="directory holding <name>/<version>/model.onnx")
    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="onnxruntime execution provider: auto (CUDA when available, else CPU), "
        "cpu, or cuda (refuse to start without it)",
    )
    intra_op_threads: int = Field(
        1,
        ge=0,
        description="onnxruntime threads inside one operator (0 = onnxruntime default: one per "
        "core); with inference_workers batches running at once, workers x threads <= cores "
        "keeps the CPU from being oversubscribed",
    )
    inter_op_threads: int = Field(1, ge=0, description="onnxruntime threads across operators (0 = onnxruntime default)")
    inference_workers: int = Field(
        2, ge=1, description="threads running inference calls concurrently, off the event loop"
    )
    workers: int = Field(
        1,
        ge=1,
        description="server processes sharing the gRPC and HTTP ports (SO_REUSEPORT) under one supervisor, "
        "each with its own onnxruntime sessions and batchers, and one metrics endpoint summing them; "
        "auto = one per usable core; 1 = one process, no supervisor",
    )
    max_request_rows: int = Field(
        1024,
        ge=1,
        description="most rows (batch size) one request may carry; more → INVALID_ARGUMENT (was max_batch_size)",
    )
    dynamic_batching: bool = Field(
        True,
        description="batch concurrent requests for the same model version together (per-model override: 'enabled')",
    )
    max_batch_rows: int = Field(
        64,
        ge=1,
        description="most rows in one executed batch; larger requests are split "
        "(per-model override: 'max_batch_rows'; was batch_max_size)",
    )
    batch_max_queue_delay_us: int = Field(
        0,
        ge=0,
        description="how long the oldest queued request may wait for more rows, in microseconds "
        "(0 = no waiting: a batch is whatever queued while the workers were busy)",
    )
    inline_compute_us: int = Field(
        100,
        ge=0,
        description="a batch expected to compute in less than this many microseconds runs on the "
        "event loop thread: handing it to an inference thread costs more (0 = never)",
    )
    gc_freeze: bool = Field(
        True,
        description="freeze the heap built at start-up (imported modules, classes) out of Python's "
        "cyclic garbage collector before loading models: full collections stop traversing it",
    )
    batch_queue_capacity: int = Field(
        512, ge=1, description="requests waiting per model version; more → RESOURCE_EXHAUSTED"
    )
    batching: Annotated[dict[str, BatchingOverride], NoDecode] = Field(  # JSON read by _json: errors say so
        {},
        description="per-model batching overrides, JSON: "
        '{"fashion_cnn": {"max_batch_rows": 32, "max_queue_delay_us": 500}}; '
        "wins over models/<name>/config.json",
    )
    http_port: int = Field(
        8000, ge=0, le=65535, description="HTTP/REST port of the Open Inference Protocol (0 = no HTTP)"
    )
    http_header_timeout_seconds: float = Field(
        10.0, gt=0, description="time a client gets to send a request's line and headers (slow clients: 408)"
    )
    http_body_timeout_seconds: float = Field(
        30.0, gt=0, description="time a client gets to send a request's body (slow clients: 408)"
    )
    http_keep_alive_seconds: float = Field(
        5.0, gt=0, description="idle HTTP keep-alive connections are closed after this long"
    )
    metrics_port: int = Field(
        8002, ge=0, le=65535, description="Prometheus /metrics HTTP port (0 = no metrics endpoint)"
    )
    max_message_bytes: int | None = Field(
        None,
        ge=64 * 1024,
        description="largest request message or body, in bytes (unset: twice the largest request the models "
        "loaded at start-up accept, at least 4 MiB; set it when larger models may arrive by hot reload)",
    )
    shutdown_grace_seconds: float = Field(
        10.0, ge=0, description="time in-flight calls get to finish on SIGTERM/SIGINT"
    )
    tls_cert: Path | None = Field(None, description="PEM server certificate (enables TLS)")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA bundle; when set, clients must present a certificate it signed"
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG adds one log line per request"
    )
    log_format: Literal["auto", "json", "text"] = Field(
        "auto",
        description="json (one object per line), text (for a person: the start-up line as a summary), "
        "or auto: text when stderr is a terminal, json otherwise (containers, Kubernetes, CI)",
    )
    tracing: bool = Field(
        False,
        description="OpenTelemetry traces of every request, continuing a caller's W3C traceparent (needs the "
        "[otel] extra); exporter, endpoint, sampler and service name from the standard OTEL_* variables",
    )
    # -- hardening (README "Hardening") --------------------------------------------------------
    auth_tokens: Annotated[list[str], NoDecode] = Field(
        [],
        description="bearer tokens accepted as 'authorization: Bearer <token>' metadata, "
        "comma-separated (prefer auth_token_file: flags show up in ps); none here and no "
        "auth_token_file = no auth. Health checks and reflection need no token",
    )
    auth_token_file: Path | None = Field(
        None,
        description="file with one bearer token per line (blank lines and # comments ignored); re-read when it changes",
    )
    auth_token_file_missing: Literal["deny", "keep"] = Field(
        "deny",
        description="when the token file disappears, empties or cannot be read while the server runs: deny "
        "(its tokens stop working: fail closed) or keep (the last good tokens go on working); logged once",
    )
    admin_tokens: Annotated[list[str], NoDecode] = Field(
        [],
        description="bearer tokens allowed to load and unload models (comma-separated); inference tokens get "
        "PERMISSION_DENIED / 403 there. With auth on and no admin token, nobody may; with auth off, anybody may",
    )
    admin_token_file: Path | None = Field(None, description="file of admin tokens, one per line, like auth_token_file")
    max_concurrent_requests: int = Field(
        256,
        ge=1,
        description="calls handled at once (a message on a stream counts as one while it is handled; health "
        "checks are not counted); more → RESOURCE_EXHAUSTED",
    )
    max_inference_streams: int = Field(
        128,
        ge=1,
        description="inference streams (ClassifyStream, ModelStreamInfer) open at once; more → RESOURCE_EXHAUSTED",
    )
    max_metadata_bytes: int = Field(
        16 * 1024, ge=1024, description="largest request metadata (headers), in bytes; more → RESOURCE_EXHAUSTED"
    )
    max_health_watches: int = Field(
        32, ge=1, description="health Watch streams open at once (no token needed; budgeted apart from inference)"
    )
    max_reflection_calls: int = Field(
        8, ge=1, description="server reflection calls at once (no token needed; budgeted apart from inference)"
    )
    stream_idle_timeout_seconds: float = Field(
        60.0, gt=0, description="an inference stream that sends no message for this long is ended (DEADLINE_EXCEEDED)"
    )
    max_streams_per_connection: int = Field(
        1000,
        ge=1,
        description="concurrent gRPC calls on one HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS); keep it "
        "above max_concurrent_requests + max_inference_streams: a new connection's calls beyond it are reset "
        "(REFUSED_STREAM), which gRPC clients report as UNAVAILABLE instead of retrying",
    )
    max_connection_age_seconds: float = Field(
        1800.0,
        ge=0,
        description="gRPC connections are closed (GOAWAY, then a grace of shutdown_grace_seconds) after this "
        "long, so clients reconnect and find new replicas behind a load balancer (0 = never)",
    )
    max_connection_idle_seconds: float = Field(
        300.0, ge=0, description="gRPC connections with no call for this long are closed (0 = never)"
    )
    keepalive_seconds: float = Field(
        60.0,
        gt=0,
        description="the server pings idle gRPC connections this often to find dead peers; clients may ping it "
        "at most every 10 s (more → GOAWAY)",
    )
    reload_interval_seconds: float = Field(
        0.0,
        ge=0,
        description="poll the model repository this often: new versions are loaded, "
        "removed ones drained and unloaded, changed files reloaded (0 = no polling)",
    )
    allow_model_control: bool = Field(
        False,
        description="serve V2 RepositoryModelLoad/RepositoryModelUnload (load, reload or "
        "drain a model on request); off, they answer FAILED_PRECONDITION",
    )
    # -- guarded rollout and payload capture (docs/rollout.md) --------------------------------
    rollout: Annotated[dict[str, RolloutOverride], NoDecode] = Field(  # JSON read by _json
        {},
        description="per-model rollout, JSON: "
        '{"fashion_cnn": {"canary_version": 3, "canary_share": 0.1}} ("*": every model); '
        "wins over models/<name>/config.json",
    )
    rollout_new_versions: Literal["serve", "shadow", "canary"] = Field(
        "serve",
        description="a version that appears on disk while the server runs: serve it as the version policy says "
        "(serve), or start it as the shadow or the canary of the version serving now (per-model: new_versions)",
    )
    rollout_queue_capacity: int = Field(
        1024,
        ge=1,
        description="mirrored requests (shadow, canary checks) waiting per model; more are dropped and counted",
    )
    rollout_queue_bytes: int = Field(
        64 * MiB, ge=MiB, description="bytes of mirrored requests waiting per model; more are dropped and counted"
    )
    rollout_mirror: Literal["process", "batcher"] = Field(
        "process",
        description="where mirrored batches run: a child process per model at idle CPU priority (process), "
        "or the target version's own batcher in the server, when it has no client work (batcher)",
    )
    rollout_audit_file: Path | None = Field(
        None, description="append an audit record (JSON line) per rollout change, rollback and promotion"
    )
    capture_dir: Path | None = Field(
        None, description="capture requests and responses into rotating JSON-lines files here (unset = no capture)"
    )
    capture_share: float = Field(1.0, gt=0, le=1, description="share of inference requests captured")
    capture_models: Annotated[list[str], NoDecode] = Field(
        [], description="models whose requests are captured, comma-separated (empty = all)"
    )
    capture_redact: Annotated[list[str], NoDecode] = Field(
        [],
        description="tensors whose values are never captured, comma-separated: 'name' (any model) or "
        "'model/name'; their name, datatype and shape are kept",
    )
    capture_max_file_bytes: int = Field(64 * MiB, ge=4096, description="a capture file is rotated past this size")
    capture_max_file_seconds: float = Field(3600.0, gt=0, description="a capture file is rotated after this long")
    capture_max_files: int = Field(10, ge=1, description="capture files kept; the oldest are deleted")
    capture_queue_capacity: int = Field(
        4096, ge=1, description="captured requests waiting to be written; more are dropped and counted"
    )
    capture_queue_bytes: int = Field(
        64 * MiB, ge=MiB, description="bytes of captured requests waiting to be written; more are dropped and counted"
    )
    strict_model_loading: bool = Field(
        False,
        description="refuse to start (exit 1) when any model version fails to load at start-up or "
        "the repository holds no model (Triton's --exit-on-error, accepted as an alias); off, the "
        "server starts with what loaded and logs a warning. On in the container image",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _RenamedEnvSource(settings_cls), dotenv_settings, file_secret_settings

    @field_validator("auth_tokens", "admin_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        if isinstance(value, str):  # from a flag or env var: comma-separated
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("auth_tokens", "admin_tokens")
    @classmethod
    def _token_chars(cls, tokens: list[str]) -> list[str]:
        for token in tokens:
            if not token or not all(33 <= ord(c) <= 126 for c in token):
                raise ValueError("auth tokens must be non-empty printable ASCII without spaces")
        return tokens

    @field_validator("capture_models", "capture_redact", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):  # from a flag or env var: comma-separated
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("batching", "rollout", mode="before")
    @classmethod
    def _json(cls, value: object) -> object:
        if isinstance(value, str):  # from a CLI flag
            try:
                return json.loads(value) if value.strip() else {}
            except ValueError as exc:
                raise ValueError(f"expected a JSON object: {exc}") from None
        return value

    @field_validator("workers", mode="before")
    @classmethod
    def _auto_workers(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return usable_cores()
        if isinstance(value, str) and not value.strip().isdigit():
            raise ValueError("expected a whole number of processes or 'auto'")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self

    @property
    def address(self) -> str:
        """``host:port`` to bind (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets), capped by a cgroup v2
    CPU quota (a container's CPU limit), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))  # rounded up
    except (OSError, ValueError):
        pass
    return max(1, cores)


class _RenamedEnvSource(PydanticBaseSettingsSource):
    """The old env var of each renamed setting (:data:`RENAMED`), below the new one."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for old, new in RENAMED.items():
            value = os.environ.get(ENV_PREFIX + old.upper())
            if value is not None and ENV_PREFIX + new.upper() not in os.environ:
                values[new] = value
        return values
