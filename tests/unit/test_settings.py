"""Server settings (service.settings) from env vars and flags (service.__main__.parse_settings),
including the renamed ones, whose old flags and env vars still work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.__main__ import parse_settings
from service.settings import BUNDLED_MODELS, RENAMED, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("SERVING_")]:
        monkeypatch.delenv(var)


def test_defaults() -> None:
    settings = Settings()
    assert (settings.port, settings.provider, settings.model_repository) == (8001, "auto", BUNDLED_MODELS)
    assert settings.max_message_bytes is None  # sized from the models loaded at start-up


def test_env_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_PORT", "9001")
    monkeypatch.setenv("SERVING_PROVIDER", "cpu")
    monkeypatch.setenv("SERVING_MAX_BATCH_SIZE", "64")  # the old name of max_request_rows
    settings = parse_settings(["--port", "9002", "--model-repository", "somewhere", "--log-level", "debug"])
    assert settings.port == 9002  # flag wins
    assert settings.provider == "cpu"  # env
    assert settings.max_request_rows == 64
    assert settings.model_repository == Path("somewhere")
    assert settings.log_level == "DEBUG"


def test_tls_settings_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key must be given together"):
        Settings(tls_cert=Path("cert.pem"))
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert"):
        Settings(tls_client_ca=Path("ca.pem"))


def test_renamed_settings_keep_their_old_flags_and_env_vars(monkeypatch: pytest.MonkeyPatch) -> None:
    """max_batch_size → max_request_rows, batch_max_size → max_batch_rows: the old flag and env
    var still set the new setting; given together with the new spelling, the new one wins."""
    assert RENAMED == {"max_batch_size": "max_request_rows", "batch_max_size": "max_batch_rows"}
    # Old flags.
    old = parse_settings(["--max-batch-size", "5", "--batch-max-size", "7"])
    assert (old.max_request_rows, old.max_batch_rows) == (5, 7)
    # Old and new flags together, in either order: the new one.
    for argv in (
        ["--max-request-rows", "9", "--max-batch-size", "5"],
        ["--max-batch-size", "5", "--max-request-rows", "9"],
    ):
        assert parse_settings(argv).max_request_rows == 9, argv
    for argv in (
        ["--max-batch-rows", "11", "--batch-max-size", "7"],
        ["--batch-max-size", "7", "--max-batch-rows", "11"],
    ):
        assert parse_settings(argv).max_batch_rows == 11, argv
    # Old env vars.
    monkeypatch.setenv("SERVING_MAX_BATCH_SIZE", "5")
    monkeypatch.setenv("SERVING_BATCH_MAX_SIZE", "7")
    assert (Settings().max_request_rows, Settings().max_batch_rows) == (5, 7)
    # Old and new env vars together: the new one.
    monkeypatch.setenv("SERVING_MAX_REQUEST_ROWS", "9")
    monkeypatch.setenv("SERVING_MAX_BATCH_ROWS", "11")
    assert (Settings().max_request_rows, Settings().max_batch_rows) == (9, 11)
    # A flag (either spelling) still beats an env var (either spelling).
    assert parse_settings(["--max-batch-size", "3"]).max_request_rows == 3


def test_renamed_settings_in_help() -> None:
    from service.__main__ import build_parser

    text = build_parser().format_help()
    assert "--max-request-rows" in text and "--max-batch-rows" in text
    assert "old name of --max-request-rows [env SERVING_MAX_BATCH_SIZE]" in " ".join(text.split())


# -- invalid settings, said per flag (service.settings_errors; the CLI end to end: tests/e2e/test_cli.py)


def invalid(argv: list[str]) -> list[str]:
    """The lines the CLI prints for ``argv`` (and the current env)."""
    from pydantic import ValidationError

    from service.__main__ import build_parser
    from service.settings_errors import describe

    with pytest.raises(ValidationError) as info:
        parse_settings(argv)
    return describe(info.value, set(vars(build_parser().parse_args(argv))), os.environ)


def test_invalid_settings_one_line_per_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_SHUTDOWN_GRACE_SECONDS", "soon")
    assert invalid(["--port", "-1", "--log-level", "loud", "--batching", '{"m": {"colour": 1}}']) == [
        "model-serving: invalid --port (SERVING_PORT) '-1': expected at least 0",
        "model-serving: invalid --batching (SERVING_BATCHING) m.colour=1: not a known setting",
        "model-serving: invalid --shutdown-grace-seconds (SERVING_SHUTDOWN_GRACE_SECONDS) 'soon': expected a number",
        "model-serving: invalid --log-level (SERVING_LOG_LEVEL) 'LOUD': expected 'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
    ]


def test_renamed_setting_says_which_spelling_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVING_BATCH_MAX_SIZE", "0")
    assert invalid(["--max-batch-size", "0"]) == [
        "model-serving: invalid --max-request-rows (SERVING_MAX_REQUEST_ROWS, given as --max-batch-size) '0': "
        "expected at least 1",
        "model-serving: invalid --max-batch-rows (SERVING_MAX_BATCH_ROWS, given as SERVING_BATCH_MAX_SIZE) '0': "
        "expected at least 1",
    ]
    # The new spelling given: no mention of the old one.
    assert invalid(["--max-request-rows", "0"])[0].startswith(
        "model-serving: invalid --max-request-rows (SERVING_MAX_REQUEST_ROWS) '0'"
    )


def test_token_settings_are_never_printed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every setting whose name holds "token" is secret: value and any quote of it redacted, in
    field errors and in cross-field ones (pydantic's dump carried the whole settings dict)."""
    from service.settings_errors import is_secret

    assert {name for name in Settings.model_fields if is_secret(name)} >= {"auth_tokens", "auth_token_file"}
    monkeypatch.setenv("SERVING_AUTH_TOKENS", "s3cr3t,bad token")
    lines = invalid([])
    assert lines == [
        "model-serving: invalid --auth-tokens (SERVING_AUTH_TOKENS) <redacted>: "
        "auth tokens must be non-empty printable ASCII without spaces"
    ]
    monkeypatch.setenv("SERVING_AUTH_TOKENS", "s3cr3t")
    lines = invalid(["--tls-client-ca", "ca.pem", "--auth-token-file", "/run/secret-tokens"])
    assert lines == [
        "model-serving: invalid settings: --tls-client-ca (SERVING_TLS_CLIENT_CA) needs --tls-cert "
        "(SERVING_TLS_CERT) and --tls-key (SERVING_TLS_KEY) (given: --tls-client-ca='ca.pem')"
    ]
    assert not any("s3cr3t" in line or "secret-tokens" in line for line in lines)


