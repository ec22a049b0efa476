"""Bearer-token auth (service.security): the token file, the store, the authenticator's answers."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from service import security
from service.security import (
    INVALID,
    MALFORMED,
    MISSING,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    AuthConfigError,
    Authenticator,
    Refusal,
    TokenStore,
    read_token_file,
)
from service.settings import Settings


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read auth token file"), ("\n# only comments\n", "holds no token"), ("two words\n", "spaces")],
    ids=["missing", "empty", "spaces"],
)
def test_a_bad_token_file_is_a_config_error(tmp_path: Path, content: str | None, message: str) -> None:
    token_file = tmp_path / "tokens"
    if content is not None:
        token_file.write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        read_token_file(token_file) if content is not None else TokenStore(file=token_file)
    with pytest.raises(AuthConfigError, match=message):
        TokenStore(file=token_file)  # the server refuses to start on it (tests/e2e/test_auth_limits.py)


def test_token_file_format(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# rotated monthly\n\n  first \nsecond\n")
    assert read_token_file(path) == ["first", "second"]


def test_token_comparison_covers_every_token() -> None:
    store = TokenStore(["alpha", "beta"])
    assert store.accepts("alpha") and store.accepts("beta")
    assert not store.accepts("alph") and not store.accepts("alphaa") and not store.accepts("")


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The accepted tokens each ``hmac.compare_digest`` call compared against, in order."""
    seen: list[bytes] = []
    real = security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append(b)
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)
    return seen


def test_every_token_is_compared(compared: list[bytes]) -> None:
    """No early exit at the first match: each check compares against every accepted token."""
    store = TokenStore(["alpha", "beta", "gamma"])
    for token in ("alpha", "gamma", "wrong"):
        compared.clear()
        store.accepts(token)
        assert len(compared) == 3 and len(set(compared)) == 3, token


def test_every_configured_token_is_compared_on_every_check(tmp_path: Path, compared: list[bytes]) -> None:
    """Across the settings' tokens, the file's tokens and the admin tokens: one comparison per
    configured token for every call, whether the token presented is a user's, an admin's or
    nobody's (an early exit would tell a caller how far down the lists its guess matched)."""
    path = tmp_path / "tokens"
    path.write_text("file-1\nfile-2\n")
    authenticator = Authenticator(TokenStore(["user-1", "user-2"], file=path), TokenStore(["admin-1"]))
    for token, control in (("user-1", False), ("file-2", False), ("admin-1", False), ("nobody", False)):
        compared.clear()
        authenticator.check([f"Bearer {token}"], control=control)
        assert len(compared) == 5 and len(set(compared)) == 5, token
    for token in ("admin-1", "user-2", "nobody"):
        compared.clear()
        authenticator.check([f"Bearer {token}"], control=True)
        assert len(compared) == 5 and len(set(compared)) == 5, token


def test_from_settings() -> None:
    assert Authenticator.from_settings(Settings()) is None  # auth off
    authenticator = Authenticator.from_settings(Settings(auth_tokens=["a-token"]))
    assert authenticator is not None and authenticator.tokens is not None and authenticator.tokens.accepts("a-token")
    assert authenticator.admins is None


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ([], MISSING),
        (["Bearer a", "Bearer b"], "more than one authorization metadata entry"),
        (["Basic Zm9vOmJhcg=="], MALFORMED),
        (["Bearer "], MALFORMED),
        (["Bearer"], MALFORMED),
        (["Bearer wrong"], INVALID),
        (["Bearer good-token"], None),
        (["bearer good-token"], None),  # the scheme is case-insensitive
        (["  Bearer   good-token  "], None),
        ([b"Bearer good-token"], None),  # binary metadata values
        ([b"Bearer \xff"], INVALID),
    ],
)
def test_authenticator_problems(values: list[str | bytes], problem: str | None) -> None:
    refusal = Authenticator(TokenStore(["good-token"])).check(values)
    assert (None if refusal is None else refusal.message) == problem
    assert refusal is None or refusal.status == UNAUTHENTICATED


