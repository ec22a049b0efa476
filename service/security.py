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
from typing import NamedTuple

from .settings import Settings

log = logging.getLogger(__name__)

RECHECK_SECONDS = 1.0
_LOG_EVERY_SECONDS = 10.0


class AuthConfigError(RuntimeError):
    """The token settings are unusable; the server must not start."""


def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def read_token_file(path: Path, what: str = "auth token") -> list[str]:
    """Tokens in ``path``: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read {what} file {path}: {exc}") from None
    tokens = [line.strip() for line in text.splitlines()]
    tokens = [t for t in tokens if t and not t.startswith("#")]
    if not tokens:
        raise AuthConfigError(f"{what} file {path} holds no token")
    bad = [i for i, t in enumerate(tokens) if not all(33 <= ord(c) <= 126 for c in t)]
    if bad:
        raise AuthConfigError(f"{what} file {path}: token {bad[0] + 1} has spaces or non-ASCII characters")
    return tokens


class TokenStore:
    """The accepted tokens (as digests): the fixed ones plus those in the file, if any."""

    def __init__(
        self, tokens: Sequence[str] = (), file: Path | None = None, on_missing: str = "deny", what: str = "auth token"
    ) -> None:
        self._fixed = [_digest(t) for t in tokens]
        self._file = file
        self._on_missing = on_missing
        self._what = what
        self._file_digests: list[bytes] = []
        self._signature: tuple[int, int, int] | None = None
        self._checked = 0.0
        if file is not None:
            self._signature = self._stat_or_fail()
            self._file_digests = [_digest(t) for t in read_token_file(file, what)]

    @property
    def configured(self) -> bool:
        return bool(self._fixed) or self._file is not None

    def _stat(self) -> tuple[int, int, int]:
        assert self._file is not None
        st = os.stat(self._file)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _stat_or_fail(self) -> tuple[int, int, int]:
        try:
            return self._stat()
        except OSError as exc:
            raise AuthConfigError(f"cannot read {self._what} file {self._file}: {exc.strerror or exc}") from None

    def _refresh(self) -> None:
        """Re-read the file when it changed (checked at most once a second). A file that went
        away, emptied or turned unreadable denies its tokens (``deny``) or keeps the last good
        ones (``keep``); each change of state is logged once."""
        now = time.monotonic()
        if self._file is None or now - self._checked < RECHECK_SECONDS:
            return
        self._checked = now
        try:
            signature: tuple[int, int, int] | None = self._stat()
        except OSError as exc:
            signature, problem = None, f"cannot read {self._file}: {exc.strerror or exc}"
        if signature == self._signature:
            return  # unchanged since the last look: good, or bad and logged already
        self._signature = signature
        if signature is not None:
            try:
                self._file_digests = [_digest(t) for t in read_token_file(self._file, self._what)]
                log.info(
                    f"{self._what} file reloaded", extra={"path": str(self._file), "tokens": len(self._file_digests)}
                )
                return
            except AuthConfigError as exc:
                problem = str(exc)
        if self._on_missing == "deny":
            self._file_digests = []
        log.error(
            f"{self._what} file unusable: its tokens are "
            + ("refused until it is fixed" if self._on_missing == "deny" else "kept as they were"),
            extra={"error": problem},
        )

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


UNAUTHENTICATED = "unauthenticated"
PERMISSION_DENIED = "permission_denied"


class Refusal(NamedTuple):
    """Why a call is refused: ``status`` is UNAUTHENTICATED or PERMISSION_DENIED."""

    status: str
    message: str


class Authenticator:
    """Who may call what, for every front end: inference calls need a token of ``tokens``
    (admins' tokens work too); model control needs one of ``admins`` — or, with no admin token
    configured, is open only on a server without auth. Refusals are logged without flooding (one
    warning per 10 s at most, with the count since)."""

    def __init__(self, tokens: TokenStore | None, admins: TokenStore | None = None) -> None:
        self.tokens = tokens
        self.admins = admins
        self._rejected = 0
        self._logged = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator | None:
        """None when no token of any kind is configured (an open server)."""
        tokens = admins = None
        if settings.auth_tokens or settings.auth_token_file is not None:
            tokens = TokenStore(settings.auth_tokens, settings.auth_token_file, settings.auth_token_file_missing)
        if settings.admin_tokens or settings.admin_token_file is not None:
            admins = TokenStore(
                settings.admin_tokens, settings.admin_token_file, settings.auth_token_file_missing, "admin token"
            )
        return None if tokens is None and admins is None else cls(tokens, admins)

    @staticmethod
    def _token(values: Sequence[str | bytes]) -> str | Refusal:
        if not values:
            return Refusal(UNAUTHENTICATED, MISSING)
        if len(values) > 1:
            return Refusal(UNAUTHENTICATED, "more than one authorization metadata entry")
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Refusal(UNAUTHENTICATED, MALFORMED)
        return token

    def check(self, values: Sequence[str | bytes], *, control: bool = False) -> Refusal | None:
        """Why a call whose ``authorization`` entries are ``values`` is refused, or None."""
        if not control and self.tokens is None:
            return None  # inference is open; only model control is guarded
        token = self._token(values)
        if isinstance(token, Refusal):
            return token
        # Both lists, always: no early exit across them either.
        is_admin = self.admins is not None and self.admins.accepts(token)
        is_user = self.tokens is not None and self.tokens.accepts(token)
        if control:
            if is_admin:
                return None
            if self.admins is None:
                return Refusal(
                    PERMISSION_DENIED,
                    "model control needs an admin token, and none is configured (--admin-tokens or --admin-token-file)",
                )
            if is_user:
                return Refusal(PERMISSION_DENIED, "this token may run inference but not load or unload models")
            return Refusal(UNAUTHENTICATED, INVALID)
        return None if is_admin or is_user else Refusal(UNAUTHENTICATED, INVALID)

    def refused(self, method: str, refusal: Refusal) -> None:
        """Count (and now and then log) a refused call."""
        self._rejected += 1
        now = time.monotonic()
        if now - self._logged >= _LOG_EVERY_SECONDS:
            log.warning(
                f"call refused: {refusal.status.upper()}",
                extra={"method": method, "reason": refusal.message, "refused_since_last_log": self._rejected},
            )
            self._logged = now
            self._rejected = 0
