"""The abuse suite (benchmarks/abuse.py), each attack once against a real server configured as
the benchmark runs it: the attacker gets the expected refusal, the server's peak RSS grows by
less than 64 MiB, an authenticated caller is served while the attack holds its resources, and
the server is still serving afterwards. (The benchmark adds timings and a well-behaved client's
latency alongside; see docs/hardening.md.)"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.servers import MODELS, REPO_ROOT, ServerProcess, start_server
from grpc_health.v1 import health_pb2

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import abuse

#: Compression bombs here inflate to 128 MiB, not the benchmark's 400: past every limit all the
#: same, and the client compresses them in a third of the time.
TEST_BOMB_BYTES = 128 * 1024 * 1024


@pytest.fixture(scope="module")
def attacked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(
        tmp_path_factory.mktemp("abuse"), "--model-repository", str(MODELS), env=dict(abuse.SERVER_ENV)
    ) as server:
        yield server


@pytest.fixture
def small_bombs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(abuse, "BOMB_BYTES", TEST_BOMB_BYTES)
    monkeypatch.setattr(abuse, "_GZIP_BOMB", None)


def test_the_suite_covers_every_surface() -> None:
    surfaces = {a.surface for a in abuse.ATTACKS}
    assert surfaces == {"typed", "v2", "health", "reflection", "control", "transport", "http"}
    assert len(abuse.ATTACKS) >= 20
    assert len({a.name for a in abuse.ATTACKS}) == len(abuse.ATTACKS)
    for a in abuse.ATTACKS:  # no attack may count a 5xx-equivalent as a correct refusal
        assert not a.expected & abuse.FORBIDDEN, a.name


@pytest.mark.usefixtures("small_bombs")
@pytest.mark.parametrize("attack", abuse.ATTACKS, ids=lambda a: a.name)
def test_attack_is_refused_within_bounds(attacked: ServerProcess, attack: abuse.Attack, tmp_path: Path) -> None:
    pid = attacked.process.pid
    target = abuse.Target(attacked.address, f"127.0.0.1:{attacked.http_port}")
    log_start = len(attacked.log())
    abuse.reset_peak(pid)
    before = abuse.rss_kib(pid)
    outcome = asyncio.run(attack.run(target))
    growth = abuse.peak_growth_mib(pid, before)
    assert outcome.status in attack.expected, outcome
    assert outcome.served is not False, f"an authenticated call was refused during {attack.name}"
    assert growth < abuse.RSS_GOAL_MIB, f"{attack.name}: peak RSS +{growth:.0f} MiB"
    assert attacked.process.poll() is None
    assert attacked.health() == health_pb2.HealthCheckResponse.SERVING
    assert "Traceback" not in attacked.log()[log_start:]


@pytest.mark.parametrize("name", ["typed-classify-nan-images", "v2-many-inputs"])
def test_refused_requests_do_not_pile_up(attacked: ServerProcess, name: str) -> None:
    """The same refused 3 MB request 100 times: memory stays flat (grpc.aio's abort() kept every
    refused request in a reference cycle until the garbage collector ran: +180 MiB here)."""
    attack = next(a for a in abuse.ATTACKS if a.name == name)
    target = abuse.Target(attacked.address, f"127.0.0.1:{attacked.http_port}")
    pid = attacked.process.pid
    abuse.reset_peak(pid)
    before = abuse.rss_kib(pid)

    async def repeat() -> set[str]:
        return {(await attack.run(target)).status for _ in range(100)}

    assert asyncio.run(repeat()) <= attack.expected
    growth = abuse.peak_growth_mib(pid, before)
    assert growth < abuse.RSS_GOAL_MIB, f"+{growth:.0f} MiB after 100 refusals"
