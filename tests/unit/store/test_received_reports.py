"""The received-reports store, one suite for both backends: ``sqlite`` (a temp
file) and ``redis`` (a real redis-server on loopback, tests/support/redis.py).

Dedupe by (org_name, report_id) -- RFC 9990 §3: report_id is unique per
reporter -- and the age bound ``[dmarc] received_max_age_days``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mxguard.auth.dmarc_ingest import AggregateReport, parse_report
from mxguard.config import Config, DmarcConfig, StorageConfig
from mxguard.store.backends import open_received_reports
from mxguard.store.base import StoreError
from mxguard.store.received_reports import (
    ADDED,
    DAY,
    DUPLICATE,
    EXPIRED,
    ReceivedReportsStore,
    SqliteReceivedReports,
    received_path,
)
from tests.support.redis import shared_server
from tests.unit.auth.dmarc_reports import Rec, report_xml

NOW = 1_795_000_000.0
Factory = Callable[[float], ReceivedReportsStore]


@pytest.fixture(params=["sqlite", "redis"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Makes stores (with a max age in days) that share one file / one Redis database."""
    made: list[ReceivedReportsStore] = []

    if request.param == "redis":
        from mxguard.store.redis_received import RedisReceivedReports

        server = shared_server()
        server.flush()
        url = server.url(0)

        def make(age: float) -> ReceivedReportsStore:
            made.append(RedisReceivedReports(url, max_age_days=age, timeout=5.0))
            return made[-1]
    else:
        def make(age: float) -> ReceivedReportsStore:
            made.append(SqliteReceivedReports(str(tmp_path / "rcv.db"), max_age_days=age))
            return made[-1]
    yield make
    for s in made:
        s.close()


def rep(org: str = "Reporter Inc", rid: str = "r1", domain: str = "ours.example",
        end: float = NOW - DAY, n: int = 1) -> AggregateReport:
    return parse_report(report_xml(org=org, report_id=rid, domain=domain,
                                   begin=int(end) - 86399, end=int(end),
                                   records=[Rec("192.0.2.1", n)]))


@pytest.mark.parametrize(("name", "second", "outcome", "kept"), [
    ("same report twice is stored once", rep(n=5), DUPLICATE, 1),
    ("control: another report_id of the same reporter", rep(rid="r2"), ADDED, 2),
    ("control: the same report_id from another reporter", rep(org="Other"), ADDED, 2),
])
def test_dedupe(factory: Factory, name: str, second: AggregateReport, outcome: str,
                kept: int) -> None:
    store = factory(400)
    assert store.add(rep(), now=NOW) == ADDED
    assert store.add(second, now=NOW) == outcome
    assert store.count() == kept
    # the first copy wins: a resent report does not double its messages
    assert sum(r.messages for r in store.reports()) == (1 if kept == 1 else 2)


def test_dedupe_across_two_store_objects(factory: Factory) -> None:
    """Two processes (or MX hosts) ingesting the same mail keep one copy."""
    a, b = factory(400), factory(400)
    assert a.add(rep(), now=NOW) == ADDED
    assert b.add(rep(), now=NOW) == DUPLICATE


@pytest.mark.parametrize(("name", "end", "outcome"), [
    ("older than received_max_age_days is not stored", NOW - 31 * DAY, EXPIRED),
    ("control: within the age is stored", NOW - 29 * DAY, ADDED),
])
def test_age_bound_on_add(factory: Factory, name: str, end: float, outcome: str) -> None:
    store = factory(30)
    assert store.add(rep(end=end), now=NOW) == outcome


def test_purge_drops_only_old_reports(factory: Factory) -> None:
    store = factory(30)
    store.add(rep(rid="old", end=NOW - 20 * DAY), now=NOW)
    store.add(rep(rid="new", end=NOW - 1 * DAY), now=NOW)
    assert store.purge(now=NOW + 15 * DAY) == 1
    assert [r.report_id for r in store.reports()] == ["new"]
    assert store.purge(now=NOW + 15 * DAY) == 0  # control: nothing more to drop


def test_reports_filters(factory: Factory) -> None:
    store = factory(400)
    store.add(rep(rid="a", end=NOW - 5 * DAY), now=NOW)
    store.add(rep(rid="b", end=NOW - 1 * DAY), now=NOW)
    store.add(rep(rid="c", domain="theirs.example", end=NOW - 1 * DAY), now=NOW)
    assert [r.report_id for r in store.reports()] == ["a", "b", "c"]
    assert [r.report_id for r in store.reports(since=NOW - 2 * DAY)] == ["b", "c"]
    assert [r.report_id for r in store.reports(domain="ours.example")] == ["a", "b"]
    assert store.reports(domain="none.example") == []  # control
    got = store.reports(domain="ours.example")[0]
    assert got == rep(rid="a", end=NOW - 5 * DAY)  # stored whole


def test_open_received_reports_by_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state/mxguard.db"
    cfg = Config(storage=StorageConfig(url=url),
                 dmarc=dataclasses.replace(DmarcConfig(), received_max_age_days=7))
    store = open_received_reports(cfg)
    try:
        assert isinstance(store, SqliteReceivedReports)
        assert store.path == str(tmp_path / "state" / "mxguard-received.db")
        assert store.max_age_days == 7
    finally:
        store.close()
    assert received_path(url) == str(tmp_path / "state" / "mxguard-received.db")


def test_unopenable_file_is_one_line_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError) as err:
        SqliteReceivedReports(str(blocker / "sub" / "r.db"))
    assert "cannot open the received reports store" in str(err.value)
