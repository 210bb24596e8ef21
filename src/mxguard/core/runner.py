"""The one runner: walks a pipeline table for a door (policy, milter) or for
``mxguard scan``, and owns what every check needs and none should write.

A check is ``async def check(tx, rt) -> CheckResult | None``. The runner, per
row: skips it in mode ``off`` (or when its ``enabled`` predicate says so, or
the mail's direction does not match), gives it a time budget, captures what it
raises or a timeout as an error symbol (``<NAME>_ERROR`` / ``<NAME>_TIMEOUT``)
plus that check's fail behaviour, times it (``Verdict.timings``), and merges
its result under its mode. At end of message, once every check ran, the core
applies the score -> action policy (:mod:`mxguard.core.verdict`), then runs
the rows of stage ``DONE``: checks that need the verdict (spam headers,
autolearn, report_safe).

This module names no check: the table is handed in (:mod:`mxguard.checks`).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Coroutine, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mxguard import logs
from mxguard.config import Config
from mxguard.core.runtime import CHECK_DEADLINE, Runtime
from mxguard.core.transaction import (
    Action,
    CheckResult,
    Decision,
    Mode,
    Stage,
    Symbol,
    Transaction,
    Verdict,
)
from mxguard.core.verdict import apply_actions
from mxguard.store.base import StoreError

log = logging.getLogger("mxguard")

CheckFn = Callable[[Transaction, Runtime], Coroutine[Any, Any, CheckResult | None]]

# What a policy-stage check that fails answers ([policy] fail_action; DUNNO: nothing).
FAIL_ACTIONS = {
    "DEFER_IF_PERMIT": Decision(Action.DEFER_IF_PERMIT, 451, "4.3.0",
                                "Temporary local problem, please try again later"),
    "DEFER": Decision(Action.DEFER, 451, "4.3.0",
                      "Temporary local problem, please try again later"),
}
# What an end-of-message check listed in [pipeline] tempfail_on_error answers.
TEMPFAIL = Decision(Action.DEFER, 451, "4.3.0", "Temporary local problem, please try again later")


class ErrorLog:
    """One error line per check per interval (a store outage must not flood the log);
    the lines between are counted and the next line says how many."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def allow(self, name: str, interval: float, now: float | None = None) -> int | None:
        """None: do not log; else the number of errors not logged since the last line."""
        now = time.monotonic() if now is None else now
        last = self._last.get(name)
        if last is not None and now - last < interval:
            self._count[name] = self._count.get(name, 0) + 1
            return None
        self._last[name] = now
        return self._count.pop(name, 0)

    def reset(self) -> None:
        self._last.clear()
        self._count.clear()


ERROR_LOG = ErrorLog()


def log_failure(name: str, interval: float, message: str, *args: Any) -> None:
    """A failure outside a check's run (autolearn in the background, DMARC results
    writes, store maintenance): one warning per ``name`` per ``interval`` ([storage]
    fail_open_log_interval), the next line saying how many were held back."""
    suppressed = ERROR_LOG.allow(name, interval)
    if suppressed is None:
        return
    more = f" (+{suppressed} more since the last line)" if suppressed else ""
    log.warning(message + "%s", *args, more)


class Direction(enum.Enum):
    ANY = "any"
    INCOMING = "incoming"
    OUTGOING = "outgoing"


ANY, OUTGOING = Direction.ANY, Direction.OUTGOING


@dataclass(frozen=True)
class CheckSpec:
    """One row of the pipeline table."""

    name: str  # symbol prefix of its errors, key of tx.results, history and timings
    stage: Stage
    mode_key: str | None  # config section holding its `mode`; None: always on (enforce)
    fn: CheckFn
    doc: str = ""
    symbols: tuple[str, ...] = ()
    config: str = ""  # the config keys that steer it, for the README's table
    direction: Direction = Direction.ANY
    enabled: Callable[[Config], bool] | None = None
    budget: Callable[[Config], float] | None = None  # seconds; default [pipeline] check_timeout

    def mode(self, cfg: Config) -> Mode:
        if self.enabled is not None and not self.enabled(cfg):
            return Mode.OFF
        if self.mode_key is None:
            return Mode.ENFORCE
        return cfg.mode(self.mode_key)


@dataclass(frozen=True)
class Pipeline:
    """The table plus the two things the core asks of it: which mail is outgoing,
    and which mode key governs the score actions."""

    rows: tuple[CheckSpec, ...]
    outgoing: Callable[[Transaction, Config], bool]
    actions_mode: str
    by_stage: dict[Stage, tuple[CheckSpec, ...]] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        table = {stage: tuple(r for r in self.rows if r.stage is stage) for stage in Stage}
        object.__setattr__(self, "by_stage", table)
        object.__setattr__(self, "_spans", {})

    def span(self, upto: Stage, after: Stage | None = None) -> tuple[CheckSpec, ...]:
        """The rows of the stages ``(after, upto]`` in table order (memoised)."""
        key = (upto, after)
        spans: dict[tuple[Stage, Stage | None], tuple[CheckSpec, ...]] = \
            self._spans  # type: ignore[attr-defined]
        rows = spans.get(key)
        if rows is None:
            rows = spans[key] = tuple(r for r in self.rows if r.stage <= upto
                                      and (after is None or r.stage > after))
        return rows


