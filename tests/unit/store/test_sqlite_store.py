"""The greylist stores: records, concurrency, failures; group commit (SQLite).

One suite for both backends: the ``store`` fixture is parametrised over
``sqlite`` (a temp file) and ``redis`` (a real redis-server on loopback, see
tests/support/redis.py). Tests marked ``@sqlite_only`` exercise what only the
SQLite store has (WAL, group commit, file corruption, locks).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from mxguard.config import Config, StorageConfig
from mxguard.store.backends import open_store
from mxguard.store.base import GreylistStore, StoreError, WhitelistEntry, sqlite_path
from mxguard.store.sqlite import SqliteGreylistStore
from tests.support.redis import shared_server

T0 = 1_795_000_000.0

BACKENDS = ["sqlite", "redis"]
StoreFactory = Callable[[], GreylistStore]
# Only the SQLite store: `@sqlite_only` narrows the backend parameter.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(backend: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes store objects that share one state (one file / one Redis database)."""
    if backend == "redis":
        from mxguard.store.redis import RedisGreylistStore

        server = shared_server()
        server.flush()
        url = server.url(0)
        yield lambda: RedisGreylistStore(url, timeout=5.0)
    else:
        yield lambda: SqliteGreylistStore(str(tmp_path / "gl.db"))


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[GreylistStore]:
    s = store_factory()
    yield s
    await s.close()


def other_connection(tmp_path: Path) -> sqlite3.Connection:
    return sqlite3.connect(tmp_path / "gl.db")


