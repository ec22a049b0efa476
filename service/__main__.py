"""CLI: ``python -m service --model-repository models --port 8001`` (also ``model-serving``).

Every :class:`~service.settings.Settings` field is a flag (``--field-name``) and an env var
(``SERVING_FIELD_NAME``); flags win.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import sys
import typing
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from . import DISTRIBUTION, settings_errors
from .observability.logs import configure_logging
from .settings import RENAMED, Settings

log = logging.getLogger("service")
#: Other spellings of a flag (Triton's name for strict model loading).
FLAG_ALIASES = {"strict_model_loading": ["--exit-on-error"]}
PROG = settings_errors.PROG
#: The exit status of a refused start-up (invalid settings: 2, as argparse).
REFUSED = 1
INVALID_SETTINGS = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line (no usage dump), exit 2."""
        self.exit(INVALID_SETTINGS, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Settings field; unset flags fall through to env vars and defaults. Values are
    checked by Settings, not here, so a flag and its env var get the same message."""
    parser = _Parser(
        prog=PROG,
        description="gRPC model server (typed API + KServe V2) on onnxruntime.",
        argument_default=argparse.SUPPRESS,
    )
    prefix = Settings.model_config.get("env_prefix", "")
    for name, info in Settings.model_fields.items():
        kwargs: dict[str, typing.Any] = {"metavar": name.upper()}
        if typing.get_origin(info.annotation) is typing.Literal:
            kwargs["metavar"] = "{" + ",".join(typing.get_args(info.annotation)) + "}"
        default = info.default if info.default is not None else "unset"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            *FLAG_ALIASES.get(name, []),
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
    return Settings(**_flag_values(argv))


def _flag_values(argv: Sequence[str] | None) -> dict[str, typing.Any]:
    values = vars(build_parser().parse_args(argv))
    for old, new in RENAMED.items():
        if old in values:
            values.setdefault(new, values.pop(old))
    return values


def _settings_or_lines(argv: Sequence[str] | None) -> Settings | list[str]:
    """The settings, or one line per problem (flag, env var, value with secrets redacted, what
    is expected)."""
    given = set(vars(build_parser().parse_args(argv)))  # the spellings used, old ones included
    try:
        return Settings(**_flag_values(argv))
    except ValidationError as exc:
        return settings_errors.describe(exc, given, os.environ)
    except SettingsError as exc:  # an env value pydantic-settings could not parse
        field = re.search(r'field "(\w+)"', str(exc))
        return [settings_errors.describe_unparsed(field.group(1)) if field else f"{PROG}: invalid settings: {exc}"]


def refuse(reason: str, log_format: str) -> int:
    """A refused start-up: its one line, last on stderr (a JSON log line when logs are JSON)."""
    if log_format == "json":
        log.error(f"refusing to start: {reason}", extra={"reason": reason, "exit_status": REFUSED})
    else:
        print(f"{PROG}: error: {reason}", file=sys.stderr)
    return REFUSED


def main(argv: Sequence[str] | None = None) -> int:
    settings = _settings_or_lines(argv)
    if isinstance(settings, list):
        print("\n".join(settings), file=sys.stderr)
        return INVALID_SETTINGS
    log_format = configure_logging(settings.log_level, settings.log_format)

    try:
        import onnxruntime  # noqa: F401  (not a base dependency: the cpu or gpu extra brings it)
    except ImportError as exc:
        if exc.name != "onnxruntime":
            return refuse(f"onnxruntime cannot be imported: {exc}", log_format)
        return refuse(
            f"onnxruntime is not installed: install the server with the extra for your hardware, "
            f"pip install '{DISTRIBUTION}[cpu]' (CPU) or '{DISTRIBUTION}[gpu]' (CUDA)",
            log_format,
        )

    try:
        if settings.workers > 1:  # a supervisor and its worker processes (service/workers)
            from .workers.supervisor import supervise

            supervise(settings, log_format)
        else:
            from .app import serve  # after logging is configured

            asyncio.run(serve(settings))
    except (RuntimeError, OSError) as exc:  # incl. ProviderUnavailable, AuthConfigError, a busy port
        return refuse(str(exc), log_format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
