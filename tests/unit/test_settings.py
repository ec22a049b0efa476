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
