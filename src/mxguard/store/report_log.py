"""What aggregate reports were sent: one entry per (policy domain, period, destination).

An entry is ``sent``, ``retry`` (the local sendmail refused it; ``next_try``
says when to try again), ``failed`` (given up, or not sendable: too large,
destination not verified) or, for a moment, ``sending`` (claimed by one sender
for ``lease`` seconds). :meth:`ReportLog.claim` is the only way to start a
send and succeeds for one caller only, so a report is never sent twice -- not
by the daemon and the CLI at once, nor by two MX hosts sharing Redis.

Backends: :class:`SqliteReportLog` (its own file next to the greylist
database, ``mxguard-reports.db``) and :class:`RedisReportLog` (shared by a
fleet; also holds the fleet lock of the report job, ``SET NX PX``). Entries
older than ``max_age`` days are purged (:meth:`ReportLog.purge`; Redis keys
also carry a TTL), so storage stays bounded.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import sqlite3
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from mxguard.store.base import StoreError, connect_sqlite, sibling_path, sqlite_path

STATES = ("sending", "sent", "retry", "failed")


@dataclass(frozen=True, slots=True)
class LogEntry:
    domain: str
    period: str  # YYYY-MM-DD (UTC day)
    destination: str  # the mailto: address
    state: str
    attempts: int = 0
    updated: float = 0.0  # UNIX time of the last change
    next_try: float = 0.0  # for state "retry"
    error: str = ""
    report_id: str = ""
    size: int = 0


class ReportLog(ABC):
    @abstractmethod
    def get(self, domain: str, period: str, destination: str) -> LogEntry | None: ...

    @abstractmethod
    def claim(self, domain: str, period: str, destination: str, *, now: float,
              lease: float) -> LogEntry | None:
        """Take the entry for sending; the entry as claimed (attempts counted), or None
        when it is sent, failed, being sent by someone else or not yet due."""

    @abstractmethod
    def finish(self, entry: LogEntry) -> None:
        """Record the outcome of a claimed send (state sent / retry / failed)."""

    @abstractmethod
    def entries(self, period: str | None = None) -> list[LogEntry]:
        """Entries, newest period first."""

    @abstractmethod
    def purge(self, max_age_days: float, now: float | None = None) -> int: ...

    def lock(self, ttl: float) -> str | None:  # single host: no fleet lock
        """The fleet lock of the report job: a token, or None when another host has it."""
        return "local"

    def unlock(self, token: str) -> None:  # noqa: B027
        """Release the fleet lock taken with ``token``."""

    @abstractmethod
    def close(self) -> None: ...


def _may_claim(entry: LogEntry | None, now: float) -> bool:
    if entry is None:
        return True
    if entry.state == "retry":
        return entry.next_try <= now
    if entry.state == "sending":
        return entry.next_try <= now  # the lease ran out: the sender died
    return False


def report_log_path(storage_url: str) -> str:
    return sibling_path(sqlite_path(storage_url), "reports")


SCHEMA = """
CREATE TABLE IF NOT EXISTS report_log (
    domain TEXT NOT NULL, period TEXT NOT NULL, destination TEXT NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL, updated REAL NOT NULL,
    next_try REAL NOT NULL, error TEXT NOT NULL, report_id TEXT NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY (domain, period, destination));