def test_model_control_needs_an_admin_token() -> None:
    both = Authenticator(TokenStore(["user"]), TokenStore(["admin"]))
    assert both.check(["Bearer admin"], control=True) is None
    assert both.check(["Bearer admin"]) is None  # an admin may run inference too
    assert both.check(["Bearer user"]) is None
    denied = both.check(["Bearer user"], control=True)
    assert denied is not None and denied.status == PERMISSION_DENIED and "not load or unload" in denied.message
    unknown = both.check(["Bearer nope"], control=True)
    assert unknown is not None and unknown.status == UNAUTHENTICATED
    users_only = Authenticator(TokenStore(["user"]))  # auth on, no admin token: nobody may
    closed = users_only.check(["Bearer user"], control=True)
    assert closed is not None and closed.status == PERMISSION_DENIED and "none is configured" in closed.message
    admins_only = Authenticator(None, TokenStore(["admin"]))  # inference open, control guarded
    assert admins_only.check([]) is None
    assert admins_only.check([], control=True) == Refusal(UNAUTHENTICATED, MISSING)


def test_the_messages_clients_see() -> None:
    assert MISSING == "missing 'authorization: Bearer <token>' metadata: this server requires a bearer token"
    assert MALFORMED == "the authorization metadata must be 'Bearer <token>'"
    assert INVALID == "invalid bearer token"


def test_refusals_are_logged_without_flooding(caplog: pytest.LogCaptureFixture) -> None:
    authenticator = Authenticator(TokenStore(["good-token"]))
    with caplog.at_level(logging.WARNING, logger="service.security"):
        for _ in range(5):
            authenticator.refused("/serving.v1.ModelService/Classify", Refusal(UNAUTHENTICATED, INVALID))
    lines = [r for r in caplog.records if r.getMessage() == "call refused: UNAUTHENTICATED"]
    assert len(lines) == 1  # one warning per 10 s at most
    assert lines[0].method == "/serving.v1.ModelService/Classify" and lines[0].reason == INVALID
    assert "good-token" not in caplog.text


def test_refusal_warnings_are_one_per_ten_seconds_with_the_count_since(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By a clock the test moves: a flood of refusals is one warning now, the next one 10 s later
    saying how many were refused meanwhile."""
    now = [1000.0]
    monkeypatch.setattr(security.time, "monotonic", lambda: now[0])
    authenticator = Authenticator(TokenStore(["good-token"]))
    refusal = Refusal(UNAUTHENTICATED, INVALID)
    with caplog.at_level(logging.WARNING, logger="service.security"):
        for step in range(100):  # 100 refusals, 0.15 s apart: 15 s
            now[0] = 1000.0 + step * 0.15
            authenticator.refused("/m", refusal)
    lines = [r for r in caplog.records if r.getMessage() == "call refused: UNAUTHENTICATED"]
    assert [r.refused_since_last_log for r in lines] == [1, 67]  # the first, then the 67 of the next 10.05 s


def test_the_token_file_is_re_read_when_it_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(security, "RECHECK_SECONDS", 0.0)
    path = tmp_path / "tokens"
    path.write_text("old-token\n")
    store = TokenStore(["fixed-token"], file=path)
    assert store.accepts("old-token")
    replacement = tmp_path / "tokens.new"
    replacement.write_text("new-token\n")
    os.replace(replacement, path)
    assert store.accepts("new-token") and not store.accepts("old-token") and store.accepts("fixed-token")
    path.write_text("# nothing\n")  # an emptied file fails closed: its tokens stop working
    assert not store.accepts("new-token") and store.accepts("fixed-token")
    path.write_text("newer-token\n")
    assert store.accepts("newer-token")


def test_a_token_file_that_goes_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """deny (the default): its tokens are refused, logged once however often it is checked;
    keep: the last good tokens go on working."""
    monkeypatch.setattr(security, "RECHECK_SECONDS", 0.0)
    for mode, still_accepted in (("deny", False), ("keep", True)):
        path = tmp_path / f"tokens-{mode}"
        path.write_text("file-token\n")
        store = TokenStore(file=path, on_missing=mode)
        assert store.accepts("file-token")
        path.unlink()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="service.security"):
            assert [store.accepts("file-token") for _ in range(20)] == [still_accepted] * 20
        unusable = [r for r in caplog.records if "file unusable" in r.getMessage()]
        assert len(unusable) == 1 and "No such file" in unusable[0].error, mode
        path.write_text("file-token\n")
        assert store.accepts("file-token")
        assert "file-token" not in caplog.text
