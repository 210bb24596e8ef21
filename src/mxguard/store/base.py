"""The greylist store interface: what greylisting needs from a state store.

Implementations: :mod:`mxguard.store.sqlite` (embedded default) and
:mod:`mxguard.store.redis` (fleets of MX hosts);
:func:`mxguard.store.backends.open_store` picks one by URL. Every method is a
coroutine and each one is atomic on its own, so two daemons sharing a store
(or two concurrent requests) never corrupt a record; the worst case of a race
is a triplet recorded twice with nearly the same first-seen time.

Times are UNIX seconds (float). Each record carries ``expires``: the caller
(the Greylister) computes it from ``max_age`` / ``retry_window``, which maps
directly onto Redis TTLs and lets expiry be one indexed range scan.

Every storage failure (locked, disk full, corrupt or read-only file) raises
:class:`StoreError`; the store stays usable and later calls retry.
"""

from __future__ import annotations

import os
import sqlite3
from abc import ABC, abstractmethod
from dataclasses import dataclass


class StoreError(Exception):
    """A storage failure, phrased for the admin (which store, what went wrong)."""


@dataclass(frozen=True, slots=True)
class TripletRecord:
    """One greylist triplet. ``passed_at`` is 0 until a retry was accepted."""

    key: str
    first_seen: float
    last_seen: float
    passed_at: float
    expires: float

    @property
    def passed(self) -> bool:
        return self.passed_at > 0


@dataclass(frozen=True, slots=True)
class ClientRecord:
    """Auto-whitelist state of one client (network): counted deliveries."""

    key: str
    count: int
    first_seen: float
    last_counted: float
    last_seen: float
    expires: float


@dataclass(frozen=True, slots=True)
class WhitelistEntry:
    """A dynamic whitelist entry; ``kind`` is ``client`` or ``recipient``."""

    entry: str
    kind: str
    added: float
    comment: str = ""


@dataclass(frozen=True, slots=True)
class StoreStats:
    triplets: int
    passed: int
    pending: int
    clients: int
    whitelist: int
    oldest_seen: float  # 0 when empty
    commits: int  # commits done by this store object (group commit figure)


class GreylistStore(ABC):
    """State of greylisting: triplets, client auto-whitelist, dynamic whitelist."""

    # -- triplets
    @abstractmethod
    async def get_triplet(self, key: str) -> TripletRecord | None:
        """The record of ``key`` or None."""

    @abstractmethod
    async def record_first_seen(self, key: str, now: float, expires: float) -> None:
        """Store ``key`` as new (first seen now, not passed), replacing any old record."""

    @abstractmethod
    async def mark_passed(self, key: str, now: float, expires: float) -> bool:
        """Mark ``key`` passed; True only for the call that made the transition."""

    @abstractmethod
    async def touch_triplet(self, key: str, now: float, expires: float) -> None:
        """Update the last-seen time (and expiry) of a known triplet."""

    async def lookup(self, triplet_key: str,
                     client_key: str) -> tuple[TripletRecord | None, ClientRecord | None]:
        """Both records of one request (one round trip where the store allows)."""
        return await self.get_triplet(triplet_key), await self.get_client(client_key)

    # -- client auto-whitelist
    @abstractmethod
    async def get_client(self, key: str) -> ClientRecord | None:
        """The auto-whitelist record of a client key or None."""

    @abstractmethod
    async def count_client(self, key: str, now: float, expires: float,
                           interval: float) -> None:
        """Count one delivery of ``key`` unless one was counted less than
        ``interval`` seconds ago (always refreshes last-seen and expiry)."""

    @abstractmethod
    async def touch_client(self, key: str, now: float, expires: float) -> None:
        """Refresh last-seen and expiry of a client without counting."""

    # -- dynamic whitelist
    @abstractmethod
    async def add_whitelist(self, entry: WhitelistEntry) -> bool:
        """Add an entry; False if it was there already."""

    @abstractmethod
    async def remove_whitelist(self, entry: str) -> bool:
        """Remove an entry; False if there was none."""

    @abstractmethod
    async def list_whitelist(self) -> list[WhitelistEntry]:
        """All dynamic whitelist entries."""

    @abstractmethod
    async def whitelist_version(self) -> int:
        """A number that changes whenever the dynamic whitelist changes."""

    # -- maintenance
    @abstractmethod
    async def expire_batch(self, now: float, limit: int) -> int:
        """Delete at most ``limit`` expired rows; return how many were deleted."""

    @abstractmethod
    async def list_triplets(self, limit: int) -> list[TripletRecord]:
        """Up to ``limit`` triplets, most recently seen first."""

    @abstractmethod
    async def stats(self) -> StoreStats:
        """Counts for ``mxguard greylist stats``."""

    @abstractmethod
    async def purge(self, older_than: float | None) -> int:
        """Delete triplets and clients last seen before ``older_than`` (None: all)."""

    @abstractmethod
    async def delete_triplet(self, key: str) -> bool:
        """Delete one triplet; False if there was none."""

    @abstractmethod
    async def secret(self, name: str, size: int = 32) -> bytes:
        """A random secret kept in the store, created on first use (privacy key)."""

    @abstractmethod
    async def close(self) -> None:
        """Commit what is pending and release the store."""


def connect_sqlite(path: str, busy_timeout: float, *, synchronous: str = "NORMAL",
                   cache_kib: int = 0, any_thread: bool = False) -> sqlite3.Connection:
    """A connection as every SQLite store wants it: parent directory made (0750),
    autocommit mode (stores open their own transactions), ``busy_timeout``, WAL
    (the CLI reads while the daemon writes), ``synchronous`` and, when given, a
    page cache of ``cache_kib``. Closed again if a PRAGMA fails; errors raise
    (sqlite3.Error, OSError) for the store to word."""
    if path != ":memory:" and os.path.dirname(path):
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                           check_same_thread=not any_thread, cached_statements=64)
    try:
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        if cache_kib:
            conn.execute(f"PRAGMA cache_size=-{int(cache_kib)}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def sqlite_path(url: str) -> str:
    """``sqlite:///var/lib/x.db`` and ``sqlite:////var/lib/x.db`` -> ``/var/lib/x.db``
    (always absolute: a daemon's working directory means nothing)."""
    rest = url[len("sqlite://"):].lstrip("/")
    return rest if rest == ":memory:" else "/" + rest


def sibling_path(main_path: str, kind: str) -> str:
    """The SQLite file of one kind of state next to the main one:
    ``/x/mxguard.db`` + ``dmarc`` -> ``/x/mxguard-dmarc.db`` (``:memory:`` stays).
    A file per kind, so a long batch of one never holds the lock another waits for."""
    if main_path == ":memory:":
        return main_path
    root, ext = os.path.splitext(main_path)
    return f"{root}-{kind}{ext or '.db'}"


__all__ = ["ClientRecord", "GreylistStore", "StoreError", "StoreStats", "TripletRecord",
           "WhitelistEntry", "sibling_path", "sqlite_path"]
