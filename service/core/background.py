"""The background inference thread: mirrored work (shadow runs, a canary's checks) on one thread
at the lowest nice value, so that on a busy machine the kernel gives the cores to client requests
first (docs/rollout.md, "Shadow")."""

from __future__ import annotations

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger(__name__)

#: The background thread's nice value: the lowest priority that still always makes progress
#: (SCHED_IDLE could starve mirrored work, and a canary's checks, on a saturated machine).
LOWEST_NICE = 19


def lower_this_thread() -> bool:
    """Give the calling thread nice :data:`LOWEST_NICE` (Linux: threads have their own nice
    value); elsewhere leave it. True when lowered."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_NICE)
    except OSError as exc:
        log.warning("background inference thread keeps its priority", extra={"error": str(exc)})
        return False
    return True


def background_executor() -> ThreadPoolExecutor:
    """One thread for mirrored batches, lowered once it starts (on the first mirrored batch)."""
    return ThreadPoolExecutor(1, thread_name_prefix="background", initializer=lower_this_thread)
