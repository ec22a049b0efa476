"""The rollout controller: every model's :class:`~.state.ModelRollout`, wired into the registry
(which versions to keep loaded), the data plane (routing, the canary's fallback, mirroring and
capture after the answer) and model control (``RepositoryModelLoad`` parameters).

While no model has a rollout and capture is off, the data plane's ``router`` and ``taps`` are
None: the request path checks two attributes and does nothing else. With a rollout or capture on,
:meth:`Rollout.refresh` points them here, and :class:`Rollout` becomes an observer of finished
requests.

Changes of roles happen on the event loop, in one step each, and take effect for the next
request: a rule that breaks in :meth:`Rollout.finish` rolls the canary back before the next
request is routed. Retiring the versions that lost their role (drain, unload) follows in a
registry round of the model.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from ..core.context import CARRIER, RequestContext
from ..core.discovery import is_model_dir
from ..core.registry import Pins, ReloadReport
from ..core.spec import ModelKey
from ..errors import FailedPrecondition, Internal, InvalidArgument, NotFound, ResourceExhausted, Unavailable
from ..settings import RolloutOverride, Settings
from .audit import Audit
from .capture import Capture
from .compare import Agreement, compare
from .config import RULE_FIELDS, RolloutConfig
from .mirror import Job, Mirror
from .mirror_process import MirrorProcess
from .state import CANARY, SUCCESS, ModelRollout, Route

if TYPE_CHECKING:
    from ..core.dataplane import DataPlane
    from ..core.model_config import ModelSettings
    from ..core.registry import ModelRegistry, ModelVersion

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
#: A canary request failing with one of these is answered by the primary instead.
FALLBACK_ERRORS = (Internal, Unavailable, ResourceExhausted)
#: Model-control parameters (RepositoryModelLoad) this server reads.
ROLE_PARAMETERS = ("shadow_version", "shadow_share", "canary_version", "canary_share", "new_versions")
CONTROL_PARAMETERS = frozenset({*ROLE_PARAMETERS, *RULE_FIELDS, "promote", "rollback"})
OFF = ("", "none", "off")


class Tap:
    """What a request ran with (set on its context while taps are on)."""

    __slots__ = ("model", "feeds", "names", "outputs")

    def __init__(self, model: ModelVersion, feeds: Arrays, names: list[str]) -> None:
        self.model = model
        self.feeds = feeds
        self.names = names
        self.outputs: Arrays | None = None


class Rollout:
    """Every model's rollout state and the hooks around it (see the module docstring)."""

    def __init__(self, settings: Settings, registry: ModelRegistry) -> None:
        self.settings = settings
        self.registry = registry
        registry.rollout = self
        self.models: dict[str, ModelRollout] = {}
        self._routes: dict[str, ModelRollout] = {}
        self.audit = Audit(settings.rollout_audit_file)
        self.capture = Capture(settings) if settings.capture_dir is not None else None
        self.plane: DataPlane | None = None
        #: Counters for the metrics: (model, version, rule) → rollbacks; (model, version, trigger)
        #: → promotions; (model, version, outcome) → mirrored requests (ok, failed).
        self.rollbacks: dict[tuple[str, int, str], int] = {}
        self.promotions: dict[tuple[str, int, str], int] = {}
        self.mirrored: dict[tuple[str, int, str], int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- wiring -------------------------------------------------------------------------------

    def bind(self, plane: DataPlane) -> None:
        """Serve ``plane``: its control API and, while anything is on, its request hooks."""
        self.plane = plane
        plane.rollout = self
        self.refresh()

    def refresh(self) -> None:
        """Point the data plane's hooks here while a model has a rollout or capture is on."""
        self._routes = {name: state for name, state in self.models.items() if state.active}
        for state in self.models.values():  # no shadow left (canary checks run in the batcher): free the child
            process = state.mirror.process
            if process is not None and process.running and state.shadow is None:
                self._spawn(process.stop())
        plane = self.plane
        if plane is None:
            return
        tapping = bool(self._routes) or self.capture is not None
        plane.router = self if self._routes else None
        plane.taps = self if tapping else None
        canary = any(state.canary_model is not None for state in self._routes.values())
        plane.headers = CARRIER if plane.tracing is not None or canary else None
        if tapping and self not in plane.observers:
            plane.observers.append(self)
        elif not tapping and self in plane.observers:
            plane.observers.remove(self)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for state in self.models.values():
            await state.mirror.stop()
        if self.capture is not None:
            self.capture.encode_pending()  # here, on the loop's thread; then written off it
            await asyncio.get_running_loop().run_in_executor(None, self.capture.close)

    def close(self) -> None:
        """:meth:`stop` without an event loop (the capture's last records are written)."""
        if self.capture is not None:
            self.capture.close()

    # -- the registry (pins from its worker thread, sync after each round) -----------------------

    def pins(self, name: str, config: ModelSettings) -> Pins:
        """The versions to serve beside the version policy: the state's roles, or (a new or edited
        configuration) those the configuration names."""
        state = self.models.get(name)
        if state is not None and state.signature == config.signature:
            keep = frozenset({state.primary}) if state.primary is not None else frozenset()
            return Pins(keep, state.side)
        rollout = config.rollout
        keep = frozenset({rollout.primary}) if rollout.primary is not None else frozenset()
        return Pins(keep, rollout.side)

    async def sync(self) -> None:
        """After a round: states follow the configuration, the served versions and new versions."""
        served = self.registry.snapshot()
        for name in [n for n in self.models if n not in served]:
            self._drop(name)
        for name, versions in served.items():
            config = self.registry.model_settings(name)
            if config is None:
                continue
            state = self.models.get(name)
            if state is None or state.signature != config.signature:
                if state is not None:
                    self._drop(name)
                state = self._from_config(name, config, versions)
                if state is None:
                    continue
            else:
                state.held = frozenset(self.registry.held(name))
                self._follow(state, versions)
            state.held = frozenset(self.registry.held(name))
            state.resolve(versions)
        self.refresh()

    def _drop(self, name: str) -> None:
        state = self.models.pop(name)
        self._spawn(state.mirror.stop())

    def _mirror(self, name: str) -> Mirror:
        def resolve(version: int) -> ModelVersion | None:
            return self.registry.snapshot().get(name, {}).get(version)

        def done(jobs: list[Job], output: np.ndarray | None, error: BaseException | None) -> None:
            self._mirrored(name, jobs, output, error)

        settings = self.settings
        process = None
        if settings.rollout_mirror == "process":
            process = MirrorProcess(name, settings.intra_op_threads, settings.inter_op_threads)
        return Mirror(name, settings.rollout_queue_capacity, settings.rollout_queue_bytes, resolve, done, process)

    def _new_state(self, name: str, config: ModelSettings) -> ModelRollout:
        state = ModelRollout(name, config.rollout, config.signature, self._mirror(name))
        self.models[name] = state
        return state

    def _from_config(self, name: str, config: ModelSettings, versions: Mapping[int, Any]) -> ModelRollout | None:
        rollout = config.rollout
        if not rollout.active:
            return None
        state = self._new_state(name, config)
        state.seen = set(versions)
        state.held = frozenset(self.registry.held(name))
        for role, version in (("shadow", rollout.shadow_version), ("canary", rollout.canary_version)):
            if version is None:
                continue
            if version in versions:
                setattr(state, role, version)
            else:
                why = self.registry.held(name).get(version) or "not served (not in the repository, or failed to load)"
                log.warning(
                    f"rollout: configured {role} version not served",
                    extra={"model": name, "version": version, "reason": why},
                )
        if state.primary is None and state.new_versions != "serve":
            state.primary = state.primary_version(versions)  # held while new versions start aside
        if state.side or rollout.primary is not None:
            self.audit.record(
                "configure",
                name,
                None,
                "configuration",
                "config.json or the rollout setting",
                **self._roles(state, versions),
            )
        return state

    def _follow(self, state: ModelRollout, versions: Mapping[int, Any]) -> None:
        """Roles whose version is no longer served end; a new version starts as the policy says."""
        name = state.name
        new = set(versions) - state.seen
        state.seen = set(versions)
        for role in ("shadow", "canary"):
            version = getattr(state, role)
            if version is not None and version not in versions:
                setattr(state, role, None)
                self.audit.record(f"{role}_end", name, version, "registry", "the version is no longer served")
        if state.primary is not None and state.primary not in versions:
            log.warning("rollout: the primary is no longer served", extra={"model": name, "version": state.primary})
            state.primary = None if state.new_versions == "serve" else state.primary_version(versions)
        fresh = [v for v in new if v not in state.side]
        current = state.primary_version({v: None for v in versions if v not in fresh})
        if not fresh or current is None or max(fresh) <= current:
            return
        newest = max(fresh)
        if state.new_versions == "serve":
            if state.primary is not None and state.config.primary is None:  # promoted earlier: the policy leads again
                state.primary = None
                self._round(name)
            return
        role = state.new_versions
        previous = getattr(state, role)
        if previous is not None:  # superseded: out of service, like a rollback, until its file changes
            self.registry.hold(ModelKey(name, previous), f"superseded by version {newest} as {role}")
        setattr(state, role, newest)
        if role == "canary":
            state.new_canary()
        self.audit.record(
            role,
            name,
            newest,
            "automatic",
            f"a new version on disk starts as the {role} (new_versions {role})",
            **self._roles(state, versions),
        )
        self._round(name)

    def _round(self, name: str) -> None:
        """A registry round of ``name`` soon (retires what lost its role, loads what gained one)."""
        self._spawn(self.registry.reload([name], trigger="rollout"))

    def _spawn(self, work: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # no event loop (closing in-process users)
            work.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("rollout round failed", exc_info=task.exception())

    # -- the data plane -------------------------------------------------------------------------

    def route(self, context: RequestContext | None, latest: ModelVersion) -> ModelVersion:
        """The version an unversioned request gets (``latest``: the registry's highest)."""
        state = self._routes.get(latest.name)
        return latest if state is None else state.pick(context, latest)

    async def infer(self, context: RequestContext, model: ModelVersion, feeds: Arrays, names: list[str]) -> Arrays:
        """The data plane's inference with taps on: the request is remembered for the mirror and
        capture, and a canary's failure is answered by the primary."""
        tap = Tap(model, feeds, names)
        context.tap = tap
        try:
            outputs = await model.batcher.submit(feeds, names, context.remaining(), context)
        except FALLBACK_ERRORS:
            route: Route | None = getattr(context, "route", None)
            primary = route.state.primary_model if route is not None and route.arm == CANARY else None
            if route is None or primary is None or primary is model:
                raise
            route.fell_back = True
            route.state.fallbacks += 1
            context.version = str(primary.version)
            tap.model = primary
            outputs = await primary.batcher.submit(feeds, names, context.remaining(), context)
        tap.outputs = outputs
        return outputs

    def finish(self, context: RequestContext) -> None:
        """Observer: the canary's windows and rules, then mirror and capture the answered request.
        Never raises: the client has its answer, whatever happens here."""
        try:
            self._finish(context)
        except Exception:
            log.exception("rollout: a finished request could not be processed", extra={"model": context.model})

    def _finish(self, context: RequestContext) -> None:
        route: Route | None = getattr(context, "route", None)
        if route is not None:
            route.state.outcome(route, context.status, context.seconds())
            if route.arm == CANARY:
                self._judge(route.state)
        tap: Tap | None = getattr(context, "tap", None)
        if tap is None:
            return
        if self.capture is not None:
            self.capture.offer(context, tap.model.name, tap.feeds, tap.outputs)
        if tap.outputs is None or context.status not in SUCCESS:
            return
        state = self._routes.get(tap.model.name)
        if state is None or state.primary_model is None:
            return
        answered = tap.model.version
        primary = state.primary_model.version
        if route is not None and route.arm == CANARY:
            if route.fell_back or answered == primary:
                return
            share, target, check = state.rules.compare_share, primary, True
        elif state.shadow_model is not None and answered == primary:
            share, target, check = state.shadow_share, state.shadow_model.version, False
        else:
            return
        if share < 1 and random.random() >= share:
            return
        output = next((n for n in tap.model.spec.output_names if n in tap.outputs), tap.names[0])
        state.mirror.offer(Job(target, answered, check, tap.feeds, output, tap.outputs[output]))

    def _mirrored(self, name: str, jobs: list[Job], output: np.ndarray | None, error: BaseException | None) -> None:
        """A mirrored batch came back (or failed): agreement, the canary's window, the counters."""
        first = jobs[0]
        key = (name, first.target, "failed" if output is None else "ok")
        self.mirrored[key] = self.mirrored.get(key, 0) + len(jobs)
        state = self.models.get(name)
        if output is None or state is None:
            if error is not None:
                log.debug(
                    "mirrored request failed", extra={"model": name, "version": first.target, "error": str(error)}
                )
            return
        answers = first.answer if len(jobs) == 1 else np.concatenate([j.answer for j in jobs])
        if first.check:  # the canary answered; the primary ran it again
            pair, result = (first.target, first.answered), compare(output, answers, state.rules.regression_tolerance)
        else:  # the primary answered; the shadow ran it again
            pair, result = (first.answered, first.target), compare(answers, output, state.rules.regression_tolerance)
        agreement = state.pairs.get(pair)
        if agreement is None:
            agreement = state.pairs[pair] = Agreement(name, *pair)
        agreement.add(result)
        if first.check and first.answered == state.canary:
            offset = 0
            for job in jobs:
                state.agreement(job.rows, int(result.agreed[offset : offset + job.rows].sum()))
                offset += job.rows
            self._judge(state)

    # -- rules, rollback, promotion ---------------------------------------------------------------

    def _judge(self, state: ModelRollout) -> None:
        if state.canary is None or state.canary_model is None:
            return
        verdict = state.verdict()
        if verdict is not None:
            rule, why, figures = verdict
            self.rollback(state, "automatic", rule, why, figures)
        elif state.rules.auto_promote and state.clean():
            self.promote(state, state.canary, "automatic", f"a clean window of {state.rules.window} requests")

    def rollback(self, state: ModelRollout, who: str, rule: str, why: str, figures: Mapping[str, Any]) -> None:
        """Take the canary out of service now: no more requests are routed to it, it is held
        (not served until its file changes or it is named again) and retired by a round."""
        version = state.canary
        assert version is not None
        described = state.describe()["canary"]
        state.canary, state.canary_model = None, None
        state.new_canary()
        self.registry.hold(ModelKey(state.name, version), f"rolled back ({rule}): {why}")
        state.held = frozenset(self.registry.held(state.name))
        key = (state.name, version, rule)
        self.rollbacks[key] = self.rollbacks.get(key, 0) + 1
        served = self.registry.snapshot().get(state.name, {})
        self.audit.record(
            "rollback",
            state.name,
            version,
            who,
            why,
            rule=rule,
            figures=dict(figures),
            canary_figures=described,
            **self._roles(state, served),
        )
        self.refresh()
        self._round(state.name)

    def promote(self, state: ModelRollout, version: int, who: str, why: str) -> None:
        """``version`` takes every unversioned request from now on."""
        served = self.registry.snapshot().get(state.name, {})
        before = state.primary_version(served)
        if state.canary == version:
            state.canary, state.canary_model = None, None
            state.new_canary()
        if state.shadow == version:
            state.shadow, state.shadow_model = None, None
        self.registry.release(ModelKey(state.name, version))
        state.held = frozenset(self.registry.held(state.name))
        rest = [v for v in served if v not in state.side and v not in state.held]
        follows = state.new_versions == "serve" and state.config.primary is None and rest and version == max(rest)
        state.primary = None if follows else version
        state.resolve(served)
        trigger = "automatic" if who == "automatic" else "request"
        key = (state.name, version, trigger)
        self.promotions[key] = self.promotions.get(key, 0) + 1
        self.audit.record(
            "promote", state.name, version, who, why, previous_primary=before, **self._roles(state, served)
        )
        self.refresh()
        self._round(state.name)

    def _roles(self, state: ModelRollout, served: Mapping[int, Any]) -> dict[str, Any]:
        return {
            "primary": state.primary_version(served),
            "shadow": state.shadow,
            "shadow_share": state.shadow_share if state.shadow is not None else None,
            "canary": state.canary,
            "canary_share": state.canary_share if state.canary is not None else None,
        }

    # -- model control ------------------------------------------------------------------------------

    async def control(self, name: str, parameters: Mapping[str, str], who: str) -> ReloadReport:
        """Apply RepositoryModelLoad parameters (docs/rollout.md#model-control)."""
        unknown = sorted(set(parameters) - CONTROL_PARAMETERS)
        if unknown:
            raise InvalidArgument(
                f"parameters {unknown} are not supported; model load takes the rollout parameters "
                f"{sorted(CONTROL_PARAMETERS)} (or none: reload from the repository)"
            )
        if not is_model_dir(self.registry.root, name):
            raise NotFound(f"no model directory {name!r} in the repository; models: {self.registry.names()}")
        served = self.registry.snapshot().get(name, {})
        if "rollback" in parameters or "promote" in parameters:
            return self._decide(name, parameters, served, who)
        config = self.registry.model_settings(name)
        if config is None:
            raise FailedPrecondition(f"model '{name}' has not been loaded; load it first (no parameters)")
        values: dict[str, Any] = {}
        for key, text in parameters.items():
            if key in ("shadow_version", "canary_version") and text.strip().lower() in OFF:
                values[key] = None
            else:
                values[key] = text
        try:
            override = RolloutOverride.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise InvalidArgument(f"rollout parameters: {problems}") from None
        found = self.models.get(name)
        state = found if found is not None else self._new_state(name, config)
        if found is None:
            state.seen = set(served)
        before = (state.shadow, state.shadow_share, state.canary, state.canary_share, state.rules, state.new_versions)
        try:
            self._change(state, values, override, served)
        except ValueError as exc:
            state.shadow, state.shadow_share, state.canary, state.canary_share, state.rules, state.new_versions = before
            raise InvalidArgument(str(exc)) from None
        if state.canary != before[2] or state.rules != before[4]:
            state.new_canary()
        for version in state.side:
            self.registry.release(ModelKey(name, version))  # named by an operator: served again
        state.held = frozenset(self.registry.held(name))
        state.resolve(served)
        self.refresh()
        wanted = state.side  # the round's sync ends a role whose version did not load: ask before
        report = await self.registry.reload([name], explicit=True, trigger="request")
        now = self.registry.snapshot().get(name, {})
        missing = sorted(v for v in wanted if v not in now)
        if missing:
            failures = {str(k): why for k, why in self.registry.failures.items() if k.model == name}
            state.shadow, state.shadow_share, state.canary, state.canary_share, state.rules, state.new_versions = before
            state.resolve(now)
            self.refresh()
            self._round(name)
            raise FailedPrecondition(
                f"model '{name}' version(s) {missing} are not served (not in the repository, or failed to load: "
                f"{failures or 'no failure recorded'}); the rollout is unchanged"
            )
        self.audit.record(
            "configure", name, None, who, "model control", parameters=dict(parameters), **self._roles(state, now)
        )
        return report

    def _change(
        self, state: ModelRollout, values: Mapping[str, Any], override: RolloutOverride, served: Mapping[int, Any]
    ) -> None:
        fields = override.model_dump(exclude_none=True)
        if "shadow_version" in values:
            state.shadow = fields.get("shadow_version")
        if "canary_version" in values:
            state.canary = fields.get("canary_version")
        state.shadow_share = fields.get("shadow_share", state.shadow_share)
        state.canary_share = fields.get("canary_share", state.canary_share)
        state.new_versions = fields.get("new_versions", state.new_versions)
        rules = {k: v for k, v in fields.items() if k in RULE_FIELDS}
        if rules:
            state.rules = replace(state.rules, **rules)
        primary = state.primary_version({v: None for v in served if v not in state.side}) if served else None
        if state.primary is None and state.new_versions != "serve":
            state.primary = primary
        RolloutConfig(primary=state.primary, shadow_version=state.shadow, canary_version=state.canary).check()

    def _decide(self, name: str, parameters: Mapping[str, str], served: Mapping[int, Any], who: str) -> ReloadReport:
        """``rollback`` or ``promote``, alone."""
        if len(parameters) != 1:
            raise InvalidArgument("rollback and promote are given alone, without other parameters")
        state = self.models.get(name)
        if "rollback" in parameters:
            if state is None or state.canary is None:
                raise FailedPrecondition(f"model '{name}' has no canary to roll back")
            named = parameters["rollback"].strip().lower()
            if named not in ("", "canary", str(state.canary)):
                raise InvalidArgument(
                    f"model '{name}' has canary version {state.canary}, not {parameters['rollback']!r}"
                )
            self.rollback(state, who, "request", "rolled back by request", {})
            return ReloadReport()
        try:
            version = int(parameters["promote"])
        except ValueError:
            raise InvalidArgument(f"promote takes a version number, got {parameters['promote']!r}") from None
        if version not in served:
            raise FailedPrecondition(
                f"version {version} of model '{name}' is not served (versions {sorted(served)}); make it the canary "
                "or the shadow first"
            )
        if state is None:
            config = self.registry.model_settings(name)
            assert config is not None  # served
            state = self._new_state(name, config)
            state.seen = set(served)
        self.promote(state, version, who, "promoted by request")
        return ReloadReport()

    # -- reports --------------------------------------------------------------------------------------

    def status(self, name: str) -> dict[str, Any]:
        """The model's rollout as the status endpoint shows it."""
        served = self.registry.snapshot().get(name, {})
        state = self.models.get(name)
        figures: dict[str, Any] = {"model": name, "versions": sorted(served)}
        if state is None:
            figures.update(primary=max(served) if served else None, shadow=None, canary=None, agreement=[])
        else:
            figures.update(state.describe())
            figures["agreement"] = [a.as_dict() for a in state.pairs.values()]
            mirror = state.mirror
            figures["mirror"] = {
                "queued": mirror.depth,
                "batches": mirror.batches,
                "dropped": dict(mirror.dropped),
                "ok": sum(n for (m, _, o), n in self.mirrored.items() if m == name and o == "ok"),
                "failed": sum(n for (m, _, o), n in self.mirrored.items() if m == name and o == "failed"),
                "runs_in": "batcher" if mirror.process is None else "process",
            }
            if mirror.process is not None:
                figures["mirror"]["process"] = mirror.process.figures()
        figures["held"] = {str(v): why for v, why in self.registry.held(name).items()}
        figures["audit"] = self.audit.for_model(name)[-20:]
        if self.capture is not None:
            figures["capture"] = self.capture.describe()
        return figures

    def roles(self) -> dict[tuple[str, int], str]:
        """(model, version) → its role, for the repository index's reason."""
        roles: dict[tuple[str, int], str] = {}
        for name, state in list(self.models.items()):
            primary = state.primary_model.version if state.primary_model is not None else None
            if primary is not None and (state.side or state.primary is not None):
                roles[(name, primary)] = "rollout: primary" + (" (pinned)" if state.primary is not None else "")
            for role, version, share in (
                ("shadow", state.shadow, state.shadow_share),
                ("canary", state.canary, state.canary_share),
            ):
                if version is None or primary is None:
                    continue
                agreement = state.pairs.get((primary, version))
                measured = (
                    f"; agreement {agreement.agreement:.4f} over {agreement.rows} rows"
                    if agreement is not None and agreement.rows
                    else ""
                )
                roles[(name, version)] = f"rollout: {role} of version {primary}, share {share:g}{measured}"
        return roles