def _error_result(spec: CheckSpec, tx: Transaction, rt: Runtime, exc: BaseException) -> CheckResult:
    timeout = isinstance(exc, TimeoutError)
    kind = "TIMEOUT" if timeout else "ERROR"
    cfg = rt.config
    if spec.stage <= Stage.RCPT:
        decision = FAIL_ACTIONS.get(cfg.policy.fail_action)
        behaviour = f"policy.fail_action:{cfg.policy.fail_action}"
    elif spec.name in cfg.pipeline.tempfail_on_error:
        decision, behaviour = TEMPFAIL, "tempfail"
    else:
        decision, behaviour = None, "skipped"
    suppressed = ERROR_LOG.allow(spec.name, cfg.storage.fail_open_log_interval)
    if suppressed is not None:  # the first error of each interval; the others are counted
        more = f" (+{suppressed} more since the last line)" if suppressed else ""
        log.error("check=%s error=%s detail=%r client=%s queue_id=%s fail=%s%s", spec.name,
                  type(exc).__name__, "timed out" if timeout else str(exc)[:200],
                  tx.client_address or "-", tx.queue_id or "-", behaviour, more,
                  # a traceback is for a bug; a store failure says all in its message
                  exc_info=not timeout and not suppressed and not isinstance(exc, StoreError))
    name = f"{spec.name.upper()}_{kind}"
    return CheckResult(spec.name, [Symbol(name, cfg.score(name), type(exc).__name__)],
                       decision=decision, reason=f"{kind.lower()}:{type(exc).__name__}")


class Budgets:
    """Time budgets of running checks, enforced by one sweeper task per event loop
    instead of a timer per check: a check costs a dict entry (~0.5 us) rather than
    an ``asyncio.timeout`` (3.7 us; with two or three checks per policy request
    that was 10 % of the policy door's CPU, bench/policy_bench.py). A check over
    its budget is cancelled within :data:`SWEEP` seconds and ends as TimeoutError,
    exactly as ``asyncio.timeout`` would end it."""

    SWEEP = 0.05  # seconds between sweeps while checks are in flight

    def __init__(self) -> None:
        self._running: dict[int, tuple[float, asyncio.Task[Any]]] = {}
        self._expired: set[int] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._next = 0

    def start(self, budget: float) -> int:
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - checks always run in a task
            return -1
        loop = task.get_loop()
        self._next += 1
        self._running[self._next] = (loop.time() + budget, task)
        sweeper = self._sweeper
        if sweeper is None or sweeper.done() or sweeper.get_loop() is not loop:
            self._sweeper = loop.create_task(self._sweep(loop))
        return self._next

    def stop(self, key: int) -> bool:
        """Forget the check; True when it was cancelled for running over its budget."""
        self._running.pop(key, None)
        if key in self._expired:
            self._expired.discard(key)
            return True
        return False

    async def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._running:
            await asyncio.sleep(self.SWEEP)
            now = loop.time()
            for key, (deadline, task) in list(self._running.items()):
                if deadline <= now and key not in self._expired and task.get_loop() is loop:
                    self._expired.add(key)
                    task.cancel()


BUDGETS = Budgets()


class _Resume:
    """Await a coroutine that already ran its first step (``first`` is what it
    yielded): forwards sends, throws (a cancellation by the timeout) and the
    return value, as ``await coro`` would have."""

    def __init__(self, coro: Coroutine[Any, Any, Any], first: Any) -> None:
        self.coro, self.first = coro, first

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, yielded = self.coro, self.first
        while True:
            try:
                sent = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # CancelledError from the budget, or any throw
                try:
                    yielded = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    yielded = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def within(coro: Coroutine[Any, Any, Any], budget: float) -> Any:
    """``await coro`` with a time budget (TimeoutError beyond it). A check that
    completes without waiting (cached DNS, in-memory state: most policy
    requests) is not registered at all; the budget starts when it first waits."""
    try:
        first = coro.send(None)
    except StopIteration as stop:
        return stop.value
    key = BUDGETS.start(budget)
    try:
        return await _Resume(coro, first)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if BUDGETS.stop(key) and task is not None and task.uncancel() == 0:
            raise TimeoutError(f"over its budget of {budget:g} s") from None
        raise
    finally:
        BUDGETS.stop(key)


Plan = tuple[tuple[CheckSpec, Mode, float], ...]
_PLANS: dict[tuple[int, int], tuple[Config, Sequence[CheckSpec], Plan]] = {}


