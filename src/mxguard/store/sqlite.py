"""SQLite greylist store: WAL mode, calls on the event loop, group commit.

Why no thread: a greylist read or write on a warm SQLite page cache takes a
few microseconds, far less than handing work to a thread and back. What is
expensive is the commit, so writes are grouped:

* The first write of a loop iteration opens a transaction (``BEGIN
  IMMEDIATE``) and schedules one commit with ``loop.call_soon``.
* Every write of concurrent requests until then goes into that same
  transaction; each writer awaits the shared commit future before it replies,
  so no request answers on a decision that is not committed.
* If any statement of the batch or the commit fails, the batch is rolled back
  and every writer of that batch gets a :class:`StoreError`; the next write
  opens a fresh transaction (the store recovers, e.g. once the disk has room).
  Errors that mean the file itself is bad (corrupt, unreadable, replaced)
  close the connection; the next call reopens it.

The write lock is held from the first write of an iteration to its commit
(microseconds), so other processes (the CLI, a second daemon) can write in
between. Use one store object per event loop: a second connection in the
same thread would block the loop waiting for a lock only that loop can free.

``PRAGMA journal_mode=WAL`` lets the CLI read while the daemon writes;
``synchronous=NORMAL`` makes a commit a write to the WAL without fsync (a
power loss can lose the last commits, never corrupt the file).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import Sequence
from typing import Any

from mxguard.store.base import (
    ClientRecord,
    GreylistStore,
    StoreError,
    StoreStats,
    TripletRecord,
    WhitelistEntry,
    connect_sqlite,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS greylist_meta (
    name TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS greylist_triplets (
    key TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    passed_at REAL NOT NULL DEFAULT 0, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS greylist_triplets_expires ON greylist_triplets(expires);
CREATE TABLE IF NOT EXISTS greylist_clients (
    key TEXT PRIMARY KEY, count INTEGER NOT NULL, first_seen REAL NOT NULL,
    last_counted REAL NOT NULL, last_seen REAL NOT NULL, expires REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS greylist_clients_expires ON greylist_clients(expires);
CREATE TABLE IF NOT EXISTS greylist_whitelist (
    entry TEXT PRIMARY KEY, kind TEXT NOT NULL, added REAL NOT NULL,
    comment TEXT NOT NULL DEFAULT '') WITHOUT ROWID;
"""

_T = "greylist_triplets"
_C = "greylist_clients"
SQL_GET_TRIPLET = f"SELECT key, first_seen, last_seen, passed_at, expires FROM {_T} WHERE key=?"
SQL_FIRST_SEEN = f"INSERT OR REPLACE INTO {_T} VALUES (?, ?, ?, 0, ?)"
SQL_MARK_PASSED = (f"UPDATE {_T} SET passed_at=?, last_seen=?, expires=? "
                   "WHERE key=? AND passed_at=0")
SQL_TOUCH_TRIPLET = f"UPDATE {_T} SET last_seen=?, expires=? WHERE key=?"
SQL_GET_CLIENT = (f"SELECT key, count, first_seen, last_counted, last_seen, expires "
                  f"FROM {_C} WHERE key=?")
# One statement, so counting "at most once per interval" is atomic.
SQL_COUNT_CLIENT = f"""
INSERT INTO {_C} VALUES (?1, 1, ?2, ?2, ?2, ?3)
ON CONFLICT(key) DO UPDATE SET
    count = count + (?2 - last_counted >= ?4),
    last_counted = CASE WHEN ?2 - last_counted >= ?4 THEN ?2 ELSE last_counted END,
    last_seen = ?2, expires = ?3
"""
# Both records of a request in one statement: one execute instead of two.
SQL_LOOKUP = (f"SELECT 0, key, first_seen, last_seen, passed_at, expires, 0 FROM {_T} "
              f"WHERE key=?1 UNION ALL SELECT 1, key, count, first_seen, last_counted, "
              f"last_seen, expires FROM {_C} WHERE key=?2")
SQL_TOUCH_CLIENT = f"UPDATE {_C} SET last_seen=?, expires=? WHERE key=?"
SQL_BUMP_WL_VERSION = """
INSERT INTO greylist_meta VALUES ('whitelist_version', 1)
ON CONFLICT(name) DO UPDATE SET value = value + 1
"""

# SQLite error names after which the connection is closed and reopened later.
_REOPEN_ON = ("SQLITE_CORRUPT", "SQLITE_NOTADB", "SQLITE_CANTOPEN", "SQLITE_IOERR",
              "SQLITE_READONLY")
PURGE_CHUNK = 1000
# page cache of the connection: the hot greylist rows stay in memory (~50,000 triplets;
# beyond, the OS page cache serves, a pread away). 64 MB took a flood of new triplets to
# 115 MB of RSS; 16 MB to 8 MB saved 1.6 MB of peak RSS in bench/policy_bench.py --checks
# full with no change in req/s (the in-process lookup cache answers known triplets).
CACHE_KIB = 8 * 1024


