"""One model's rollout at run time: its roles (primary, shadow, canary), how unversioned requests
are routed, and the windows the canary's rules read.

**Routing.** A request that names no version goes to the canary with probability ``canary_share``,
or, when it carries a caller id (``x-caller-id`` metadata / header), when the caller's bucket
(CRC-32 of the id / 2^32, the same on every replica and for every request of that caller) is below
the share: a caller stays on one side, and raising the share only moves callers onto the canary.
Every other unversioned request goes to the primary; a request naming a version always gets it.

**Windows.** The last ``window`` routed requests of each arm (error or not, server-side seconds)
and the canary's last ``window`` compared requests (rows, rows agreeing with the primary).
:meth:`ModelRollout.verdict` reads them (see :class:`~.config.Rules`).
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import RolloutConfig, Rules

if TYPE_CHECKING:
    from ..core.context import RequestContext
    from ..core.registry import ModelVersion
    from .compare import Agreement
    from .mirror import Mirror

PRIMARY, CANARY = "primary", "canary"
CALLER_ID = "x-caller-id"
#: Statuses that are a client's own doing (or its going away): not the version's error.
CLIENT_SIDE = frozenset(
    {"INVALID_ARGUMENT", "NOT_FOUND", "CANCELLED", "UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION"}
    | {"400", "401", "403", "404", "408", "409", "413", "415", "499"}
)
SUCCESS = frozenset({"OK", "200"})


def caller_id(context: RequestContext) -> str | None:
    """The request's ``x-caller-id`` (gRPC metadata or HTTP header), if it has one."""
    carrier = getattr(context, "carrier", None)
    if not carrier:
        return None
    if isinstance(carrier, Mapping):
        value = carrier.get(CALLER_ID)
        return value if isinstance(value, str) and value else None
    for key, value in carrier:
        if key == CALLER_ID and isinstance(value, str) and value:
            return value
    return None


def bucket(caller: str | None) -> float:
    """Where a caller falls in [0, 1): fixed per caller id; random without one."""
    if caller is None:
        return random.random()
    return zlib.crc32(caller.encode("utf-8", "surrogatepass")) / 2**32


class Route:
    """Set on a routed request's context: which arm took it, and whether a failing canary's
    request was answered by the primary instead."""

    __slots__ = ("state", "arm", "fell_back")

    def __init__(self, state: ModelRollout, arm: str) -> None:
        self.state = state
        self.arm = arm
        self.fell_back = False


class Arm:
    """The last ``window`` outcomes of one arm's routed requests."""

    def __init__(self, window: int) -> None:
        self.errors: deque[bool] = deque(maxlen=window)
        self.seconds: deque[float] = deque(maxlen=window)
        self.error_count = 0  # errors among ``errors``
        self.routed = 0  # for the life of the canary
        self.failed = 0

    def add(self, error: bool, seconds: float) -> None:
        if len(self.errors) == self.errors.maxlen and self.errors[0]:
            self.error_count -= 1
        self.errors.append(error)
        self.error_count += error
        self.seconds.append(seconds)
        self.routed += 1
        self.failed += error

    @property
    def full(self) -> bool:
        return len(self.errors) == self.errors.maxlen

    @property
    def error_rate(self) -> float:
        return self.error_count / len(self.errors) if self.errors else 0.0

    def p99(self) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else 0.0


