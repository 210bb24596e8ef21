"""The history writer process: the wire form of a decision, a real child writing
to the store, its restart after a crash, SIGTERM ignored, the fallback to
writing on the loop when no child can start, and what ``open_history`` picks."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from mxguard.core import history_writer
from mxguard.core.history import HistoryRecorder, Pending, open_history
from mxguard.core.history_writer import ProcessRecorder, frame, pack, read_frame, unpack
from mxguard.core.transaction import Action, HeaderChange, HeaderEdit, Symbol
from mxguard.store.history import SqliteHistoryStore
from tests.unit.core.test_history import cfg, milter_tx, verdict


def pending(headers: list[tuple[str, str]] | None) -> Pending:
    p = Pending(1700000000.5, "milter", "accept", "continue", "Q1", "192.0.2.7", "mx.example",
                "mx.example", "a@example.com", ["b@example.org"], 1234, headers, 2.5,
                "actions", [Symbol("BAYES_99", 5.0, "0.99")], {"spf": 0.25},
                [HeaderEdit("X-Spam-Status", "Yes"), HeaderChange.insert(0, "X-Spam-Flag", "YES"),
                 HeaderChange.delete("X-Old")], ["helo:504"])
    p.id, p.kept = "0001", True
    return p


HEADERS = [("Received", " from x"), ("From", " A <a@example.com>"), ("Subject", " Hi"),
           ("X-Mailer", " y"), ("Message-ID", " <1@x>")]


@pytest.mark.parametrize("headers, kept_names", [
    (HEADERS, ["From", "Subject", "Message-ID"]),
    ([("Received", " from x"), ("X-Mailer", " y")], []),  # control: nothing wanted is sent
    (None, None),  # a policy decision has no message
])
def test_pack_unpack_keeps_what_the_record_needs(headers: list[tuple[str, str]] | None,
                                                 kept_names: list[str] | None,
                                                 tmp_path: Path) -> None:
    p = pending(headers)
    q = unpack(list(pack(p)))
    names = None if q.headers is None else [n for n, _ in q.headers]
    assert names == kept_names
    rec = HistoryRecorder(cfg(tmp_path), SqliteHistoryStore(":memory:"), host="h")
    a, b = rec.finish(p), rec.finish(q)
    assert a == b  # the child's record is the one the daemon would have built


async def test_read_frame_refuses_a_giant_frame() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(history_writer.FRAME.pack(history_writer.MAX_FRAME + 1))
    with pytest.raises(ValueError):
        await read_frame(reader)
    ok = asyncio.StreamReader()  # control
    ok.feed_data(frame(("s", 7)))
    ok.feed_eof()
    assert await read_frame(ok) == ("s", 7)
    assert await read_frame(ok) is None


async def recorder(tmp_path: Path) -> tuple[ProcessRecorder, SqliteHistoryStore]:
    c = cfg(tmp_path, flush_interval=0.05)
    store = SqliteHistoryStore(str(tmp_path / "g-history.db"))
    rec = ProcessRecorder(c, store, host="h")
    rec.start()
    for _ in range(200):
        if rec.pid is not None:
            break
        await asyncio.sleep(0.05)
    assert rec.pid is not None
    return rec, store


def observe(rec: HistoryRecorder, n: int, queue_id: str = "Q") -> None:
    for i in range(n):
        tx = milter_tx()
        tx.queue_id = f"{queue_id}{i}"
        rec("milter", tx, verdict(Action.ACCEPT), "continue")


def child_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_child_writes_and_exits_on_close(tmp_path: Path) -> None:
    rec, store = await recorder(tmp_path)
    pid = rec.pid
    assert pid is not None and pid != os.getpid()
    observe(rec, 30)
    assert await rec.flush() == 30
    assert rec.written == 30 and rec.errors == 0 and rec.queued == 0
    got = await store.query(queue_id="Q7")
    assert [r.queue_id for r in got] == ["Q7"] and got[0].subject == "Lunch tomorrow"
    observe(rec, 5, "LATE")
    await rec.close()  # what is queued is written before the child goes
    reader = SqliteHistoryStore(str(tmp_path / "g-history.db"), readonly=True)
    assert await reader.count() == 35
    await reader.close()
    for _ in range(100):
        if not child_alive(pid):
            break
        await asyncio.sleep(0.05)
    assert not child_alive(pid)


async def test_child_ignores_sigterm(tmp_path: Path) -> None:
    rec, _store = await recorder(tmp_path)
    assert rec.pid is not None
    assert await rec.flush() == 0  # the child runs (its handlers are set)
    os.kill(rec.pid, signal.SIGTERM)
    await asyncio.sleep(0.3)
    observe(rec, 3)
    assert await rec.flush() == 3
    assert rec.restarts == 0
    await rec.close()


async def test_a_killed_child_is_logged_and_replaced(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(history_writer, "RESTART_DELAY", 0.2)
    caplog.set_level(logging.INFO, "mxguard")
    rec, store = await recorder(tmp_path)
    observe(rec, 4)
    assert await rec.flush() == 4
    first = rec.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for _ in range(200):
        if rec.pid not in (None, first):
            break
        await asyncio.sleep(0.05)
    assert rec.pid not in (None, first) and rec.restarts == 1
    assert "exited with code -9" in caplog.text
    observe(rec, 2, "AFTER")
    await rec.flush()
    assert rec.written == 6  # counted across both children
    assert [r.queue_id for r in await store.query(queue_id="AFTER1")] == ["AFTER1"]
    await rec.close()


async def test_no_child_means_writing_on_the_loop(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(history_writer.sys, "executable", str(tmp_path / "no-such-python"))
    c = cfg(tmp_path, flush_interval=0.05)
    store = SqliteHistoryStore(str(tmp_path / "g-history.db"))
    rec = ProcessRecorder(c, store, host="h")
    observe(rec, 3)
    assert await rec.flush() == 3
    assert rec.inline and rec.pid is None and rec.written == 3
    assert "writing on the daemon's own loop" in caplog.text
    await rec.close()


@pytest.mark.parametrize("writer, kind", [("process", ProcessRecorder),
                                          ("loop", HistoryRecorder)])
async def test_open_history_picks_the_writer(tmp_path: Path, writer: str, kind: Any) -> None:
    services: dict[str, Any] = {}
    rec = await open_history(cfg(tmp_path, writer=writer), services)
    assert type(rec) is kind
    assert rec is not None
    observe(rec, 2)
    assert await rec.flush() == 2
    await rec.close()


def test_child_outlives_its_daemon_quietly(tmp_path: Path) -> None:
    """The daemon dies (both pipe ends close): the child writes what it got and exits
    0, without a traceback."""
    import pickle
    import subprocess
    import sys

    c = cfg(tmp_path)
    child = subprocess.Popen([sys.executable, "-m", "mxguard.core.history_writer"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    settings = pickle.dumps((c, "h"))
    child.stdin.write(history_writer.FRAME.pack(len(settings)) + settings)
    child.stdin.write(frame(("r", [pack(pending(HEADERS))])))
    child.stdin.flush()
    child.stdout.close()  # nobody reads its reports any more
    child.stdin.close()
    assert child.wait(timeout=60) == 0
    assert child.stderr is not None
    err = child.stderr.read()
    assert b"Traceback" not in err
    import sqlite3
    with sqlite3.connect(tmp_path / "g-history.db") as db:
        assert db.execute("SELECT queue_id FROM history").fetchall() == [("Q1",)]
