"""Dashboard authentication: password hashes, sessions, CSRF tokens, login rate limit.

* :func:`hash_password` / :func:`verify_password`: salted scrypt (``hashlib.scrypt``),
  stored as ``scrypt$N$r$p$salt$hash`` (salt and hash base64, no padding);
  the comparison is constant-time (:func:`hmac.compare_digest`).
* :class:`Sessions`: a session is a signed token ``expires.nonce.signature``
  (HMAC-SHA256 under a key derived from a secret kept in the store and the
  password hash), so every worker process accepts a session another one issued,
  and changing the password ends every session. Logout revokes the token in
  this process and clears the cookie.
* :func:`csrf_token`: the CSRF token of a session (an HMAC of its nonce): a form
  or API write carries it, a cross-site page cannot read it.
* :class:`LoginLimiter`: failed logins per client per minute; past
  ``[web] login_attempts`` the client gets 429 until the minute has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

SCHEME = "scrypt"
N, R, P = 2**14, 8, 1  # 16 MiB, ~50 ms per hash: slow for guessing, fine for a login
SALT_BYTES = 16
HASH_BYTES = 32
MAX_N = 2**20  # a hash asking for more memory than this is refused (not ours)
MAX_PASSWORD = 1024  # bytes; a longer "password" is not checked at all
WINDOW = 60.0  # seconds of the login rate limit
MAX_CLIENTS = 10000  # clients the limiter remembers (the oldest are dropped)


class HashFormatError(ValueError):
    """``[web] password_hash`` is not a hash made by ``mxguard web passwd``."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, size: int) -> bytes:
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=size,
                          maxmem=128 * r * (n + p + 2) + 1024 * 1024)


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P,
                  salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` of ``password`` with a fresh random salt."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password.encode(), salt, n, r, p, HASH_BYTES)
    return f"{SCHEME}${n}${r}${p}${_b64(salt)}${_b64(digest)}"


@dataclass(frozen=True)
class ParsedHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def parse_hash(text: str) -> ParsedHash:
    """The parts of a stored hash; :class:`HashFormatError` says what is wrong."""
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise HashFormatError("expected scrypt$N$r$p$salt$hash (from `mxguard web passwd`)")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise HashFormatError("N, r, p must be numbers and salt, hash base64") from None
    if n < 2 or n > MAX_N or n & (n - 1) or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise HashFormatError(f"scrypt parameters out of range (N a power of 2 up to {MAX_N}, "
                              "r 1-64, p 1-16)")
    if len(salt) < 8 or len(digest) < 16:
        raise HashFormatError("salt or hash too short")
    return ParsedHash(n, r, p, salt, digest)


def verify_password(password: str, stored: str) -> bool:
    """True when ``password`` matches ``stored``; False for any malformed hash."""
    try:
        h = parse_hash(stored)
    except HashFormatError:
        return False
    raw = password.encode()
    if len(raw) > MAX_PASSWORD:
        return False
    candidate = _scrypt(raw, h.salt, h.n, h.r, h.p, len(h.digest))
    return hmac.compare_digest(candidate, h.digest)


def session_key(store_secret: bytes, password_hash: str, user: str) -> bytes:
    """The signing key of sessions: the store's secret, bound to the user and hash."""
    return hmac.new(store_secret, f"web-session\0{user}\0{password_hash}".encode(),
                    hashlib.sha256).digest()


class Sessions:
    """Signed, expiring session tokens (see the module docstring)."""

    def __init__(self, key: bytes, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.key = key
        self.ttl = ttl
        self.clock = clock
        self._revoked: dict[str, float] = {}  # nonce -> expiry

    def _sign(self, expires: int, nonce: str) -> str:
        mac = hmac.new(self.key, f"{expires}.{nonce}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self) -> str:
        expires = int(self.clock() + self.ttl)
        nonce = secrets.token_urlsafe(18)
        return f"{expires}.{nonce}.{self._sign(expires, nonce)}"

    def check(self, token: str) -> str | None:
        """The session's nonce when ``token`` is valid and not expired, else None."""
        parts = token.split(".")
        if len(parts) != 3 or len(token) > 200:
            return None
        expires_text, nonce, sig = parts
        if not expires_text.isdigit():
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(sig, self._sign(expires, nonce)):
            return None
        if self.clock() >= expires or nonce in self._revoked:
            return None
        return nonce

    def revoke(self, token: str) -> None:
        nonce = self.check(token)
        if nonce is None:
            return
        now = self.clock()
        for old, exp in list(self._revoked.items()):
            if exp <= now:
                del self._revoked[old]
        self._revoked[nonce] = int(token.split(".")[0])

    def csrf(self, nonce: str) -> str:
        return csrf_token(self.key, nonce)


def csrf_token(key: bytes, nonce: str) -> str:
    return hmac.new(key, f"csrf\0{nonce}".encode(), hashlib.sha256).hexdigest()


def csrf_ok(key: bytes, nonce: str, given: str) -> bool:
    return bool(given) and hmac.compare_digest(given, csrf_token(key, nonce))


class LoginLimiter:
    """At most ``attempts`` failed logins per client per :data:`WINDOW` seconds."""

    def __init__(self, attempts: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        now = self.clock()
        q = self._failures.get(client)
        if q is None:
            return deque()
        while q and now - q[0] >= WINDOW:
            q.popleft()
        if not q:
            del self._failures[client]
        return q

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.attempts

    def failed(self, client: str) -> int:
        """Count one failure; returns the failures within the window."""
        q = self._recent(client)
        if client not in self._failures:
            if len(self._failures) >= MAX_CLIENTS:
                del self._failures[next(iter(self._failures))]
            self._failures[client] = q
        q.append(self.clock())
        return len(q)

    def retry_after(self, client: str) -> int:
        q = self._recent(client)
        return max(1, int(WINDOW - (self.clock() - q[0])) + 1) if q else 1


__all__ = ["HashFormatError", "LoginLimiter", "Sessions", "csrf_ok", "csrf_token",
           "hash_password", "parse_hash", "session_key", "verify_password"]