class ModelRollout:
    """One model's roles, arms and windows (event loop only; read by scrapes)."""

    def __init__(self, name: str, config: RolloutConfig, signature: object, mirror: Mirror) -> None:
        self.name = name
        self.signature = signature  # of the configuration it was made from
        self.config = config
        self.rules: Rules = config.rules
        self.new_versions = config.new_versions
        #: An explicit primary (configured, promoted, or held while new versions start aside);
        #: None: the highest served version that is neither shadow nor canary.
        self.primary: int | None = config.primary
        self.shadow: int | None = None
        self.shadow_share = config.shadow_share
        self.canary: int | None = None
        self.canary_share = config.canary_share
        self.seen: set[int] = set()
        #: Versions the registry holds (rolled back): still served until a round retires them,
        #: never the primary meanwhile. Kept in step by the controller.
        self.held: frozenset[int] = frozenset()
        self.mirror = mirror
        #: Agreement of each (primary, other) pair compared so far.
        self.pairs: dict[tuple[int, int], Agreement] = {}
        # Resolved on every change of roles or served versions.
        self.primary_model: ModelVersion | None = None
        self.shadow_model: ModelVersion | None = None
        self.canary_model: ModelVersion | None = None
        self.fallbacks = 0
        self.new_canary()

    # -- roles --------------------------------------------------------------------------------

    @property
    def side(self) -> frozenset[int]:
        return frozenset(v for v in (self.shadow, self.canary) if v is not None)

    @property
    def active(self) -> bool:
        """Anything for the server to do: roles, versions to hold aside as they arrive, or held
        (rolled back) versions: the registry serves them until a round retires them, and an
        unrouted request would get the highest, the version just rolled back."""
        return bool(self.side) or self.primary is not None or self.new_versions != "serve" or bool(self.held)

    def primary_version(self, served: Mapping[int, Any]) -> int | None:
        if self.primary is not None and self.primary in served:
            return self.primary
        rest = [v for v in served if v not in self.side and v not in self.held]
        return max(rest) if rest else None

    def resolve(self, served: Mapping[int, ModelVersion]) -> None:
        """Point the roles at the versions served now."""
        primary = self.primary_version(served)
        self.primary_model = served.get(primary) if primary is not None else None
        self.shadow_model = served.get(self.shadow) if self.shadow is not None else None
        self.canary_model = served.get(self.canary) if self.canary is not None else None

    def new_canary(self) -> None:
        """Fresh windows (a new canary, or new rules)."""
        window = self.rules.window
        self.arms = {PRIMARY: Arm(window), CANARY: Arm(window)}
        self.compared: deque[tuple[int, int]] = deque(maxlen=window)  # (rows, rows agreed)
        self.compared_rows = 0
        self.compared_agreed = 0
        self.checks = 0

    # -- requests -----------------------------------------------------------------------------

    def pick(self, context: RequestContext | None, fallback: ModelVersion) -> ModelVersion:
        """The version an unversioned request gets (see the module docstring)."""
        primary = self.primary_model or fallback
        canary = self.canary_model
        if canary is None or context is None or not context.inference:
            return primary
        if bucket(caller_id(context)) < self.canary_share:
            context.route = Route(self, CANARY)
            return canary
        context.route = Route(self, PRIMARY)
        return primary

    def outcome(self, route: Route, status: str, seconds: float) -> None:
        """A routed request finished."""
        if status in CLIENT_SIDE:
            return
        self.arms[route.arm].add(route.fell_back or status not in SUCCESS, seconds)

    def agreement(self, rows: int, agreed: int) -> None:
        """A canary request compared with the primary's answer."""
        window = self.compared
        if len(window) == window.maxlen:
            old_rows, old_agreed = window[0]
            self.compared_rows -= old_rows
            self.compared_agreed -= old_agreed
        window.append((rows, agreed))
        self.compared_rows += rows
        self.compared_agreed += agreed
        self.checks += 1

    # -- rules --------------------------------------------------------------------------------

    def verdict(self) -> tuple[str, str, dict[str, Any]] | None:
        """(rule, why, figures) of the first rule the canary breaks now, else None."""
        rules = self.rules
        canary, primary = self.arms[CANARY], self.arms[PRIMARY]
        if canary.full:
            rate, base = canary.error_rate, primary.error_rate
            if rate > rules.min_error_rate and rate > rules.max_error_ratio * base:
                return (
                    "errors",
                    f"error rate {rate:.3f} over the canary's last {len(canary.errors)} requests, above "
                    f"{rules.max_error_ratio:g} x the primary's {base:.3f} (and above {rules.min_error_rate:g})",
                    {"canary_error_rate": rate, "primary_error_rate": base, "requests": len(canary.errors)},
                )
            if primary.full:
                mine, theirs = canary.p99(), primary.p99()
                if mine > rules.max_latency_ratio * theirs:
                    return (
                        "latency",
                        f"p99 {mine * 1000:.2f} ms over the canary's last {len(canary.seconds)} requests, above "
                        f"{rules.max_latency_ratio:g} x the primary's {theirs * 1000:.2f} ms",
                        {"canary_p99_ms": mine * 1000, "primary_p99_ms": theirs * 1000},
                    )
        if len(self.compared) == self.compared.maxlen and self.compared_rows:
            share = self.compared_agreed / self.compared_rows
            if share < rules.min_agreement:
                return (
                    "agreement",
                    f"agreement {share:.3f} with the primary over the canary's last {len(self.compared)} compared "
                    f"requests ({self.compared_rows} rows), below {rules.min_agreement:g}",
                    {"agreement": share, "requests": len(self.compared), "rows": self.compared_rows},
                )
        return None

    def clean(self) -> bool:
        """Every window full and no rule broken: ready for automatic promotion."""
        comparing = self.rules.compare_share > 0
        full = self.arms[CANARY].full and self.arms[PRIMARY].full
        return full and (not comparing or len(self.compared) == self.compared.maxlen) and self.verdict() is None

    def describe(self) -> dict[str, Any]:
        canary, primary = self.arms[CANARY], self.arms[PRIMARY]
        figures: dict[str, Any] = {
            "primary": self.primary_model.version if self.primary_model is not None else None,
            "primary_pinned": self.primary is not None,
            "new_versions": self.new_versions,
            "shadow": None,
            "canary": None,
            "rules": self.rules.describe(),
        }
        if self.shadow is not None:
            figures["shadow"] = {
                "version": self.shadow,
                "share": self.shadow_share,
                "served": self.shadow_model is not None,
            }
        if self.canary is not None:
            agreement = self.compared_agreed / self.compared_rows if self.compared_rows else None
            figures["canary"] = {
                "version": self.canary,
                "share": self.canary_share,
                "served": self.canary_model is not None,
                "routed": canary.routed,
                "errors": canary.failed,
                "fallbacks": self.fallbacks,
                "primary_routed": primary.routed,
                "primary_errors": primary.failed,
                "window": {
                    "canary_requests": len(canary.errors),
                    "canary_error_rate": canary.error_rate,
                    "primary_requests": len(primary.errors),
                    "primary_error_rate": primary.error_rate,
                    "canary_p99_ms": canary.p99() * 1000,
                    "primary_p99_ms": primary.p99() * 1000,
                    "compared_requests": len(self.compared),
                    "agreement": agreement,
                },
            }
        return figures
