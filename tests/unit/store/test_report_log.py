"""The sent-reports log: one claim wins, sent is final, retries wait their turn;
the same on SQLite and on a real Redis (where the fleet lock lives too)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from mxguard.store.report_log import RedisReportLog, ReportLog, SqliteReportLog
from tests.support.redis import redis_url  # noqa: F401


@pytest.fixture(params=["sqlite", "redis"])
def rlog(request: pytest.FixtureRequest) -> Iterator[ReportLog]:
    if request.param == "sqlite":
        log: ReportLog = SqliteReportLog(":memory:")
    else:
        log = RedisReportLog(request.getfixturevalue("redis_url"))
    yield log
    log.close()


KEY = ("example.com", "2026-03-01", "rua@example.com")


def test_one_claim_wins_and_sent_is_final(rlog: ReportLog) -> None:
    first = rlog.claim(*KEY, now=1000.0, lease=600)
    assert first is not None and first.attempts == 1
    assert rlog.claim(*KEY, now=1001.0, lease=600) is None  # control: leased to the first
    rlog.finish(dataclasses.replace(first, state="sent"))
    assert rlog.claim(*KEY, now=99999.0, lease=600) is None  # never twice
    other = rlog.claim("example.com", "2026-03-01", "other@example.com", now=1.0, lease=1)
    assert other is not None  # control: another destination is its own entry
    assert [e.state for e in rlog.entries("2026-03-01")] == ["sending", "sent"]


def test_retry_waits_for_next_try_and_counts_attempts(rlog: ReportLog) -> None:
    e = rlog.claim(*KEY, now=1000.0, lease=600)
    assert e is not None
    rlog.finish(dataclasses.replace(e, state="retry", next_try=2000.0, error="refused"))
    assert rlog.claim(*KEY, now=1999.0, lease=600) is None  # not due
    again = rlog.claim(*KEY, now=2000.0, lease=600)
    assert again is not None and again.attempts == 2 and again.error == "refused"


def test_a_dead_senders_lease_runs_out(rlog: ReportLog) -> None:
    assert rlog.claim(*KEY, now=1000.0, lease=60) is not None
    assert rlog.claim(*KEY, now=1059.0, lease=60) is None
    assert rlog.claim(*KEY, now=1060.0, lease=60) is not None


def test_fleet_lock_is_held_by_one_host(redis_url: str) -> None:  # noqa: F811
    a, b = RedisReportLog(redis_url), RedisReportLog(redis_url)
    token = a.lock(60)
    assert token is not None
    assert b.lock(60) is None  # the other host waits
    b.unlock("not-the-token")
    assert b.lock(60) is None  # control: a wrong token releases nothing
    a.unlock(token)
    assert b.lock(60) is not None
    a.close()
    b.close()
