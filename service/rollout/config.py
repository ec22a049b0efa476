"""What a model's rollout is configured to be: roles (primary, shadow, canary), shares, the policy
for new versions, and the canary's rules. Resolved from the ``rollout`` setting (``"*"`` for every
model, then the model's name) and ``config.json``'s ``"rollout"`` section:
defaults < ``"*"`` < config.json < the model's entry in the setting."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..settings import RolloutOverride, Settings

NEW_VERSION_POLICIES = ("serve", "shadow", "canary")


@dataclass(frozen=True)
class Rules:
    """When a canary is rolled back (all over the last ``window`` requests) or promoted."""

    #: Requests per window: the canary's routed requests, its compared requests, the primary's.
    window: int = 100
    #: Error rule: the canary's error rate above this × the primary's ...
    max_error_ratio: float = 2.0
    #: ... and above this floor (a canary with a rate at or below it is never rolled back for errors).
    min_error_rate: float = 0.01
    #: Agreement rule: rows whose answer agrees with the primary's, below this share.
    min_agreement: float = 0.9
    #: Latency rule: the canary's p99 above this × the primary's.
    max_latency_ratio: float = 3.0
    #: A regression row agrees when |Δ| <= tolerance × |primary| (or 1e-6).
    regression_tolerance: float = 0.05
    #: Promote the canary once each window is full and no rule broke.
    auto_promote: bool = False
    #: Share of canary requests also run on the primary (in the background) to measure agreement.
    compare_share: float = 1.0

    def describe(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


RULE_FIELDS = tuple(f.name for f in fields(Rules))


@dataclass(frozen=True)
class RolloutConfig:
    """One model's rollout as configured (the controller's runtime state starts from it)."""

    primary: int | None = None
    shadow_version: int | None = None
    shadow_share: float = 1.0
    canary_version: int | None = None
    canary_share: float = 0.1
    new_versions: str = "serve"
    rules: Rules = field(default_factory=Rules)

    @property
    def side(self) -> frozenset[int]:
        """The shadow and canary versions: served beside the version policy's choice."""
        return frozenset(v for v in (self.shadow_version, self.canary_version) if v is not None)

    @property
    def active(self) -> bool:
        """Anything to do for this model (else requests are served as without rollout)."""
        return bool(self.side) or self.primary is not None or self.new_versions != "serve"

    def merged(self, values: Mapping[str, Any]) -> RolloutConfig:
        """This config with ``values`` (RolloutOverride fields, None = unchanged) applied; ValueError
        when roles collide."""
        given = {k: v for k, v in values.items() if v is not None}
        rules = replace(self.rules, **{k: v for k, v in given.items() if k in RULE_FIELDS})
        top = {k: v for k, v in given.items() if k not in RULE_FIELDS}
        config = replace(self, rules=rules, **top)
        config.check()
        return config

    def check(self) -> None:
        roles = [
            (r, v)
            for r, v in (("primary", self.primary), ("shadow", self.shadow_version), ("canary", self.canary_version))
            if v is not None
        ]
        versions = [v for _, v in roles]
        if len(set(versions)) != len(versions):
            raise ValueError(f"rollout: one version cannot have two roles ({', '.join(f'{r} {v}' for r, v in roles)})")

    @classmethod
    def resolve(cls, settings: Settings, name: str, from_json: Mapping[str, Any] | None = None) -> RolloutConfig:
        """Defaults < the ``"*"`` entry of the setting < config.json ``rollout`` < the model's entry."""
        config = cls(new_versions=settings.rollout_new_versions)
        layers: list[RolloutOverride] = []
        if "*" in settings.rollout:
            layers.append(settings.rollout["*"])
        if from_json:
            layers.append(RolloutOverride.model_validate(from_json))
        if name in settings.rollout:
            layers.append(settings.rollout[name])
        for layer in layers:
            config = config.merged(layer.model_dump())
        return config


NO_ROLLOUT = RolloutConfig()