@sqlite_only
async def test_wal_mode_and_tables(store: SqliteGreylistStore, tmp_path: Path) -> None:
    conn = other_connection(tmp_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert {"greylist_triplets", "greylist_clients", "greylist_whitelist",
            "greylist_meta"} <= tables


async def test_triplet_lifecycle(store: GreylistStore) -> None:
    assert await store.get_triplet("k") is None
    await store.record_first_seen("k", T0, T0 + 100)
    rec = await store.get_triplet("k")
    assert rec is not None and rec.first_seen == T0 and not rec.passed and rec.expires == T0 + 100
    assert await store.mark_passed("k", T0 + 300, T0 + 1000)
    assert not await store.mark_passed("k", T0 + 301, T0 + 1001)  # only one transition
    await store.touch_triplet("k", T0 + 500, T0 + 2000)
    rec = await store.get_triplet("k")
    assert rec is not None and rec.passed_at == T0 + 300 and rec.last_seen == T0 + 500
    assert rec.expires == T0 + 2000
    assert not await store.mark_passed("missing", T0, T0)
    await store.record_first_seen("k", T0 + 9, T0 + 99)  # starting over resets "passed"
    rec = await store.get_triplet("k")
    assert rec is not None and not rec.passed and rec.first_seen == T0 + 9
    assert await store.delete_triplet("k") and not await store.delete_triplet("k")


async def test_lookup_returns_both_records(store: GreylistStore) -> None:
    assert await store.lookup("t", "c") == (None, None)
    await store.record_first_seen("t", T0, T0 + 1)
    await store.count_client("c", T0, T0 + 1, 3600)
    t, c = await store.lookup("t", "c")
    assert t is not None and t.key == "t" and c is not None and c.key == "c" and c.count == 1
    t, c = await store.lookup("t", "other")
    assert t is not None and c is None


@pytest.mark.parametrize(("gaps", "count"), [
    ([0, 3600, 3600, 3600], 4),
    ([0, 10, 10, 10], 1),          # control: all inside one interval
    ([0, 3599, 2, 3599], 2),
])
async def test_client_counted_at_most_once_per_interval(store: GreylistStore,
                                                        gaps: list[float], count: int) -> None:
    now = T0
    for gap in gaps:
        now += gap
        await store.count_client("c", now, now + 100, 3600)
    rec = await store.get_client("c")
    assert rec is not None and rec.count == count and rec.last_seen == now
    await store.touch_client("c", now + 5, now + 500)
    rec = await store.get_client("c")
    assert rec is not None and rec.count == count and rec.expires == now + 500


@sqlite_only
async def test_group_commit_batches_concurrent_writes(store: SqliteGreylistStore,
                                                      tmp_path: Path) -> None:
    before = store.commits
    await asyncio.gather(*(store.record_first_seen(f"k{i}", T0, T0 + 1) for i in range(50)))
    assert store.commits - before == 1  # 50 writes, one commit
    # every write is committed when its await returns: another connection sees it
    conn = other_connection(tmp_path)
    assert conn.execute("SELECT count(*) FROM greylist_triplets").fetchone()[0] == 50
    conn.close()
    # control: sequential writes commit one by one
    before = store.commits
    for i in range(5):
        await store.record_first_seen(f"s{i}", T0, T0 + 1)
    assert store.commits - before == 5


@sqlite_only
async def test_writers_reply_only_after_commit(store: SqliteGreylistStore,
                                               tmp_path: Path) -> None:
    conn = other_connection(tmp_path)
    seen: list[int] = []

    async def writer(i: int) -> None:
        await store.record_first_seen(f"w{i}", T0, T0 + 1)
        seen.append(conn.execute("SELECT count(*) FROM greylist_triplets WHERE key=?",
                                 (f"w{i}",)).fetchone()[0])

    await asyncio.gather(*(writer(i) for i in range(10)))
    conn.close()
    assert seen == [1] * 10


async def test_concurrent_mixed_load(store: GreylistStore) -> None:
    async def client(n: int) -> int:
        passed = 0
        for i in range(30):
            key = f"c{n}-{i % 7}"
            rec = await store.get_triplet(key)
            if rec is None:
                await store.record_first_seen(key, T0, T0 + 10)
            elif await store.mark_passed(key, T0 + 1, T0 + 20):
                passed += 1
            await store.count_client(f"net{n}", T0 + i, T0 + 100, 5)
        return passed

    results = await asyncio.gather(*(client(n) for n in range(10)))
    assert results == [7] * 10
    stats = await store.stats()
    assert stats.triplets == 70 and stats.passed == 70 and stats.clients == 10
    if isinstance(store, SqliteGreylistStore):  # group commit: SQLite only
        assert store.commits < store.writes
    rec = await store.get_client("net0")
    assert rec is not None and rec.count == 6  # i = 0, 5, 10, 15, 20, 25


@sqlite_only
async def test_cancelled_writer_does_not_cancel_the_batch(store: SqliteGreylistStore) -> None:
    tasks = [asyncio.create_task(store.record_first_seen(f"k{i}", T0, T0 + 1))
             for i in range(5)]
    await asyncio.sleep(0)  # all five are in the batch now
    tasks[0].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert results[1:] == [None] * 4
    assert (await store.stats()).triplets == 5  # the cancelled one's write was committed too


@sqlite_only
async def test_failed_batch_fails_every_writer_then_recovers(store: SqliteGreylistStore) -> None:
    conn = store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    results = await asyncio.gather(
        *(store.record_first_seen(f"{'x' * 500}{i}", T0, T0 + 1) for i in range(40)),
        return_exceptions=True)
    assert all(isinstance(r, StoreError) for r in results[-5:])
    assert any("full" in str(r) for r in results)
    conn.execute("PRAGMA max_page_count=1073741823")
    await store.record_first_seen("after", T0, T0 + 1)
    assert await store.get_triplet("after") is not None
    # nothing of a failed batch was reported as stored when it was not
    stored = {r.key for r in await store.list_triplets(100)}
    for i, r in enumerate(results):
        if r is None:
            assert f"{'x' * 500}{i}" in stored


async def test_expire_batch_limits_and_order(store: GreylistStore) -> None:
    for i in range(10):
        await store.record_first_seen(f"old{i}", T0, T0 + 10)
    await store.record_first_seen("young", T0, T0 + 1000)
    for i in range(3):
        await store.count_client(f"c{i}", T0, T0 + 10, 1)
    counts = [await store.expire_batch(T0 + 100, 4) for _ in range(5)]
    assert counts == [4, 4, 4, 1, 0]  # 10 triplets + 3 clients, never more than 4 at once
    assert [r.key for r in await store.list_triplets(10)] == ["young"]
    assert await store.expire_batch(T0 + 5000, 4) == 1


async def test_purge(store: GreylistStore) -> None:
    await store.record_first_seen("a", T0, T0 + 1)
    await store.record_first_seen("b", T0 + 100, T0 + 101)
    await store.count_client("c", T0, T0 + 1, 1)
    await store.add_whitelist(WhitelistEntry("192.0.2.1", "client", T0))
    assert await store.purge(T0 + 50) == 2  # "a" and client "c"
    assert [r.key for r in await store.list_triplets(10)] == ["b"]
    assert await store.purge(None) == 1
    assert len(await store.list_whitelist()) == 1  # the whitelist is not purged


async def test_purge_large_in_chunks(store: GreylistStore) -> None:
    await asyncio.gather(*(store.record_first_seen(f"k{i}", T0, T0 + 1) for i in range(2500)))
    before = store.commits
    assert await store.purge(None) == 2500
    if isinstance(store, SqliteGreylistStore):  # Redis: one script per SCAN step instead
        assert store.commits - before == 3  # 1000 + 1000 + 500: the lock is released between


async def test_whitelist_and_version(store: GreylistStore) -> None:
    v0 = await store.whitelist_version()
    assert await store.add_whitelist(WhitelistEntry("postmaster@", "recipient", T0, "rfc"))
    assert not await store.add_whitelist(WhitelistEntry("postmaster@", "recipient", T0))
    v1 = await store.whitelist_version()
    assert v1 != v0
    assert [(e.entry, e.kind, e.comment) for e in await store.list_whitelist()] == [
        ("postmaster@", "recipient", "rfc")]
    assert await store.remove_whitelist("postmaster@")
    assert not await store.remove_whitelist("postmaster@")
    assert await store.whitelist_version() not in (v0, v1)


async def test_secret_is_created_once_and_kept(store_factory: StoreFactory) -> None:
    s1 = store_factory()
    key = await s1.secret("privacy_key")
    assert len(key) == 32 and await s1.secret("privacy_key") == key
    await s1.close()
    s2 = store_factory()
    assert await s2.secret("privacy_key") == key
    assert await s2.secret("other") != key
    await s2.close()


async def test_stats(store: GreylistStore) -> None:
    await store.record_first_seen("a", T0, T0 + 1)
    await store.record_first_seen("b", T0 + 5, T0 + 6)
    await store.mark_passed("b", T0 + 10, T0 + 100)
    st = await store.stats()
    assert (st.triplets, st.passed, st.pending, st.clients, st.whitelist) == (2, 1, 1, 0, 0)
    assert st.oldest_seen == T0 and st.commits == store.commits  # type: ignore[attr-defined]


async def test_two_store_objects_share_the_file(store_factory: StoreFactory) -> None:
    a = store_factory()
    b = store_factory()
    await a.record_first_seen("k", T0, T0 + 1)
    assert await b.get_triplet("k") is not None
    # (sequential: two connections in one thread would wait on each other's batch)
    await a.record_first_seen("x", T0, T0 + 1)
    await b.record_first_seen("y", T0, T0 + 1)
    assert (await a.stats()).triplets == 3
    await a.close()
    await b.close()


async def test_closed_store_raises_store_error(store_factory: StoreFactory) -> None:
    store = store_factory()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.get_triplet("k")


# ---------------------------------------------------------------- SQLite only: files, locks


async def test_corrupt_file_raises_and_store_recovers(tmp_path: Path) -> None:
    path = tmp_path / "gl.db"
    path.write_bytes(b"garbage " * 1000)
    with pytest.raises(StoreError, match=r"gl\.db: cannot open: file is not a database"):
        SqliteGreylistStore(str(path))
    # a store whose file turns bad at run time fails cleanly, then reopens
    path.unlink()
    store = SqliteGreylistStore(str(path))
    await store.record_first_seen("k", T0, T0 + 1)
    store._drop()
    path.unlink()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"gl.db{suffix}").unlink(missing_ok=True)
    path.write_bytes(b"garbage " * 1000)
    with pytest.raises(StoreError, match="not a database"):
        await store.get_triplet("k")
    path.unlink()
    assert await store.get_triplet("k") is None  # a fresh file: the store works again
    await store.record_first_seen("k", T0, T0 + 1)
    assert await store.get_triplet("k") is not None
    await store.close()


