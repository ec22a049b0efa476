"""Invalid settings, said the way a person fixes them: one line per problem naming the flag and
the environment variable, the value given (secrets never shown) and what is expected, instead of
pydantic's dump (error codes, a URL, and for a cross-field error the whole settings dict)."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from .settings import ENV_PREFIX, RENAMED, Settings

PROG = "model-serving"
REDACTED = "<redacted>"
_MAX_VALUE_CHARS = 80


def is_secret(name: str) -> bool:
    """Every setting whose name holds "token" (``auth_tokens``, ``auth_token_file``, …)."""
    return "token" in name


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_var(name: str) -> str:
    return ENV_PREFIX + name.upper()


def describe(
    error: ValidationError, flags_given: Collection[str] = (), environ: Mapping[str, str] | None = None
) -> list[str]:
    """One line per problem in ``error`` (raised by :class:`Settings`). ``flags_given``: the
    names of the flags on the command line, old spellings included, to say which spelling of a
    renamed setting the value came from; ``environ`` likewise for env vars (default: none)."""
    environ = environ or {}
    lines = []
    for problem in error.errors(include_url=False):
        loc = [str(part) for part in problem["loc"]]
        if loc and loc[0] in Settings.model_fields:
            lines.append(_field_line(loc, problem, flags_given, environ))
        else:  # a cross-field check (model validator): name every setting it mentions
            lines.append(f"{PROG}: invalid settings: {_cross_field_message(problem, flags_given)}")
    return lines


def describe_unparsed(field: str) -> str:
    """The line for a value pydantic-settings could not even parse (JSON in an env var)."""
    return f"{PROG}: invalid {_names(field)} {REDACTED if is_secret(field) else '(env value)'}: expected JSON"


def _names(field: str, given_as: str | None = None) -> str:
    spelled = f", given as {given_as}" if given_as else ""
    return f"{flag(field)} ({env_var(field)}{spelled})"


def _given_as(field: str, flags_given: Collection[str], environ: Mapping[str, str]) -> str | None:
    """The old spelling of a renamed setting, when that is where the value came from."""
    for old, new in RENAMED.items():
        if new != field:
            continue
        if old in flags_given and new not in flags_given:
            return flag(old)
        if new not in flags_given and env_var(new) not in environ and env_var(old) in environ:
            return env_var(old)
    return None


def _field_line(
    loc: Sequence[str], problem: Mapping[str, Any], flags_given: Collection[str], environ: Mapping[str, str]
) -> str:
    field, path = loc[0], ".".join(loc[1:])
    secret = is_secret(field)
    value = REDACTED if secret else _show(problem.get("input"))
    where = f"{path}={value}" if path else value
    expected = _expected(problem)
    if secret:
        expected = _scrub(expected, problem.get("input"))
    return f"{PROG}: invalid {_names(field, _given_as(field, flags_given, environ))} {where}: {expected}"


def _cross_field_message(problem: Mapping[str, Any], flags_given: Collection[str]) -> str:
    message = _expected(problem)
    named = [name for name in Settings.model_fields if re.search(rf"\b{name}\b", message)]
    for name in named:
        message = re.sub(rf"\b{name}\b", _names(name), message)
    values = problem.get("input")
    if isinstance(values, Mapping):
        given = [
            f"{flag(name)}={REDACTED if is_secret(name) else _show(values[name])}"
            for name in named
            if values.get(name) is not None
        ]
        if given:
            message += f" (given: {', '.join(given)})"
    return message


_EXPECTED = {
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "dict_type": "expected a JSON object",
    "extra_forbidden": "not a known setting",
}
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "more than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}


def _expected(problem: Mapping[str, Any]) -> str:
    kind = problem["type"]
    context = problem.get("ctx") or {}
    if kind in _EXPECTED:
        return _EXPECTED[kind]
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return f"expected {words} {context.get(key)}"
    message = str(problem["msg"])
    if kind == "value_error":
        return message.removeprefix("Value error, ")
    return re.sub(r"^Input should be ", "expected ", message)


def _show(value: object) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"


def _scrub(message: str, value: object) -> str:
    """A secret's message never quotes the secret (nor any comma-separated part of it)."""
    parts: list[str] = []
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(item, str):
            parts += [item, *item.split(",")]
    for part in sorted({p.strip() for p in parts if len(p.strip()) >= 3}, key=len, reverse=True):
        message = message.replace(part, REDACTED)
    return message
