"""Message history: one record per milter message and per refused or deferred
policy request, for ``mxguard history``, ``mxguard explain`` and the dashboard.

* :class:`HistoryRecord` -- one decision, JSON-serialisable (``to_dict`` /
  ``from_dict``; the From header is the JSON key ``"from"``).
* :class:`HistoryStore` -- the interface: every public method is a coroutine
  whose work runs in a thread (SQLite and the blocking Redis client never hold
  up the event loop); backends implement the ``_sync`` methods. Every failure
  raises :class:`~mxguard.store.base.StoreError`.
* :class:`SqliteHistoryStore` -- the embedded backend (its own file next to the
  greylist database, :func:`history_path`); the Redis backend is
  :mod:`mxguard.store.redis_history`. :func:`mxguard.store.backends.open_history_store`
  picks one by ``[storage] url``.

Privacy (``[history] privacy``): the store hashes sender, recipients, From,
client address and name (and the sender's domain) with a keyed BLAKE2b, the
key kept in the store and made on first use (greylisting's privacy scheme,
:func:`~mxguard.checks.greylist_lists.hashed_key`), and keeps no Subject. A
query by sender, recipient or client hashes its value the same way, so
``mxguard history --sender a@example.com`` still finds that sender's mail.

Kept raw messages (``[web] keep_messages``): ``keep_raw`` stores at most
``raw_max_size`` bytes of a message; only the newest ``keep_messages`` are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar

from mxguard.store.base import StoreError, connect_sqlite, sibling_path, sqlite_path

try:
    import orjson
except ImportError:  # pragma: no cover - a declared dependency; json does the same, slower
    orjson = None  # type: ignore[assignment]

T = TypeVar("T")

TOP_FIELDS = ("symbol", "sender", "client", "sender_domain")
ACTIONS = ("accept", "quarantine", "defer_if_permit", "defer", "reject")
DEFAULT_RAW_MAX = 10 * 1024 * 1024
SECRET_SIZE = 32
LOOP_BUSY_MS = 50  # longest wait on the event loop for another process's write lock


class StoreBusy(StoreError):
    """Another process holds the store's write lock: try the same records again later."""


def new_id(now: float | None = None) -> str:
    """A unique id that sorts by time: 14 hex digits of microseconds + 8 random."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:014x}{random.getrandbits(32):08x}"  # unique, not secret


@dataclass(slots=True)
class HistoryRecord:
    """One decision as it is kept. ``action`` is a Verdict action value."""

    id: str = ""
    time: float = 0.0
    host: str = ""
    door: str = "milter"
    queue_id: str = ""
    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    sender: str = ""
    recipients: list[str] = field(default_factory=list)
    from_: str = ""
    subject: str = ""
    message_id: str = ""
    size: int = 0
    score: float = 0.0
    action: str = "accept"
    spam: bool = False
    decided_by: str = ""
    reply: str = ""
    symbols: list[dict[str, Any]] = field(default_factory=list)  # {"name","score","detail"}
    timings: dict[str, float] = field(default_factory=dict)  # check -> milliseconds
    headers_added: list[list[str]] = field(default_factory=list)  # [[name, value]]
    observed: list[str] = field(default_factory=list)
    kept: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``from_`` as ``"from"``); lists and dicts are shared, not copied
        (``dataclasses.asdict``'s deep copy was most of a write's cost)."""
        return {key: getattr(self, name) for key, name in _KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HistoryRecord:
        """A record from :meth:`to_dict`'s JSON (unknown keys ignored, missing ones default)."""
        names = {f.name for f in fields(cls)}
        values = {("from_" if k == "from" else k): v for k, v in data.items()}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2].lower() if "@" in self.sender else ""

    def symbol_names(self) -> list[str]:
        return [str(s.get("name", "")) for s in self.symbols]


_KEYS = tuple(("from" if f.name == "from_" else f.name, f.name) for f in fields(HistoryRecord))


