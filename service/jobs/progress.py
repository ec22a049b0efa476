"""A dependency-free progress bar on stderr: rows done, percent, rate and ETA.

On a terminal the bar redraws in place (at most 10 times a second); otherwise (logs, CI,
containers) it prints one line every ``interval`` seconds and a last line at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """``update(n)`` after each chunk; ``close()`` at the end. ``initial`` rows were done by an
    earlier run (a resumed job): they count toward the total but not toward the rate."""

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        label: str = "rows",
        mode: str = "auto",
        stream: TextIO | None = None,
        interval: float = 5.0,
        width: int = 30,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "log"
        if mode not in ("bar", "log", "none"):
            raise ValueError(f"progress mode must be auto, bar, log or none; got {mode!r}")
        self.mode = mode
        self.total = total
        self.done = initial
        self.initial = initial
        self.label = label
        self.interval = interval if mode == "log" else 0.1
        self.width = width
        self.start = time.monotonic()
        self._last = 0.0
        self._drawn = False

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        fraction = self.done / self.total if self.total else 1.0
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        resumed = f" (resumed at {self.initial:,})" if self.initial else ""
        elapsed = _duration(time.monotonic() - self.start)
        return (
            f"{self.label} [{bar}] {self.done:,}/{self.total:,} {fraction:4.0%}  "
            f"{rate:,.0f} {self.label}/s  ETA {_duration(eta)}  elapsed {elapsed}{resumed}"
        )

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.mode != "none" and (now - self._last >= self.interval or self.done >= self.total):
            self._draw()
            self._last = now

    def _draw(self) -> None:
        if self.mode == "bar":
            self.stream.write("\r" + self.line() + "\x1b[K")
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.mode == "none":
            return
        if self.mode == "log" and self._last and self.done < self.total:
            self._draw()
        if self.mode == "bar" and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
