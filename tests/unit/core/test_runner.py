"""The one runner: modes, time budget, error capture and fail behaviour, timing,
direction, the score actions once, and the DONE rows that read the verdict.

Each case runs a small table of fake checks; a control row that must not fire
stands next to each positive case."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from mxguard.config import Config, PipelineConfig, PolicyConfig
from mxguard.core import runner
from mxguard.core.runner import CheckSpec, Direction, Pipeline
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import (
    Action,
    CheckResult,
    Decision,
    HeaderEdit,
    Message,
    Mode,
    Stage,
    Symbol,
    Transaction,
)

REJECT = Decision(Action.REJECT, 550, "5.7.1", "no")


def rt(**sections: Any) -> Runtime:
    return Runtime(config=dataclasses.replace(Config(), **sections),
                   resolver=None)  # type: ignore[arg-type]


def returns(name: str, score: float = 1.0, decision: Decision | None = None,
            header: str = "") -> runner.CheckFn:
    async def check(tx: Transaction, rt: Runtime) -> CheckResult:
        headers = [HeaderEdit(header, "x")] if header else []
        return CheckResult(name, [Symbol(name.upper(), score)], decision, headers)
    return check


def raises(exc: BaseException) -> runner.CheckFn:
    async def check(tx: Transaction, rt: Runtime) -> CheckResult:
        raise exc
    return check


def sleeps(seconds: float) -> runner.CheckFn:
    async def check(tx: Transaction, rt: Runtime) -> CheckResult:
        await asyncio.sleep(seconds)
        return CheckResult("slow", [Symbol("SLOW", 1.0)])
    return check


def table(*rows: CheckSpec, actions_mode: str = "content") -> Pipeline:
    return Pipeline(rows=rows, outgoing=lambda tx, cfg: tx.authenticated,
                    actions_mode=actions_mode)


# ------------------------------------------------------------------ modes

@pytest.mark.parametrize(("mode", "score", "decided", "observed"), [
    (Mode.ENFORCE, 1.0, True, False),
    (Mode.SCORE, 1.0, False, False),
    (Mode.OBSERVE, 0.0, False, True),
    (Mode.OFF, 0.0, False, False),
])
async def test_mode_of_the_row_applies(mode: Mode, score: float, decided: bool,
                                       observed: bool) -> None:
    pipe = table(CheckSpec("helo", Stage.HELO, "helo", returns("helo", 1.0, REJECT)),
                 CheckSpec("control", Stage.HELO, None, returns("control", 0.0)))
    r = rt(helo=dataclasses.replace(Config().helo, mode=mode))
    verdict = await runner.evaluate(Transaction(), r, pipe, Stage.RCPT)
    assert verdict.score == score
    assert (verdict.decision is not None) is decided
    assert bool(verdict.observed) is observed
    assert ("HELO" in [s.name for s in verdict.symbols]) is (mode is not Mode.OFF)
    assert "CONTROL" in [s.name for s in verdict.symbols]  # the other row ran regardless


async def test_stages_after_and_upto_select_rows() -> None:
    pipe = table(CheckSpec("helo", Stage.HELO, None, returns("helo")),
                 CheckSpec("rcpt", Stage.RCPT, None, returns("rcpt")),
                 CheckSpec("eom", Stage.EOM, None, returns("eom")))
    r = rt()
    names = [s.name for s in (await runner.evaluate(Transaction(), r, pipe, Stage.RCPT)).symbols]
    assert names == ["HELO", "RCPT"]  # never the EOM row at the policy door
    after = await runner.evaluate(Transaction(), r, pipe, Stage.RCPT, after=Stage.HELO)
    assert [s.name for s in after.symbols] == ["RCPT"]


# ------------------------------------------------------------------ errors and budget

@pytest.mark.parametrize(("stage", "pipeline_cfg", "policy_fail", "want_action"), [
    # end of message: skipped by default, tempfail only when configured so
    (Stage.EOM, PipelineConfig(), "DUNNO", Action.ACCEPT),
    (Stage.EOM, PipelineConfig(tempfail_on_error=["bayes"]), "DUNNO", Action.DEFER),
    # policy stages: [policy] fail_action
    (Stage.RCPT, PipelineConfig(), "DUNNO", Action.ACCEPT),
    (Stage.RCPT, PipelineConfig(), "DEFER_IF_PERMIT", Action.DEFER_IF_PERMIT),
])
async def test_a_check_that_raises_becomes_an_error_symbol_and_its_fail_behaviour(
        stage: Stage, pipeline_cfg: PipelineConfig, policy_fail: str,
        want_action: Action, caplog: pytest.LogCaptureFixture) -> None:
    pipe = table(CheckSpec("bayes", stage, None, raises(RuntimeError("store gone"))),
                 CheckSpec("control", stage, None, returns("control", 2.0)))
    r = rt(pipeline=pipeline_cfg, policy=PolicyConfig(fail_action=policy_fail))
    tx = Transaction(stage=stage)
    verdict = runner.Verdict()
    with caplog.at_level("ERROR", logger="mxguard"):
        await runner.run_rows(tx, r, pipe.rows, verdict)
    names = [s.name for s in verdict.symbols]
    assert names == ["BAYES_ERROR", "CONTROL"]  # the next check still ran
    assert verdict.action is want_action
    assert verdict.score == 2.0
    assert "check=bayes error=RuntimeError detail='store gone'" in caplog.text
    assert tx.results["bayes"].reason == "error:RuntimeError"


async def test_a_check_over_its_budget_ends_as_a_timeout_symbol(
        caplog: pytest.LogCaptureFixture) -> None:
    pipe = table(CheckSpec("slow", Stage.EOM, None, sleeps(5.0)),
                 CheckSpec("quick", Stage.EOM, None, sleeps(0.0),
                           budget=lambda cfg: 5.0))
    r = rt(pipeline=PipelineConfig(check_timeout=0.05))
    verdict = runner.Verdict()
    with caplog.at_level("ERROR", logger="mxguard"):
        await runner.run_rows(Transaction(stage=Stage.EOM), r, pipe.rows, verdict)
    assert [s.name for s in verdict.symbols] == ["SLOW_TIMEOUT", "SLOW"]  # control: in budget
    assert verdict.decision is None
    assert "check=slow error=TimeoutError detail='timed out'" in caplog.text


async def test_every_row_run_is_timed_and_rows_off_are_not() -> None:
    pipe = table(CheckSpec("a", Stage.EOM, None, returns("a")),
                 CheckSpec("b", Stage.EOM, None, returns("b"), enabled=lambda cfg: False))
    verdict = runner.Verdict()
    await runner.run_rows(Transaction(), rt(), pipe.rows, verdict)
    assert set(verdict.timings) == {"a"} and verdict.timings["a"] >= 0.0


# ------------------------------------------------------------------ end of message

def msg_tx(authenticated: bool = False) -> Transaction:
    tx = Transaction(message=Message([("Subject", " hi")]))
    tx.sasl_username = "alice" if authenticated else ""
    return tx


@pytest.mark.parametrize(("authenticated", "want"), [
    (True, ["SIGN", "ANY"]),  # outgoing: no incoming row, no score actions
    (False, ["IN", "ANY"]),  # incoming: control
])
async def test_direction_picks_rows(authenticated: bool, want: list[str]) -> None:
    pipe = table(CheckSpec("sign", Stage.EOM, None, returns("sign", 100.0),
                           direction=Direction.OUTGOING),
                 CheckSpec("in", Stage.EOM, None, returns("in", 0.5),
                           direction=Direction.INCOMING),
                 CheckSpec("any", Stage.EOM, None, returns("any", 0.5)))
    verdict = await runner.run_message(msg_tx(authenticated), rt(), pipe)
    assert [s.name for s in verdict.symbols] == want
    assert verdict.decision is None  # 100 points of an outgoing row reject nothing


@pytest.mark.parametrize(("score", "action", "decision"), [
    (16.0, "reject", Action.REJECT),
    (6.0, "add_header", None),
    (1.0, "no action", None),  # control
])
async def test_score_actions_apply_once_after_the_eom_rows(score: float, action: str,
                                                           decision: Action | None) -> None:
    seen: list[float] = []

    async def done(tx: Transaction, rt: Runtime) -> CheckResult:
        assert tx.verdict is not None
        seen.append(tx.verdict.score)
        return CheckResult("done", headers=[HeaderEdit("X-Seen", tx.verdict.extra["spam_action"])])

    pipe = table(CheckSpec("half", Stage.EOM, None, returns("half", score / 2)),
                 CheckSpec("other", Stage.EOM, None, returns("other", score / 2)),
                 CheckSpec("done", Stage.DONE, None, done))
    verdict = await runner.run_message(msg_tx(), rt(), pipe)
    assert verdict.extra["spam_action"] == action
    assert (verdict.decision.action if verdict.decision else None) == decision
    assert verdict.decided_by == ("actions" if decision else "")
    assert seen == [score]  # DONE rows see the final total
    assert HeaderEdit("X-Seen", action) in verdict.headers


async def test_a_check_decision_outranks_a_weaker_score_action() -> None:
    pipe = table(CheckSpec("dmarc", Stage.EOM, None, returns("dmarc", 6.0, REJECT)))
    verdict = await runner.run_message(msg_tx(), rt(), pipe)
    assert verdict.decided_by == "dmarc" and verdict.extra["spam_action"] == "add_header"


def test_error_lines_are_one_per_check_per_interval() -> None:
    log = runner.ErrorLog()
    assert log.allow("bayes", 60, now=0.0) == 0  # first: logged
    assert log.allow("bayes", 60, now=1.0) is None  # counted, not logged
    assert log.allow("bayes", 60, now=2.0) is None
    assert log.allow("greylist", 60, now=2.0) == 0  # control: another check logs its own
    assert log.allow("bayes", 60, now=61.0) == 2  # next interval says how many were held


# ------------------------------------------------------------------ the budget wrapper

async def _steps(n: int, fail: bool = False) -> int:
    for _ in range(n):
        await asyncio.sleep(0)
    if fail:
        raise ValueError("after waiting")
    return n


@pytest.mark.parametrize("steps", [0, 1, 5])  # 0: done without waiting (no timer)
async def test_within_returns_what_the_coroutine_returns(steps: int) -> None:
    assert await runner.within(_steps(steps), 1.0) == steps


async def test_within_passes_on_errors_raised_after_a_wait() -> None:
    with pytest.raises(ValueError, match="after waiting"):
        await runner.within(_steps(2, fail=True), 1.0)


async def test_within_cancellation_from_outside_reaches_the_check() -> None:
    cleaned: list[bool] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)

    task = asyncio.ensure_future(runner.within(waits(), 30.0))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]


async def test_within_timeout_after_a_wait_cancels_the_check() -> None:
    cleaned: list[bool] = []

    async def waits() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append(True)

    with pytest.raises(TimeoutError):
        await runner.within(waits(), 0.02)
    assert cleaned == [True]
