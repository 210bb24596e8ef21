"""Rate counters: fixed windows, one suite for SQLite and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from mxguard.config import Config, StorageConfig
from mxguard.store.base import StoreError
from mxguard.store.rates import (
    RateStore,
    RedisRateStore,
    SqliteRateStore,
    open_rate_store,
    rates_path,
    window_number,
)
from tests.support.redis import shared_server

T0 = 1_794_999_980.0  # 20 s into a minute window: T0 // 60 * 60 == T0 - 20

Factory = Callable[[], RateStore]


@pytest.fixture(params=["sqlite", "redis"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    if request.param == "redis":
        server = shared_server()
        server.flush()
        url = server.url(0)
        return lambda: RedisRateStore(url, timeout=5.0)
    return lambda: SqliteRateStore(str(tmp_path / "rates.db"))


@pytest.fixture
async def rates(factory: Factory) -> AsyncIterator[RateStore]:
    store = factory()
    yield store
    await store.close()


async def test_counts_within_a_window_and_restarts_in_the_next(rates: RateStore) -> None:
    assert [await rates.incr("ip:192.0.2.1", 60, T0 + i) for i in range(3)] == [1, 2, 3]
    assert await rates.get("ip:192.0.2.1", 60, T0 + 39) == 3  # same window (ends at T0+40)
    assert await rates.incr("ip:192.0.2.1", 60, T0 + 40) == 1  # control: next window
    assert await rates.get("ip:192.0.2.1", 60, T0 + 41) == 1


async def test_keys_and_windows_are_separate(rates: RateStore) -> None:
    await rates.incr("a", 60, T0)
    await rates.incr("a", 60, T0, amount=4)
    assert await rates.incr("b", 60, T0) == 1  # control: another key
    assert await rates.incr("a", 3600, T0) == 1  # control: another window size
    assert await rates.get("a", 60, T0) == 5
    assert await rates.get("missing", 60, T0) == 0


async def test_concurrent_increments_are_all_counted(factory: Factory) -> None:
    a, b = factory(), factory()  # two hosts (or two connections) on one store
    try:
        counts = await asyncio.gather(*(s.incr("k", 60, T0) for s in (a, b) for _ in range(50)))
        assert sorted(counts) == list(range(1, 101))  # each count handed out once
        assert await a.get("k", 60, T0) == 100
    finally:
        await a.close()
        await b.close()


async def test_expire_forgets_past_windows(rates: RateStore) -> None:
    await rates.incr("k", 60, T0)
    removed = await rates.expire(T0 + 60)
    if isinstance(rates, SqliteRateStore):
        assert removed == 1
    else:
        assert removed == 0  # Redis TTLs do it
    assert await rates.get("k", 60, T0 + 60) == 0


async def test_redis_counter_has_a_ttl_of_two_windows() -> None:
    server = shared_server()
    server.flush()
    store = RedisRateStore(server.url(0), timeout=5.0)
    await store.incr("k", 30, T0)
    await store.incr("k", 30, T0 + 1)
    client = server.client()
    try:
        (key,) = client.keys("mxguard:rate:*")
        assert key == f"mxguard:rate:30:k:{window_number(T0, 30)}".encode()
        assert 59_000 < client.pttl(key) <= 60_000
    finally:
        client.close()
        await store.close()


async def test_closed_and_unavailable_store_raise_store_error(factory: Factory,
                                                               tmp_path: Path) -> None:
    store = factory()
    await store.close()
    with pytest.raises(StoreError):
        await store.incr("k", 60, T0)
    down = RedisRateStore("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens on port 1
    with pytest.raises(StoreError, match=r"127\.0\.0\.1:1/0"):
        await down.incr("k", 60, T0)
    await down.close()


def test_bad_window() -> None:
    with pytest.raises(ValueError):
        window_number(T0, 0)


async def test_open_rate_store_follows_the_storage_url(tmp_path: Path) -> None:
    store = open_rate_store(Config(storage=StorageConfig(url=f"sqlite:///{tmp_path}/m.db")))
    assert isinstance(store, SqliteRateStore) and store.path == f"{tmp_path}/m-rates.db"
    await store.close()
    assert rates_path("sqlite:///:memory:") == ":memory:"
    store = open_rate_store(Config(storage=StorageConfig(url="redis://127.0.0.1:6390/2")))
    assert isinstance(store, RedisRateStore)
    await store.close()