def dumps(record: HistoryRecord) -> str:
    """The record's JSON text (orjson when installed: a few microseconds, not ~15)."""
    data = record.to_dict()
    if orjson is not None:
        try:
            return orjson.dumps(data).decode()
        except TypeError:  # e.g. a lone surrogate of an undecodable header byte
            pass
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), check_circular=False)


def loads(text: str | bytes) -> HistoryRecord:
    if orjson is not None:
        try:
            return HistoryRecord.from_dict(orjson.loads(text))
        except orjson.JSONDecodeError:  # json's escaped surrogates (see dumps)
            pass
    return HistoryRecord.from_dict(json.loads(text))


@dataclass(frozen=True, slots=True)
class Query:
    """The filters of :meth:`HistoryStore.query` (values already hashed in privacy mode)."""

    queue_id: str | None = None
    sender: str | None = None
    recipient: str | None = None
    client: str | None = None
    action: str | None = None
    symbol: str | None = None
    text: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    before_id: str | None = None

    def matches(self, rec: HistoryRecord) -> bool:
        """The filter applied to one record (the Redis backend filters in Python)."""
        if self.queue_id is not None and rec.queue_id != self.queue_id:
            return False
        if self.sender is not None and rec.sender.lower() != self.sender:
            return False
        if self.recipient is not None and self.recipient not in \
                [r.lower() for r in rec.recipients]:
            return False
        if self.client is not None and self.client not in (rec.client_address.lower(),
                                                           rec.client_name.lower()):
            return False
        if self.action is not None and rec.action != self.action:
            return False
        if self.symbol is not None and self.symbol not in rec.symbol_names():
            return False
        if self.since is not None and rec.time < self.since:
            return False
        if self.until is not None and rec.time > self.until:
            return False
        if self.before_id is not None and rec.id >= self.before_id:
            return False
        return not (self.text is not None and self.text.lower() not in dumps(rec).lower())


def _norm(value: str) -> str:
    return value.strip().lower()


