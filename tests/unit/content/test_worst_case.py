"""Worst-case input for the content path (issue 14, item 1): adversarial shapes
must be parsed, scanned and tokenized in time linear in their size, the rule
scan stops at its check's deadline (RULES_TIMEOUT, its worker thread free
again), and the worker pool is bounded and drops work nobody waits for.

No test measures speed: a shape must merely finish before a generous alarm
(its quadratic version took hours), next to a control message of the same size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from mxguard.checks import rules as rules_check
from mxguard.config import Config, ContentConfig, PipelineConfig
from mxguard.content.evals import EVALS
from mxguard.content.evals.base import DomainSet, address, display_name, in_domain_list
from mxguard.content.mime import parse_message
from mxguard.content.rules import RuleSet, build_ruleset, load_rules
from mxguard.content.tokenizer import tokenize_message
from mxguard.core import runtime as core_runtime
from mxguard.core.runner import CheckSpec, run_rows
from mxguard.core.runtime import Overrun, Runtime, WorkerPool
from mxguard.core.transaction import Stage, Transaction, Verdict
from mxguard.server.milter_session import MilterSession
from mxguard.testing.adversarial import SHAPES

SIZE = 512 * 1024
ALARM = 60  # seconds: generous; the quadratic label walk took hours on these


class Alarm(Exception):
    pass


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Interrupt the test (the main thread) after ``seconds``."""
    def ring(signum: int, frame: FrameType | None) -> None:
        raise Alarm(f"not finished within {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_rules(Config())


def control(size: int) -> bytes:
    """Ordinary prose with links, of about ``size`` bytes."""
    line = (b"Hi Bob, the notes from Tuesday are at https://www.example.com/notes and "
            b"the build passes again. Mail me at ann@example.org.\n")
    return (b"From: Ann <ann@example.com>\nTo: bob@example.net\nSubject: notes\n\n"
            + line * max(1, size // len(line)))


def scan_all(ruleset: RuleSet, raw: bytes) -> tuple[list[str], list[str]]:
    msg = parse_message(raw)
    result = ruleset.scan(msg, now=1.7e9)
    return sorted(h.name for h in result.hits), tokenize_message(msg)


CASES = [pytest.param(name, id=name) for name in SHAPES] + [pytest.param("", id="control")]


@pytest.mark.parametrize("shape", CASES)
def test_adversarial_shape_is_scanned_to_the_end(ruleset: RuleSet, shape: str) -> None:
    raw = SHAPES[shape](SIZE) if shape else control(SIZE)
    with alarm(ALARM):
        hits, tokens = scan_all(ruleset, raw)
    assert tokens  # a full result, not an abandoned scan
    assert all(not h.endswith("_TIMEOUT") for h in hits)


# ------------------------------------------------------------------ domain lists

SHORTENERS = DomainSet({"bit.ly", "*.short.example", "t.co"})
DEEP = "a." * 50_000


@pytest.mark.parametrize(("host", "expected"), [
    ("bit.ly", True),
    ("x.bit.ly", True),
    (DEEP + "bit.ly", True),  # many labels, listed parent
    (DEEP + "example.com", False),  # control: many labels, nothing listed
    ("short.example", False),  # a wildcard entry matches subdomains only
    ("a.short.example", True),
    (DEEP + "short.example", True),
    ("bit.ly.example.com", False),
    ("", False),
])
def test_domain_list_lookup(host: str, expected: bool) -> None:
    with alarm(ALARM):
        assert in_domain_list(host, SHORTENERS) is expected
        assert in_domain_list(host, frozenset(SHORTENERS)) is expected  # a plain frozenset too


def test_domain_set_depth() -> None:
    assert DomainSet({"a.b.c", "d"}).depth == 3
    assert DomainSet().depth == 0 and not in_domain_list("a.b", DomainSet())


# ------------------------------------------------------------------ first address of a header

MANY = "u@example.net, " * 50_000


@pytest.mark.parametrize(("value", "addr", "name"), [
    ("Ann <ann@example.com>", "ann@example.com", "Ann"),
    ("Ann <ann@example.com>, " + MANY, "ann@example.com", "Ann"),  # a huge To: first address
    ("undisclosed-recipients:;, " + MANY, "u@example.net", ""),
    ("x" * 10_000 + "@example.com", "x" * 10_000 + "@example.com", ""),  # one long address
    ("no address here", "", ""),
])
def test_first_address_of_long_header(value: str, addr: str, name: str) -> None:
    assert address(value) == addr
    assert display_name(value) == name


# ------------------------------------------------------------------ the scan's deadline

SLOW_RULES = 20


@pytest.fixture
def slow_ruleset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A rule set of SLOW_RULES evals that take 20 ms each (a stand-in for a
    runaway scan), its calls counted and its end signalled."""
    state: dict[str, Any] = {"calls": 0, "done": threading.Event(), "raised": None}

    def slow(ctx: Any) -> bool:
        state["calls"] += 1
        time.sleep(0.02)
        return True

    monkeypatch.setitem(EVALS, "test_slow", slow)
    (tmp_path / "slow.cf").write_text("".join(
        f"body SLOW_{i} eval:test_slow()\nscore SLOW_{i} 0.1\n" for i in range(SLOW_RULES)))
    rs = build_ruleset([tmp_path / "slow.cf"])
    scan = rs.scan

    def watched(*args: Any, **kwargs: Any) -> Any:
        try:
            return scan(*args, **kwargs)
        except BaseException as exc:
            state["raised"] = exc
            raise
        finally:
            state["done"].set()

    rs.scan = watched  # type: ignore[method-assign]
    state["ruleset"] = rs
    yield state


def test_scan_past_its_deadline_raises_overrun(slow_ruleset: dict[str, Any]) -> None:
    rs: RuleSet = slow_ruleset["ruleset"]
    msg = parse_message(control(1000))
    with pytest.raises(Overrun):
        rs.scan(msg, deadline=time.monotonic() - 1)
    assert slow_ruleset["calls"] == 0
    assert issubclass(Overrun, TimeoutError)  # the runner's NAME_TIMEOUT


def test_scan_within_its_deadline_is_complete(slow_ruleset: dict[str, Any]) -> None:
    rs: RuleSet = slow_ruleset["ruleset"]
    msg = parse_message(control(1000))
    result = rs.scan(msg, deadline=time.monotonic() + 600)
    assert len(result.hits) == SLOW_RULES == slow_ruleset["calls"]
    assert [h.name for h in rs.scan(msg).hits] == [h.name for h in result.hits]


def _tx(size: int) -> Transaction:
    s = MilterSession()
    s.start_message("sender@example.com", [])
    for name, value in [("From", "Ann <ann@example.com>"), ("To", "bob@example.org"),
                        ("Subject", "Hello")]:
        s.add_header(name, value)
    s.add_body(b"x" * size + b"\r\n")
    tx = s.transaction()
    tx.message = s.message()
    tx.size = size
    return tx


RULES_ROW = CheckSpec(rules_check.NAME, Stage.EOM, "content", rules_check.check)


@pytest.mark.parametrize(("size", "check_timeout", "timed_out"), [
    (100, 0.1, True),  # in place on the loop: the scan stops itself
    (100, 600.0, False),  # control
    (core_runtime.INLINE_BYTES + 1, 0.1, True),  # in a worker thread: the thread stops too
    (core_runtime.INLINE_BYTES + 1, 600.0, False),  # control
])
async def test_rules_check_ends_as_rules_timeout_and_frees_its_thread(
        slow_ruleset: dict[str, Any], size: int, check_timeout: float, timed_out: bool) -> None:
    cfg = dataclasses.replace(Config(), pipeline=PipelineConfig(check_timeout=check_timeout),
                              content=ContentConfig(builtin_rules=False))
    rt = Runtime(config=cfg, resolver=None,  # type: ignore[arg-type]
                 services={rules_check.RULES_SERVICE: slow_ruleset["ruleset"]})
    verdict = await run_rows(_tx(size), rt, (RULES_ROW,), Verdict())
    names = {s.name for s in verdict.symbols}
    assert ("RULES_TIMEOUT" in names) is timed_out
    assert ("SLOW_0" in names) is not timed_out
    # the scan itself ended (no thread left running the rest of the rules)
    assert await asyncio.to_thread(slow_ruleset["done"].wait, 30)
    assert (slow_ruleset["calls"] < SLOW_RULES) is timed_out
    assert isinstance(slow_ruleset["raised"], Overrun) is timed_out


# ------------------------------------------------------------------ the worker pool


async def test_pool_is_bounded_and_skips_abandoned_work() -> None:
    pool = WorkerPool(2)
    release = threading.Event()
    ran: list[str] = []

    def job(name: str) -> str:
        ran.append(name)
        release.wait(30)
        return name

    busy = [asyncio.ensure_future(pool.run(job, f"busy{i}")) for i in range(2)]
    queued = asyncio.ensure_future(pool.run(job, "abandoned"))
    kept = asyncio.ensure_future(pool.run(job, "kept"))
    for _ in range(500):  # both threads started (no fixed sleep: a loaded machine is slow)
        if len(ran) >= 2:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)  # room for a third thread to start, if there were one
    assert sorted(ran) == ["busy0", "busy1"]  # at most 2 threads
    queued.cancel()  # its caller gave up (its budget ran out) while it was queued
    with pytest.raises(asyncio.CancelledError):
        await queued
    release.set()
    assert await asyncio.gather(*busy, kept) == ["busy0", "busy1", "kept"]
    assert "abandoned" not in ran and pool.busy == 0
    assert len(pool._threads) == 2 and all(t.daemon for t in pool._threads)


@pytest.mark.parametrize(("offset", "runs"), [(-1.0, False), (600.0, True)])
async def test_pool_drops_a_job_queued_past_its_deadline(offset: float, runs: bool) -> None:
    pool = WorkerPool(1)
    ran: list[int] = []
    token = core_runtime.CHECK_DEADLINE.set(time.monotonic() + offset)
    try:
        if runs:
            assert await pool.run(lambda: ran.append(1) or 7) == 7
        else:
            with pytest.raises(Overrun):
                await pool.run(lambda: ran.append(1) or 7)
    finally:
        core_runtime.CHECK_DEADLINE.reset(token)
    assert bool(ran) is runs


async def test_pool_passes_exceptions_and_the_deadline() -> None:
    pool = WorkerPool(1)

    def boom() -> None:
        raise ValueError("x")

    with pytest.raises(ValueError, match="x"):
        await pool.run(boom)
    deadline = time.monotonic() + 100
    token = core_runtime.CHECK_DEADLINE.set(deadline)
    try:
        seen: Callable[[], float | None] = core_runtime.check_deadline
        assert await pool.run(seen) == deadline
    finally:
        core_runtime.CHECK_DEADLINE.reset(token)
