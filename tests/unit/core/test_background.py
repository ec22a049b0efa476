"""service.core.background: the mirrored work's thread runs at nice 19, and the rest of the
process keeps its priority."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from service.core.background import LOWEST_NICE, background_executor


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread scheduling is Linux's")
def test_the_background_thread_is_lowered_and_the_caller_is_not() -> None:
    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = nice()
    with background_executor() as executor:
        assert executor.submit(nice).result(timeout=30) == LOWEST_NICE
    assert nice() == before  # this (the event loop's) thread kept its priority