def plan(cfg: Config, rows: Sequence[CheckSpec]) -> Plan:
    """The rows that are on under ``cfg``, with their mode and budget: worked out
    once per config (it is swapped as a whole on reload), not per request."""
    key = (id(cfg), id(rows))
    cached = _PLANS.get(key)
    if cached is not None and cached[0] is cfg and cached[1] is rows:
        return cached[2]
    default_budget = cfg.pipeline.check_timeout
    made = tuple((spec, mode, spec.budget(cfg) if spec.budget is not None else default_budget)
                 for spec in rows if (mode := spec.mode(cfg)) is not Mode.OFF)
    if len(_PLANS) > 64:
        _PLANS.clear()
    _PLANS[key] = (cfg, rows, made)
    return made


async def run_rows(tx: Transaction, rt: Runtime, rows: Sequence[CheckSpec],
                   verdict: Verdict) -> Verdict:
    """Run ``rows`` in order on ``tx``, merging into ``verdict``."""
    clock = time.perf_counter
    timings = verdict.timings
    outgoing = tx.outgoing
    for spec, mode, budget in plan(rt.config, rows):
        if spec.direction is not ANY and (spec.direction is OUTGOING) is not outgoing:
            continue
        started = clock()
        # CPU-bound work (the rule scan, in place or in a worker thread) reads the
        # deadline and stops itself: a thread cannot be cancelled like a task.
        token = CHECK_DEADLINE.set(time.monotonic() + budget)
        try:
            result = await within(spec.fn(tx, rt), budget)
        except Exception as exc:  # a bug, a store or DNS failure, a timeout: fail behaviour
            result = _error_result(spec, tx, rt, exc)
            mode = Mode.ENFORCE if result.decision is not None else Mode.SCORE
        finally:
            CHECK_DEADLINE.reset(token)
        timings[spec.name] = (clock() - started) * 1000.0
        if result is None:
            continue
        tx.results[spec.name] = result
        verdict.add(result, mode)
    return verdict


async def evaluate(tx: Transaction, rt: Runtime, pipeline: Pipeline, upto: Stage,
                   after: Stage | None = None) -> Verdict:
    """The policy door: every row of the stages ``(after, upto]``, in stage order.

    Postfix evaluates HELO restrictions at RCPT time with ``smtpd_delay_reject
    = yes``, so a request at stage S runs the rows of every stage up to S that
    were not run yet."""
    return await run_rows(tx, rt, pipeline.span(upto, after), Verdict())


async def run_message(tx: Transaction, rt: Runtime, pipeline: Pipeline) -> Verdict:
    """End of message (milter door, ``mxguard scan``): the EOM rows, the score
    actions once, then the DONE rows that read the verdict."""
    tx.stage = Stage.EOM
    tx.outgoing = pipeline.outgoing(tx, rt.config)
    verdict = Verdict()
    tx.verdict = verdict
    await run_rows(tx, rt, pipeline.by_stage[Stage.EOM], verdict)
    if not tx.outgoing:
        mode = rt.config.mode(pipeline.actions_mode)
        if mode is not Mode.OFF:
            apply_actions(verdict, tx.message, rt.config, mode)
    await run_rows(tx, rt, pipeline.by_stage[Stage.DONE], verdict)
    return verdict


# Services under this key: callables ``(door, tx, verdict, reply) -> None`` told of every
# decision after its log line (metrics, history). They run on the loop, once per request or
# message: they must be cheap and must not block (queue the work, write it later).
OBSERVERS_SERVICE = "decision_observers"
DecisionObserver = Callable[[str, Transaction, Verdict, str], None]


def add_observer(services: dict[str, Any], observer: DecisionObserver) -> None:
    """Register ``observer`` for every decision of the daemon whose services these are."""
    services.setdefault(OBSERVERS_SERVICE, []).append(observer)


def log_decision(door: str, tx: Transaction, verdict: Verdict, reply: str,
                 rt: Runtime | None = None) -> None:
    """The one decision line per request / message; then the observers of ``rt``."""
    prefix = "" if door == "policy" else f"door={door} "
    logs.decisions.emit(prefix + logs.decision_line(tx, verdict, reply))
    if rt is None:
        return
    observers = rt.services.get(OBSERVERS_SERVICE)
    if not observers:
        return
    for observer in observers:
        try:
            observer(door, tx, verdict, reply)
        except Exception as exc:  # an observer's bug never costs the mail its answer
            log_failure(f"observer-{getattr(observer, '__name__', 'observer')}",
                        rt.config.storage.fail_open_log_interval,
                        "decision observer failed: %s: %s", type(exc).__name__, exc)


__all__ = ["FAIL_ACTIONS", "OBSERVERS_SERVICE", "CheckFn", "CheckSpec", "DecisionObserver",
           "Direction", "Pipeline", "add_observer", "evaluate", "log_decision", "log_failure",
           "run_message", "run_rows"]
