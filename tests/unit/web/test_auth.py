"""Password hashes, signed sessions, CSRF tokens and the login limiter."""

from __future__ import annotations

import pytest

from mxguard.web.auth import (
    HashFormatError,
    LoginLimiter,
    Sessions,
    csrf_ok,
    csrf_token,
    hash_password,
    parse_hash,
    session_key,
    verify_password,
)

# small scrypt parameters keep the tests quick; the format is the same


def fast_hash(password: str) -> str:
    return hash_password(password, n=2**4, r=1, p=1)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("given", "ok"), [
    ("correct horse", True),
    ("correct horse ", False),  # control: one character more
    ("Correct horse", False),
    ("", False),
])
def test_verify_password(given: str, ok: bool) -> None:
    stored = fast_hash("correct horse")
    assert verify_password(given, stored) is ok


def test_hash_format_and_salt() -> None:
    a, b = fast_hash("pw-pw-pw"), fast_hash("pw-pw-pw")
    assert a != b  # a fresh salt each time
    scheme, n, r, p, _salt, _digest = a.split("$")
    assert (scheme, n, r, p) == ("scrypt", "16", "1", "1")
    assert parse_hash(a).n == 16
    default = hash_password("pw-pw-pw")
    assert default.startswith("scrypt$16384$8$1$") and verify_password("pw-pw-pw", default)


@pytest.mark.parametrize("bad", [
    "", "plain", "bcrypt$1$2$3$AAAA$BBBB", "scrypt$16$1$1$@@@$AAAA",
    "scrypt$15$1$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",  # N not a power of two
    "scrypt$2097152$1$1$AAAAAAAAAAA$AAAAAAAAAAAAAAAAAAAAAA",  # N too large (memory)
])
def test_malformed_hash(bad: str) -> None:
    with pytest.raises(HashFormatError):
        parse_hash(bad)
    assert verify_password("anything", bad) is False


def test_overlong_password_is_not_checked() -> None:
    stored = fast_hash("x" * 2000)
    assert verify_password("x" * 2000, stored) is False
    assert verify_password("x" * 1000, fast_hash("x" * 1000)) is True


def test_session_valid_until_ttl() -> None:
    clock = Clock()
    s = Sessions(b"k" * 32, ttl=60, clock=clock)
    token = s.issue()
    assert s.check(token) is not None
    clock.now += 59
    assert s.check(token) is not None
    clock.now += 1  # expired
    assert s.check(token) is None


@pytest.mark.parametrize("mangle", [
    lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature
    lambda t: str(int(t.split(".")[0]) + 1000) + t[t.index("."):],  # a later expiry
    lambda t: t.replace(".", "", 1),
    lambda t: "",
])
def test_tampered_token_refused(mangle: object) -> None:
    s = Sessions(b"k" * 32, ttl=3600, clock=Clock())
    token = s.issue()
    assert s.check(token) is not None  # control
    assert s.check(mangle(token)) is None  # type: ignore[operator]


def test_other_key_or_changed_password_refuses_token() -> None:
    clock = Clock()
    key = session_key(b"s" * 32, "scrypt$hash-one", "admin")
    token = Sessions(key, 3600, clock).issue()
    assert Sessions(key, 3600, clock).check(token) is not None  # another worker, same key
    other = session_key(b"s" * 32, "scrypt$hash-two", "admin")
    assert Sessions(other, 3600, clock).check(token) is None


def test_revoke() -> None:
    s = Sessions(b"k" * 32, ttl=3600, clock=Clock())
    a, b = s.issue(), s.issue()
    s.revoke(a)
    assert s.check(a) is None
    assert s.check(b) is not None  # control: another session stays


def test_csrf() -> None:
    key = b"k" * 32
    token = csrf_token(key, "nonce1")
    assert csrf_ok(key, "nonce1", token)
    assert not csrf_ok(key, "nonce2", token)  # another session's token
    assert not csrf_ok(key, "nonce1", "")


def test_login_limiter() -> None:
    clock = Clock()
    lim = LoginLimiter(3, clock)
    for _ in range(2):
        lim.failed("192.0.2.1")
    assert not lim.blocked("192.0.2.1")
    lim.failed("192.0.2.1")
    assert lim.blocked("192.0.2.1")
    assert not lim.blocked("192.0.2.2")  # control: another client
    assert 1 <= lim.retry_after("192.0.2.1") <= 61
    clock.now += 60
    assert not lim.blocked("192.0.2.1")  # a minute later