class SqliteGreylistStore(GreylistStore):
    """Greylist state in one SQLite file (``path``; ``:memory:`` for tests)."""

    def __init__(self, path: str, busy_timeout: float = 2.0, *, connect: bool = True) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self.commits = 0  # commits done: with group commit, far fewer than writes
        self.writes = 0
        self._conn: sqlite3.Connection | None = None
        self._batch: asyncio.Future[None] | None = None
        self._closed = False
        if connect:  # else the first call opens it (a daemon started while it cannot)
            self._connection()

    # ------------------------------------------------------------ plumbing

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._closed:
            raise StoreError(f"sqlite {self.path}: store is closed")
        try:
            self._conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite {self.path}: cannot open: {_describe(exc)}") from None
        return self._conn

    def _open(self) -> sqlite3.Connection:
        conn = connect_sqlite(self.path, self.busy_timeout, cache_kib=CACHE_KIB)
        try:
            conn.executescript(SCHEMA)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _fail(self, exc: sqlite3.Error, doing: str) -> StoreError:
        """Turn a SQLite error into a StoreError; drop a connection that is unusable."""
        err = StoreError(f"sqlite {self.path}: {doing} failed: {_describe(exc)}")
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(_REOPEN_ON) or isinstance(exc, sqlite3.ProgrammingError):
            self._drop(err)
        return err

    def _drop(self, err: StoreError | None = None) -> None:
        """Close the connection; an open batch fails (closing rolls it back)."""
        batch, self._batch = self._batch, None
        if batch is not None:
            _settle(batch, err or StoreError(f"sqlite {self.path}: connection closed"))
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()  # rolls back what is uncommitted

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise self._fail(exc, "read") from None

    def _begin(self, conn: sqlite3.Connection) -> asyncio.Future[None]:
        if self._batch is None:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._fail(exc, "begin") from None
            loop = asyncio.get_running_loop()
            self._batch = loop.create_future()
            loop.call_soon(self._commit)
        return self._batch

    def _execute(self, sql: str, params: Any,
                 many: bool = False) -> tuple[int, asyncio.Future[None]]:
        """Run one write in the open batch; return (rowcount, the batch's commit future)."""
        conn = self._connection()
        batch = self._begin(conn)
        try:
            cur = conn.executemany(sql, params) if many else conn.execute(sql, params)
        except sqlite3.Error as exc:
            err = self._fail(exc, "write")
            # SQLite may have rolled back the whole transaction (disk full, I/O
            # error): fail the batch now so no later write joins a dead one.
            if self._batch is batch:
                self._batch = None
                self._rollback()
            _settle(batch, err)
            raise err from None
        self.writes += 1
        return cur.rowcount, batch

    def _commit(self) -> None:
        """Commit the open batch (called via call_soon) and wake all its writers."""
        batch, self._batch = self._batch, None
        if batch is None:
            return
        try:
            self._connection().execute("COMMIT")
        except StoreError as closed:  # pragma: no cover - _drop settles the batch itself
            _settle(batch, closed)
            return
        except sqlite3.Error as exc:
            failed = self._fail(exc, "commit")
            self._rollback()
            _settle(batch, failed)
            return
        self.commits += 1
        _settle(batch, None)

    def _rollback(self) -> None:
        conn = self._conn
        if conn is not None and conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                self._drop()

    async def _write(self, sql: str, params: Sequence[Any]) -> int:
        rowcount, batch = self._execute(sql, params)
        await _wait(batch)
        return rowcount

    async def _write_many(self, sql: str, rows: list[tuple[Any, ...]]) -> int:
        rowcount, batch = self._execute(sql, rows, many=True)
        await _wait(batch)
        return rowcount

    # ------------------------------------------------------------ triplets

    async def get_triplet(self, key: str) -> TripletRecord | None:
        rows = self._read(SQL_GET_TRIPLET, (key,))
        return TripletRecord(*rows[0]) if rows else None

    async def record_first_seen(self, key: str, now: float, expires: float) -> None:
        await self._write(SQL_FIRST_SEEN, (key, now, now, expires))

    async def lookup(self, triplet_key: str,
                     client_key: str) -> tuple[TripletRecord | None, ClientRecord | None]:
        triplet: TripletRecord | None = None
        client: ClientRecord | None = None
        for row in self._read(SQL_LOOKUP, (triplet_key, client_key)):
            if row[0]:
                client = ClientRecord(*row[1:])
            else:
                triplet = TripletRecord(*row[1:6])
        return triplet, client

    async def mark_passed(self, key: str, now: float, expires: float) -> bool:
        return await self._write(SQL_MARK_PASSED, (now, now, expires, key)) == 1

    async def touch_triplet(self, key: str, now: float, expires: float) -> None:
        await self._write(SQL_TOUCH_TRIPLET, (now, expires, key))

    # ------------------------------------------------------------ clients

    async def get_client(self, key: str) -> ClientRecord | None:
        rows = self._read(SQL_GET_CLIENT, (key,))
        return ClientRecord(*rows[0]) if rows else None

    async def count_client(self, key: str, now: float, expires: float,
                           interval: float) -> None:
        await self._write(SQL_COUNT_CLIENT, (key, now, expires, interval))

    async def touch_client(self, key: str, now: float, expires: float) -> None:
        await self._write(SQL_TOUCH_CLIENT, (now, expires, key))

    # ------------------------------------------------------------ whitelist

    async def add_whitelist(self, entry: WhitelistEntry) -> bool:
        sql = "INSERT OR IGNORE INTO greylist_whitelist VALUES (?, ?, ?, ?)"
        added, batch = self._execute(sql, (entry.entry, entry.kind, entry.added, entry.comment))
        if added:
            self._execute(SQL_BUMP_WL_VERSION, ())
        await _wait(batch)
        return added == 1

    async def remove_whitelist(self, entry: str) -> bool:
        removed, batch = self._execute("DELETE FROM greylist_whitelist WHERE entry=?", (entry,))
        if removed:
            self._execute(SQL_BUMP_WL_VERSION, ())
        await _wait(batch)
        return removed > 0

    async def list_whitelist(self) -> list[WhitelistEntry]:
        rows = self._read("SELECT entry, kind, added, comment FROM greylist_whitelist "
                          "ORDER BY kind, entry")
        return [WhitelistEntry(*row) for row in rows]

    async def whitelist_version(self) -> int:
        rows = self._read("SELECT value FROM greylist_meta WHERE name='whitelist_version'")
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------ maintenance

    async def expire_batch(self, now: float, limit: int) -> int:
        n, batch = self._execute(f"DELETE FROM {_T} WHERE key IN (SELECT key FROM {_T} "
                                 "WHERE expires < ? LIMIT ?)", (now, limit))
        if n < limit:
            m, batch = self._execute(f"DELETE FROM {_C} WHERE key IN (SELECT key FROM {_C} "
                                     "WHERE expires < ? LIMIT ?)", (now, limit - n))
            n += m
        await _wait(batch)
        return n

    async def list_triplets(self, limit: int) -> list[TripletRecord]:
        rows = self._read(f"SELECT key, first_seen, last_seen, passed_at, expires FROM {_T} "
                          "ORDER BY last_seen DESC LIMIT ?", (limit,))
        return [TripletRecord(*row) for row in rows]

    async def stats(self) -> StoreStats:
        (total, passed, oldest), = self._read(
            f"SELECT count(*), coalesce(sum(passed_at > 0), 0), coalesce(min(first_seen), 0) "
            f"FROM {_T}")
        (clients,), = self._read(f"SELECT count(*) FROM {_C}")
        (wl,), = self._read("SELECT count(*) FROM greylist_whitelist")
        return StoreStats(triplets=total, passed=passed, pending=total - passed,
                          clients=clients, whitelist=wl, oldest_seen=oldest,
                          commits=self.commits)

    async def purge(self, older_than: float | None) -> int:
        """Delete in chunks of one commit each, so the daemon never waits long for the lock."""
        n = 0
        for table in (_T, _C):
            if older_than is None:
                keys = self._read(f"SELECT key FROM {table}")
            else:
                keys = self._read(f"SELECT key FROM {table} WHERE last_seen < ?", (older_than,))
            for i in range(0, len(keys), PURGE_CHUNK):
                chunk = [tuple(k) for k in keys[i:i + PURGE_CHUNK]]
                n += await self._write_many(f"DELETE FROM {table} WHERE key=?", chunk)
        return n

    async def delete_triplet(self, key: str) -> bool:
        return await self._write(f"DELETE FROM {_T} WHERE key=?", (key,)) > 0

    async def secret(self, name: str, size: int = 32) -> bytes:
        rows = self._read("SELECT value FROM greylist_meta WHERE name=?", (name,))
        if rows and isinstance(rows[0][0], bytes) and len(rows[0][0]) >= size:
            return rows[0][0]
        await self._write("INSERT OR IGNORE INTO greylist_meta VALUES (?, ?)",
                          (name, secrets.token_bytes(size)))
        rows = self._read("SELECT value FROM greylist_meta WHERE name=?", (name,))
        value = rows[0][0] if rows else None
        if not isinstance(value, bytes) or len(value) < size:
            raise StoreError(f"sqlite {self.path}: meta value {name!r} is not a {size}-byte key")
        return value

    async def close(self) -> None:
        if self._batch is not None:
            self._commit()
        self._drop()
        self._closed = True


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _settle(batch: asyncio.Future[None], err: StoreError | None) -> None:
    if batch.done():
        return
    if err is None:
        batch.set_result(None)
    else:
        batch.set_exception(err)
        batch.exception()  # retrieved: a batch whose only writer failed logs nothing


async def _wait(batch: asyncio.Future[None]) -> None:
    """Wait for the commit of a batch; a cancelled writer must not cancel the others."""
    try:
        await asyncio.shield(batch)
    except StoreError as exc:
        raise StoreError(str(exc)) from None  # a fresh object per writer


__all__ = ["SqliteGreylistStore"]
