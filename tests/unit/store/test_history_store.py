"""The message history store: the same table of behaviour on SQLite and on a
real Redis (add/get, each query filter next to a control that must not match,
paging, timeline, top lists, pruning, privacy hashing, the raw-message bound)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from mxguard.store.base import StoreError
from mxguard.store.history import HistoryRecord, HistoryStore, SqliteHistoryStore, new_id
from mxguard.store.redis_history import RedisHistoryStore
from tests.support.redis import redis_url  # noqa: F401

NOW = time.time()

Factory = Callable[..., HistoryStore]


@pytest.fixture(params=["sqlite", "redis"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    if request.param == "sqlite":
        def sqlite(**kw: Any) -> HistoryStore:
            return SqliteHistoryStore(str(tmp_path / "h.db"), **kw)
        return sqlite
    url = request.getfixturevalue("redis_url")

    def redis(**kw: Any) -> HistoryStore:
        return RedisHistoryStore(url, **kw)
    return redis


@pytest.fixture
async def store(make: Factory) -> AsyncIterator[HistoryStore]:
    s = make()
    yield s
    await s.close()


def rec(age: float, **kw: Any) -> HistoryRecord:
    t = NOW - age
    base: dict[str, Any] = dict(id=new_id(t), time=t, host="mx1", queue_id="Q" + str(int(age)),
                                client_address="192.0.2.7", client_name="mail.example.net",
                                helo="mail.example.net", sender="alice@example.com",
                                recipients=["bob@example.org"], from_="Alice <alice@example.com>",
                                subject="Hello", message_id="<m@example.com>", size=1200,
                                score=1.0, action="accept",
                                symbols=[{"name": "SPF_PASS", "score": -0.5, "detail": "pass"}],
                                timings={"spf": 1.5})
    base.update(kw)
    return HistoryRecord(**base)


def test_record_round_trips_through_json() -> None:
    r = rec(5, headers_added=[["X-Spam-Flag", "YES"]], observed=["helo:550 x"], kept=True)
    d = r.to_dict()
    assert d["from"] == "Alice <alice@example.com>" and "from_" not in d
    assert HistoryRecord.from_dict(d) == r
    assert HistoryRecord.from_dict({**d, "unknown": 1}) == r  # newer writers' keys ignored


def test_ids_sort_by_time() -> None:
    ids = [new_id(t) for t in (1.0, 2.0, 1000.0, 1e9)]
    assert ids == sorted(ids) and len(set(new_id(5.0) for _ in range(50))) == 50


async def test_add_and_get_by_id_and_queue_id(store: HistoryStore) -> None:
    old, new = rec(100, queue_id="ABC"), rec(10, queue_id="ABC", action="reject")
    await store.add_many([old, new, rec(5, queue_id="OTHER")])
    assert await store.get(old.id) == old
    got = await store.get("ABC")
    assert got is not None and got.id == new.id  # the newest of the queue id
    assert await store.get("NOPE") is None  # control
    assert await store.count() == 3


SENT = {
    "a": rec(50, queue_id="QA", sender="alice@example.com", action="reject",
             symbols=[{"name": "SPF_FAIL", "score": 5.0, "detail": "fail"}]),
    "b": rec(40, queue_id="QB", sender="Carol@Example.net", recipients=["dave@example.org"],
             client_address="198.51.100.9", client_name="unknown", subject="Cheap pills"),
    "c": rec(30, queue_id="QC", action="defer", door="policy",
             symbols=[{"name": "GREYLIST_DEFERRED", "score": 0.0, "detail": "new"}]),
}

QUERIES: list[tuple[str, dict[str, Any], set[str]]] = [
    ("queue id", {"queue_id": "QB"}, {"b"}),
    ("queue id control", {"queue_id": "QZ"}, set()),
    ("sender, any case", {"sender": "carol@example.NET"}, {"b"}),
    ("sender control", {"sender": "carol@example.com"}, set()),
    ("recipient", {"recipient": "dave@example.org"}, {"b"}),
    ("recipient control", {"recipient": "eve@example.org"}, set()),
    ("client address", {"client": "198.51.100.9"}, {"b"}),
    ("client name", {"client": "mail.example.net"}, {"a", "c"}),
    ("client control", {"client": "203.0.113.1"}, set()),
    ("action", {"action": "reject"}, {"a"}),
    ("action control", {"action": "quarantine"}, set()),
    ("symbol", {"symbol": "GREYLIST_DEFERRED"}, {"c"}),
    ("symbol control", {"symbol": "BAYES_99"}, set()),
    ("text in subject", {"text": "pills"}, {"b"}),
    ("text control", {"text": "viagra"}, set()),
    ("since", {"since": NOW - 45}, {"b", "c"}),
    ("until", {"until": NOW - 45}, {"a"}),
    ("combined", {"sender": "alice@example.com", "action": "defer"}, {"c"}),
]


@pytest.mark.parametrize(("name", "filters", "expected"), QUERIES, ids=[q[0] for q in QUERIES])
async def test_query_filters(store: HistoryStore, name: str, filters: dict[str, Any],
                             expected: set[str]) -> None:
    await store.add_many(list(SENT.values()))
    found = await store.query(**filters)
    assert {k for k, r in SENT.items() if r in found} == expected
    assert len(found) == len(expected)


async def test_query_is_newest_first_and_pages(store: HistoryStore) -> None:
    records = [rec(age) for age in range(100, 0, -1)]
    await store.add_many(records)
    first = await store.query(limit=30)
    assert [r.id for r in first] == [r.id for r in reversed(records)][:30]
    second = await store.query(limit=30, before_id=first[-1].id)
    assert [r.id for r in second] == [r.id for r in reversed(records)][30:60]


async def test_timeline_counts_per_bucket_and_action(store: HistoryStore) -> None:
    base = (NOW // 600) * 600 - 3000  # a bucket boundary well in the past
    t0 = base + 1
    records = [rec(NOW - t0, action="accept"), rec(NOW - t0 - 5, action="accept"),
               rec(NOW - t0 - 10, action="reject"), rec(NOW - t0 - 700, action="accept")]
    await store.add_many(records)
    rows = await store.timeline(base - 600, bucket=600)
    assert (base, "accept", 2) in rows and (base, "reject", 1) in rows
    assert (base + 600, "accept", 1) in rows
    assert sum(n for _, _, n in rows) == 4
    assert await store.timeline(NOW + 60) == []  # control: nothing later


async def test_top_lists(store: HistoryStore) -> None:
    await store.add_many([
        rec(20, sender="x@spam.example", action="reject", client_address="203.0.113.5",
            symbols=[{"name": "BAYES_99", "score": 5, "detail": ""}]),
        rec(19, sender="x@spam.example", action="reject", client_address="203.0.113.5",
            symbols=[{"name": "BAYES_99", "score": 5, "detail": ""}]),
        rec(18, sender="y@spam.example", action="reject", client_address="203.0.113.6"),
        rec(17, sender="ok@example.com", action="accept"),
    ])
    since = NOW - 7200
    assert (await store.top("sender", since, 1, action="reject")) == [("x@spam.example", 2)]
    assert (await store.top("sender_domain", since, 5, action="reject")) == \
        [("spam.example", 3)]
    assert ("ok@example.com", 1) not in await store.top("sender", since, 5, action="reject")
    assert (await store.top("client", since, 1, action="reject")) == [("203.0.113.5", 2)]
    symbols = dict(await store.top("symbol", since, 10))
    assert symbols["BAYES_99"] == 2 and symbols["SPF_PASS"] == 2
    with pytest.raises(ValueError, match="expected one of"):
        await store.top("subject", since, 5)


async def test_prune_by_age_and_count_in_steps(store: HistoryStore) -> None:
    old = [rec(40 * 86400 + i) for i in range(5)]
    fresh = [rec(100 - i) for i in range(10)]
    await store.add_many(old + fresh)
    assert await store.prune(30 * 86400, 1000, batch=3) == 3  # a small step
    assert await store.prune(30 * 86400, 1000, batch=3) == 2
    assert await store.prune(30 * 86400, 1000) == 0  # control: the fresh ones stay
    assert await store.count() == 10
    assert await store.prune(30 * 86400, 6) == 4  # past max_records: the oldest go
    left = await store.query()
    assert [r.id for r in left] == [r.id for r in reversed(fresh)][:6]
    assert await store.get(old[0].id) is None
    assert await store.query(queue_id=fresh[0].queue_id) == []  # index entries gone too


async def test_privacy_hashes_addresses_and_drops_subject(make: Factory) -> None:
    store = make(privacy=True)
    try:
        r = rec(10, subject="Secret plans", sender="Alice@Example.com")
        await store.add_many([r])
        (kept,) = await store.query()
        for value in (kept.sender, kept.client_address, kept.client_name, kept.from_,
                      *kept.recipients):
            assert value.startswith("h:") and "example" not in value
        assert kept.subject == "" and kept.helo == "mail.example.net"  # HELO stays
        assert "alice" not in str(kept.to_dict()).lower()
        assert [x.id for x in await store.query(sender="alice@example.com")] == [r.id]
        assert [x.id for x in await store.query(recipient="bob@example.org")] == [r.id]
        assert [x.id for x in await store.query(client="192.0.2.7")] == [r.id]
        assert await store.query(sender="mallory@example.com") == []  # control
        domains = await store.top("sender_domain", NOW - 7200, 5)
        assert domains and domains[0][0].startswith("h:")
    finally:
        await store.close()


async def test_privacy_key_is_kept_in_the_store(make: Factory) -> None:
    a = make(privacy=True)
    await a.add_many([rec(10)])
    await a.close()
    b = make(privacy=True)
    try:  # a second process hashes with the same key
        assert len(await b.query(sender="alice@example.com")) == 1
    finally:
        await b.close()


async def test_raw_messages_keep_only_the_last_n_and_are_cut(make: Factory) -> None:
    store = make(keep_messages=3, raw_max_size=100)
    try:
        ids = [new_id() for _ in range(5)]
        for i, rid in enumerate(ids):
            await store.keep_raw(rid, bytes([65 + i]) * 500)
        assert await store.get_raw(ids[0]) is None and await store.get_raw(ids[1]) is None
        assert await store.get_raw(ids[4]) == b"E" * 100  # bounded size
        assert await store.get_raw(ids[2]) == b"C" * 100
    finally:
        await store.close()


async def test_raw_keeping_off_by_default(store: HistoryStore) -> None:
    rid = new_id()
    await store.keep_raw(rid, b"data")
    assert await store.get_raw(rid) is None


def test_sqlite_readonly_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such file"):
        SqliteHistoryStore(str(tmp_path / "none.db"), readonly=True)


async def test_sqlite_readonly_reads_what_the_daemon_wrote(tmp_path: Path) -> None:
    path = str(tmp_path / "h.db")
    writer = SqliteHistoryStore(path)
    await writer.add_many([rec(3)])
    reader = SqliteHistoryStore(path, readonly=True)
    try:
        assert len(await reader.query()) == 1
        with pytest.raises(StoreError):
            await reader.add_many([rec(2)])
    finally:
        await reader.close()
        await writer.close()


async def test_redis_outage_is_a_store_error() -> None:
    from mxguard.testing.ports import free_port

    store = RedisHistoryStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    with pytest.raises(StoreError, match="history store redis"):
        await store.add_many([rec(1)])
    await store.close()
