"""Rate counters (for rate limiting): fixed windows, shared by a fleet on Redis.

``await rates.incr(key, window)`` counts one event of ``key`` in the current
fixed window of ``window`` seconds (window number ``floor(now / window)``) and
returns the count so far in that window, this event included. A caller limits
by comparing it with its limit: ``if await rates.incr(f"rcpt:{ip}", 60) > 100``.

* :class:`SqliteRateStore`: its own file next to the greylist database
  (``mxguard.db`` -> ``mxguard-rates.db``: a second connection writing the
  greylist file from the same thread would wait on the greylist store's batch
  lock while blocking the loop that releases it). One UPSERT per call, in
  autocommit with ``synchronous=OFF`` (counters are advisory: a power loss may
  lose the last counts, never corrupt the file). :meth:`expire` deletes past
  windows.
* :class:`RedisRateStore`: ``mxguard:rate:<window>:<key>:<n>`` counters; one Lua
  script increments and, on the window's first event, sets the TTL (twice the
  window), so every host counts into the same window and Redis forgets it.

Failures raise :class:`~mxguard.store.base.StoreError` (Redis: within
``[storage] redis_timeout``); a caller should then not limit (fail open).
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from mxguard.store.base import StoreError, connect_sqlite, sqlite_path

if TYPE_CHECKING:
    from mxguard.config import Config
    from mxguard.store.redis import RedisConnection


class RateStore(ABC):
    """Fixed-window event counters."""

    @abstractmethod
    async def incr(self, key: str, window: float, now: float | None = None,
                   amount: int = 1) -> int:
        """Count ``amount`` events of ``key`` now; the window's count after it."""

    @abstractmethod
    async def get(self, key: str, window: float, now: float | None = None) -> int:
        """The count of ``key`` in the current window (0 if none)."""

    @abstractmethod
    async def expire(self, now: float | None = None) -> int:
        """Forget windows that are over; how many were removed (Redis: 0, TTLs do it)."""

    @abstractmethod
    async def close(self) -> None:
        """Release the store."""


def window_number(now: float, window: float) -> int:
    if window <= 0:
        raise ValueError(f"rate window must be positive, not {window!r}")
    return math.floor(now / window)


# ------------------------------------------------------------------ SQLite

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_counters (
    key TEXT NOT NULL, window REAL NOT NULL, bucket INTEGER NOT NULL,
    count INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (key, window, bucket)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rate_counters_expires ON rate_counters(expires);
"""
SQL_INCR = """
INSERT INTO rate_counters VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT(key, window, bucket) DO UPDATE SET count = count + ?4
RETURNING count
"""


def rates_path(storage_url: str) -> str:
    """``.../mxguard.db`` -> ``.../mxguard-rates.db``."""
    path = sqlite_path(storage_url)
    if path == ":memory:":
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-rates{p.suffix or '.db'}"))


class SqliteRateStore(RateStore):
    """Counters in one SQLite file (``:memory:`` for tests)."""

    def __init__(self, path: str, busy_timeout: float = 2.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        try:
            conn = connect_sqlite(path, busy_timeout, synchronous="OFF")
            conn.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite {path}: cannot open rate store: {exc}") from None
        self._conn = conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"sqlite {self.path}: rate store is closed")
        return self._conn

    async def incr(self, key: str, window: float, now: float | None = None,
                   amount: int = 1) -> int:
        now = time.time() if now is None else now
        n = window_number(now, window)
        try:
            row = self._db().execute(SQL_INCR, (key, float(window), n, amount,
                                                (n + 1) * window)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: rate count failed: {exc}") from None
        return int(row[0])

    async def get(self, key: str, window: float, now: float | None = None) -> int:
        n = window_number(time.time() if now is None else now, window)
        try:
            row = self._db().execute(
                "SELECT count FROM rate_counters WHERE key=? AND window=? AND bucket=?",
                (key, float(window), n)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: rate read failed: {exc}") from None
        return int(row[0]) if row else 0

    async def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        try:
            cur = self._db().execute("DELETE FROM rate_counters WHERE expires <= ?", (now,))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: rate expiry failed: {exc}") from None
        return cur.rowcount

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


# ------------------------------------------------------------------ Redis

# KEYS: counter; ARGV: amount, ttl_ms. The first event of a window sets its TTL.
LUA_INCR = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if n == tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return n
"""


class RedisRateStore(RateStore):
    """Counters in Redis: every host counts into the same window."""

    def __init__(self, url: str, *, timeout: float = 1.0, prefix: str = "mxguard:",
                 connection: RedisConnection | None = None) -> None:
        from mxguard.store.redis import RedisConnection

        self.conn = connection if connection is not None else RedisConnection(
            url, timeout=timeout)
        self.prefix = f"{prefix}rate:"
        self._incr = self.conn.script(LUA_INCR)

    @property
    def errors(self) -> int:
        return self.conn.errors

    def _key(self, key: str, window: float, n: int) -> str:
        return f"{self.prefix}{window:g}:{key}:{n}"

    async def incr(self, key: str, window: float, now: float | None = None,
                   amount: int = 1) -> int:
        now = time.time() if now is None else now
        n = window_number(now, window)
        ttl = max(1000, math.ceil(2 * window * 1000))
        name = self._key(key, window, n)
        count = await self.conn.evalsha("rate count", self._incr, [name], [amount, ttl])
        return int(count)

    async def get(self, key: str, window: float, now: float | None = None) -> int:
        n = window_number(time.time() if now is None else now, window)
        name = self._key(key, window, n)
        value = await self.conn.command("rate read", "GET", name)
        return int(value) if value is not None else 0

    async def expire(self, now: float | None = None) -> int:
        return 0  # Redis TTLs remove past windows

    async def close(self) -> None:
        await self.conn.close()


def open_rate_store(cfg: Config) -> RateStore:
    """The rate store of ``cfg.storage_url``: Redis for a Redis URL, else a SQLite file
    next to the greylist database."""
    url = cfg.storage_url
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        return RedisRateStore(url, timeout=cfg.storage.redis_timeout)
    if url.startswith("sqlite:///"):
        return SqliteRateStore(rates_path(url), busy_timeout=cfg.storage.busy_timeout)
    raise StoreError(f"storage.url {url!r}: unsupported store")


__all__ = ["RateStore", "RedisRateStore", "SqliteRateStore", "open_rate_store", "rates_path",
           "window_number"]
