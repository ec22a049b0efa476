"""The model registry: which versions are served now, and their lifecycle.

One code path loads the repository at start-up, follows it on a poll, and serves the model
control RPCs. A round (all models, or the named ones):

1. **Scan** the repository (:mod:`.discovery`) off the event loop, and read each model's
   configuration (:mod:`.model_config`: ``config.pbtxt``, ``config.json``). A file is identified
   by its (mtime, size, inode), so a new version folder, a removed one, a replaced
   ``model.onnx`` and an edited configuration (which reloads the model's versions) are all seen.
   A configuration that does not parse or contradicts itself is a model-level failure: nothing
   new is loaded for that model, and what it serves keeps serving.
2. **Choose and load** the versions the model's **version policy** selects (Triton's
   ``latest { num_versions }`` — by default the latest version only —, ``all`` or ``specific``;
   see :class:`~.model_config.VersionPolicy`): every new or changed file becomes a new
   :class:`ModelVersion` (session, contract, batcher, warm-up, ``model_warmup`` samples) before
   anything is published. A file that does not load (corrupt, half-copied, unsupported types,
   metadata or config.pbtxt that disagrees with the graph, a failed warm-up sample), or whose
   tensors differ from the version clients get today (*incompatible*), is **rejected**: one
   ERROR log line ``"model rejected"`` with the reason, an entry in
   :attr:`ModelRegistry.failures`, and whatever was serving keeps serving (with ``latest`` the
   policy passes over it to the version below). The same file is not retried until it changes
   again. Served versions the policy no longer selects (an older one, once a newer one loaded)
   are retired.
3. **Publish** on the event loop: a new name → version → model dict is swapped in with one
   assignment (never mutated under readers).
4. **Drain** what left the set (a removed version, the old session of a replaced file, an
   unloaded model, a version beyond the policy): wait until its batcher has nothing queued or
   running, then close it (``"model unloaded"`` log line). Requests that already hold the old
   version finish on it.
5. **Listeners** (health) are told.

Why draining is exact: a front end resolves the model and queues its request in the batcher
without yielding the event loop in between, and the drain runs on the event loop after the
publish, so every request that got the old version is already counted in its batcher.

A model unloaded by request stays unloaded (polls leave it alone) until it is loaded by request.
If the repository root cannot be read, nothing is unloaded: that round is skipped and logged.
:meth:`ModelRegistry.index` lists every version it knows (Triton's repository index): served
ones READY, the others UNAVAILABLE with the reason (failed, unloaded, outside the policy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ..observability.statistics import Statistics
from ..settings import Settings
from .batching import Batcher
from .discovery import MODEL_FILE, Failure, Scan, Signature, file_signature, is_model_dir, scan, version_number
from .model_config import ModelSettings, config_signature, load_model_settings
from .runner import Runner
from .runtime import Runtime
from .spec import ModelKey, ModelSpec

if TYPE_CHECKING:
    from ..observability.metrics import Metrics

log = logging.getLogger(__name__)

Listener = Callable[[], Awaitable[None]]
Served = dict[str, dict[int, "ModelVersion"]]
#: A version as loaded: its model.onnx and its model's configuration files.
VersionSignature = tuple[Signature, tuple[Signature | None, Signature | None]]
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


@dataclass(frozen=True)
class Pins:
    """Versions of one model served beside its version policy (guarded rollout, docs/rollout.md):
    ``keep`` (the primary: kept while the policy moves on) and ``side`` (shadow and canary: taken
    out of the policy's choice and served as extras)."""

    keep: frozenset[int] = frozenset()
    side: frozenset[int] = frozenset()


NO_PINS = Pins()


class PinSource(Protocol):
    """Who says which versions are pinned (:class:`~service.rollout.controller.Rollout`). Called
    from the round's worker thread with the model's configuration as read this round."""

    def pins(self, name: str, config: ModelSettings) -> Pins: ...


@dataclass(frozen=True)
class IndexEntry:
    """One row of the repository index (Triton's ``RepositoryIndexResponse.ModelIndex``)."""

    name: str
    version: str
    state: str
    reason: str = ""


class ModelVersion:
    """One loaded model version: its contract, its session and its batch queue."""

    def __init__(
        self,
        spec: ModelSpec,
        path: Path,
        runner: Runner,
        batcher: Batcher,
        settings: ModelSettings | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.spec = spec
        self.path = path
        self.runner = runner
        #: Every inference goes through this queue (dynamic batching, or one request per batch).
        self.batcher = batcher
        #: What its model's configuration files said (config.pbtxt, config.json, settings).
        self.settings = settings if settings is not None else ModelSettings(spec.name)
        self._executor = executor  # its own inference threads (instance_group), if any

    def __repr__(self) -> str:
        return str(self.spec)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> int:
        return self.spec.version

    @property
    def key(self) -> ModelKey:
        return self.spec.key

    @property
    def provider(self) -> str:
        return self.runner.provider

    def close(self) -> None:
        """Refuse new requests (waiting ones get UNAVAILABLE) and, once nothing runs on it, free
        the session now rather than at garbage collection."""
        self.batcher.close()
        if not self.batcher.busy:
            self.runner.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # running batches finish; then its threads end


@dataclass
class ReloadReport:
    """What one round did."""

    loaded: list[ModelKey] = field(default_factory=list)  # newly served: new versions, replaced files
    unloaded: list[ModelKey] = field(default_factory=list)  # no longer served (drained)
    rejected: dict[ModelKey, str] = field(default_factory=dict)  # the previous one serves on
    skipped: bool = False  # the repository root could not be read: nothing changed

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.unloaded)


@dataclass
class _Plan:
    """The outcome of the scan + load step (worker thread), published on the event loop."""

    scope: set[str] | None
    add: list[ModelVersion] = field(default_factory=list)
    remove: list[ModelKey] = field(default_factory=list)
    signatures: dict[ModelKey, VersionSignature] = field(default_factory=dict)
    rejected: dict[ModelKey, tuple[VersionSignature | None, str]] = field(default_factory=dict)
    scan: Scan = field(default_factory=Scan)
    skipped: bool = False
    #: Whether ``scan`` is a real scan of the scope (not a bare unload).
    scanned: bool = False
    #: Why a removed version goes (default: removed from the repository).
    reasons: dict[ModelKey, str] = field(default_factory=dict)
    #: Model-level problems (configuration) and versions a specific policy names but lacks.
    problems: dict[Failure, str] = field(default_factory=dict)
    #: The versions each model's policy considered this round (its failures stay listed).
    examined: dict[str, set[int]] = field(default_factory=dict)
    #: Each model's configuration as read this round.
    configs: dict[str, ModelSettings] = field(default_factory=dict)
    #: Held (rolled-back) versions whose file changed or went away: served again if selected.
    released: list[ModelKey] = field(default_factory=list)


class ModelRegistry:
    """The versions served from ``root`` and their lifecycle (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        settings: Settings,
        runtime: Runtime | None = None,
        metrics: Metrics | None = None,
        statistics: Statistics | None = None,
    ) -> None:
        self.root = Path(root)
        self.settings = settings
        self.runtime = runtime if runtime is not None else Runtime(settings)
        self.metrics = metrics
        #: Triton's per-version statistics (also an observer of the data plane).
        self.statistics = statistics if statistics is not None else Statistics()
        self.listeners: list[Listener] = []
        #: What failed to load and why; a failed version whose predecessor serves is listed too.
        self.failures: dict[Failure, str] = {}
        self._models: Served = {}
        self._loaded = False
        self._executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="infer")
        self._drain_timeout = max(settings.shutdown_grace_seconds, 1.0)
        self._signatures: dict[ModelKey, VersionSignature] = {}  # the files being served
        self._rejected: dict[ModelKey, VersionSignature | None] = {}  # files rejected, until they change
        self._unloaded: set[str] = set()  # models unloaded by request
        # For the repository index: versions on disk per model (last scan), each model's policy,
        # why a version was unloaded.
        self._disk: dict[str, set[int]] = {}
        self._configs: dict[str, ModelSettings] = {}
        self._unload_reasons: dict[ModelKey, str] = {}
        self._config_cache: dict[str, tuple[object, ModelSettings | str]] = {}
        self._lock: asyncio.Lock | None = None
        self._drains: set[asyncio.Task[None]] = set()
        self._retired: set[ModelVersion] = set()
        #: Versions served beside the version policy (set by the rollout controller).
        self.rollout: PinSource | None = None
        #: Rolled-back versions: (their file when held, why); not served until the file changes.
        self._held: dict[ModelKey, tuple[Signature | None, str]] = {}

    # -- lookup (event loop; never blocks) ------------------------------------------------------

    @property
    def loaded(self) -> bool:
        """The first round (start-up) is done."""
        return self._loaded

    @property
    def ready(self) -> bool:
        """True once the first round finished with at least one model version to serve."""
        return self._loaded and bool(self._models)

    @property
    def failed(self) -> dict[str, str]:
        """:attr:`failures` keyed as ``name`` or ``name/version`` (the form clients see)."""
        return {str(key): why for key, why in self.failures.items()}

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[int]:
        return sorted(self._models.get(name, {}))

    def models(self) -> list[ModelVersion]:
        snapshot = self._models  # read once: a round swaps in a whole new dict
        return [snapshot[n][v] for n in sorted(snapshot) for v in sorted(snapshot[n])]

    def largest_request(self) -> int | None:
        """Wire bytes of the largest request any served version accepts (:attr:`ModelSpec.wire_bytes`;
        None: unbounded, or nothing served)."""
        sizes = [m.spec.wire_bytes for m in self.models()]
        if not sizes or None in sizes:
            return None
        return max(s for s in sizes if s is not None)

    def snapshot(self) -> Served:
        """The served versions, name → version → model; never mutated once published."""
        return self._models

    def model_settings(self, name: str) -> ModelSettings | None:
        """The model's configuration as last read (None before its first round)."""
        return self._configs.get(name)

    def hold(self, key: ModelKey, reason: str) -> None:
        """Take a version out of service (a rolled-back canary) until its model.onnx changes or
        :meth:`release`; the next round of the model retires it."""
        served = self._signatures.get(key)
        file = served[0] if served is not None else file_signature(self.root / key.name / str(key.version) / MODEL_FILE)
        self._held[key] = (file, reason)

    def release(self, key: ModelKey) -> None:
        """Serve a held version again (it loads on the next round of its model)."""
        self._held.pop(key, None)

    def held(self, name: str) -> dict[int, str]:
        """The model's held versions and why."""
        return {k.version: why for k, (_, why) in self._held.items() if k.name == name}

    def get(self, name: str, version: int | str | None = None) -> ModelVersion:
        """The version asked for; ``None``, ``""`` or ``0`` → the latest."""
        if not self._loaded:
            raise Unavailable("the model repository is still loading; retry shortly")
        if not name:
            raise InvalidArgument(f"a model name is required; available models: {self.names()}")
        versions = self._models.get(name)
        if not versions:
            reasons = {str(k): v for k, v in self.failures.items() if k.model == name}
            why = f" (failed to load: {reasons})" if reasons else ""
            raise NotFound(f"model '{name}' not found{why}; available models: {self.names()}")
        if not version:
            return versions[max(versions)]
        if isinstance(version, str):
            try:
                version = int(version)
            except ValueError:
                raise InvalidArgument(f"model version must be an integer, got {version!r}") from None
        found = versions.get(version)
        if found is None:
            raise NotFound(f"version {version} of model '{name}' not found; available versions: {sorted(versions)}")
        return found

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Triton's repository index: every served version READY; every version on disk that is
        not served, every failed version and every failed model (version "") UNAVAILABLE with
        the reason."""
        served = self._models
        failures = self.failures
        by_model: dict[str, set[str]] = {}
        for name, versions in served.items():
            by_model.setdefault(name, set()).update(str(v) for v in versions)
        if not ready_only:
            for name, on_disk in self._disk.items():
                by_model.setdefault(name, set()).update(str(v) for v in on_disk)
            for failure in failures:
                by_model.setdefault(failure.model, set()).add(failure.version)
        entries = []
        for name in sorted(by_model):
            model_failure = failures.get(Failure(name))
            for version in sorted(by_model[name], key=lambda v: (version_number(v) or 0, v)):
                number = version_number(version)
                if number is not None and number in served.get(name, {}):
                    entries.append(IndexEntry(name, version, READY))
                    continue
                if ready_only:
                    continue
                if not version:
                    entries.append(IndexEntry(name, "", UNAVAILABLE, model_failure or ""))
                    continue
                why = failures.get(Failure(name, version))
                if why is None and number is not None:
                    key = ModelKey(name, number)
                    if name in self._unloaded:
                        why = "unloaded: unload requested"
                    elif key in self._held:
                        why = f"rolled back: {self._held[key][1]}"
                    elif key in self._unload_reasons:
                        why = f"unloaded: {self._unload_reasons[key]}"
                    elif model_failure:
                        why = f"not loaded: {model_failure}"
                    else:
                        policy = self._configs[name].version_policy if name in self._configs else None
                        why = f"not served: outside the version policy {policy}" if policy else "not loaded"
                entries.append(IndexEntry(name, version, UNAVAILABLE, why or ""))
        return entries

    # -- lifecycle (event loop) -----------------------------------------------------------------

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def start(self) -> ReloadReport:
        """The first round: load everything on disk. FileNotFoundError when the root is not a
        directory (a configuration error: the server must not start)."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        return await self.reload(trigger="startup")

    async def reload(
        self, names: Collection[str] | None = None, *, explicit: bool = False, trigger: str = "poll"
    ) -> ReloadReport:
        """Bring the named models (all when None) in step with the disk; wait for the drains.
        ``explicit`` (a load request) also brings back models unloaded by request."""
        scope = set(names) if names is not None else None
        async with self._guard():
            if explicit and scope:
                self._unloaded -= scope
            plan = await asyncio.get_running_loop().run_in_executor(None, self._prepare, scope)
            if plan.skipped:
                log.error("model repository cannot be read; nothing reloaded", extra={"root": str(self.root)})
                return ReloadReport(skipped=True)
            report, retired = self._publish(plan, trigger)
            self._loaded = True
            await self._notify()
        await self._drain_all(retired)
        return report

    async def unload(self, name: str) -> ReloadReport:
        """Stop serving every version of ``name``, drain them, and keep it unloaded (also across
        polls) until it is loaded by request."""
        async with self._guard():
            snapshot = self._models
            if name not in snapshot and name not in self._unloaded and not is_model_dir(self.root, name):
                raise NotFound(f"model {name!r} is neither loaded nor in the repository; models: {sorted(snapshot)}")
            self._unloaded.add(name)
            plan = _Plan(scope={name}, remove=[ModelKey(name, v) for v in sorted(snapshot.get(name, {}))])
            report, retired = self._publish(plan, "request", reason="unload requested")
            await self._notify()
        await self._drain_all(retired)
        return report

    async def load(self, name: str) -> ReloadReport:
        """(Re)load ``name`` from disk; FailedPrecondition unless it ends up served with every
        version its policy selects loaded."""
        if not is_model_dir(self.root, name):
            raise NotFound(f"no model directory {name!r} in the repository; models: {self.names()}")
        report = await self.reload([name], explicit=True, trigger="request")
        if report.skipped:
            raise FailedPrecondition("the model repository cannot be read")
        if not is_model_dir(self.root, name):
            raise NotFound(f"model directory {name!r} went away while loading")
        served = self.versions(name)
        rejected = {str(k): v for k, v in self.failures.items() if k.model == name}
        if rejected or not served:
            serving = f"; still serving versions {served}" if served else "; nothing is served"
            raise FailedPrecondition(f"model '{name}' did not load cleanly: {rejected}{serving}")
        return report

    async def stop(self) -> None:
        """Close everything (the server has stopped taking calls and the grace is over): drains
        in progress end, onnxruntime runs still in progress are terminated (a run longer than the
        grace would otherwise hold the exit until it ends), the inference threads stop."""
        for task in list(self._drains):
            task.cancel()
        for model in [*self._retired, *self.models()]:
            model.close()
            model.runner.terminate()
        self._retired.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        """:meth:`stop` without an event loop (in-process users: the batch job, tests)."""
        for model in [*self._retired, *self.models()]:
            model.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _notify(self) -> None:
        for listener in self.listeners:
            try:
                await listener()
            except Exception:  # a listener must not break a round
                log.exception("registry listener failed")

    # -- step 1-2: scan and load (worker thread) ------------------------------------------------

    def load_version(self, key: ModelKey, path: Path, config: ModelSettings | None = None) -> ModelVersion:
        """Load one version: session, contract, batcher, warm-up (ValueError & co when unusable)."""
        settings = self.settings
        if config is None:
            config = load_model_settings(settings, path.parent.parent, self.runtime.providers)
        runner = self.runtime.load(path, f"model '{key.name}' version {key.version}", config.providers)
        try:
            spec = runner.spec(key, config.max_request_rows(settings.max_request_rows))
            config.check(spec)
            warmup = config.warmup(spec)
        except Exception:
            runner.close()
            raise
        executor = None
        if config.instances is not None:  # instance_group: inference threads of its own
            executor = ThreadPoolExecutor(config.instances, thread_name_prefix=f"infer-{key.name}-{key.version}")
        batcher = Batcher(
            str(spec),
            runner.run,
            executor or self._executor,
            config.batching,
            config.instances or settings.inference_workers,
            self.metrics.for_model(key.name, key.version) if self.metrics is not None else None,
            spec.batchable,
            settings.inline_compute_us,
            self.statistics.for_model(key.name, key.version),
        )
        model = ModelVersion(spec, path, runner, batcher, config, executor)
        try:
            rows = [1, 16] if batcher.batching and spec.max_rows >= 16 else [1]
            timings = runner.warm_up(spec, rows)
            if timings:  # the batcher's cost model: which batches are cheap enough to run inline
                per_row = (timings[16] - timings[1]) / 15 if 16 in timings else 0.0
                batcher.calibrate(timings[1] - per_row, per_row)
            for name, feeds, runs in warmup:  # config.pbtxt model_warmup: a failure rejects the version
                try:
                    for _ in range(runs):
                        runner.run(feeds, spec.output_names)
                except Exception as exc:
                    raise ValueError(f"model_warmup sample '{name}' failed: {exc}") from None
        except Exception:
            model.close()
            raise
        return model

    def _model_config(self, name: str) -> ModelSettings | str:
        """The model's configuration, or why it is unusable (cached until its files change)."""
        model_dir = self.root / name
        signature = config_signature(model_dir)
        cached = self._config_cache.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            result: ModelSettings | str = load_model_settings(self.settings, model_dir, self.runtime.providers)
        except Exception as exc:  # a bad config.pbtxt / config.json: the whole model
            result = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
        self._config_cache[name] = (signature, result)
        return result

    def _prepare(self, scope: set[str] | None) -> _Plan:
        found_scan = scan(self.root, scope)
        if found_scan is None:
            return _Plan(scope=scope, skipped=True)
        plan = _Plan(scope=scope, scan=found_scan, scanned=True)
        current = self._models
        names = set(found_scan.found) | {n for n in current if scope is None or n in scope}
        for name in sorted(names):
            served = current.get(name, {})
            disk = {} if name in self._unloaded else found_scan.found.get(name, {})
            for version in sorted(set(served) - set(disk)):
                plan.remove.append(ModelKey(name, version))
            if not disk:
                plan.examined[name] = set()
                continue
            config = self._model_config(name)
            if isinstance(config, str):  # nothing new loads; what serves keeps serving
                plan.problems[Failure(name)] = config
                continue
            plan.configs[name] = config
            self._plan_versions(plan, name, served, disk, config)
        return plan

    def _plan_versions(
        self, plan: _Plan, name: str, served: dict[int, ModelVersion], disk: dict[int, Path], config: ModelSettings
    ) -> None:
        """Apply the model's version policy: load what it selects, retire what it no longer does.
        Pinned versions (guarded rollout) are served beside the policy's choice; held (rolled-back)
        ones are passed over like a rejected file."""
        policy = config.version_policy
        for version in policy.missing(list(disk)):
            plan.problems[Failure(name, str(version))] = (
                f"version_policy {policy} names version {version}, which is not in the repository"
            )
        pins = self.rollout.pins(name, config) if self.rollout is not None else NO_PINS
        held = self._holding(plan, name, disk)
        # What clients get today and keep getting: the latest version that stays on disk.
        staying = [v for v in served if v in disk]
        reference = served[max(staying)] if staying else None
        chosen: list[int] = []  # served after this round
        examined: set[int] = set()
        for version in policy.order(list(disk)):
            if version in held or version in pins.side:
                continue
            if policy.limit is not None and len(chosen) >= policy.limit:
                break
            examined.add(version)
            if self._consider(plan, ModelKey(name, version), disk[version], served, reference, config):
                chosen.append(version)
        for version in sorted((pins.keep | pins.side) - set(chosen) - held):
            if version in disk:
                examined.add(version)
                if self._consider(plan, ModelKey(name, version), disk[version], served, reference, config):
                    chosen.append(version)
        plan.examined[name] = examined
        for version in sorted(served):
            if version in disk and version not in chosen and ModelKey(name, version) not in plan.remove:
                key = ModelKey(name, version)
                plan.remove.append(key)
                plan.reasons[key] = (
                    f"rolled back: {self._held[key][1]}"
                    if version in held
                    else f"version policy {policy} serves versions {sorted(chosen)}"
                )

    def _holding(self, plan: _Plan, name: str, disk: dict[int, Path]) -> set[int]:
        """The model's held versions whose file is unchanged; the others are released at publish."""
        held: set[int] = set()
        for key, (file, _) in list(self._held.items()):
            if key.name != name:
                continue
            path = disk.get(key.version)
            if path is not None and file is not None and file_signature(path) == file:
                held.add(key.version)
            else:
                plan.released.append(key)
        return held

    def _consider(
        self,
        plan: _Plan,
        key: ModelKey,
        path: Path,
        served: dict[int, ModelVersion],
        reference: ModelVersion | None,
        config: ModelSettings,
    ) -> bool:
        """Plan one version the policy (or a pin) selects: unchanged, (re)loaded, or rejected.
        Whether it is served after the round."""
        version = key.version
        file = file_signature(path)
        if file is None:
            if version in served:  # the file went away: unload that version
                plan.remove.append(key)
            elif self._rejected.get(key, ()) is not None:
                plan.rejected[key] = (None, f"{key.name}/{key.version}/model.onnx is missing")
            return False
        signature: VersionSignature = (file, config.signature)
        if version in served and self._signatures.get(key) == signature:
            return True  # unchanged
        if key in self._rejected and self._rejected[key] == signature:
            return version in served  # rejected before and unchanged: no retry; the old file serves on
        model = self._try_load(key, path, signature, served.get(version) or reference, plan, config)
        if model is not None:
            plan.add.append(model)
        return model is not None or version in served

    def _try_load(
        self,
        key: ModelKey,
        path: Path,
        signature: VersionSignature,
        reference: ModelVersion | None,
        plan: _Plan,
        config: ModelSettings | None = None,
    ) -> ModelVersion | None:
        try:
            model = self.load_version(key, path, config)
        except Exception as exc:  # any broken file: reject it, serve on
            plan.rejected[key] = (signature, f"{type(exc).__name__}: {exc}")
            return None
        if reference is not None and model.spec.signature() != reference.spec.signature():
            (want_in, want_out), (got_in, got_out) = reference.spec.signature(), model.spec.signature()
            plan.rejected[key] = (
                signature,
                f"incompatible with {reference}: inputs {got_in} / outputs {got_out}, but clients "
                f"are served inputs {want_in} / outputs {want_out}; publish a changed signature "
                "under a new model name",
            )
            model.close()
            return None
        plan.signatures[key] = signature
        return model

    # -- step 3: publish (event loop) -----------------------------------------------------------

    def _publish(
        self, plan: _Plan, trigger: str, reason: str | None = None
    ) -> tuple[ReloadReport, list[tuple[ModelVersion, str]]]:
        models = {name: dict(versions) for name, versions in self._models.items()}
        report = ReloadReport()
        for key in plan.released:
            self._held.pop(key, None)
        retired: list[tuple[ModelVersion, str]] = []
        for key in plan.remove:
            model = models.get(key.name, {}).pop(key.version, None)
            if model is None:
                continue
            if not models[key.name]:
                del models[key.name]
            self._signatures.pop(key, None)
            report.unloaded.append(key)
            why = plan.reasons.get(key, reason or "removed from the repository")
            self._unload_reasons[key] = why
            retired.append((model, why))
        for model in plan.add:
            key = model.key
            old = models.setdefault(key.name, {}).get(key.version)
            models[key.name][key.version] = model
            self._signatures[key] = plan.signatures[key]
            self._rejected.pop(key, None)
            self._unload_reasons.pop(key, None)
            report.loaded.append(key)
            if old is not None:
                retired.append((old, "reloaded: its model.onnx or its model's configuration changed"))
            inputs, outputs = model.spec.signature()
            log.info(
                "model loaded",
                extra={
                    "model": key.name,
                    "version": key.version,
                    "provider": model.provider,
                    "inputs": inputs,
                    "outputs": outputs,
                    "batching": {**model.batcher.config.describe(), "enabled": model.batcher.batching},
                    "max_request_rows": model.spec.max_rows,
                    "instances": model.batcher.max_in_flight,
                    "version_policy": str(model.settings.version_policy),
                    "replaced": old is not None,
                    "trigger": trigger,
                },
            )
        on_disk = plan.scan.on_disk
        for key in list(self._rejected):  # forget rejections of folders that are gone or out of the policy
            if (plan.scope is None or key.name in plan.scope) and (
                str(key.version) not in on_disk.get(key.name, ())
                or (key.name in plan.examined and key.version not in plan.examined[key.name])
            ):
                del self._rejected[key]
        if plan.scanned:  # what the repository index lists besides served versions
            in_scope = [n for n in {*self._disk, *plan.scan.found} if plan.scope is None or n in plan.scope]
            for name in in_scope:
                if name in plan.scan.found:
                    self._disk[name] = set(plan.scan.found[name])
                else:
                    self._disk.pop(name, None)
                if name in plan.configs:
                    self._configs[name] = plan.configs[name]
            for key in list(self._unload_reasons):
                if key.name in in_scope and key.version not in self._disk.get(key.name, ()):
                    del self._unload_reasons[key]
        failures = self._failures_after(plan)
        for key, (signature, why) in plan.rejected.items():
            serving = models.get(key.name, {})
            if key.version in serving:
                why += "; the previously loaded file keeps serving"
            elif serving:
                why += f"; versions {sorted(serving)} keep serving"
            self._rejected[key] = signature
            log.error(
                "model rejected", extra={"model": key.name, "version": key.version, "error": why, "trigger": trigger}
            )
            why = self._public(why)  # what clients see: no paths of this machine
            failures[Failure(key.name, str(key.version))] = why
            report.rejected[key] = why
        for failure, why in {**plan.scan.problems, **plan.problems}.items():
            if failure not in self.failures:
                log.error("model rejected", extra={"model": str(failure), "error": why, "trigger": trigger})
        self.failures = failures
        self._models = models  # one assignment: readers see the old set or the new
        if report.changed or report.rejected:
            log.info(
                "model repository reloaded",
                extra={
                    "loaded": [str(k) for k in report.loaded],
                    "unloaded": [str(k) for k in report.unloaded],
                    "rejected": sorted(str(k) for k in report.rejected),
                    "trigger": trigger,
                    "models": {n: sorted(v) for n, v in sorted(models.items())},
                },
            )
        return report, retired

    def _public(self, reason: str) -> str:
        """``reason`` with the repository's absolute path taken out (onnxruntime and file errors
        name the files they read): clients see paths inside the repository only."""
        for root in {str(self.root.resolve()), str(self.root.absolute()), str(self.root)}:
            if root not in (".", ""):
                reason = reason.replace(root + "/", "").replace(root, "the model repository")
        return reason

    def _failures_after(self, plan: _Plan) -> dict[Failure, str]:
        """:attr:`failures` after this round: out-of-scope entries kept; in scope, a version stays
        listed while it is still rejected (unchanged since) and its folder exists; folder problems
        come from the scan. This round's rejections are added by the caller."""
        failures: dict[Failure, str] = {}
        on_disk = plan.scan.on_disk
        for failure, why in self.failures.items():
            name, version = failure
            if (plan.scope is not None and name not in plan.scope) or (
                version
                and name not in self._unloaded
                and version in on_disk.get(name, ())
                and (number := version_number(version)) is not None
                and ModelKey(name, number) in self._rejected
            ):
                failures[failure] = why
        for problems in (plan.scan.problems, plan.problems):
            failures.update({k: self._public(v) for k, v in problems.items() if k.model not in self._unloaded})
        return failures

    # -- step 4: drain (event loop) -------------------------------------------------------------

    async def _drain_all(self, retired: list[tuple[ModelVersion, str]]) -> None:
        if not retired:
            return
        tasks = []
        for model, reason in retired:
            self._retired.add(model)
            task = asyncio.get_running_loop().create_task(self._drain(model, reason))
            self._drains.add(task)
            task.add_done_callback(self._drains.discard)
            tasks.append(task)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, model: ModelVersion, reason: str) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        busy_at_start = model.batcher.busy
        idle = await model.batcher.wait_idle(self._drain_timeout)
        # Timed out: not closed; its queued and running requests finish on it, and the session
        # goes when the last of them does (garbage collection).
        if idle:
            model.close()
        self._retired.discard(model)
        log.info(
            "model unloaded",
            extra={
                "model": model.name,
                "version": model.version,
                "reason": reason,
                "drained": busy_at_start,
                "drain_seconds": round(loop.time() - start, 3),
                "drain_timed_out": not idle,
            },
        )


class RepositoryPoller:
    """Calls :meth:`ModelRegistry.reload` every ``interval`` seconds until stopped."""

    def __init__(self, registry: ModelRegistry, interval: float) -> None:
        self.registry = registry
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="model-repository-poll")
            log.info("watching the model repository", extra={"interval_seconds": self.interval})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.registry.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watcher die
                log.exception("model repository poll failed")
