"""The canary's rules on synthetic windows (service/rollout/state.py), and the caller buckets."""

from __future__ import annotations

import zlib

from service.core.context import RequestContext
from service.rollout.config import RolloutConfig, Rules
from service.rollout.mirror import Mirror
from service.rollout.state import CANARY, PRIMARY, ModelRollout, Route, bucket, caller_id


def state(**rules: object) -> ModelRollout:
    config = RolloutConfig(canary_version=2, rules=Rules(window=10, **rules))
    return ModelRollout("m", config, None, Mirror("m", 1, 1 << 20, lambda v: None, lambda *a: None))


def fill(model: ModelRollout, arm: str, n: int, seconds: float, errors: int = 0) -> None:
    for i in range(n):
        model.outcome(Route(model, arm), "INTERNAL" if i < errors else "OK", seconds)


def test_error_rule_needs_a_full_window_the_ratio_and_the_floor() -> None:
    model = state(min_error_rate=0.05)
    fill(model, PRIMARY, 10, 0.001)
    fill(model, CANARY, 9, 0.001, errors=9)
    assert model.verdict() is None  # the window is not full yet
    fill(model, CANARY, 1, 0.001)
    rule, why, figures = model.verdict() or ("", "", {})
    assert rule == "errors" and figures["canary_error_rate"] == 0.9 and "0.900" in why
    quiet = state(min_error_rate=0.2)
    fill(quiet, PRIMARY, 10, 0.001)
    fill(quiet, CANARY, 10, 0.001, errors=1)  # 0.1: below the floor
    assert quiet.verdict() is None
    client = state()
    for _ in range(10):
        client.outcome(Route(client, CANARY), "INVALID_ARGUMENT", 0.001)  # the caller's fault
    assert len(client.arms[CANARY].errors) == 0


def test_latency_rule_compares_p99() -> None:
    model = state(max_latency_ratio=3.0)
    fill(model, PRIMARY, 10, 0.010)
    fill(model, CANARY, 10, 0.025)
    assert model.verdict() is None
    fill(model, CANARY, 10, 0.040)
    rule, _, figures = model.verdict() or ("", "", {})
    assert rule == "latency" and figures["canary_p99_ms"] == 40.0 and figures["primary_p99_ms"] == 10.0


def test_agreement_rule_over_the_compared_window_and_clean() -> None:
    model = state(min_agreement=0.9)
    fill(model, PRIMARY, 10, 0.001)
    fill(model, CANARY, 10, 0.001)
    for _ in range(9):
        model.agreement(4, 4)
    assert model.verdict() is None and not model.clean()
    model.agreement(4, 4)
    assert model.clean()
    for _ in range(10):
        model.agreement(4, 3)  # 0.75: the older, agreeing requests have left the window
    rule, _, figures = model.verdict() or ("", "", {})
    assert rule == "agreement" and figures["agreement"] == 0.75 and figures["rows"] == 40


def test_caller_bucket_is_fixed_per_caller() -> None:
    assert bucket("alice") == bucket("alice") == zlib.crc32(b"alice") / 2**32
    context = RequestContext("v2", "ModelInfer", inference=True)
    context.carrier = (("authorization", "Bearer x"), ("x-caller-id", "alice"))
    assert caller_id(context) == "alice"
    context.carrier = {"x-caller-id": "bob"}
    assert caller_id(context) == "bob"
    assert caller_id(RequestContext("v2", "ModelInfer")) is None


def test_a_held_version_is_never_the_primary() -> None:
    """A rolled-back canary stays served until a registry round retires it: meanwhile a sync must
    not make it the primary (it is the highest version and no longer has a role)."""
    model = state()
    model.canary = 2
    served = {1: None, 2: None}
    assert model.primary_version(served) == 1  # 2 is the canary
    model.canary = None
    model.held = frozenset({2})
    assert model.primary_version(served) == 1