"""
_FIELDS = ("domain", "period", "destination", "state", "attempts", "updated", "next_try",
           "error", "report_id", "size")


class SqliteReportLog(ReportLog):
    def __init__(self, path: str, *, busy_timeout: float = 2.0) -> None:
        self.path = path
        try:
            self._conn: sqlite3.Connection | None = connect_sqlite(path, busy_timeout)
            self._conn.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite {path}: cannot open report log: {exc}") from None

    def _c(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"sqlite {self.path}: report log is closed")
        return self._conn

    def _get(self, conn: sqlite3.Connection, key: tuple[str, str, str]) -> LogEntry | None:
        row = conn.execute(f"SELECT {', '.join(_FIELDS)} FROM report_log WHERE domain=? "
                           "AND period=? AND destination=?", key).fetchone()
        return LogEntry(*row) if row else None

    def get(self, domain: str, period: str, destination: str) -> LogEntry | None:
        try:
            return self._get(self._c(), (domain, period, destination))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: read failed: {exc}") from None

    def _put(self, conn: sqlite3.Connection, e: LogEntry) -> None:
        conn.execute(f"INSERT OR REPLACE INTO report_log ({', '.join(_FIELDS)}) VALUES "
                     f"({', '.join('?' * len(_FIELDS))})",
                     tuple(getattr(e, f) for f in _FIELDS))

    def claim(self, domain: str, period: str, destination: str, *, now: float,
              lease: float) -> LogEntry | None:
        conn = self._c()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                old = self._get(conn, (domain, period, destination))
                if not _may_claim(old, now):
                    conn.execute("ROLLBACK")
                    return None
                entry = LogEntry(domain, period, destination, "sending",
                                 (old.attempts if old else 0) + 1, now, now + lease,
                                 old.error if old else "")
                self._put(conn, entry)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: claim failed: {exc}") from None
        return entry

    def finish(self, entry: LogEntry) -> None:
        try:
            self._put(self._c(), entry)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: write failed: {exc}") from None

    def entries(self, period: str | None = None) -> list[LogEntry]:
        where, params = ("WHERE period=?", (period,)) if period else ("", ())
        try:
            rows = self._c().execute(f"SELECT {', '.join(_FIELDS)} FROM report_log {where} "
                                     "ORDER BY period DESC, domain, destination",
                                     params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: read failed: {exc}") from None
        return [LogEntry(*r) for r in rows]

    def purge(self, max_age_days: float, now: float | None = None) -> int:
        cutoff = time.strftime("%Y-%m-%d", time.gmtime(
            (time.time() if now is None else now) - max_age_days * 86400))
        try:
            return self._c().execute("DELETE FROM report_log WHERE period < ?",
                                     (cutoff,)).rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: purge failed: {exc}") from None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


# KEYS: entry; ARGV: now, lease, json of the new entry fields but attempts, ttl seconds
LUA_CLAIM = """
local old = redis.call('GET', KEYS[1])
local attempts = 0
if old then
  local e = cjson.decode(old)
  if e.state == 'sent' or e.state == 'failed' then return false end
  if tonumber(e.next_try) > tonumber(ARGV[1]) then return false end
  attempts = tonumber(e.attempts)
