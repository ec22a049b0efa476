"""Hot model reload: the repository on disk is rescanned and the served versions follow it.

Triggered by a poll every ``reload_interval_seconds`` (0 = off) and by the V2
``RepositoryModelLoad`` / ``RepositoryModelUnload`` RPCs (with ``allow_model_control``).

One reload, for all models or the named ones:

1. **Scan** ``<root>/<name>/<version>/model.onnx`` (off the event loop). A file is identified by
   (mtime, size, inode), so a new version directory, a removed one and a replaced ``model.onnx``
   are all seen.
2. **Load and validate** every new or changed file into a new session, before anything is
   published. A file that does not load (corrupt, half-copied, unsupported types, metadata that
   disagrees with the graph) or whose inputs/outputs differ from the version clients get today
   (*incompatible*) is **rejected**: one ERROR log line ``"model rejected"`` with the reason, an
   entry in ``failed`` (ListModels), and whatever was serving keeps serving. The same file is
   not retried until it changes again.
3. **Publish** on the event loop: a new name → version → model dict is built and swapped in with
   one assignment (never mutated under readers). New requests see the new set at once.
4. **Drain** what left the set (a removed version, the old session of a replaced file, an
   unloaded model): wait until its batcher has nothing queued or running, then close it and drop
   its session (``"model unloaded"`` log line). Requests that already hold the old version finish
   on it, so a reload under load fails no request.
5. **Health** follows (per model and overall), through the listeners (the server's health update).

Why draining is exact: an adapter resolves the model and queues its request in the batcher
without yielding the event loop in between, and the drain check runs on the event loop after the
publish, so every request that got the old version is already counted in its batcher.

A model unloaded by RPC stays unloaded (the poll leaves it alone) until a RepositoryModelLoad.
If the repository root cannot be read, nothing is unloaded: that round is skipped and logged.
Write new files atomically (copy elsewhere, then ``mv`` into place) so a poll never sees half a
file; if it does, the half file is rejected and the complete one loads on the next poll.
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FailedPrecondition, NotFound
from .repository import MODEL_FILE, Model, ModelRepository
from .settings import Settings

log = logging.getLogger(__name__)

Signature = tuple[int, int, int]  # st_mtime_ns, st_size, st_ino of a model.onnx
Listener = Callable[[], Awaitable[None]]
DRAIN_POLL_SECONDS = 0.01


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _tensors(model: Model) -> tuple[list[str], list[str]]:
    def fmt(specs: list) -> list[str]:
        return [f"{s.name} {s.dtype.name} {s.shape_str()}" for s in specs]

    return fmt(model.inputs), fmt(model.outputs)


def _busy(model: Model) -> bool:
    """Whether ``model`` still has requests queued or running in its batcher."""
    batcher = getattr(model, "batcher", None)
    return batcher is not None and bool(batcher.depth or batcher.in_flight)


@dataclass
class ReloadReport:
    """What one reload did, as ``name/version`` keys."""

    loaded: list[str] = field(default_factory=list)  # newly served: new versions and replaced files
    unloaded: list[str] = field(default_factory=list)  # no longer served (drained)
    rejected: dict[str, str] = field(default_factory=dict)  # key → reason; the previous one serves on
    skipped: bool = False  # the repository root could not be read: nothing changed

    @property
    def changed(self) -> bool:
        return bool(self.loaded or self.unloaded)


@dataclass
class _Plan:
    """The outcome of the scan + load step, published on the event loop."""

    scope: set[str] | None
    add: list[Model] = field(default_factory=list)
    remove: list[tuple[str, int]] = field(default_factory=list)
    signatures: dict[str, Signature] = field(default_factory=dict)
    rejected: dict[str, tuple[Signature | None, str]] = field(default_factory=dict)
    on_disk: dict[str, set[str]] = field(default_factory=dict)  # model → version dir names
    problems: dict[str, str] = field(default_factory=dict)  # bad directories (not rejections)
    skipped: bool = False


class ModelReloader:
    """Keeps a :class:`ModelRepository` in step with its directory (see the module docstring)."""

    def __init__(self, repository: ModelRepository, settings: Settings) -> None:
        self.repository = repository
        self.interval = settings.reload_interval_seconds
        self.drain_timeout = max(settings.shutdown_grace_seconds, 1.0)
        self.listeners: list[Listener] = []
        self._signatures: dict[str, Signature] = {}  # key → file signature being served
        self._rejected: dict[str, Signature | None] = {}  # key → signature of the rejected file
        self._unloaded: set[str] = set()  # models unloaded by request
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._drains: set[asyncio.Task] = set()
        self._retired: set[Model] = set()
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Record the files loaded at start-up; start polling when an interval is set."""
        for model in self.repository.models():
            signature = _signature(model.path)
            if signature is not None:
                self._signatures[f"{model.name}/{model.version}"] = signature
        for key in self.repository.failed:
            if "/" in key:  # a version that failed at start-up: retried only once it changes
                self._rejected[key] = _signature(self.repository.root / key / MODEL_FILE)
        self._started = True
        if self.interval > 0:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="model-reload-poll")
            log.info("watching the model repository", extra={"interval_seconds": self.interval})

    async def stop(self) -> None:
        """Stop polling; close whatever is still draining (the server is stopping)."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        for task in list(self._drains):
            task.cancel()
        for model in list(self._retired):
            self._close(model)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the watcher die
                log.exception("model repository poll failed")

    # -- reload / unload -------------------------------------------------------------------

    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def reload(self, names: Collection[str] | None = None, *, explicit: bool = False) -> ReloadReport:
        """Bring the named models (all when None) in step with the disk; wait for the drains.

        ``explicit`` (an RPC) also brings back models unloaded by request.
        """
        scope = set(names) if names is not None else None
        async with self._guard():
            if explicit and scope:
                self._unloaded -= scope
            loop = asyncio.get_running_loop()
            plan = await loop.run_in_executor(None, self._prepare, scope)
            if plan.skipped:
                return ReloadReport(skipped=True)
            report, retired = self._publish(plan)
            await self._notify()
        await self._drain_all(retired)
        return report

    def _on_disk(self, name: str) -> bool:
        """Whether ``name`` is a model directory of the repository: matched against the listing,
        never joined into a path (no ``..``, ``/``, NUL or over-long names reach the filesystem)."""
        if not name or name.startswith((".", "_")) or len(name) > 255:
            return False
        try:
            return any(p.name == name and p.is_dir() for p in self.repository.root.iterdir())
        except OSError:
            return False

    async def unload(self, name: str) -> ReloadReport:
        """Stop serving every version of ``name``, drain them, and keep it unloaded (also across
        polls) until :meth:`reload` is called for it explicitly."""
        async with self._guard():
            snapshot = self.repository.snapshot()
            if name not in snapshot and name not in self._unloaded and not self._on_disk(name):
                raise NotFound(f"model {name!r} is neither loaded nor in the repository; models: {sorted(snapshot)}")
            self._unloaded.add(name)
            plan = _Plan(scope={name}, remove=[(name, v) for v in sorted(snapshot.get(name, {}))])
            plan.on_disk = {}
            report, retired = self._publish(plan, reason="unload requested")
            await self._notify()
        await self._drain_all(retired)
        return report

    async def load(self, name: str) -> ReloadReport:
        """RepositoryModelLoad: (re)load ``name`` from disk; FailedPrecondition unless it ends up
        served with every version on disk loaded."""
        if not self._on_disk(name):
            raise NotFound(f"no model directory {name!r} in the repository; models: {self.repository.names()}")
        report = await self.reload([name], explicit=True)
        if report.skipped:
            raise FailedPrecondition(f"the model repository {self.repository.root} cannot be read")
        if not self._on_disk(name):
            raise NotFound(f"model directory {name!r} went away while loading")
        served = self.repository.versions(name)
        rejected = {k: v for k, v in self.repository.failed.items() if k == name or k.startswith(name + "/")}
        if rejected or not served:
            serving = f"; still serving versions {served}" if served else "; nothing is served"
            raise FailedPrecondition(f"model '{name}' did not load cleanly: {rejected}{serving}")
        return report

    async def _notify(self) -> None:
        for listener in self.listeners:
            try:
                await listener()
            except Exception:  # a listener must not break a reload
                log.exception("reload listener failed")

    # -- step 1-2: scan and load (worker thread) -------------------------------------------

    def _scan(self, scope: set[str] | None) -> tuple[dict[str, dict[int, Path]], dict[str, set[str]], dict[str, str]] | None:
        root = self.repository.root
        try:
            entries = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
        except OSError as exc:
            log.error("model repository cannot be read; nothing reloaded", extra={"root": str(root), "error": str(exc)})
            return None
        found: dict[str, dict[int, Path]] = {}
        on_disk: dict[str, set[str]] = {}
        problems: dict[str, str] = {}
        for model_dir in entries:
            name = model_dir.name
            if scope is not None and name not in scope:
                continue
            try:
                version_dirs = [p for p in model_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
            except OSError:
                continue
            on_disk[name] = {p.name for p in version_dirs}
            if not version_dirs:
                problems[name] = f"no version directories; expected {model_dir}/<version>/{MODEL_FILE}"
            for version_dir in version_dirs:
                if not version_dir.name.isdigit() or int(version_dir.name) < 1:
                    problems[f"{name}/{version_dir.name}"] = (
                        f"version directory must be a positive integer, got {version_dir.name!r}"
                    )
                    continue
                found.setdefault(name, {})[int(version_dir.name)] = version_dir / MODEL_FILE
        return found, on_disk, problems

    def _prepare(self, scope: set[str] | None) -> _Plan:
        scanned = self._scan(scope)
        if scanned is None:
            return _Plan(scope=scope, skipped=True)
        found, on_disk, problems = scanned
        plan = _Plan(scope=scope, on_disk=on_disk, problems=problems)
        current = self.repository.snapshot()
        names = set(found) | {n for n in current if scope is None or n in scope}
        for name in sorted(names):
            served = current.get(name, {})
            disk = {} if name in self._unloaded else found.get(name, {})
            for version in sorted(set(served) - set(disk)):
                plan.remove.append((name, version))
            # What clients get today and keep getting: the latest version that stays on disk.
            staying = [v for v in served if v in disk]
            reference = served[max(staying)] if staying else None
            for version, path in sorted(disk.items()):
                key = f"{name}/{version}"
                signature = _signature(path)
                if signature is None:
                    if version in served:  # the file went away: unload that version
                        plan.remove.append((name, version))
                    elif self._rejected.get(key, ()) is not None:
                        plan.rejected[key] = (None, f"{path} is missing")
                    continue
                if version in served and self._signatures.get(key) == signature:
                    continue  # unchanged
                if key in self._rejected and self._rejected[key] == signature:
                    continue  # rejected before and unchanged: no retry, no new log line
                model = self._load(name, version, path, signature, served.get(version) or reference, plan)
                if model is not None:
                    plan.add.append(model)
        return plan

    def _load(
        self, name: str, version: int, path: Path, signature: Signature, reference: Model | None, plan: _Plan
    ) -> Model | None:
        key = f"{name}/{version}"
        try:
            model = self.repository._load_version(name, version, path)
        except Exception as exc:  # any broken file: reject it, serve on
            plan.rejected[key] = (signature, f"{type(exc).__name__}: {exc}")
            return None
        if reference is not None and _tensors(model) != _tensors(reference):
            (want_in, want_out), (got_in, got_out) = _tensors(reference), _tensors(model)
            plan.rejected[key] = (
                signature,
                f"incompatible with {reference}: inputs {got_in} / outputs {got_out}, but clients "
                f"are served inputs {want_in} / outputs {want_out}; publish a changed signature "
                "under a new model name",
            )
            if hasattr(model, "close"):
                model.close()
            return None
        plan.signatures[key] = signature
        return model

    # -- step 3: publish (event loop) ------------------------------------------------------

    def _publish(self, plan: _Plan, reason: str | None = None) -> tuple[ReloadReport, list[tuple[Model, str]]]:
        current = self.repository.snapshot()
        models = {name: dict(versions) for name, versions in current.items()}
        report = ReloadReport()
        retired: list[tuple[Model, str]] = []
        for name, version in plan.remove:
            model = models.get(name, {}).pop(version, None)
            if model is None:
                continue
            if not models[name]:
                del models[name]
            key = f"{name}/{version}"
            self._signatures.pop(key, None)
            report.unloaded.append(key)
            retired.append((model, reason or "removed from the repository"))
        for model in plan.add:
            key = f"{model.name}/{model.version}"
            old = models.setdefault(model.name, {}).get(model.version)
            models[model.name][model.version] = model
            self._signatures[key] = plan.signatures[key]
            self._rejected.pop(key, None)
            report.loaded.append(key)
            if old is not None:
                retired.append((old, "replaced by a new model.onnx"))
            inputs, outputs = _tensors(model)
            log.info(
                "model loaded",
                extra={"model": model.name, "version": model.version, "provider": model.provider,
                       "inputs": inputs, "outputs": outputs, "replaced": old is not None, "trigger": "reload"},
            )
        for key in list(self._rejected):  # forget rejections of directories that are gone
            name, _, version = key.partition("/")
            if (plan.scope is None or name in plan.scope) and version not in plan.on_disk.get(name, ()):
                del self._rejected[key]
        failed = self._failed(plan, models)
        for key, (signature, why) in plan.rejected.items():
            name, version = key.split("/")
            serving = models.get(name, {})
            if int(version) in serving:
                why += "; the previously loaded file keeps serving"
            elif serving:
                why += f"; versions {sorted(serving)} keep serving"
            self._rejected[key] = signature
            failed[key] = why
            report.rejected[key] = why
            log.error("model rejected", extra={"model": name, "version": int(version), "error": why})
        self.repository.publish(models, failed)
        if report.changed or report.rejected:
            log.info(
                "model repository reloaded",
                extra={"loaded": report.loaded, "unloaded": report.unloaded, "rejected": sorted(report.rejected),
                       "models": {n: sorted(v) for n, v in sorted(models.items())}},
            )
        return report, retired

    def _failed(self, plan: _Plan, models: dict[str, dict[int, Model]]) -> dict[str, str]:
        """``failed`` after this reload: out-of-scope entries kept; in scope, a version stays listed
        while it is still rejected (unchanged since) and its directory exists; directory problems
        are recomputed by the scan. This round's rejections are added by the caller."""
        failed: dict[str, str] = {}
        for key, why in self.repository.failed.items():
            name, _, version = key.partition("/")
            if plan.scope is not None and name not in plan.scope:
                failed[key] = why
            elif (
                version
                and name not in self._unloaded
                and version in plan.on_disk.get(name, ())
                and key in self._rejected
            ):
                failed[key] = why
        failed.update(
            {k: v for k, v in plan.problems.items() if k.partition("/")[0] not in self._unloaded}
        )
        return failed

    # -- step 4: drain (event loop) --------------------------------------------------------

    async def _drain_all(self, retired: list[tuple[Model, str]]) -> None:
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

    async def _drain(self, model: Model, reason: str) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        busy_at_start = _busy(model)
        while _busy(model) and loop.time() - start < self.drain_timeout:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        still_busy = _busy(model)
        if still_busy:
            # Not closed: its queued and running requests finish on it; the session goes when
            # the last of them does (garbage collection).
            self._retired.discard(model)
        else:
            self._close(model)
        log.info(
            "model unloaded",
            extra={
                "model": model.name,
                "version": model.version,
                "reason": reason,
                "drained": busy_at_start,
                "drain_seconds": round(loop.time() - start, 3),
                "drain_timed_out": still_busy,
            },
        )

    def _close(self, model: Model) -> None:
        """Refuse new requests to ``model`` and drop its session (frees the memory now, not
        whenever the garbage collector breaks the model ↔ batcher cycle)."""
        self._retired.discard(model)
        if hasattr(model, "close"):
            model.close()
        if not _busy(model):
            model._session = None  # type: ignore[assignment]

