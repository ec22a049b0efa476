"""The call gate every front end admits calls through: how many run at once, and the drain.

* **Concurrent calls.** At most ``max_concurrent_requests`` calls run at once, over every
  protocol; one more is refused at once (RESOURCE_EXHAUSTED / 429). A message on an inference
  stream counts as one call while it is handled; an idle stream takes nothing of this budget
  (open streams have a gate of their own). Health checks are not counted, so probes work while
  the server is saturated.
* **Draining** (shutdown). New calls do no work: each is *held* until the transport has begun to
  stop and is then refused as UNAVAILABLE (before its deadline, at the latest), while the calls
  already running finish. Why hold rather than refuse at once: when gRPC stops it cancels
  (``CANCELLED``, https://github.com/grpc/grpc/issues/41785) every call that reached it but was not
  started yet, including those arriving until the client has read gRPC's GOAWAY. A client
  refused at once retries, and its retry can land right in that window; a client whose call is
  held has nothing in flight to lose, and reads the GOAWAY before its UNAVAILABLE. Held calls are
  capped (the concurrency limit, or 1024).

All state lives on the event loop thread (no locks).
"""

from __future__ import annotations

import asyncio
import time

BUSY = "busy"
DRAINING = "draining"


class CallGate:
    """Counts the calls running now; ``limit`` None = no cap."""

    def __init__(self, limit: int | None, setting: str = "max_concurrent_requests") -> None:
        self.limit = limit if limit else None
        self.setting = setting  # named in the busy message
        self.active = 0
        self.refused = 0
        self.draining = False
        self.last_call = 0.0  # time.monotonic() when the last call (refused or not) came in
        self.held = 0
        self._release = asyncio.Event()  # set once the transport has begun to stop
        #: Tasks of open streams waiting for their next message: told when draining starts.
        self.waiting: set[asyncio.Task[object]] = set()

    def admit(self) -> str | None:
        """Why a new call is refused now (:data:`BUSY`, :data:`DRAINING`), or None: then the
        caller counts itself in ``active`` while it runs."""
        self.last_call = time.monotonic()
        if self.draining:
            return DRAINING
        if self.limit is not None and self.active >= self.limit:
            self.refused += 1
            return BUSY
        return None

    def busy_message(self) -> str:
        return f"the server is busy: {self.active} calls in progress, its {self.setting} limit; retry with backoff"

    async def hold(self, remaining: float | None) -> None:
        """A call that came in while draining: wait until the transport has begun to stop (or
        until just before the caller's deadline, ``remaining`` seconds), then the caller answers
        it UNAVAILABLE. Beyond the cap, return at once."""
        self.refused += 1
        if self.held >= (self.limit or 1024):
            return
        self.held += 1
        try:
            timeout = None if remaining is None else max(remaining - 0.1, 0.0)
            await asyncio.wait_for(self._release.wait(), timeout)
        except TimeoutError:
            pass  # answer before the caller's deadline
        finally:
            self.held -= 1

    def start_draining(self) -> None:
        """From now on hold every new call (health aside) for an UNAVAILABLE answer; streams
        waiting for their next message are woken (cancelled with :data:`DRAINING`) to end."""
        self.draining = True
        for task in self.waiting:
            task.cancel(DRAINING)

    def release_held(self) -> None:
        """Answer the held calls (call once the transport has begun to stop)."""
        self._release.set()

    async def drain(
        self, timeout: float, quiet: float = 0.25, quiet_turns: int = 20, linger: float = 2.0
    ) -> dict[str, float]:
        """Hold new calls and wait (at most ``timeout`` s) until none is running and either
        nothing happened for ``quiet`` s *and* ``quiet_turns`` turns of this loop, or ``linger`` s
        passed. Returns figures; then stop the transports and call :meth:`release_held`.

        "Nothing happened": no call came in and none finished. A caller whose call just finished
        sends its next one soon, and gRPC cancels a call that reached it but was not started yet
        when it stops; waiting until callers had time to send (and the loop to start, and hold,
        what they sent) keeps that window empty. Turns as well as seconds: a process that was not
        scheduled for a while must not mistake that for quiet."""
        self.start_draining()
        loop = asyncio.get_running_loop()
        start = loop.time()
        running_at_start = self.active
        seen = (self.last_call, self.active)
        quiet_since, turns = start, 0
        while True:
            now = loop.time()
            if now - start >= timeout:
                break
            if (self.last_call, self.active) != seen:
                seen, quiet_since, turns = (self.last_call, self.active), now, 0
            else:
                turns += 1
            settled = now - quiet_since >= quiet and turns >= quiet_turns
            if not self.active and (settled or now - start >= linger):
                break
            await asyncio.sleep(0.002)
        return {
            "running_at_signal": running_at_start,
            "still_running": self.active,
            "held_for_unavailable": self.held,
            "drain_seconds": round(loop.time() - start, 3),
        }


MiB = 1024 * 1024
#: The transport's ceiling when the settings name none and the models ask for less (gRPC's own default).
DEFAULT_MESSAGE_BYTES = 4 * MiB
#: Room for everything around the tensors in a request message (names, shapes, parameters).
ENVELOPE_BYTES = 64 * 1024


class MessageLimits:
    """How large a request may be. ``transport`` is the fixed ceiling given to gRPC and the HTTP
    server (the ``max_message_bytes`` setting, else sized from the models loaded at start-up);
    ``current`` follows the models served now: their largest legitimate request in any front
    end's encoding (:attr:`~service.core.spec.ModelSpec.wire_bytes`) plus an envelope, never over
    ``transport``. A request message over ``current`` is refused before it is parsed."""

    def __init__(self, explicit: int | None) -> None:
        self.explicit = explicit
        self.transport = explicit or DEFAULT_MESSAGE_BYTES
        self.current = self.transport

    def follow(self, largest_request: int | None) -> None:
        """The largest request (wire bytes) of the models served now (None: unbounded, a
        dynamic dimension somewhere, or no model)."""
        wanted = self.transport if largest_request is None else largest_request + ENVELOPE_BYTES
        self.current = min(wanted, self.transport)

    def size_transport(self, largest_request: int | None) -> None:
        """Before the transports exist: size the ceiling from the models loaded at start-up."""
        if self.explicit is None and largest_request is not None:
            self.transport = max(DEFAULT_MESSAGE_BYTES, largest_request + ENVELOPE_BYTES)
        self.follow(largest_request)