async def test_unopenable_path_raises_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open"):
        SqliteGreylistStore(str(blocker / "sub" / "gl.db"))


async def test_locked_database_raises_store_error(tmp_path: Path) -> None:
    store = SqliteGreylistStore(str(tmp_path / "gl.db"), busy_timeout=0.05)
    locker = sqlite3.connect(tmp_path / "gl.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreError, match="locked"):
        await store.record_first_seen("k", T0, T0 + 1)
    locker.execute("ROLLBACK")
    locker.close()
    await store.record_first_seen("k", T0, T0 + 1)  # recovered once the lock is gone
    assert await store.get_triplet("k") is not None
    await store.close()


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:///var/lib/mxguard/mxguard.db", "/var/lib/mxguard/mxguard.db"),
    ("sqlite:////var/lib/mxguard/mxguard.db", "/var/lib/mxguard/mxguard.db"),
    ("sqlite:///:memory:", ":memory:"),
])
def test_sqlite_url(url: str, path: str) -> None:
    assert sqlite_path(url) == path


async def test_open_store_from_config(tmp_path: Path) -> None:
    store = open_store(Config(storage=StorageConfig(url=f"sqlite:///{tmp_path}/x/y.db")))
    assert isinstance(store, SqliteGreylistStore) and store.path == f"{tmp_path}/x/y.db"
    await store.record_first_seen("k", T0, T0 + 1)
    await store.close()
    assert (tmp_path / "x" / "y.db").exists()
