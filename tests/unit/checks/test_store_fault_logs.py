"""Failures outside a check's own run are logged once per interval (issue 14, item 4):
a read-only or unreachable store fails every autolearn, every DMARC results write."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator, Sequence

import pytest

from mxguard.checks import bayes as bayes_check
from mxguard.checks import run_message
from mxguard.config import BayesConfig, Config
from mxguard.content.bayes import BayesClassifier
from mxguard.core import runner
from mxguard.core.runtime import Runtime
from mxguard.server.milter_session import MilterSession
from mxguard.store.base import StoreError
from mxguard.store.bayes_store import LearnItem, MemoryBayesStore


class ReadOnlyStore(MemoryBayesStore):
    """Lookups work, every write fails (a read-only SQLite file, a Redis replica)."""

    async def learn(self, items: Sequence[LearnItem], now: int) -> list[str]:
        raise StoreError("sqlite /var/lib/mxguard/mxguard-bayes.db: bayes learn failed: "
                         "attempt to write a readonly database")


@pytest.fixture(autouse=True)
def fresh_error_log() -> Iterator[None]:
    runner.ERROR_LOG.reset()
    yield
    runner.ERROR_LOG.reset()


def runtime(store: MemoryBayesStore) -> Runtime:
    cfg = Config()
    cfg = dataclasses.replace(
        cfg, spf=dataclasses.replace(cfg.spf, mode="off"),
        dkim=dataclasses.replace(cfg.dkim, mode="off"),
        dmarc=dataclasses.replace(cfg.dmarc, mode="off"))
    cfg = dataclasses.replace(cfg, bayes=dataclasses.replace(cfg.bayes, cold_start="normal"))
    clf = BayesClassifier(store, BayesConfig())
    return Runtime(config=cfg, resolver=None,  # type: ignore[arg-type]
                   services={bayes_check.SERVICE: clf}, clock=lambda: 1704067200.0)


def ham(i: int) -> MilterSession:
    s = MilterSession()
    s.start_message("ann@example.com", [])
    for name, value in [("From", "Ann <ann@example.com>"), ("To", "bob@example.org"),
                        ("Subject", f"Lunch {i}"), ("Message-Id", f"<{i}@example.com>"),
                        ("Date", "Mon, 01 Jan 2024 00:00:00 +0000")]:
        s.add_header(name, value)
    s.add_body(b"Lunch at noon? The usual place.\r\n")
    return s


@pytest.mark.parametrize(("store_cls", "lines", "learned"), [
    (MemoryBayesStore, 0, 5),  # control: every message learned, nothing logged
    (ReadOnlyStore, 1, 0),  # five failures, one line per interval
])
async def test_autolearn_failures_are_logged_once_per_interval(
        caplog: pytest.LogCaptureFixture, store_cls: type[MemoryBayesStore], lines: int,
        learned: int) -> None:
    store = store_cls()
    rt = runtime(store)
    with caplog.at_level(logging.WARNING, logger="mxguard"):
        for i in range(5):
            s = ham(i)
            tx = s.transaction()
            tx.message = s.message()
            verdict = await run_message(tx, rt)
            assert verdict.decision is None  # mail flows
            while bayes_check._learning:
                await asyncio.sleep(0)
    failed = [r for r in caplog.records if "autolearn failed" in r.getMessage()]
    assert len(failed) == lines, [r.getMessage() for r in failed]
    assert (await store.stats()).nham == learned


@pytest.mark.parametrize(("calls", "interval", "logged"), [
    (1, 60.0, ["x failed: boom"]),  # control: a lone failure is logged as it is
    (4, 60.0, ["x failed: boom"]),  # the rest of the interval is held back
])
def test_log_failure_once_per_interval(caplog: pytest.LogCaptureFixture, calls: int,
                                       interval: float, logged: list[str]) -> None:
    with caplog.at_level(logging.WARNING, logger="mxguard"):
        for _ in range(calls):
            runner.log_failure("x-test", interval, "x failed: %s", "boom")
    assert [r.getMessage() for r in caplog.records] == logged

