"""A worker process, started by the supervisor (``python -m service --workers N``), never by hand:
``python -m service.workers --control-fd FD --index I --log-level L --log-format F``.

Its settings come over the control channel (tokens never appear in ``ps`` or the environment)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from collections.abc import Sequence

from ..observability.logs import configure_logging

log = logging.getLogger("service.workers")


class _WorkerField(logging.Filter):
    """Every log line of a worker says which (``"worker": 1``)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


async def _run(fd: int, index: int) -> int:
    from ..app import serve
    from ..settings import Settings
    from .control import Channel
    from .worker import Aborted, WorkerLink

    channel = await Channel.open(socket.socket(fileno=fd))
    try:
        config = await channel.receive()
    except (ConnectionError, ValueError):  # the supervisor went away before sending it
        return 1
    settings = Settings(**config["settings"])
    link = WorkerLink(channel, index, list(config.get("unloaded", [])), settings.strict_model_loading)
    channel.start(link.handle)
    watcher = asyncio.get_running_loop().create_task(channel.closed.wait())
    watcher.add_done_callback(lambda _: link.channel_closed())
    try:
        await serve(settings, link)
    except Aborted as exc:
        log.info("start-up called off", extra={"reason": str(exc)})
        return 1
    except (RuntimeError, OSError) as exc:  # refused: the supervisor refuses with this reason
        log.error("worker refused to start", extra={"reason": str(exc)})
        channel.notify("refused", reason=str(exc))
        await channel.flush()
        return 1
    finally:
        watcher.cancel()
        await channel.aclose()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.workers", description=__doc__)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="json", choices=["json", "text"])
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_WorkerField(args.index))
    return asyncio.run(_run(args.control_fd, args.index))


if __name__ == "__main__":
    sys.exit(main())
