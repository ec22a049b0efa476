"""service.app.freeze_startup_heap: garbage made before it is collected, not frozen; what is alive
is frozen; garbage made after it is still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from service.app import freeze_startup_heap


class Node:
    """A reference cycle's member: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed() -> Iterator[None]:
    """The test process's heap back in the collector's generations afterwards."""
    yield
    gc.unfreeze()


def cycle() -> weakref.ref[Node]:
    return weakref.ref(Node())


@pytest.mark.usefixtures("thawed")
def test_garbage_before_is_collected_the_rest_frozen_and_garbage_after_collected() -> None:
    before, alive = cycle(), Node()
    frozen = freeze_startup_heap()
    assert before() is None  # collected, not frozen for the life of the process
    assert frozen > 1000  # this process's modules and classes (other threads may change it since)
    assert not any(o is alive for o in gc.get_objects())  # frozen: no generation holds it
    after = cycle()
    gc.collect()
    assert after() is None