def test_log_format_defaults_to_auto_and_strict_loading_has_triton_spelling() -> None:
    assert Settings().log_format == "auto"
    assert Settings().strict_model_loading is False
    assert parse_settings(["--exit-on-error", "true"]).strict_model_loading is True
    assert parse_settings(["--strict-model-loading", "1"]).strict_model_loading is True


def test_every_setting_is_in_the_serving_docs() -> None:
    """docs/serving.md's settings table has a row per setting: its flag and its env var."""
    from fixtures.servers import REPO_ROOT

    rows = [line for line in (REPO_ROOT / "docs" / "serving.md").read_text().splitlines() if line.startswith("| `--")]
    for name in Settings.model_fields:
        flag, env = f"`--{name.replace('_', '-')}`", f"`SERVING_{name.upper()}`"
        assert any(line.startswith(f"| {flag}") and env in line for line in rows), name


def test_workers_auto_is_the_usable_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import usable_cores

    assert Settings().workers == 1  # one process, no supervisor
    assert parse_settings(["--workers", "auto"]).workers == usable_cores() >= 1
    assert usable_cores() <= len(os.sched_getaffinity(0))
    monkeypatch.setenv("SERVING_WORKERS", "3")
    assert parse_settings([]).workers == 3
    assert invalid(["--workers", "many"]) == [
        "model-serving: invalid --workers (SERVING_WORKERS) 'many': expected a whole number of processes or 'auto'"
    ]
    assert invalid(["--workers", "0"]) == [
        "model-serving: invalid --workers (SERVING_WORKERS) '0': expected at least 1"
    ]
