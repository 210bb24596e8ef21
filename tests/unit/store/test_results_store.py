"""The DMARC results store: rows, grouping by day and domain, batching, purge."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
from pathlib import Path

import pytest

from mxguard.config import Config, StorageConfig
from mxguard.store.backends import open_results_store
from mxguard.store.base import StoreError
from mxguard.store.results import ResultRecord, SqliteResultsStore, results_path, utc_day

DAY0 = dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp()  # 2026-03-01 00:00:00 UTC


def rec(ts: float = DAY0 + 3600, **kw: object) -> ResultRecord:
    base = ResultRecord(
        ts=ts, source_ip="192.0.2.1", header_from="example.com", envelope_from="example.com",
        envelope_to="dest.example", dkim=(("example.com", "sel", "pass"),),
        spf_domain="example.com", spf_result="pass", policy_domain="example.com",
        p="reject", rua=("mailto:agg@example.com",), dmarc_result="pass", policy="reject",
        dkim_aligned=True, spf_aligned=True)
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    store = SqliteResultsStore(":memory:")
    row = rec(dkim=(("b.example", "s2", "fail"), ("a.example", "s1", "pass")), sp="none",
              np="quarantine", pct=50, adkim="s", aspf="s", fo="1", override="sampled_out",
              override_comment="pct=50", spf_scope="helo")
    store.add(row)
    (got,) = store.query("2026-03-01")
    want = dataclasses.replace(row, dkim=(("a.example", "s1", "pass"),
                                          ("b.example", "s2", "fail")))  # stored sorted
    assert got == want


def test_identical_rows_are_counted_different_ones_kept_apart() -> None:
    store = SqliteResultsStore(":memory:")
    store.add(rec(ts=DAY0 + 10))
    store.add(rec(ts=DAY0 + 20))
    store.add(rec(ts=DAY0 + 30, disposition="reject", dmarc_result="fail"))  # control
    rows = store.query("2026-03-01")
    assert [(r.count, r.ts, r.disposition) for r in rows] == \
        [(2, DAY0 + 10, "none"), (1, DAY0 + 30, "reject")]


def test_query_by_utc_day_and_domain() -> None:
    store = SqliteResultsStore(":memory:")
    store.add(rec(ts=DAY0 - 1))  # 2026-02-28 23:59:59 UTC
    store.add(rec(ts=DAY0))
    store.add(rec(ts=DAY0 + 5, policy_domain="other.example", header_from="x.other.example"))
    assert [r.count for r in store.query("2026-02-28")] == [1]
    assert len(store.query(dt.date(2026, 3, 1))) == 2
    assert [r.header_from for r in store.query("2026-03-01", "OTHER.example.")] == \
        ["x.other.example"]
    assert store.query("2026-03-02") == []  # control: another day
    assert store.domains("2026-03-01") == ["example.com", "other.example"]
    with pytest.raises(ValueError):
        store.query("yesterday")


def test_purge_older_than_days() -> None:
    store = SqliteResultsStore(":memory:")
    for days_ago in (40, 31, 29, 1):
        store.add(rec(ts=DAY0 - days_ago * 86400))
    assert store.purge(30, now=DAY0) == 2
    assert store.purge(30, now=DAY0) == 0  # control: nothing older left
    assert utc_day(DAY0 - 29 * 86400) == "2026-01-31"
    assert len(store.query("2026-01-31")) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_batching_by_count_and_by_age(tmp_path: Path) -> None:
    path = str(tmp_path / "r.db")
    clock = Clock()
    store = SqliteResultsStore(path, max_pending=3, max_delay=5.0, clock=clock)
    reader = sqlite3.connect(path)

    def on_disk() -> int:
        return int(reader.execute("SELECT COUNT(*) FROM dmarc_results").fetchone()[0])

    store.add(rec())
    store.add(rec())
    assert (on_disk(), store.commits) == (0, 0)  # pending: no commit yet
    store.add(rec())
    assert (on_disk(), store.commits) == (3, 1)  # max_pending reached: one commit
    store.add(rec())
    clock.now = 4.9
    store.add(rec())
    assert on_disk() == 3  # control: not old enough
    clock.now = 5.0
    store.add(rec())
    assert (on_disk(), store.commits) == (6, 2)
    store.add(rec())
    store.close()
    assert on_disk() == 7  # close flushes
    reader.close()


def test_reads_flush_pending_rows() -> None:
    store = SqliteResultsStore(":memory:", max_pending=1000)
    store.add(rec())
    assert len(store.query("2026-03-01")) == 1
    assert store.flush() == 0  # control: nothing left pending


def test_reopen_sees_rows_and_uses_wal(tmp_path: Path) -> None:
    path = str(tmp_path / "sub" / "r.db")
    store = SqliteResultsStore(path)
    store.add(rec())
    store.close()
    store.close()  # idempotent
    again = SqliteResultsStore(path)
    assert again.query("2026-03-01")[0].count == 1
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    again.close()


def test_errors_are_store_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        SqliteResultsStore(str(tmp_path))  # a directory, not a database file
    store = SqliteResultsStore(":memory:")
    store.close()
    store.add(rec())
    with pytest.raises(StoreError):
        store.flush()
    with pytest.raises(StoreError):
        store.query("2026-03-01")


@pytest.mark.parametrize(("url", "path"), [
    ("sqlite:///var/lib/mxguard/mxguard.db", "/var/lib/mxguard/mxguard-dmarc.db"),
    ("sqlite:////srv/state/db.sqlite", "/srv/state/db-dmarc.sqlite"),
    ("sqlite:///srv/state/noext", "/srv/state/noext-dmarc.db"),
    ("sqlite:///:memory:", ":memory:"),
])
def test_results_path(url: str, path: str) -> None:
    assert results_path(url) == path


def test_open_from_config_is_a_sibling_file(tmp_path: Path) -> None:
    cfg = Config(storage=StorageConfig(url=f"sqlite:///{tmp_path}/mxguard.db"))
    store = open_results_store(cfg)
    store.add(rec())
    store.close()
    assert (tmp_path / "mxguard-dmarc.db").exists()
    assert not (tmp_path / "mxguard.db").exists()  # the greylist file is not touched
