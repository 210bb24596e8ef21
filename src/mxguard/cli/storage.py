"""``mxguard storage ...``: move state between stores.

``mxguard storage migrate --from URL --to URL`` copies greylist triplets,
auto-whitelist clients, the dynamic whitelist, the store's secrets (the
privacy key, so hashed triplets stay valid), the Bayes database (tokens,
learned-message records, the nspam/nham totals; for SQLite the
``mxguard-bayes.db`` file next to the main one) and the per-message DMARC
results from one store to another: ``sqlite:///…`` to ``redis://…`` when one
MX host becomes a fleet, and back. Progress is printed as it goes (a line per
``--batch`` records). Records already expired are skipped; records already in
the target are replaced by the source's (the Bayes totals too); DMARC result
counts are added to what the target holds (migrate each source once). Stop
the daemons (or accept that a few requests decided during the copy are not
carried over).

Exit status: 0 done, 1 a store failed, 2 bad usage.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from mxguard.cli.common import fail
from mxguard.redact import redact
from mxguard.store.base import (
    ClientRecord,
    GreylistStore,
    StoreError,
    TripletRecord,
    WhitelistEntry,
    sqlite_path,
)
from mxguard.store.bayes_store import SqliteBayesStore, bayes_sqlite_path
from mxguard.store.results import ResultsStore, SqliteResultsStore, results_path

if TYPE_CHECKING:
    from mxguard.store.redis_bayes import RedisBayesStore, SeenRow, TokenRow

REDIS_SCHEMES = ("redis://", "rediss://", "redis+sentinel://")
SECRET_NAMES_SKIPPED = ("whitelist_version",)  # per-store counters, not secrets


def _kind(url: str) -> str:
    if url.startswith("sqlite:///"):
        return "sqlite"
    if url.startswith(REDIS_SCHEMES):
        return "redis"
    fail(f"storage migrate: {_shown(url)!r} is not a storage URL (sqlite:///PATH, "
          "redis://, rediss://, redis+sentinel://)", 2)


def _shown(url: str) -> str:
    """A URL without its password."""
    return redact(url)


R = TypeVar("R")


class Progress:
    """Counts printed as they grow: one line per ``every`` records, and a total."""

    def __init__(self, what: str, every: int) -> None:
        self.what, self.every = what, every
        self.count = self.skipped = 0
        self._next = every

    def add(self, copied: int, skipped: int = 0) -> None:
        self.count += copied
        self.skipped += skipped
        if self.count >= self._next:
            click.echo(f"  {self.what}: {self.count}")
            while self._next <= self.count:
                self._next += self.every

    def done(self, note: str = "") -> None:
        extra = f" ({self.skipped} expired, skipped)" if self.skipped else ""
        click.echo(f"  {self.what}: {self.count} copied{extra}{note}")


async def copy_batches(what: str, source: AsyncIterator[list[R]],
                       put: Callable[[list[R]], Awaitable[int]], batch: int, *,
                       skips: bool = False) -> None:
    """Re-batch ``source``'s rows into writes of ``batch`` through ``put`` (which
    returns how many it wrote), with progress; ``skips``: rows ``put`` did not
    write are counted as skipped (expired)."""
    prog = Progress(what, batch)
    pending: list[R] = []

    async def write(chunk: list[R]) -> None:
        n = await put(chunk)
        prog.add(n, len(chunk) - n if skips else 0)

    async for rows in source:
        pending.extend(rows)
        while len(pending) >= batch:
            chunk, pending = pending[:batch], pending[batch:]
            await write(chunk)
    await write(pending)
    prog.done()


# ------------------------------------------------------------------ sources


class SqliteSource:
    """Reads an existing SQLite greylist database (read-only: never creates one)."""

    def __init__(self, url: str) -> None:
        self.path = sqlite_path(url)
        if self.path != ":memory:" and not os.path.exists(self.path):
            raise StoreError(f"sqlite {self.path}: no such database")
        try:
            self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            self.conn.execute("SELECT 1 FROM greylist_triplets LIMIT 1")
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: cannot read: {exc}") from None

    def _batches(self, sql: str, size: int) -> list[list[Any]]:
        try:
            cur = self.conn.execute(sql)
            out = []
            while rows := cur.fetchmany(size):
                out.append(rows)
            return out
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: read failed: {exc}") from None

    async def triplets(self, size: int) -> AsyncIterator[list[TripletRecord]]:
        for rows in self._batches("SELECT key, first_seen, last_seen, passed_at, expires "
                                  "FROM greylist_triplets", size):
            yield [TripletRecord(*r) for r in rows]

    async def clients(self, size: int) -> AsyncIterator[list[ClientRecord]]:
        for rows in self._batches("SELECT key, count, first_seen, last_counted, last_seen, "
                                  "expires FROM greylist_clients", size):
            yield [ClientRecord(*r) for r in rows]

    async def whitelist(self) -> list[WhitelistEntry]:
        rows = self._batches("SELECT entry, kind, added, comment FROM greylist_whitelist "
                             "ORDER BY kind, entry", 100000)
        return [WhitelistEntry(*r) for batch in rows for r in batch]

    async def secrets(self) -> dict[str, bytes]:
        rows = self._batches("SELECT name, value FROM greylist_meta", 100000)
        return {name: value for batch in rows for name, value in batch
                if name not in SECRET_NAMES_SKIPPED and isinstance(value, bytes)}

    async def close(self) -> None:
        self.conn.close()


class RedisSource:
    def __init__(self, url: str, timeout: float) -> None:
        from mxguard.store.redis import RedisGreylistStore

        self.store = RedisGreylistStore(url, timeout=timeout)

    async def triplets(self, size: int) -> AsyncIterator[list[TripletRecord]]:
        async for batch in self.store.scan_triplets():
            yield batch

    async def clients(self, size: int) -> AsyncIterator[list[ClientRecord]]:
        async for batch in self.store.scan_clients():
            yield batch

    async def whitelist(self) -> list[WhitelistEntry]:
        return await self.store.list_whitelist()

    async def secrets(self) -> dict[str, bytes]:
        return await self.store.stored_secrets()

    async def close(self) -> None:
        await self.store.close()


# ------------------------------------------------------------------ targets


class SqliteTarget:
    """Writes into a SQLite greylist database (created if missing)."""

    def __init__(self, url: str) -> None:
        from mxguard.store.sqlite import SqliteGreylistStore

        self.path = sqlite_path(url)
        self.store: GreylistStore = SqliteGreylistStore(self.path)  # creates the schema
        try:
            self.conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: cannot open: {exc}") from None

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(sql, rows)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise StoreError(f"sqlite {self.path}: write failed: {exc}") from None

    async def put(self, triplets: list[TripletRecord], clients: list[ClientRecord],
                  now: float) -> int:
        t = [(r.key, r.first_seen, r.last_seen, r.passed_at, r.expires)
             for r in triplets if r.expires >= now]
        c = [(r.key, r.count, r.first_seen, r.last_counted, r.last_seen, r.expires)
             for r in clients if r.expires >= now]
        if t:
            self._many("INSERT OR REPLACE INTO greylist_triplets VALUES (?, ?, ?, ?, ?)", t)
        if c:
            self._many("INSERT OR REPLACE INTO greylist_clients VALUES (?, ?, ?, ?, ?, ?)", c)
        return len(t) + len(c)

    async def secret(self, name: str) -> bytes | None:
        row = self.conn.execute("SELECT value FROM greylist_meta WHERE name=?",
                                (name,)).fetchone()
        return row[0] if row and isinstance(row[0], bytes) else None

    async def set_secret(self, name: str, value: bytes) -> None:
        self._many("INSERT OR REPLACE INTO greylist_meta VALUES (?, ?)", [(name, value)])

    async def close(self) -> None:
        self.conn.close()
        await self.store.close()


class RedisTarget:
    def __init__(self, url: str, timeout: float) -> None:
        from mxguard.store.redis import RedisGreylistStore

        self.redis = RedisGreylistStore(url, timeout=timeout)
        self.store: GreylistStore = self.redis

    async def put(self, triplets: list[TripletRecord], clients: list[ClientRecord],
                  now: float) -> int:
        return await self.redis.put_records(triplets, clients, now)

    async def secret(self, name: str) -> bytes | None:
        return (await self.redis.stored_secrets()).get(name)

    async def set_secret(self, name: str, value: bytes) -> None:
        await self.redis.set_secret(name, value)

    async def close(self) -> None:
        await self.redis.close()


# ------------------------------------------------------------------ results


def open_results(url: str, timeout: float, *, create: bool) -> ResultsStore | None:
    """The results store of a storage URL; None for a SQLite source without results."""
    if url.startswith(REDIS_SCHEMES):
        from mxguard.store.redis_results import RedisResultsStore

        return RedisResultsStore(url, timeout=timeout, max_pending=1000)
    path = results_path(url)
    if not create and not os.path.exists(path):
        return None
    return SqliteResultsStore(path, max_pending=1000)


def result_days(store: ResultsStore) -> list[str]:
    from mxguard.store.redis_results import RedisResultsStore

    if isinstance(store, RedisResultsStore):
        return store.days()
    if isinstance(store, SqliteResultsStore):
        store.flush()
        rows = store._connection().execute(
            "SELECT DISTINCT day FROM dmarc_results ORDER BY day").fetchall()
        return [r[0] for r in rows]
    raise StoreError(f"cannot list the days of {type(store).__name__}")


def migrate_results(src_url: str, dst_url: str, timeout: float) -> None:
    src = open_results(src_url, timeout, create=False)
    if src is None:
        click.echo("  dmarc results: none in the source")
        return
    dst = open_results(dst_url, timeout, create=True)
    assert dst is not None
    groups = messages = 0
    try:
        had = set(result_days(dst))
        days = result_days(src)
        overlap = 0
        for day in days:
            rows = src.query(day)
            for rec in rows:
                dst.add(rec)
            dst.flush()
            overlap += day in had
            groups += len(rows)
            messages += sum(r.count for r in rows)
            click.echo(f"  dmarc results: {day}: {len(rows)} groups, "
                       f"{sum(r.count for r in rows)} messages")
        note = f"; the target already had results for {overlap} of these days: counts " \
               "were added" if overlap else ""
        click.echo(f"  dmarc results: {groups} groups, {messages} messages copied "
                   f"({len(days)} days){note}")
    finally:
        src.close()
        dst.close()


# ------------------------------------------------------------------ Bayes


class SqliteBayesFile:
    """The SQLite Bayes file of a storage URL (``mxguard-bayes.db`` beside the main one)."""

    def __init__(self, url: str, *, create: bool) -> None:
        self.path = bayes_sqlite_path(sqlite_path(url))
        self.store: SqliteBayesStore | None = None
        self.conn: sqlite3.Connection | None = None
        self.exists = self.path == ":memory:" or os.path.exists(self.path)
        if not self.exists and not create:
            return
        try:
            if create:
                self.store = SqliteBayesStore(self.path)
                self.store.stats_sync()  # creates the file and its tables
                self.conn = sqlite3.connect(self.path, timeout=5.0, isolation_level=None)
            else:
                self.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
                self.conn.execute("SELECT 1 FROM bayes_tokens LIMIT 1")
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: cannot open: {exc}") from None

    def _rows(self, sql: str, size: int) -> list[list[Any]]:
        assert self.conn is not None
        try:
            cur = self.conn.execute(sql)
            out = []
            while rows := cur.fetchmany(size):
                out.append(rows)
            return out
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite {self.path}: read failed: {exc}") from None

    def _many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        assert self.conn is not None
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.executemany(sql, rows)
            self.conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise StoreError(f"sqlite {self.path}: write failed: {exc}") from None

    async def tokens(self, size: int) -> AsyncIterator[list[TokenRow]]:
        from mxguard.store.redis_bayes import TokenRow

        for rows in self._rows("SELECT h, spam, ham, atime FROM bayes_tokens", size):
            yield [TokenRow(*r) for r in rows]

    async def seen(self, size: int) -> AsyncIterator[list[SeenRow]]:
        from mxguard.store.redis_bayes import SeenRow

        for rows in self._rows("SELECT key, spam, time FROM bayes_seen", size):
            yield [SeenRow(k, bool(sp), int(t)) for k, sp, t in rows]

    async def totals(self) -> tuple[int, int]:
        meta = {n: int(v) for batch in self._rows("SELECT name, value FROM bayes_meta", 100)
                for n, v in batch}
        return meta.get("nspam", 0), meta.get("nham", 0)

    async def put_tokens(self, rows: list[TokenRow]) -> int:
        self._many("INSERT OR REPLACE INTO bayes_tokens VALUES (?, ?, ?, ?)",
                   [(r.h, r.spam, r.ham, r.atime) for r in rows])
        return len(rows)

    async def put_seen(self, rows: list[SeenRow]) -> int:
        self._many("INSERT OR REPLACE INTO bayes_seen VALUES (?, ?, ?)",
                   [(r.key, int(r.spam), r.time) for r in rows])
        return len(rows)

    async def set_totals(self, nspam: int, nham: int) -> None:
        self._many("UPDATE bayes_meta SET value = ? WHERE name = ?",
                   [(nspam, "nspam"), (nham, "nham")])
        if self.store is not None:
            self.store.recount_sync()  # the kept token count

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.store is not None:
            await self.store.close()


class RedisBayes:
    def __init__(self, url: str, timeout: float) -> None:
        from mxguard.store.redis_bayes import RedisBayesStore

        self.store: RedisBayesStore = RedisBayesStore(url, timeout=timeout)
        self.exists = True

    async def tokens(self, size: int) -> AsyncIterator[list[TokenRow]]:
        async for batch in self.store.scan_tokens():
            yield batch

    async def seen(self, size: int) -> AsyncIterator[list[SeenRow]]:
        async for batch in self.store.scan_seen():
            yield batch

    async def totals(self) -> tuple[int, int]:
        return await self.store.totals()

    async def put_tokens(self, rows: list[TokenRow]) -> int:
        return await self.store.put_tokens(rows)

    async def put_seen(self, rows: list[SeenRow]) -> int:
        return await self.store.put_seen(rows)

    async def set_totals(self, nspam: int, nham: int) -> None:
        await self.store.set_totals(nspam, nham)

    async def close(self) -> None:
        await self.store.close()


async def migrate_bayes(src_url: str, dst_url: str, batch: int, timeout: float) -> None:
    src: SqliteBayesFile | RedisBayes = (RedisBayes(src_url, timeout)
                                         if _kind(src_url) == "redis"
                                         else SqliteBayesFile(src_url, create=False))
    if not src.exists:
        click.echo("  bayes: none in the source")
        await src.close()
        return
    try:
        dst: SqliteBayesFile | RedisBayes = (RedisBayes(dst_url, timeout)
                                             if _kind(dst_url) == "redis"
                                             else SqliteBayesFile(dst_url, create=True))
    except BaseException:
        await src.close()
        raise
    try:
        await copy_batches("bayes tokens", src.tokens(batch), dst.put_tokens, batch)
        await copy_batches("bayes learned messages", src.seen(batch), dst.put_seen, batch)

        nspam, nham = await src.totals()
        had = await dst.totals()
        await dst.set_totals(nspam, nham)
        note = (f" (the target's {had[0]} spam, {had[1]} ham were replaced)"
                if any(had) and had != (nspam, nham) else "")
        click.echo(f"  bayes totals: {nspam} spam, {nham} ham{note}")
    finally:
        await src.close()
        await dst.close()


# ------------------------------------------------------------------ migrate


async def migrate_greylist(src_url: str, dst_url: str, batch: int, timeout: float) -> None:
    src: SqliteSource | RedisSource = (RedisSource(src_url, timeout)
                                       if _kind(src_url) == "redis" else SqliteSource(src_url))
    try:
        dst: SqliteTarget | RedisTarget = (RedisTarget(dst_url, timeout)
                                           if _kind(dst_url) == "redis"
                                           else SqliteTarget(dst_url))
    except BaseException:
        await src.close()
        raise
    try:
        now = time.time()

        async def put_triplets(chunk: list[TripletRecord]) -> int:
            return await dst.put(chunk, [], now)

        async def put_clients(chunk: list[ClientRecord]) -> int:
            return await dst.put([], chunk, now)

        # what the target does not take has expired meanwhile: counted as skipped
        await copy_batches("greylist triplets", src.triplets(batch), put_triplets, batch,
                           skips=True)
        await copy_batches("auto-whitelist clients", src.clients(batch), put_clients, batch,
                           skips=True)

        entries = await src.whitelist()
        added = 0
        for entry in entries:
            added += await dst.store.add_whitelist(entry)
        there = len(entries) - added
        click.echo(f"  dynamic whitelist: {added} entries copied"
                   + (f" ({there} already there)" if there else ""))

        secrets = await src.secrets()
        for name, value in sorted(secrets.items()):
            old = await dst.secret(name)
            if old is not None and old != value:
                click.echo(f"  secret {name}: the target's differed and was replaced by the "
                           "source's (hashed triplets are keyed by it)")
            await dst.set_secret(name, value)
        click.echo(f"  secrets: {len(secrets)} copied")
    finally:
        await src.close()
        await dst.close()


@click.group("storage")
def storage() -> None:
    """Move mxguard's state between stores (SQLite, Redis)."""


