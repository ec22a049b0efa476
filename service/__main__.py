"""CLI: ``python -m service --model-repository models --port 8001`` (also ``model-serving``).

Every :class:`~service.settings.Settings` field is a flag (``--field-name``) and an env var
(``SERVING_FIELD_NAME``); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError

from .core.runtime import ProviderUnavailable
from .observability.logs import configure_logging
from .settings import RENAMED, Settings

log = logging.getLogger("service")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field; unset flags fall through to env vars and defaults."""
    parser = argparse.ArgumentParser(
        prog="model-serving",
        description="gRPC model server (typed API + KServe V2) on onnxruntime.",
        argument_default=argparse.SUPPRESS,
    )
    prefix = Settings.model_config.get("env_prefix", "")
    for name, info in Settings.model_fields.items():
        kwargs: dict[str, typing.Any] = {"metavar": name.upper()}
        if typing.get_origin(info.annotation) is typing.Literal:
            choices = typing.get_args(info.annotation)
            kwargs = {"choices": choices}
            if all(c.isupper() for c in choices):  # --log-level debug works too
                kwargs["type"] = str.upper
        default = info.default if info.default is not None else "unset"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            help=f"{info.description} [env {prefix}{name.upper()}, default {default}]",
            **kwargs,
        )
    for old, new in RENAMED.items():  # the old spellings still work (parse_settings maps them)
        parser.add_argument(
            "--" + old.replace("_", "-"),
            dest=old,
            metavar=new.upper(),
            help=f"old name of --{new.replace('_', '-')} [env {prefix}{old.upper()}]",
        )
    return parser


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from env vars, overridden by the flags in ``argv`` (a renamed setting's new flag
    wins over its old one, wherever each stands)."""
    values = vars(build_parser().parse_args(argv))
    for old, new in RENAMED.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    return Settings(**values)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        print(f"model-serving: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)

    from .app import serve  # after logging is configured

    try:
        asyncio.run(serve(settings))
    except (ProviderUnavailable, FileNotFoundError, RuntimeError) as exc:
        log.error("refusing to start: %s", exc)
        print(f"model-serving: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
