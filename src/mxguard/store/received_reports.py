"""Aggregate reports we received about our own domains (``mxguard dmarc ingest``).

One row per report, kept whole (the parsed
:class:`~mxguard.auth.dmarc_ingest.AggregateReport` as JSON): a reporter
sends one report per domain per day, so a year of reports is small, and
summaries are computed from the reports (:func:`~mxguard.auth.dmarc_ingest.summarize`).

* **Dedupe**: a report is identified by (``org_name``, ``report_id``) (RFC 9990
  §3: the report ID is unique per reporter); the same report ingested twice
  -- a resent mail, an mbox read again -- is stored once (:data:`DUPLICATE`).
* **Age bound**: a report whose date range ended more than ``max_age_days``
  ago is not stored (:data:`EXPIRED`) and :meth:`purge` drops those already
  kept; ``mxguard dmarc ingest`` purges at each run. Redis also sets each
  report's TTL to that moment.

:class:`SqliteReceivedReports` uses its own file next to the greylist
database (``mxguard.db`` -> ``mxguard-received.db``, :func:`received_path`);
:class:`~mxguard.store.redis_received.RedisReceivedReports` keeps them in the
fleet's Redis. Both are synchronous: only the CLI uses them.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from abc import ABC, abstractmethod

from mxguard.auth.dmarc_ingest import AggregateReport
from mxguard.store.base import StoreError, connect_sqlite, sibling_path, sqlite_path

DAY = 86400.0
ADDED = "added"
DUPLICATE = "duplicate"
EXPIRED = "expired"


class ReceivedReportsStore(ABC):
    """Where received aggregate reports are kept."""

    max_age_days: float

    def expired(self, report: AggregateReport, now: float | None = None) -> bool:
        """Whether ``report``'s range ended more than ``max_age_days`` before ``now``."""
        return report.end < (time.time() if now is None else now) - self.max_age_days * DAY

    @abstractmethod
    def add(self, report: AggregateReport, now: float | None = None) -> str:
        """Keep ``report``: :data:`ADDED`, :data:`DUPLICATE` (same org_name and
        report_id kept already) or :data:`EXPIRED` (too old, not kept)."""

    @abstractmethod
    def reports(self, since: float | None = None,
                domain: str | None = None) -> list[AggregateReport]:
        """Reports whose range ends at or after ``since`` (UNIX time), optionally of
        one policy domain, oldest first."""

    @abstractmethod
    def count(self) -> int:
        """Reports kept."""

    @abstractmethod
    def purge(self, now: float | None = None) -> int:
        """Drop reports older than ``max_age_days``; return how many went."""

    @abstractmethod
    def close(self) -> None:
        """Release the connection."""


def received_path(storage_url: str) -> str:
    """The file for a storage URL: ``.../mxguard.db`` -> ``.../mxguard-received.db``."""
    return sibling_path(sqlite_path(storage_url), "received")


SCHEMA = """
CREATE TABLE IF NOT EXISTS received_reports (
    org_name TEXT NOT NULL, report_id TEXT NOT NULL, domain TEXT NOT NULL,
    begin_ts INTEGER NOT NULL, end_ts INTEGER NOT NULL, received REAL NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY (org_name, report_id));
CREATE INDEX IF NOT EXISTS received_reports_end ON received_reports(end_ts);
CREATE INDEX IF NOT EXISTS received_reports_domain ON received_reports(domain, end_ts);
"""


class SqliteReceivedReports(ReceivedReportsStore):
    """Received reports in one SQLite file (``:memory:`` for tests)."""

    def __init__(self, path: str, *, max_age_days: float = 400, busy_timeout: float = 2.0
                 ) -> None:
        self.path = path
        self.max_age_days = max_age_days
        try:
            self._conn: sqlite3.Connection | None = connect_sqlite(path, busy_timeout)
            self._conn.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite {path}: cannot open the received reports store: "
                             f"{exc}") from None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"sqlite {self.path}: received reports store is closed")
        return self._conn

    def add(self, report: AggregateReport, now: float | None = None) -> str:
        now = time.time() if now is None else now
        if self.expired(report, now):
            return EXPIRED
        try:
            cur = self._connection().execute(
                "INSERT OR IGNORE INTO received_reports VALUES (?, ?, ?, ?, ?, ?, ?)",
                (report.org_name, report.report_id, report.domain, report.begin, report.end,
                 now, report.to_json()))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: storing a report failed: {exc}") from None
        return ADDED if cur.rowcount == 1 else DUPLICATE

    def reports(self, since: float | None = None,
                domain: str | None = None) -> list[AggregateReport]:
        sql = "SELECT body FROM received_reports WHERE end_ts >= ?"
        params: list[object] = [since if since is not None else float("-inf")]
        if domain is not None:
            sql += " AND domain = ?"
            params.append(domain.lower().rstrip("."))
        try:
            rows = self._connection().execute(sql + " ORDER BY end_ts, org_name, report_id",
                                              params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: read failed: {exc}") from None
        return [AggregateReport.from_json(r[0]) for r in rows]

    def count(self) -> int:
        try:
            row = self._connection().execute("SELECT COUNT(*) FROM received_reports").fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: read failed: {exc}") from None
        return int(row[0])

    def purge(self, now: float | None = None) -> int:
        cutoff = (time.time() if now is None else now) - self.max_age_days * DAY
        try:
            cur = self._connection().execute("DELETE FROM received_reports WHERE end_ts < ?",
                                             (cutoff,))
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: purge failed: {exc}") from None
        return cur.rowcount

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


__all__ = ["ADDED", "DUPLICATE", "EXPIRED", "ReceivedReportsStore", "SqliteReceivedReports",
           "received_path"]