@storage.command("migrate")
@click.option("--from", "src", required=True, metavar="URL",
              help="source store: sqlite:///PATH, redis://…, rediss://…, redis+sentinel://…")
@click.option("--to", "dst", required=True, metavar="URL", help="target store (same forms)")
@click.option("--batch", type=click.IntRange(min=1, max=100000), default=1000,
              show_default=True, help="records per write (and per progress line)")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=600), default=10.0,
              show_default=True, help="seconds a Redis command may take")
@click.option("--no-results", is_flag=True, help="leave the DMARC results where they are")
def migrate(src: str, dst: str, batch: int, timeout: float, no_results: bool) -> None:
    """Copy greylist state, whitelist, secrets, Bayes and DMARC results from --from to --to."""
    _kind(src)
    _kind(dst)
    if src.rstrip("/") == dst.rstrip("/"):
        fail("storage migrate: --from and --to name the same store", 2)
    click.echo(f"migrating {_shown(src)} -> {_shown(dst)}")
    t0 = time.monotonic()
    try:
        asyncio.run(migrate_greylist(src, dst, batch, timeout))
        asyncio.run(migrate_bayes(src, dst, batch, timeout))
        if not no_results:
            migrate_results(src, dst, timeout)
    except StoreError as exc:
        fail(f"storage migrate: {exc}", 1)
    click.echo(f"done in {time.monotonic() - t0:.1f} s")


__all__ = ["migrate", "storage"]
