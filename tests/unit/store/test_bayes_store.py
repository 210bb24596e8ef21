"""Bayes token stores: counts, totals, seen records, expiry.

One suite for every backend: the ``store`` fixture is parametrised over
``sqlite`` (a temp file), ``redis`` (a real redis-server on loopback, see
tests/support/redis.py) and ``memory`` (the reference). Tests marked
``@sqlite_only`` exercise what only the SQLite store has (its file, WAL, errors
of a broken file); ``redis_*`` tests what only Redis has (TTLs, several hosts).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from mxguard.config import BayesConfig, Config, ServerConfig, StorageConfig
from mxguard.store.backends import open_bayes_store
from mxguard.store.base import StoreError
from mxguard.store.bayes_store import (
    FORGOTTEN,
    KNOWN,
    LEARNED,
    RELEARNED,
    UNKNOWN,
    BayesStore,
    LearnItem,
    MemoryBayesStore,
    SqliteBayesStore,
    bayes_sqlite_path,
    hashes,
    token_hash,
)
from tests.support.redis import RedisServer, redis_server, shared_server  # noqa: F401

T0 = 1_795_000_000
DAY = 86400


BACKENDS = ["sqlite", "redis", "memory"]
StoreFactory = Callable[[], BayesStore]
# Only the SQLite store: `@sqlite_only` narrows the backend parameter.
sqlite_only = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
redis_only = pytest.mark.parametrize("backend", ["redis"], indirect=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_factory(backend: str, tmp_path: Path) -> Iterator[StoreFactory]:
    """Makes store objects that share one state (one file / one Redis database)."""
    if backend == "redis":
        from mxguard.store.redis_bayes import RedisBayesStore

        server = shared_server()
        server.flush()
        url = server.url(0)
        yield lambda: RedisBayesStore(url, timeout=5.0)
    elif backend == "sqlite":
        yield lambda: SqliteBayesStore(str(tmp_path / "bayes.db"))
    else:
        memory = MemoryBayesStore()
        yield lambda: memory


@pytest.fixture
async def store(store_factory: StoreFactory) -> AsyncIterator[BayesStore]:
    s = store_factory()
    yield s
    await s.close()


def item(key: str, tokens: list[int], spam: bool) -> LearnItem:
    return LearnItem(key, tokens, spam)


def test_token_hash_is_stable_and_fits_sqlite_integer() -> None:
    assert token_hash("free") == token_hash("free")
    assert token_hash("free") != token_hash("Free")
    assert all(0 <= token_hash(t) < 2**63 for t in ("", "a", "ü" * 50, "\udcff"))
    assert hashes(["a", "b", "a"]) == [token_hash("a"), token_hash("b")]


async def test_learn_counts_and_totals(store: BayesStore) -> None:
    out = await store.learn([item("m1", [1, 2, 3], True), item("m2", [2, 3, 4], False),
                             item("m3", [3], True)], T0)
    assert out == [LEARNED, LEARNED, LEARNED]
    tc = await store.lookup([1, 2, 3, 4, 5])
    assert (tc.nspam, tc.nham) == (2, 1)
    assert {h: c[:2] for h, c in tc.counts.items()} == {1: (1, 0), 2: (1, 1), 3: (2, 1),
                                                        4: (0, 1)}
    assert 5 not in tc.counts  # unknown token: absent, not zero
    st = await store.stats()
    assert (st.tokens, st.nspam, st.nham, st.seen) == (4, 2, 1, 3)


async def test_learning_twice_counts_once(store: BayesStore) -> None:
    assert await store.learn([item("m1", [1, 2], True)], T0) == [LEARNED]
    assert await store.learn([item("m1", [1, 2], True)], T0) == [KNOWN]
    tc = await store.lookup([1, 2])
    assert tc.nspam == 1 and tc.counts[1][:2] == (1, 0)
    assert await store.seen("m1") is True
    assert await store.seen("other") is None  # control


async def test_relearn_as_other_class_moves_counts(store: BayesStore) -> None:
    await store.learn([item("m1", [1, 2], True)], T0)
    assert await store.learn([item("m1", [1, 2], False)], T0) == [RELEARNED]
    tc = await store.lookup([1, 2])
    assert (tc.nspam, tc.nham) == (0, 1)
    assert tc.counts[1][:2] == (0, 1)
    assert await store.seen("m1") is False


async def test_forget_subtracts_exactly(store: BayesStore) -> None:
    await store.learn([item("m1", [1, 2], True), item("m2", [2, 3], True)], T0)
    assert await store.forget([item("m1", [1, 2], False)], T0) == [FORGOTTEN]
    assert await store.forget([item("m1", [1, 2], False)], T0) == [UNKNOWN]
    assert await store.forget([item("never", [2], True)], T0) == [UNKNOWN]
    tc = await store.lookup([1, 2, 3])
    assert tc.nspam == 1
    assert 1 not in tc.counts  # count dropped to zero: row deleted
    assert tc.counts[2][:2] == (1, 0) and tc.counts[3][:2] == (1, 0)
    assert (await store.stats()).tokens == 2


async def test_forget_never_goes_negative(store: BayesStore) -> None:
    await store.learn([item("m1", [1], True)], T0)
    # re-tokenized with more tokens than were learned (tokenizer changed): clamp at 0
    await store.forget([item("m1", [1, 2, 3], True)], T0)
    tc = await store.lookup([1, 2, 3])
    assert tc.counts == {} and tc.nspam == 0


async def test_lookup_many_tokens_in_one_call(store: BayesStore) -> None:
    toks = list(range(1, 5001))
    await store.learn([item("big", toks, False)], T0)
    tc = await store.lookup([*toks, 10**12])
    assert len(tc.counts) == 5000


async def test_touch_refreshes_atime_only_forward(store: BayesStore) -> None:
    await store.learn([item("m1", [1, 2], True)], T0)
    await store.touch([1], T0 + DAY)
    await store.touch([2], T0 - DAY)
    tc = await store.lookup([1, 2])
    assert tc.counts[1][2] == T0 + DAY and tc.counts[2][2] == T0


async def test_expire_ttl_in_batches(store: BayesStore) -> None:
    await store.learn([item("old", list(range(100)), True)], T0)
    await store.learn([item("new", list(range(100, 150)), True)], T0 + 10 * DAY)
    now = T0 + 11 * DAY
    ttl = 5 * DAY
    assert await store.expire(now, 10**6, ttl, limit=30) == 30  # a batch, not a sweep
    assert await store.expire(now, 10**6, ttl, limit=30) == 30
    assert await store.expire(now, 10**6, ttl, limit=1000) == 40
    assert await store.expire(now, 10**6, ttl, limit=1000) == 0
    tc = await store.lookup(list(range(150)))
    assert sorted(tc.counts) == list(range(100, 150))  # the recent ones survive
    assert (await store.stats()).tokens == 50


async def test_expire_beyond_max_tokens_least_recent_first(store: BayesStore) -> None:
    for day in range(10):
        await store.learn([item(f"m{day}", list(range(day * 10, day * 10 + 10)), False)],
                          T0 + day * DAY)
    now = T0 + 10 * DAY
    ttl = 365 * DAY  # nothing is too old: only the count limit applies
    assert await store.expire(now, 45, ttl, limit=20) == 20
    assert await store.expire(now, 45, ttl, limit=20) == 20
    assert await store.expire(now, 45, ttl, limit=20) == 15
    assert await store.expire(now, 45, ttl, limit=20) == 0
    tc = await store.lookup(list(range(100)))
    assert sorted(tc.counts) == list(range(55, 100))
    assert (await store.stats()).tokens == 45


async def test_stats_atime_range(store: BayesStore) -> None:
    empty = await store.stats()
    assert (empty.tokens, empty.oldest_atime, empty.newest_atime) == (0, 0, 0)
    await store.learn([item("a", [1], True)], T0)
    await store.learn([item("b", [2], True)], T0 + 5)
    st = await store.stats()
    assert (st.oldest_atime, st.newest_atime) == (T0, T0 + 5)


@sqlite_only
async def test_sqlite_wal_and_persistence(backend: str, tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "mxguard.db")
    s = SqliteBayesStore(path)
    await s.learn([item("m1", [7, 8], True)], T0)
    await s.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    s2 = SqliteBayesStore(path)
    tc = await s2.lookup([7, 8])
    assert tc.nspam == 1 and set(tc.counts) == {7, 8}
    await s2.close()


async def test_100k_tokens(store: BayesStore) -> None:
    s = store
    items = [item(f"m{i}", list(range(i * 1000, i * 1000 + 1000)), i % 2 == 0)
             for i in range(120)]
    assert await s.learn(items, T0) == [LEARNED] * 120
    st = await s.stats()
    assert st.tokens == 120_000 and st.nspam == 60 and st.nham == 60
    assert await s.expire(T0, 100_000, 10**8, limit=5000) == 5000  # one bounded batch
    assert (await s.stats()).tokens == 115_000


@sqlite_only
async def test_sqlite_errors_are_store_errors(backend: str, tmp_path: Path) -> None:
    bad = tmp_path / "notadb"
    bad.write_bytes(b"this is not a database" * 100)
    s = SqliteBayesStore(str(bad))
    with pytest.raises(StoreError, match="notadb"):
        await s.lookup([1])
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await s.lookup([1])


@sqlite_only
async def test_sqlite_file_next_to_the_main_state_file(backend: str, tmp_path: Path) -> None:
    cfg = Config(server=ServerConfig(state_dir=str(tmp_path)))
    s = open_bayes_store(cfg)
    assert isinstance(s, SqliteBayesStore) and s.path == str(tmp_path / "mxguard-bayes.db")
    await s.close()
    assert bayes_sqlite_path("/x/state") == "/x/state-bayes.db"
    assert bayes_sqlite_path(":memory:") == ":memory:"


@pytest.mark.parametrize(("cache_mb", "pragma"), [(None, -32 * 1024), (8, -8 * 1024)])
def test_sqlite_page_cache_from_config(tmp_path: Path, cache_mb: int | None,
                                       pragma: int) -> None:
    bayes = BayesConfig() if cache_mb is None else BayesConfig(sqlite_cache_mb=cache_mb)
    cfg = Config(server=ServerConfig(state_dir=str(tmp_path)), bayes=bayes)
    s = open_bayes_store(cfg)
    assert isinstance(s, SqliteBayesStore)
    conn = s._connection()
    assert conn.execute("PRAGMA cache_size").fetchone()[0] == pragma
    conn.close()


def test_unsupported_url_is_a_clear_error() -> None:
    cfg = Config(storage=StorageConfig(url="mysql://127.0.0.1:3306/mx"))
    with pytest.raises(StoreError, match="no Bayes store"):
        open_bayes_store(cfg)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6380/1",
                                 "redis+sentinel://127.0.0.1:26379/mx/2"])
async def test_redis_urls_open_the_redis_store(url: str) -> None:
    from mxguard.store.redis_bayes import TTL_GRACE, RedisBayesStore

    cfg = Config(storage=StorageConfig(url=url, redis_timeout=0.3),
                 bayes=BayesConfig(token_ttl=10 * DAY))
    s = open_bayes_store(cfg)  # connects lazily: no server needed
    assert isinstance(s, RedisBayesStore) and s.conn.timeout == 0.3
    assert s.ttl_ms == (10 * DAY + TTL_GRACE) * 1000
    await s.close()


# ------------------------------------------------------------ Redis only


@redis_only
async def test_redis_tokens_carry_ttls_refreshed_on_use(store: BayesStore) -> None:
    from mxguard.store.redis_bayes import RedisBayesStore

    assert isinstance(store, RedisBayesStore)
    store.token_ttl = 3 * DAY
    await store.learn([item("m1", [1, 2], True)], T0)
    c = shared_server().client()
    try:
        assert 0 < c.pttl("mxguard:bayes:t:1") <= store.ttl_ms
        assert c.pttl("mxguard:bayes:seen") == -1  # records and totals do not expire
        c.pexpire("mxguard:bayes:t:1", 5000)
        c.pexpire("mxguard:bayes:t:2", 5000)
        await store.touch([1], T0 + DAY)  # used again: full TTL
        await store.touch([2], T0 - DAY)  # not newer: TTL refreshed all the same
        assert c.pttl("mxguard:bayes:t:1") > 5000 and c.pttl("mxguard:bayes:t:2") > 5000
        await store.touch([3], T0 + DAY)  # unknown token: not created (control)
        assert not c.exists("mxguard:bayes:t:3")
        # a token Redis expired by itself: gone from lookups; expire() drops its index entry
        c.delete("mxguard:bayes:t:2")
        tc = await store.lookup([1, 2])
        assert set(tc.counts) == {1}
        assert await store.expire(T0 + 10 * DAY, 10**6, 3 * DAY, 100) == 2
        assert (await store.stats()).tokens == 0
    finally:
        c.close()


@redis_only
async def test_redis_two_hosts_learning_one_message_count_it_once(
        store_factory: StoreFactory) -> None:
    hosts = [store_factory() for _ in range(4)]
    toks = list(range(1, 301))
    outcomes = await asyncio.gather(*[h.learn([item("same", toks, True)], T0) for h in hosts])
    assert sorted(o[0] for o in outcomes) == [KNOWN, KNOWN, KNOWN, LEARNED]
    tc = await hosts[1].lookup(toks)
    assert tc.nspam == 1 and {c[0] for c in tc.counts.values()} == {1}
    # relearned as ham on two hosts at once: moved once
    outcomes = await asyncio.gather(*[h.learn([item("same", toks, False)], T0) for h in hosts[:2]])
    assert sorted(o[0] for o in outcomes) == [KNOWN, RELEARNED]
    tc = await hosts[2].lookup(toks)
    assert (tc.nspam, tc.nham) == (0, 1) and {c[:2] for c in tc.counts.values()} == {(0, 1)}
    for h in hosts:
        await h.close()


async def test_redis_outage_is_a_store_error_and_recovers(
        redis_server: RedisServer) -> None:  # noqa: F811
    from mxguard.store.redis_bayes import RedisBayesStore
    from mxguard.store.redis_conn import RETRY_AFTER

    s = RedisBayesStore(redis_server.url(0), timeout=0.5)
    await s.learn([item("m1", [1], True)], T0)
    redis_server.stop()
    with pytest.raises(StoreError, match="bayes lookup failed"):
        await s.lookup([1])
    with pytest.raises(StoreError, match="unavailable"):  # fail fast, no wait
        await s.learn([item("m2", [2], True)], T0)
    redis_server.start()  # restarted empty: the scripts are loaded again
    await asyncio.sleep(RETRY_AFTER + 0.1)
    assert await s.learn([item("m2", [2], True)], T0) == [LEARNED]
    tc = await s.lookup([1, 2])
    assert tc.nspam == 1 and set(tc.counts) == {2}
    await s.close()
