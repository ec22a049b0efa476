"""The mirror's child process (``python -m service.rollout.mirror_worker``): runs mirrored batches
on its own onnxruntime sessions at idle CPU priority, so that mirrored work takes neither the
server's GIL nor CPU time its requests could use (docs/rollout.md, "Where mirrored batches run").

It reads frames from stdin and answers each on stdout, in order; a frame is an 8-byte little-endian
length and a pickle. The parent is the server that spawned it (:mod:`.mirror_process`), over pipes
that only the two hold. EOF on stdin ends it.
"""

from __future__ import annotations

import argparse
import os
import pickle
import struct
import sys
from collections import OrderedDict
from typing import IO, Any

HEADER = struct.Struct("<Q")
#: Sessions kept: the shadow's (canary checks run in the server); a new shadow replaces it.
SESSIONS = 1


def lower_priority() -> str:
    """Run this thread, and the threads it starts, only on CPU time nothing else wants."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "idle"
    except (AttributeError, OSError):  # not Linux, or a sandbox that refuses it
        pass
    try:
        os.nice(19)
        return "nice 19"
    except OSError:
        return "normal"


def read_frame(stream: IO[bytes]) -> bytes | None:
    """The next frame's body, or None at EOF."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    body = stream.read(size)
    return body if len(body) == size else None


def write_frame(stream: IO[bytes], value: Any) -> None:
    body = pickle.dumps(value, protocol=5)
    stream.write(HEADER.pack(len(body)))
    stream.write(body)
    stream.flush()


def serve(inp: IO[bytes], out: IO[bytes], intra_op_threads: int, inter_op_threads: int) -> None:
    """Say hello (pid, priority), then answer frames until EOF: ``(key, path, providers, feeds,
    output)`` → ``(True, array)`` or ``(False, why)``."""
    import onnxruntime as ort

    from ..core.runtime import session_options

    priority = lower_priority()  # after the imports, before onnxruntime starts threads: they inherit it
    write_frame(out, {"pid": os.getpid(), "priority": priority})
    sessions: OrderedDict[Any, ort.InferenceSession] = OrderedDict()
    while (frame := read_frame(inp)) is not None:
        key, path, providers, feeds, output = pickle.loads(frame)
        try:
            session = sessions.get(key)
            if session is None:
                options = session_options(intra_op_threads, inter_op_threads)
                options.log_severity_level = 4  # failures go to the server, which counts them
                session = sessions[key] = ort.InferenceSession(path, options, providers=providers)
                while len(sessions) > SESSIONS:
                    sessions.popitem(last=False)
            sessions.move_to_end(key)
            reply: tuple[bool, Any] = (True, session.run([output], feeds)[0])
        except Exception as exc:  # a failing shadow: the parent counts it
            reply = (False, f"{type(exc).__name__}: {exc}")
        write_frame(out, reply)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--intra-op-threads", type=int, default=1)
    parser.add_argument("--inter-op-threads", type=int, default=1)
    args = parser.parse_args(argv)
    # The protocol owns the real stdout; anything else printed goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        serve(sys.stdin.buffer, out, args.intra_op_threads, args.inter_op_threads)
    except (BrokenPipeError, KeyboardInterrupt):  # the server went away
        pass


if __name__ == "__main__":
    main()
