"""Optional bearer-token auth: ``authorization: Bearer <token>`` (gRPC metadata, HTTP header).

On when the settings name at least one token (``auth_tokens``) or a token file
(``auth_token_file``, one token per line, ``#`` comments; re-read when it changes, checked at most
once a second, so tokens rotate without a restart). Every call must then carry a valid token, or
it ends with ``UNAUTHENTICATED`` before its request is decoded.

Exempt, so that load balancers and Kubernetes probes need no secret: the gRPC health service
(``grpc.health.v1.Health``) and server reflection (it describes the API, it serves nothing).

Tokens are compared in constant time: both sides are hashed (SHA-256, so lengths do not leak
either) and compared with :func:`hmac.compare_digest` against every configured token, without
stopping at the first match.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

from .settings import Settings

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0
_LOG_EVERY_SECONDS = 10.0


class AuthConfigError(RuntimeError):
    """The token settings are unusable; the server must not start."""


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def read_token_file(path: Path) -> list[str]:
    """Tokens in ``path``: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read auth token file {path}: {exc}") from None
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise AuthConfigError(f"auth token file {path} holds no token")
    bad = [i for i, t in enumerate(tokens) if not all(33 <= ord(c) <= 126 for c in t)]
    if bad:
        raise AuthConfigError(f"auth token file {path}: token {bad[0] + 1} has spaces or non-ASCII characters")
    return tokens


class TokenStore:
    """The accepted tokens (as digests): the fixed ones plus those in the file, if any."""

    def __init__(self, tokens: Sequence[str] = (), file: Path | None = None) -> None:
        self._fixed = [_digest(t) for t in tokens]
        self._file = file
        self._file_digests: list[bytes] = []
        self._signature: tuple[int, int, int] | None = None
        self._checked = 0.0
        if file is not None:
            self._load_file()

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenStore | None:
        """None when auth is off (no tokens and no file)."""
        if not settings.auth_tokens and settings.auth_token_file is None:
            return None
        return cls(settings.auth_tokens, settings.auth_token_file)

    def _stat(self) -> tuple[int, int, int]:
        assert self._file is not None
        st = os.stat(self._file)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load_file(self) -> None:
        assert self._file is not None
        try:
            signature = self._stat()
        except OSError as exc:
            raise AuthConfigError(f"cannot read auth token file {self._file}: {exc}") from None
        self._file_digests = [_digest(t) for t in read_token_file(self._file)]
        self._signature = signature

    def _refresh(self) -> None:
        """Re-read the file when it changed; on a bad file keep the last good tokens."""
        now = time.monotonic()
        if self._file is None or now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            if self._stat() == self._signature:
                return
            self._load_file()
        except (OSError, AuthConfigError) as exc:
            log.error("auth token file not reloaded; keeping the previous tokens", extra={"error": str(exc)})
            try:
                self._signature = self._stat()  # do not retry (and log) until it changes again
            except OSError:
                pass
            return
        log.info("auth token file reloaded", extra={"path": str(self._file), "tokens": len(self._file_digests)})

    def accepts(self, token: str | bytes) -> bool:
        """Constant-time check of ``token`` against every accepted token."""
        self._refresh()
        given = _digest(token)
        match = False
        for digest in (*self._fixed, *self._file_digests):
            match |= hmac.compare_digest(given, digest)
        return match


MISSING = "missing 'authorization: Bearer <token>' metadata: this server requires a bearer token"
MALFORMED = "the authorization metadata must be 'Bearer <token>'"
INVALID = "invalid bearer token"


class Authenticator:
    """Checks ``authorization`` values against a :class:`TokenStore`, for every front end, and
    logs refusals without flooding (one warning per 10 s at most, with the count since)."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self._rejected = 0
        self._logged = 0.0

    def problem(self, values: Sequence[str | bytes]) -> str | None:
        """Why a call whose ``authorization`` entries are ``values`` is refused, or None when
        it carries a valid bearer token."""
        if not values:
            return MISSING
        if len(values) > 1:
            return "more than one authorization metadata entry"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return MALFORMED
        return None if self.store.accepts(token) else INVALID

    def refused(self, method: str, reason: str) -> None:
        """Count (and now and then log) a refused call."""
        self._rejected += 1
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_SECONDS:
            log.warning(
                "call refused: UNAUTHENTICATED",
                extra={"method": method, "reason": reason, "refused_since_last_log": self._rejected},
            )
            self._logged = now
            self._rejected = 0