end
local new = cjson.decode(ARGV[3])
new.attempts = attempts + 1
local text = cjson.encode(new)
redis.call('SET', KEYS[1], text, 'EX', ARGV[4])
return text
"""
LUA_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisReportLog(ReportLog):
    """The report log in Redis: ``<prefix>dmarc:rlog:<period>:<domain>:<destination>``
    (JSON, TTL ``max_age`` days), the index ``<prefix>dmarc:rlog`` (a sorted set by
    period) and the job's fleet lock ``<prefix>dmarc:report-lock``."""

    def __init__(self, url: str, *, timeout: float = 1.0, prefix: str = "mxguard:",
                 max_age_days: float = 14) -> None:
        from mxguard.store.redis_conn import describe_url, sync_redis_client

        self.where = f"redis {describe_url(url)}"
        self._client = sync_redis_client(url, timeout)
        self._p = f"{prefix}dmarc:"
        self._ttl = int(max_age_days * 86400)
        self._claim = self._client.register_script(LUA_CLAIM)
        self._unlock = self._client.register_script(LUA_UNLOCK)

    def _key(self, domain: str, period: str, destination: str) -> str:
        return f"{self._p}rlog:{period}:{domain}:{destination}"

    def _call(self, doing: str, fn: Any) -> Any:
        from redis.exceptions import RedisError  # not at import: SQLite users never load redis

        try:
            return fn()
        except (RedisError, OSError) as exc:
            raise StoreError(f"{self.where}: {doing} failed: {exc or type(exc).__name__}") \
                from None

    @staticmethod
    def _entry(raw: bytes | str | None) -> LogEntry | None:
        if raw is None:
            return None
        values = json.loads(raw)
        return LogEntry(**{f: values[f] for f in _FIELDS})

    def get(self, domain: str, period: str, destination: str) -> LogEntry | None:
        key = self._key(domain, period, destination)
        return self._entry(self._call("read", lambda: self._client.get(key)))

    def claim(self, domain: str, period: str, destination: str, *, now: float,
              lease: float) -> LogEntry | None:
        key = self._key(domain, period, destination)
        old = self.get(domain, period, destination)
        new = {f: getattr(LogEntry(domain, period, destination, "sending", 0, now,
                                   now + lease, old.error if old else ""), f)
               for f in _FIELDS if f != "attempts"}
        raw = self._call("claim", lambda: self._claim(
            keys=[key], args=[repr(now), repr(lease), json.dumps(new), self._ttl]))
        if not raw:
            return None
        self._index(period)
        return self._entry(raw)

    def _index(self, period: str) -> None:
        score = calendar.timegm(time.strptime(period, "%Y-%m-%d"))
        self._call("write", lambda: self._client.zadd(f"{self._p}rlog", {period: score}))

    def finish(self, entry: LogEntry) -> None:
        key = self._key(entry.domain, entry.period, entry.destination)
        text = json.dumps({f: getattr(entry, f) for f in _FIELDS})
        self._call("write", lambda: self._client.set(key, text, ex=self._ttl))

    def entries(self, period: str | None = None) -> list[LogEntry]:
        periods = [period] if period else [
            p.decode() for p in self._call("read", lambda: self._client.zrevrange(
                f"{self._p}rlog", 0, -1))]
        out: list[LogEntry] = []
        for per in periods:
            keys = sorted(self._call("read", lambda per=per: list(self._client.scan_iter(
                match=f"{self._p}rlog:{per}:*", count=500))))
            if keys:
                for raw in self._call("read", lambda keys=keys: self._client.mget(keys)):
                    entry = self._entry(raw)
                    if entry is not None:
                        out.append(entry)
        out.sort(key=lambda e: (e.domain, e.destination))
        out.sort(key=lambda e: e.period, reverse=True)
        return out

    def purge(self, max_age_days: float, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - max_age_days * 86400
        # the entries expire by TTL; the index forgets the old periods
        return int(self._call("purge", lambda: self._client.zremrangebyscore(
            f"{self._p}rlog", "-inf", f"({cutoff!r}")))

    def lock(self, ttl: float) -> str | None:
        token = uuid.uuid4().hex
        got = self._call("lock", lambda: self._client.set(
            f"{self._p}report-lock", token, nx=True, px=int(ttl * 1000)))
        return token if got else None

    def unlock(self, token: str) -> None:
        self._call("unlock", lambda: self._unlock(keys=[f"{self._p}report-lock"],
                                                  args=[token]))

    def close(self) -> None:
        from redis.exceptions import RedisError

        with contextlib.suppress(RedisError, OSError):
            self._client.close()


def open_report_log(cfg: Any) -> ReportLog:
    """The report log of ``cfg.storage_url`` (Redis for a fleet, else SQLite)."""
    url = cfg.storage_url
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        return RedisReportLog(url, timeout=cfg.storage.redis_timeout,
                              max_age_days=cfg.dmarc.results_max_age)
    return SqliteReportLog(report_log_path(url), busy_timeout=cfg.storage.busy_timeout)


__all__ = ["STATES", "LogEntry", "RedisReportLog", "ReportLog", "SqliteReportLog",
           "open_report_log", "report_log_path"]
