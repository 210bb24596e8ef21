"""The Bayes token store: what the classifier needs from a state store.

Tokens are stored as 63-bit integers (:func:`token_hash` of the token text),
each with the number of spam and ham messages learned that contained it and
``atime``, the last time (UNIX seconds) it was learned or seen in a scanned
message. Besides tokens the store keeps the totals ``nspam``/``nham`` and one
record per learned message (``seen``: key -> spam or ham) so that learning a
message twice counts it once, learning it as the other class moves it, and
forgetting subtracts exactly what was added.

Implementations:

* :class:`SqliteBayesStore` -- the embedded default: WAL, its own file next to
  the main state file (``mxguard-bayes.db`` beside ``mxguard.db``).
* :class:`MemoryBayesStore` -- dicts; for tests and the accuracy benchmark's
  cross-validation. Also the reference for what a method must do.
* :class:`~mxguard.store.redis_bayes.RedisBayesStore` -- for fleets of MX hosts.

:func:`mxguard.store.backends.open_bayes_store` picks one by storage URL.

Expiry never stalls scanning: :meth:`BayesStore.expire` deletes at most
``limit`` tokens per call (least recently seen first, through an index) and
the caller spreads calls over time. Touching atime on scan is batched by the
classifier and only done for tokens whose atime is older than a day.

Every storage failure raises :class:`mxguard.store.base.StoreError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from mxguard.store.base import StoreError, connect_sqlite, sibling_path

T = TypeVar("T")


def token_hash(token: str) -> int:
    """A stable 63-bit integer for a token (fits SQLite's signed INTEGER)."""
    h = _HASH_CACHE.get(token)
    if h is None:
        digest = hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        h = int.from_bytes(digest, "big") >> 1
        if len(_HASH_CACHE) >= HASH_CACHE_MAX:
            _HASH_CACHE.clear()
        _HASH_CACHE[token] = h
    return h


# Token -> hash: the same tokens recur in mail all day; a dict lookup is several
# times cheaper than blake2b plus the bytes/int conversions. Bounded (emptied
# when full).
_HASH_CACHE: dict[str, int] = {}
HASH_CACHE_MAX = 80_000


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Counts of the looked-up tokens that are known, plus the message totals."""

    nspam: int
    nham: int
    counts: dict[int, tuple[int, int, int]]  # hash -> (spam, ham, atime)


@dataclass(frozen=True, slots=True)
class LearnItem:
    key: str  # message key (see mxguard.content.bayes.message_key)
    tokens: Sequence[int]  # unique token hashes
    spam: bool


# Outcomes of learn / forget of one message.
LEARNED = "learned"
RELEARNED = "relearned"  # it was learned as the other class: moved
KNOWN = "known"  # already learned as this class: nothing counted
FORGOTTEN = "forgotten"
UNKNOWN = "unknown"  # forget of a message that was never learned


@dataclass(frozen=True, slots=True)
class BayesStats:
    tokens: int
    nspam: int
    nham: int
    seen: int
    oldest_atime: int  # 0 when empty
    newest_atime: int


class BayesStore(ABC):
    """Token counts, totals and learned-message records of the Bayes classifier."""

    @abstractmethod
    async def lookup(self, tokens: Sequence[int]) -> TokenCounts:
        """Totals and the counts of those ``tokens`` that are known, in one round trip."""

    @abstractmethod
    async def learn(self, items: Sequence[LearnItem], now: int) -> list[str]:
        """Learn messages in one transaction; per item LEARNED, RELEARNED or KNOWN."""

    @abstractmethod
    async def forget(self, items: Sequence[LearnItem], now: int) -> list[str]:
        """Un-learn messages (``spam`` of the item is ignored: the record says which
        class to subtract from); per item FORGOTTEN or UNKNOWN."""

    @abstractmethod
    async def seen(self, key: str) -> bool | None:
        """True (learned as spam), False (ham) or None (never learned)."""

    @abstractmethod
    async def touch(self, tokens: Sequence[int], now: int) -> None:
        """Set atime of known tokens to ``now`` (scanned messages keep tokens alive)."""

    @abstractmethod
    async def expire(self, now: int, max_tokens: int, ttl: int, limit: int) -> int:
        """Delete at most ``limit`` tokens: first those unseen for ``ttl`` seconds, then
        the least recently seen beyond ``max_tokens``; return how many were deleted."""

    @abstractmethod
    async def stats(self) -> BayesStats:
        """Counts for ``mxguard bayes stats``."""

    @abstractmethod
    async def close(self) -> None:
        """Commit what is pending and release the store."""


# ---------------------------------------------------------------- in memory


class MemoryBayesStore(BayesStore):
    """Everything in dicts; not persistent."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}  # hash -> [spam, ham, atime]
        self.nspam = 0
        self.nham = 0
        self.messages: dict[str, bool] = {}

    def lookup_sync(self, tokens: Sequence[int]) -> TokenCounts:
        get = self.tokens.get
        counts: dict[int, tuple[int, int, int]] = {}
        for h in tokens:
            row = get(h)
            if row is not None:
                counts[h] = (row[0], row[1], row[2])
        return TokenCounts(self.nspam, self.nham, counts)

    def _add(self, tokens: Sequence[int], spam: bool, delta: int, now: int) -> None:
        idx = 0 if spam else 1
        table = self.tokens
        for h in tokens:
            row = table.get(h)
            if row is None:
                if delta < 0:
                    continue
                row = table[h] = [0, 0, now]
            row[idx] = max(0, row[idx] + delta)
            if delta > 0:
                row[2] = max(row[2], now)
            elif row[0] == 0 and row[1] == 0:
                del table[h]
        if spam:
            self.nspam = max(0, self.nspam + delta)
        else:
            self.nham = max(0, self.nham + delta)

    def learn_sync(self, items: Sequence[LearnItem], now: int) -> list[str]:
        out = []
        for item in items:
            prev = self.messages.get(item.key)
            if prev is item.spam:
                out.append(KNOWN)
                continue
            if prev is not None:
                self._add(item.tokens, prev, -1, now)
            self._add(item.tokens, item.spam, 1, now)
            self.messages[item.key] = item.spam
            out.append(LEARNED if prev is None else RELEARNED)
        return out

    def forget_sync(self, items: Sequence[LearnItem], now: int) -> list[str]:
        out = []
        for item in items:
            prev = self.messages.pop(item.key, None)
            if prev is None:
                out.append(UNKNOWN)
                continue
            self._add(item.tokens, prev, -1, now)
            out.append(FORGOTTEN)
        return out

    async def lookup(self, tokens: Sequence[int]) -> TokenCounts:
        return self.lookup_sync(tokens)

    async def learn(self, items: Sequence[LearnItem], now: int) -> list[str]:
        return self.learn_sync(items, now)

    async def forget(self, items: Sequence[LearnItem], now: int) -> list[str]:
        return self.forget_sync(items, now)

    async def seen(self, key: str) -> bool | None:
        return self.messages.get(key)

    async def touch(self, tokens: Sequence[int], now: int) -> None:
        for h in tokens:
            row = self.tokens.get(h)
            if row is not None and row[2] < now:
                row[2] = now

    async def expire(self, now: int, max_tokens: int, ttl: int, limit: int) -> int:
        by_age = sorted(self.tokens.items(), key=lambda kv: (kv[1][2], kv[0]))
        doomed = [h for h, row in by_age[:limit] if row[2] < now - ttl]
        excess = len(self.tokens) - len(doomed) - max_tokens
        if excess > 0 and len(doomed) < limit:
            rest = [h for h, _ in by_age[len(doomed):]]
            doomed += rest[:min(excess, limit - len(doomed))]
        for h in doomed:
            del self.tokens[h]
        return len(doomed)

    async def stats(self) -> BayesStats:
        atimes = [row[2] for row in self.tokens.values()]
        return BayesStats(len(self.tokens), self.nspam, self.nham, len(self.messages),
                          min(atimes, default=0), max(atimes, default=0))

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------- SQLite

SCHEMA = """
CREATE TABLE IF NOT EXISTS bayes_tokens (
    h INTEGER PRIMARY KEY, spam INTEGER NOT NULL, ham INTEGER NOT NULL,
    atime INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS bayes_tokens_atime ON bayes_tokens(atime);
CREATE TABLE IF NOT EXISTS bayes_seen (
    key TEXT PRIMARY KEY, spam INTEGER NOT NULL, time INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS bayes_meta (
    name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO bayes_meta VALUES ('nspam', 0), ('nham', 0), ('ntokens', 0);
"""

LOOKUP_CHUNK = 900  # bound parameters per SELECT ... IN (...)
_COL = {True: "spam", False: "ham"}
_REOPEN_ON = ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CANTOPEN", "SQLITE_IOERR",
              "SQLITE_READONLY")