class HistoryStore(ABC):
    """Records, raw messages, counts. ``privacy``: hash addresses (see the module doc)."""

    where = "history"
    privacy = False
    readonly = False

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secret: bytes | None = None

    # ------------------------------------------------------------- public, async

    #: the backend's writes are short enough to run on the event loop (SQLite: tens of
    #: microseconds a record): ``add_many`` then runs there, without a thread, unless a
    #: thread holds the store (a query, a prune), and raises :class:`StoreBusy` when
    #: another process holds the file's write lock longer than :data:`LOOP_BUSY_MS`.
    writes_on_loop = False

    async def add_many(self, records: Sequence[HistoryRecord]) -> None:
        """Store ``records`` (in privacy mode hashed here).

        Why on the loop when the backend allows: a thread that builds rows and steps
        SQLite takes and drops the GIL for every row and slowed the mail it shares
        the process with by far more than the write itself (milter CPU per message
        +15-38 % with history on, against ~65 us of work per record)."""
        if not records:
            return
        if self.writes_on_loop and self._lock.acquire(blocking=False):
            try:
                self._guarded(lambda: self._add_many([self._private(r) for r in records],
                                                     on_loop=True))
            finally:
                self._lock.release()
            return
        await self._run(lambda: self._add_many([self._private(r) for r in records]))

    def _private(self, rec: HistoryRecord) -> tuple[HistoryRecord, str]:
        """The record as stored and its sender domain as stored (both hashed in
        privacy mode)."""
        domain = rec.sender_domain
        if not self.privacy:
            return rec, domain
        h = self.hash_value
        return replace(rec, sender=h(rec.sender), recipients=[h(r) for r in rec.recipients],
                       from_=h(rec.from_), client_address=h(rec.client_address),
                       client_name=h(rec.client_name), subject=""), h(domain)

    async def get(self, id_or_queue_id: str) -> HistoryRecord | None:
        """The record of an id, else the newest record of that queue id."""
        return await self._run(lambda: self._get(id_or_queue_id.strip()))

    async def query(self, *, queue_id: str | None = None, sender: str | None = None,
                    recipient: str | None = None, client: str | None = None,
                    action: str | None = None, symbol: str | None = None,
                    text: str | None = None, since: float | None = None,
                    until: float | None = None, limit: int = 100,
                    before_id: str | None = None) -> list[HistoryRecord]:
        """Matching records, newest first; ``before_id`` pages on from that record."""
        def run() -> list[HistoryRecord]:
            q = Query(queue_id=queue_id or None, sender=self._q(sender),
                      recipient=self._q(recipient), client=self._q(client),
                      action=action or None, symbol=symbol or None, text=text or None,
                      since=since, until=until, limit=max(1, min(int(limit), 100000)),
                      before_id=before_id or None)
            return self._query(q)
        return await self._run(run)

    async def timeline(self, since: float, bucket: int = 60) -> list[tuple[float, str, int]]:
        """``(bucket_start, action, count)`` from ``since`` on, oldest first."""
        bucket = max(60, int(bucket) // 60 * 60)
        return await self._run(lambda: self._timeline(since, bucket))

    async def top(self, field: str, since: float, limit: int = 10,
                  action: str | None = None) -> list[tuple[str, int]]:
        """The most frequent values of ``field`` (one of :data:`TOP_FIELDS`: ``symbol``,
        ``sender``, ``client``, ``sender_domain``) since ``since``, optionally only for
        records of ``action``: ``[(value, count)]``, most frequent first. Symbols are
        counted per hour (``since`` is rounded down to the hour); the others per record
        (SQLite) or per hour (Redis)."""
        if field not in TOP_FIELDS:
            raise ValueError(f"top: field {field!r}: expected one of " + ", ".join(TOP_FIELDS))
        name = field
        return await self._run(lambda: self._top(name, since, max(1, limit), action))

    async def prune(self, max_age: float, max_records: int, batch: int = 1000) -> int:
        """Delete at most ``batch`` records older than ``max_age`` seconds or past the
        newest ``max_records``; returns how many went (call again while it is ``batch``)."""
        return await self._run(lambda: self._prune(time.time() - max_age, max_records, batch))

    async def count(self) -> int:
        return await self._run(self._count)

    async def keep_raw(self, record_id: str, data: bytes) -> None:
        """Keep a message's bytes (cut at ``raw_max_size``); only the last
        ``keep_messages`` stay. Does nothing when ``keep_messages`` is 0."""
        if self.keep_messages > 0:
            await self._run(lambda: self._keep_raw(record_id, data[:self.raw_max_size]))

    async def get_raw(self, record_id: str) -> bytes | None:
        return await self._run(lambda: self._get_raw(record_id))

    async def checkpoint(self) -> None:
        """Copy the backend's write-ahead log into its file (SQLite; in a thread: the
        writes on the loop never run a checkpoint, which can fsync). Others: nothing."""
        await self._run(self._checkpoint)

    async def close(self) -> None:
        await self._run(self._close)

    keep_messages = 0
    raw_max_size = DEFAULT_RAW_MAX

    # ------------------------------------------------------------- helpers

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(self._locked, fn)

    def _locked(self, fn: Callable[[], T]) -> T:
        with self._lock:
            return self._guarded(fn)

    def _guarded(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except StoreError:
            raise
        except Exception as exc:
            if isinstance(exc, ValueError | TypeError) and not self._backend_error(exc):
                raise
            raise StoreError(f"history store {self.where}: {type(exc).__name__}: "
                             f"{exc}") from None

    def _backend_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.Error | OSError)

    def _key(self) -> bytes | None:
        if self._secret is None:
            self._secret = self._load_secret(create=not self.readonly)
        return self._secret

    def hash_value(self, value: str) -> str:
        """The stored form of an address in privacy mode ("" stays "")."""
        if not value:
            return ""
        from mxguard.checks.greylist_lists import hashed_key  # checks import the stores

        key = self._key()
        if key is None:  # read-only and never written: nothing can match
            return "h:-"
        return hashed_key(key, _norm(value))

    def _q(self, value: str | None) -> str | None:
        if not value:
            return None
        return self.hash_value(value) if self.privacy else _norm(value)

    # ------------------------------------------------------------- backend

    @abstractmethod
    def _load_secret(self, *, create: bool) -> bytes | None: ...

    @abstractmethod
    def _add_many(self, records: list[tuple[HistoryRecord, str]], *,
                  on_loop: bool = False) -> None:
        """Store ``(record, sender domain)`` pairs, already in their stored form
        (``on_loop``: called on the event loop, see :attr:`writes_on_loop`)."""

    def _checkpoint(self) -> None:
        return None

    @abstractmethod
    def _get(self, key: str) -> HistoryRecord | None: ...

    @abstractmethod
    def _query(self, q: Query) -> list[HistoryRecord]: ...

    @abstractmethod
    def _timeline(self, since: float, bucket: int) -> list[tuple[float, str, int]]: ...

    @abstractmethod
    def _top(self, field_name: str, since: float, limit: int,
             action: str | None) -> list[tuple[str, int]]: ...

    @abstractmethod
    def _prune(self, cutoff: float, max_records: int, batch: int) -> int: ...

    @abstractmethod
    def _count(self) -> int: ...

    @abstractmethod
    def _keep_raw(self, record_id: str, data: bytes) -> None: ...

    @abstractmethod
    def _get_raw(self, record_id: str) -> bytes | None: ...

    @abstractmethod
    def _close(self) -> None: ...


def history_path(storage_url: str) -> str:
    """The SQLite file of the history next to the greylist database."""
    return sibling_path(sqlite_path(storage_url), "history")


# A rowid table: its rows (~1 KB of JSON) are too large for WITHOUT ROWID, which
# cost ~15 us more per insert. Files made by older versions (WITHOUT ROWID, id the
# primary key) have the same columns and keep working.
SCHEMA = """
CREATE TABLE IF NOT EXISTS history (
  id TEXT NOT NULL UNIQUE, time REAL NOT NULL, host TEXT, door TEXT, queue_id TEXT,
  client_address TEXT, client_name TEXT, sender TEXT, sender_domain TEXT,
  action TEXT, score REAL, symbols TEXT, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS history_time ON history(time, action);
CREATE INDEX IF NOT EXISTS history_queue ON history(queue_id);
CREATE INDEX IF NOT EXISTS history_sender ON history(sender);
CREATE INDEX IF NOT EXISTS history_client ON history(client_address);
CREATE TABLE IF NOT EXISTS history_rcpt (rcpt TEXT NOT NULL, id TEXT NOT NULL,
  PRIMARY KEY (rcpt, id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history_symcount (hour INTEGER NOT NULL, action TEXT NOT NULL,
  name TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (hour, action, name)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS history_raw (seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT UNIQUE NOT NULL, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS history_meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
"""


class SqliteHistoryStore(HistoryStore):
    """The history in one SQLite file (``:memory:`` for tests)."""

    def __init__(self, path: str, *, privacy: bool = False, busy_timeout: float = 5.0,
                 keep_messages: int = 0, raw_max_size: int = DEFAULT_RAW_MAX,
                 readonly: bool = False) -> None:
        super().__init__()
        self.path = path
        self._busy_ms = int(busy_timeout * 1000)
        self.where = f"sqlite {path}"
        self.privacy = privacy
        self.keep_messages = keep_messages
        self.raw_max_size = raw_max_size
        self.readonly = readonly
        try:
            if readonly:
                if path != ":memory:" and not os.path.exists(path):
                    raise StoreError(f"history store {path}: no such file (no history was "
                                     "written yet: is [history] enabled and the daemon "
                                     "running?)")
                self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True,
                                             timeout=busy_timeout, isolation_level=None,
                                             check_same_thread=False)
            else:
                self._conn = connect_sqlite(path, busy_timeout, any_thread=True)
                self._conn.executescript(SCHEMA)
                # checkpoints run from the writer's thread (checkpoint()), not in a
                # commit on the event loop
                self._conn.execute("PRAGMA wal_autocheckpoint=0")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"history store {path}: {exc}") from None

    def _load_secret(self, *, create: bool) -> bytes | None:
        c = self._conn
        if create:
            c.execute("INSERT OR IGNORE INTO history_meta(name, value) VALUES ('key', ?)",
                      (secrets.token_bytes(SECRET_SIZE),))
        try:
            row = c.execute("SELECT value FROM history_meta WHERE name = 'key'").fetchone()
        except sqlite3.OperationalError:  # read-only and no table yet
            return None
        return bytes(row[0]) if row else None

    writes_on_loop = True

    def _add_many(self, records: list[tuple[HistoryRecord, str]], *,
                  on_loop: bool = False) -> None:
        c = self._conn
        if on_loop:  # wait for another process's write lock briefly, never seconds
            c.execute(f"PRAGMA busy_timeout={LOOP_BUSY_MS}")
            try:
                self._insert(records)
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreBusy(f"history store {self.where}: busy (another process "
                                    "is writing)") from None
                raise
            finally:
                c.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        else:
            self._insert(records)

    def _checkpoint(self) -> None:
        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _insert(self, records: list[tuple[HistoryRecord, str]]) -> None:
        c = self._conn
        rows = []
        rcpts = []
        # symbol counts per hour and action, added up per batch: a few rows, not one per hit
        counts: Counter[tuple[int, str, str]] = Counter()
        for r, domain in records:
            names = [str(s.get("name", "")) for s in r.symbols]
            rows.append((r.id, r.time, r.host, r.door, r.queue_id,
                         r.client_address.strip().lower(), r.client_name.strip().lower(),
                         r.sender.strip().lower(), domain, r.action, r.score,
                         " " + " ".join(names) + " ", dumps(r)))
            if r.recipients:
                rid = r.id
                rcpts += [(x.strip().lower(), rid) for x in r.recipients]
            hour, action = int(r.time // 3600), r.action
            counts.update((hour, action, n) for n in set(names))
        syms = [(h, a, n, k) for (h, a, n), k in counts.items()]
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany("INSERT OR REPLACE INTO history VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                          rows)
            c.executemany("INSERT OR IGNORE INTO history_rcpt VALUES (?, ?)", rcpts)
            c.executemany("INSERT INTO history_symcount VALUES (?, ?, ?, ?) ON CONFLICT "
                          "DO UPDATE SET n = n + excluded.n", syms)
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def _get(self, key: str) -> HistoryRecord | None:
        row = self._conn.execute("SELECT data FROM history WHERE id = ?", (key,)).fetchone()
        if row is None:
            row = self._conn.execute("SELECT data FROM history WHERE queue_id = ? "
                                     "ORDER BY time DESC, id DESC LIMIT 1", (key,)).fetchone()
        return loads(row[0]) if row else None

    def _query(self, q: Query) -> list[HistoryRecord]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("queue_id", q.queue_id), ("sender", q.sender),
                              ("action", q.action)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if q.client is not None:
            where.append("(client_address = ? OR client_name = ?)")
            args += [q.client, q.client]
        if q.recipient is not None:
            where.append("id IN (SELECT id FROM history_rcpt WHERE rcpt = ?)")  # its key
            args.append(q.recipient)
        if q.symbol is not None:
            where.append("instr(symbols, ?) > 0")
            args.append(f" {q.symbol} ")
        if q.since is not None:
            where.append("time >= ?")
            args.append(q.since)
        if q.until is not None:
            where.append("time <= ?")
            args.append(q.until)
        if q.before_id is not None:
            where.append("id < ?")
            args.append(q.before_id)
        if q.text is not None:
            where.append("instr(lower(data), ?) > 0")
            args.append(q.text.lower())
        sql = "SELECT data FROM history"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"  # ids sort by time
        args.append(q.limit)
        return [loads(row[0]) for row in self._conn.execute(sql, args)]

    def _timeline(self, since: float, bucket: int) -> list[tuple[float, str, int]]:
        rows = self._conn.execute(
            "SELECT CAST(time / ? AS INTEGER) * ? AS b, action, COUNT(*) FROM history "
            "WHERE time >= ? GROUP BY b, action ORDER BY b, action", (bucket, bucket, since))
        return [(float(b), str(a), int(n)) for b, a, n in rows]

    def _top(self, field_name: str, since: float, limit: int,
             action: str | None) -> list[tuple[str, int]]:
        if field_name == "symbol":
            sql = "SELECT name, SUM(n) AS n FROM history_symcount WHERE hour >= ?"
            group = "name"
        else:
            column = {"sender": "sender", "client": "client_address",
                      "sender_domain": "sender_domain"}[field_name]
            sql = (f"SELECT {column}, COUNT(*) AS n FROM history WHERE time >= ? "
                   f"AND {column} != ''")
            group = column
        args: list[Any] = [int(since // 3600) if field_name == "symbol" else since]
        if action is not None:
            sql += " AND action = ?"
            args.append(action)
        sql += f" GROUP BY {group} ORDER BY n DESC, {group} LIMIT ?"
        args.append(limit)
        return [(str(v), int(n)) for v, n in self._conn.execute(sql, args)]

    def _prune(self, cutoff: float, max_records: int, batch: int) -> int:
        c = self._conn
        rows = c.execute("SELECT id, data FROM history WHERE time < ? ORDER BY time LIMIT ?",
                         (cutoff, batch)).fetchall()
        if len(rows) < batch:
            total = c.execute("SELECT COUNT(*) FROM history").fetchone()[0] - len(rows)
            over = min(batch - len(rows), max(0, total - max_records))
            if over:
                rows += c.execute("SELECT id, data FROM history WHERE time >= ? "
                                  "ORDER BY time, id LIMIT ?", (cutoff, over)).fetchall()
        if not rows:
            return 0
        ids = [r[0] for r in rows]
        rcpts = [(_norm(x), rid) for rid, data in rows for x in loads(data).recipients]
        marks = ",".join("?" * len(ids))
        c.execute("BEGIN IMMEDIATE")
        try:
            for table in ("history", "history_raw"):
                c.execute(f"DELETE FROM {table} WHERE id IN ({marks})", ids)
            c.execute("DELETE FROM history_symcount WHERE hour < ?", (int(cutoff // 3600),))
            c.executemany("DELETE FROM history_rcpt WHERE rcpt = ? AND id = ?", rcpts)
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise
        return len(ids)

    def _count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM history").fetchone()[0])

    def _keep_raw(self, record_id: str, data: bytes) -> None:
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("INSERT OR REPLACE INTO history_raw(id, data) VALUES (?, ?)",
                      (record_id, data))
            c.execute("DELETE FROM history_raw WHERE seq <= (SELECT MAX(seq) FROM "
                      "history_raw) - ?", (self.keep_messages,))
            c.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                c.execute("ROLLBACK")
            raise

    def _get_raw(self, record_id: str) -> bytes | None:
        row = self._conn.execute("SELECT data FROM history_raw WHERE id = ?",
                                 (record_id,)).fetchone()
        return bytes(row[0]) if row else None

    def _close(self) -> None:
        self._conn.close()


def newest_first(records: Iterable[HistoryRecord]) -> list[HistoryRecord]:
    return sorted(records, key=lambda r: (r.time, r.id), reverse=True)


__all__ = ["ACTIONS", "LOOP_BUSY_MS", "TOP_FIELDS", "HistoryRecord", "HistoryStore", "Query",
           "SqliteHistoryStore", "StoreBusy", "dumps", "history_path", "loads", "new_id",
           "newest_first"]
