"""The history recorder: which decisions it records (milter always, policy by
action), what a record holds, the queue bound and its drop count, a failing
store never raising into the observer, background flush and prune, raw copies."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from pathlib import Path
from typing import Any

import pytest

from mxguard.config import Config, HistoryConfig, StorageConfig, WebConfig
from mxguard.core import runner
from mxguard.core.history import HistoryRecorder, open_history, raw_message
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import (
    Action,
    Decision,
    HeaderChange,
    HeaderEdit,
    Message,
    Symbol,
    Transaction,
    Verdict,
)
from mxguard.store.base import StoreError
from mxguard.store.history import HistoryRecord, SqliteHistoryStore


def cfg(tmp_path: Path, **history: Any) -> Config:
    web = history.pop("web", WebConfig())
    storage = dataclasses.replace(StorageConfig(), url=f"sqlite:///{tmp_path}/g.db")
    return dataclasses.replace(Config(), storage=storage, web=web,
                               history=dataclasses.replace(HistoryConfig(), **history))


def milter_tx() -> Transaction:
    body = b"Hello there\r\n"
    headers = [("From", " =?utf-8?q?J=C3=BCrgen?= <j@example.com>"),
               ("Subject", " Lunch\n\ttomorrow"), ("Message-ID", " <m1@example.com>")]
    return Transaction(client_address="192.0.2.7", client_name="mail.example.net",
                       helo="mail.example.net", sender="j@example.com",
                       recipients=["bob@example.org"], queue_id="4ABCD", size=99,
                       message=Message(headers, lambda: io.BytesIO(body), 120))


def verdict(action: Action = Action.ACCEPT, by: str = "", spam: bool = False) -> Verdict:
    v = Verdict(action=action, decided_by=by, score=7.25 if spam else 0.5,
                symbols=[Symbol("BAYES_99", 5.0, "0.99"), Symbol("SPF_PASS", -0.5, "x")],
                timings={"spf": 1.23456}, observed=["helo:504 5.5.2 nope"])
    if action is not Action.ACCEPT:
        v.decision = Decision(action, 450, "4.2.0", "Greylisted")
    v.headers = [HeaderEdit("X-Spam-Status", "Yes")]
    if spam:
        v.headers.append(HeaderChange.insert(0, "X-Spam-Flag", "YES"))
    v.headers.append(HeaderChange.delete("X-Old"))
    return v


class BrokenStore(SqliteHistoryStore):
    def _add_many(self, records: Any, *, on_loop: bool = False) -> None:
        raise StoreError("history store sqlite x: disk full")


RECORDS = [  # door, action, policy_actions, recorded?
    ("milter", Action.ACCEPT, ["reject"], True),
    ("milter", Action.REJECT, [], True),
    ("policy", Action.DEFER, ["reject", "defer"], True),
    ("policy", Action.ACCEPT, ["reject", "defer"], False),  # control
    ("policy", Action.DEFER_IF_PERMIT, ["reject"], False),  # control
]


@pytest.mark.parametrize(("door", "action", "actions", "recorded"), RECORDS)
async def test_which_decisions_are_recorded(tmp_path: Path, door: str, action: Action,
                                            actions: list[str], recorded: bool) -> None:
    store = SqliteHistoryStore(":memory:")
    r = HistoryRecorder(cfg(tmp_path, policy_actions=actions), store, host="mx1")
    r(door, milter_tx(), verdict(action), "x")
    assert r.queued == (1 if recorded else 0)
    await r.close()


async def test_record_holds_the_decision(tmp_path: Path) -> None:
    store = SqliteHistoryStore(":memory:")
    r = HistoryRecorder(cfg(tmp_path), store, host="mx1")
    r("milter", milter_tx(), verdict(spam=True), "accept")
    assert await r.flush() == 1 and r.written == 1
    (rec,) = await store.query()
    assert (rec.host, rec.door, rec.queue_id, rec.sender, rec.recipients) == \
        ("mx1", "milter", "4ABCD", "j@example.com", ["bob@example.org"])
    assert rec.from_ == "Jürgen <j@example.com>" and rec.subject == "Lunch tomorrow"
    assert rec.message_id == "<m1@example.com>" and rec.size == 120
    assert rec.spam and rec.score == 7.25 and rec.action == "accept"
    assert rec.symbols[0] == {"name": "BAYES_99", "score": 5.0, "detail": "0.99"}
    assert rec.timings == {"spf": 1.235}
    assert rec.headers_added == [["X-Spam-Status", "Yes"], ["X-Spam-Flag", "YES"]]
    assert rec.observed == ["helo:504 5.5.2 nope"] and rec.kept is False
    r("milter", milter_tx(), verdict(), "accept")  # control: no flag, not spam
    await r.flush()
    assert not (await store.query(limit=1))[0].spam
    await r.close()


async def test_queue_is_bounded_and_drops_are_counted(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    runner.ERROR_LOG.reset()
    store = SqliteHistoryStore(":memory:")
    r = HistoryRecorder(cfg(tmp_path, queue_size=100), store)
    tx = milter_tx()
    with caplog.at_level(logging.WARNING, "mxguard"):
        for i in range(130):
            tx.queue_id = f"Q{i}"
            r("milter", tx, verdict(), "accept")
    assert r.queued == 100 and r.dropped == 30
    assert sum("queue full" in m for m in caplog.messages) == 1  # rate-limited
    await r.flush()
    kept = await store.query(limit=1000)
    assert len(kept) == 100 and kept[-1].queue_id == "Q30"  # the oldest went
    await r.close()


async def test_store_error_is_counted_and_logged_never_raised(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runner.ERROR_LOG.reset()
    store = BrokenStore(":memory:")
    r = HistoryRecorder(cfg(tmp_path), store)
    r("milter", milter_tx(), verdict(), "accept")
    with caplog.at_level(logging.WARNING, "mxguard"):
        assert await r.flush() == 0
    assert r.errors == 1 and r.written == 0
    assert any("records not written" in m and "disk full" in m for m in caplog.messages)
    await r.close()


async def test_observer_error_does_not_cost_the_answer(tmp_path: Path) -> None:
    """Registered through the runner: even a raising observer is only logged."""
    services: dict[str, Any] = {}
    rec = await open_history(cfg(tmp_path, flush_interval=0.05), services)
    assert rec is not None and services["history"] is rec
    assert services["history_store"] is rec.store
    runtime = Runtime(config=rec.cfg, resolver=None, services=services)  # type: ignore[arg-type]
    runner.log_decision("milter", milter_tx(), verdict(), "accept", runtime)
    for _ in range(100):  # the background writer
        if rec.written:
            break
        await asyncio.sleep(0.02)
    assert rec.written == 1 and await rec.store.count() == 1
    bad = Transaction()
    bad.recipients = None  # type: ignore[assignment]  # list(None) raises in the observer
    runner.log_decision("milter", bad, verdict(), "accept", runtime)  # no exception
    await rec.close()


async def test_disabled_history_opens_nothing(tmp_path: Path) -> None:
    services: dict[str, Any] = {}
    assert await open_history(cfg(tmp_path, enabled=False), services) is None
    assert services == {}  # control


async def test_close_flushes_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    r = HistoryRecorder(cfg(tmp_path), SqliteHistoryStore(str(path)))
    r.start()
    r("milter", milter_tx(), verdict(), "accept")
    await r.close()
    reader = SqliteHistoryStore(str(path), readonly=True)
    assert await reader.count() == 1
    await reader.close()


async def test_prune_runs_in_steps(tmp_path: Path) -> None:
    store = SqliteHistoryStore(":memory:")
    old = [HistoryRecord(id=f"{i:020x}", time=1000.0 + i) for i in range(30)]
    await store.add_many(old)
    r = HistoryRecorder(cfg(tmp_path), store)
    assert await r.prune() == 30 and await store.count() == 0
    await r.close()


async def test_raw_copies_only_when_enabled_and_bounded(tmp_path: Path) -> None:
    on = cfg(tmp_path, web=dataclasses.replace(WebConfig(), keep_messages=2))
    store = SqliteHistoryStore(":memory:", keep_messages=2)
    r = HistoryRecorder(on, store)
    for _ in range(3):
        r("milter", milter_tx(), verdict(), "accept")
    r("policy", milter_tx(), verdict(Action.DEFER), "450")  # policy: no message bytes
    await r.flush()
    recs = await store.query()
    assert [x.kept for x in recs] == [False, True, True, True]
    raws = [await store.get_raw(x.id) for x in recs]
    assert raws[0] is None and raws[3] is None  # policy; and only the last 2 are kept
    assert raws[1] is not None and raws[1].startswith(b"From: =?utf-8?q?")
    assert raws[1].endswith(b"\r\n\r\nHello there\r\n") and raws[2] == raws[1]
    await r.close()
    off = HistoryRecorder(cfg(tmp_path), SqliteHistoryStore(":memory:"))  # control
    off("milter", milter_tx(), verdict(), "accept")
    assert off._raw == collections_empty()
    await off.close()


def collections_empty() -> Any:
    import collections

    return collections.deque()


def test_raw_message_is_cut_at_the_limit() -> None:
    tx = milter_tx()
    raw = raw_message(tx, 110)
    assert raw is not None and len(raw) == 110
    assert raw_message(Transaction(), 100) is None  # control: no message