class SqliteBayesStore(BayesStore):
    """Bayes state in SQLite (``bayes_*`` tables; ``:memory:`` for tests).

    All SQLite work runs in one worker thread owned by the store, so a learn of
    many messages or an expiry batch never blocks the event loop; calls are
    serialised through that thread. The token count is kept in ``bayes_meta``
    (exact: inserts and deletes are counted), so stats and expiry need no
    ``count(*)`` over a million rows.
    """

    def __init__(self, path: str, busy_timeout: float = 2.0, cache_mb: int = 32) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.cache_mb = cache_mb
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bayes-sqlite")
        self._lock = threading.RLock()

    # ------------------------------------------------------------ plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._closed:
            raise StoreError(f"sqlite {self.path}: bayes store is closed")
        try:
            self._conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite {self.path}: cannot open: {_describe(exc)}") from None
        return self._conn

    def _open(self) -> sqlite3.Connection:
        conn = connect_sqlite(self.path, self.busy_timeout, cache_kib=self.cache_mb * 1024,
                              any_thread=True)  # used from the store's own worker thread
        try:
            conn.execute("BEGIN IMMEDIATE")
            for stmt in SCHEMA.strip().split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute("COMMIT")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _call(self, fn: Callable[[sqlite3.Connection], T], doing: str) -> T:
        """Run ``fn(conn)`` (in the worker thread); SQLite errors -> StoreError."""
        with self._lock:
            conn = self._connection()
            try:
                return fn(conn)
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                name = getattr(exc, "sqlite_errorname", "") or ""
                if name.startswith(_REOPEN_ON):
                    self._drop()
                raise StoreError(f"sqlite {self.path}: bayes {doing} failed: "
                                 f"{_describe(exc)}") from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    async def _run(self, fn: Callable[[], T]) -> T:
        """Run a sync method in the store's worker thread."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except RuntimeError as exc:  # executor shut down
            raise StoreError(f"sqlite {self.path}: bayes store is closed ({exc})") from None

    # ------------------------------------------------------------ sync core

    @staticmethod
    def _totals(conn: sqlite3.Connection) -> dict[str, int]:
        return {name: int(value) for name, value in
                conn.execute("SELECT name, value FROM bayes_meta")}

    def lookup_sync(self, tokens: Sequence[int]) -> TokenCounts:
        def go(conn: sqlite3.Connection) -> TokenCounts:
            counts: dict[int, tuple[int, int, int]] = {}
            uniq = list(dict.fromkeys(tokens))
            conn.execute("BEGIN")  # one snapshot for totals and counts
            try:
                meta = self._totals(conn)
                for i in range(0, len(uniq), LOOKUP_CHUNK):
                    chunk = uniq[i:i + LOOKUP_CHUNK]
                    sql = ("SELECT h, spam, ham, atime FROM bayes_tokens WHERE h IN (" +
                           ",".join("?" * len(chunk)) + ")")
                    for h, s, hm, at in conn.execute(sql, chunk):
                        counts[h] = (s, hm, at)
            finally:
                conn.execute("COMMIT")
            return TokenCounts(meta.get("nspam", 0), meta.get("nham", 0), counts)
        return self._call(go, "lookup")

    @staticmethod
    def _add(conn: sqlite3.Connection, tokens: Sequence[int], spam: bool, now: int) -> int:
        col = _COL[spam]
        rows = [(h, now) for h in tokens]
        inserted = conn.executemany(
            "INSERT OR IGNORE INTO bayes_tokens VALUES (?, 0, 0, ?)", rows).rowcount
        conn.executemany(f"UPDATE bayes_tokens SET {col} = {col} + 1, "
                         "atime = max(atime, ?2) WHERE h = ?1", rows)
        conn.execute(f"UPDATE bayes_meta SET value = value + 1 WHERE name = 'n{col}'")
        return max(inserted, 0)

    @staticmethod
    def _sub(conn: sqlite3.Connection, tokens: Sequence[int], spam: bool) -> int:
        col = _COL[spam]
        rows = [(h,) for h in tokens]
        conn.executemany(f"UPDATE bayes_tokens SET {col} = max({col} - 1, 0) WHERE h = ?",
                         rows)
        deleted = conn.executemany(
            "DELETE FROM bayes_tokens WHERE h = ? AND spam = 0 AND ham = 0", rows).rowcount
        conn.execute(f"UPDATE bayes_meta SET value = max(value - 1, 0) WHERE name = 'n{col}'")
        return max(deleted, 0)

    @staticmethod
    def _count_tokens(conn: sqlite3.Connection, delta: int) -> None:
        if delta:
            conn.execute("UPDATE bayes_meta SET value = max(value + ?, 0) "
                         "WHERE name = 'ntokens'", (delta,))

    def learn_sync(self, items: Sequence[LearnItem], now: int) -> list[str]:
        def go(conn: sqlite3.Connection) -> list[str]:
            out: list[str] = []
            delta = 0
            conn.execute("BEGIN IMMEDIATE")
            for item in items:
                row = conn.execute("SELECT spam FROM bayes_seen WHERE key = ?",
                                   (item.key,)).fetchone()
                prev = None if row is None else bool(row[0])
                if prev is item.spam:
                    out.append(KNOWN)
                    continue
                if prev is not None:
                    delta -= self._sub(conn, item.tokens, prev)
                delta += self._add(conn, item.tokens, item.spam, now)
                conn.execute("INSERT OR REPLACE INTO bayes_seen VALUES (?, ?, ?)",
                             (item.key, int(item.spam), now))
                out.append(LEARNED if prev is None else RELEARNED)
            self._count_tokens(conn, delta)
            conn.execute("COMMIT")
            return out
        return self._call(go, "learn")

    def forget_sync(self, items: Sequence[LearnItem], now: int) -> list[str]:
        def go(conn: sqlite3.Connection) -> list[str]:
            out: list[str] = []
            delta = 0
            conn.execute("BEGIN IMMEDIATE")
            for item in items:
                row = conn.execute("SELECT spam FROM bayes_seen WHERE key = ?",
                                   (item.key,)).fetchone()
                if row is None:
                    out.append(UNKNOWN)
                    continue
                delta -= self._sub(conn, item.tokens, bool(row[0]))
                conn.execute("DELETE FROM bayes_seen WHERE key = ?", (item.key,))
                out.append(FORGOTTEN)
            self._count_tokens(conn, delta)
            conn.execute("COMMIT")
            return out
        return self._call(go, "forget")

    def touch_sync(self, tokens: Sequence[int], now: int) -> None:
        def go(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("UPDATE bayes_tokens SET atime = ?2 WHERE h = ?1 AND atime < ?2",
                             [(h, now) for h in tokens])
            conn.execute("COMMIT")
        self._call(go, "touch")

    def expire_sync(self, now: int, max_tokens: int, ttl: int, limit: int) -> int:
        def go(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            n = conn.execute(
                "DELETE FROM bayes_tokens WHERE h IN (SELECT h FROM bayes_tokens "
                "WHERE atime < ? ORDER BY atime LIMIT ?)", (now - ttl, limit)).rowcount
            ntokens = self._totals(conn).get("ntokens", 0) - n
            excess = min(ntokens - max_tokens, limit - n)
            if excess > 0:
                n += conn.execute(
                    "DELETE FROM bayes_tokens WHERE h IN (SELECT h FROM bayes_tokens "
                    "ORDER BY atime LIMIT ?)", (excess,)).rowcount
            self._count_tokens(conn, -n)
            conn.execute("COMMIT")
            return n
        return self._call(go, "expire")

    def stats_sync(self) -> BayesStats:
        def go(conn: sqlite3.Connection) -> BayesStats:
            meta = self._totals(conn)
            lo = conn.execute("SELECT atime FROM bayes_tokens ORDER BY atime LIMIT 1").fetchone()
            hi = conn.execute("SELECT atime FROM bayes_tokens ORDER BY atime DESC "
                              "LIMIT 1").fetchone()
            (seen,), = conn.execute("SELECT count(*) FROM bayes_seen")
            return BayesStats(meta.get("ntokens", 0), meta.get("nspam", 0),
                              meta.get("nham", 0), seen, lo[0] if lo else 0,
                              hi[0] if hi else 0)
        return self._call(go, "stats")

    def seen_sync(self, key: str) -> bool | None:
        def go(conn: sqlite3.Connection) -> bool | None:
            row = conn.execute("SELECT spam FROM bayes_seen WHERE key = ?", (key,)).fetchone()
            return None if row is None else bool(row[0])
        return self._call(go, "seen")

    def recount_sync(self) -> int:
        """Recompute the kept token count (after the table was edited by hand)."""
        def go(conn: sqlite3.Connection) -> int:
            (n,), = conn.execute("SELECT count(*) FROM bayes_tokens")
            conn.execute("UPDATE bayes_meta SET value = ? WHERE name = 'ntokens'", (n,))
            return int(n)
        return self._call(go, "recount")

    # ------------------------------------------------------------ async API

    async def lookup(self, tokens: Sequence[int]) -> TokenCounts:
        return await self._run(lambda: self.lookup_sync(tokens))

    async def learn(self, items: Sequence[LearnItem], now: int) -> list[str]:
        return await self._run(lambda: self.learn_sync(items, now))

    async def forget(self, items: Sequence[LearnItem], now: int) -> list[str]:
        return await self._run(lambda: self.forget_sync(items, now))

    async def seen(self, key: str) -> bool | None:
        return await self._run(lambda: self.seen_sync(key))

    async def touch(self, tokens: Sequence[int], now: int) -> None:
        await self._run(lambda: self.touch_sync(tokens, now))

    async def expire(self, now: int, max_tokens: int, ttl: int, limit: int) -> int:
        return await self._run(lambda: self.expire_sync(now, max_tokens, ttl, limit))

    async def stats(self) -> BayesStats:
        return await self._run(lambda: self.stats_sync())

    def close_sync(self) -> None:
        with self._lock:
            self._drop()
            self._closed = True

    async def close(self) -> None:
        if not self._closed:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self.close_sync)
        self._executor.shutdown(wait=False)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def bayes_sqlite_path(main_path: str) -> str:
    """The Bayes file next to the main SQLite file: ``/x/mxguard.db`` -> ``/x/mxguard-bayes.db``.

    A file of its own, so a long learn batch (``mxguard learn``) or an expiry
    batch never holds the lock that greylisting writes wait for on the event loop."""
    return sibling_path(main_path, "bayes")


def hashes(tokens: Iterable[str]) -> list[int]:
    """Unique token hashes in first-seen order."""
    cache = _HASH_CACHE
    out: dict[int, None] = {}
    for t in tokens:
        h = cache.get(t)
        out[token_hash(t) if h is None else h] = None
    return list(out)


__all__ = ["FORGOTTEN", "KNOWN", "LEARNED", "RELEARNED", "UNKNOWN", "BayesStats", "BayesStore",
           "LearnItem", "MemoryBayesStore", "SqliteBayesStore", "TokenCounts",
           "bayes_sqlite_path", "hashes", "token_hash"]
