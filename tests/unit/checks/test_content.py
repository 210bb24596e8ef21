"""Content scoring at end of message: actions by score (core.verdict),
SpamAssassin-style headers (checks.spam_headers), the subject tag, and the
rules, Bayes and actions run by the pipeline on a milter session's message."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from mxguard.checks import rules, run_message
from mxguard.checks.spam_headers import spam_headers, status_value
from mxguard.config import ActionsConfig, Config, ContentConfig, MilterConfig
from mxguard.core import runtime as core_runtime
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import (
    Action,
    CheckResult,
    HeaderChange,
    HeaderEdit,
    Stage,
    Symbol,
    Transaction,
    Verdict,
)
from mxguard.core.verdict import NO_ACTION, choose_action, decision_for, subject_change
from mxguard.server.milter_session import MilterSession

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def cfg(**actions: Any) -> Config:
    content_kw = {k[8:]: actions.pop(k) for k in list(actions) if k.startswith("content_")}
    return dataclasses.replace(Config(), actions=ActionsConfig(**actions),
                               content=ContentConfig(**content_kw))


# ------------------------------------------------------------------ actions

@pytest.mark.parametrize(("score", "actions", "expected"), [
    (4.9, {}, NO_ACTION),
    (5.0, {}, "add_header"),
    (14.9, {}, "add_header"),
    (15.0, {}, "reject"),
    (9.0, {"rewrite_subject": 8.0}, "rewrite_subject"),
    (7.0, {"rewrite_subject": 8.0}, "add_header"),
    (6.0, {"greylist": 6.0}, "greylist"),
    (1000.0, {"reject": 0.0}, "add_header"),  # 0 turns an action off
    (1000.0, {"reject": 0.0, "add_header": 0.0}, NO_ACTION),
    (-3.0, {}, NO_ACTION),
])
def test_choose_action(score: float, actions: dict[str, float], expected: str) -> None:
    assert choose_action(score, ActionsConfig(**actions)) == expected


def test_decisions_for_hard_actions() -> None:
    c = cfg()
    reject = decision_for("reject", 17.25, c)
    assert reject is not None and reject.action is Action.REJECT
    assert reject.reply() == "550 5.7.1 Message rejected as spam (score 17.2)"
    greylist = decision_for("greylist", 6, c)
    assert greylist is not None and greylist.code == 451 and greylist.action is Action.DEFER
    assert decision_for("add_header", 6, c) is None
    bad = decision_for("reject", 20, cfg(reject_text="spam {nope}"))
    assert bad is not None and "20.0" in bad.text


# ------------------------------------------------------------------ headers grammar

STATUS = re.compile(r"^(Yes|No), score=-?\d+\.\d required=\d+\.\d tests=(none|[A-Z0-9_]+"
                    r"(,[A-Z0-9_]+)*) autolearn=\w+ autolearn_force=(yes|no) "
                    r"version=mxguard-[\d.]+$")


def test_spam_headers_for_spam() -> None:
    symbols = [Symbol("MXG_B", 3.0), Symbol("SPF_FAIL", 5.0), Symbol("DKIM_NONE", 0.0),
               Symbol("MXG_A", -0.7)]
    edits = spam_headers(7.3, symbols, cfg())
    assert [(e.name, e.op) for e in edits] == [("X-Spam-Flag", "prepend"),
                                               ("X-Spam-Status", "prepend"),
                                               ("X-Spam-Level", "prepend")]
    assert edits[0].value == "YES"
    assert edits[1].value == ("Yes, score=7.3 required=5.0 tests=MXG_A,MXG_B,SPF_FAIL\r\n"
                              "\tautolearn=no autolearn_force=no version=mxguard-0.1.0")
    assert edits[2].value == "*******"


def test_spam_headers_for_ham_have_no_flag() -> None:
    edits = spam_headers(0.4, [], cfg(), autolearn="ham")
    assert [e.name for e in edits] == ["X-Spam-Status", "X-Spam-Level"]
    assert edits[0].value.startswith("No, score=0.4 required=5.0 tests=none autolearn=ham")
    assert edits[1].value == ""


@pytest.mark.parametrize("n_tests", [0, 1, 5, 40])
def test_status_folds_like_spamassassin(n_tests: int) -> None:
    tests = [f"RULE_NUMBER_{i:02d}" for i in range(n_tests)]
    value = status_value(12.0, 5.0, tests, True)
    lines = value.split("\r\n")
    assert all(line.startswith("\t") for line in lines[1:])
    assert len("X-Spam-Status: " + lines[0]) <= 78
    assert all(len(line.expandtabs(8)) <= 78 for line in lines[1:])
    flat = "".join(part if i == 0 or lines[i - 1].endswith(",") else " " + part
                   for i, part in enumerate(line.lstrip("\t") for line in lines))
    assert STATUS.match(flat), flat
    if tests:
        assert "tests=" + ",".join(tests) in flat


def test_level_is_capped_and_prefix_configurable() -> None:
    edits = spam_headers(1000.0, [Symbol("GTUBE", 1000.0)],
                         cfg(content_header_prefix="X-Filter-"))
    names = [e.name for e in edits]
    assert names == ["X-Filter-Flag", "X-Filter-Status", "X-Filter-Level"]
    assert edits[2].value == "*" * 50


def test_report_header_lists_rules() -> None:
    edits = spam_headers(8.0, [Symbol("A_RULE", 6.0), Symbol("B_RULE", 2.0, "detail b")],
                         cfg(content_add_report=True), descriptions={"A_RULE": "desc a"})
    report = edits[-1]
    assert report.name == "X-Spam-Report"
    lines = report.value.split("\r\n\t")
    assert lines[0] == "Content analysis details: (8.0 points, 5.0 required)"
    assert lines[1:] == ["*   6.0 A_RULE desc a", "*   2.0 B_RULE detail b"]


@pytest.mark.parametrize(("headers", "expected"), [
    ([("Subject", " Hello")], HeaderChange.change("Subject", " ***SPAM*** Hello")),
    ([("Subject", "Hello")], HeaderChange.change("Subject", "***SPAM*** Hello")),
    ([("Subject", " ***SPAM*** Hello")], None),  # never tagged twice
    ([("From", "a@b")], HeaderChange.add("Subject", "***SPAM***")),
])
def test_subject_change(headers: list[tuple[str, str]], expected: HeaderChange | None) -> None:
    assert subject_change(headers, "***SPAM*** ") == expected


def test_subject_change_off_without_tag() -> None:
    assert subject_change([("Subject", "x")], "") is None


# ------------------------------------------------------------------ the pipeline at EOM

def session(headers: list[tuple[str, str]], body: bytes) -> MilterSession:
    s = MilterSession()
    s.start_message("sender@example.com", [])
    for name, value in headers:
        s.add_header(name, value)
    s.add_body(body)
    return s


def runtime(config: Config) -> Runtime:
    # SPF, DKIM and DMARC off: no DNS in these tests; content and actions as configured
    config = dataclasses.replace(
        config, spf=dataclasses.replace(config.spf, mode="off"),
        dkim=dataclasses.replace(config.dkim, mode="off"),
        dmarc=dataclasses.replace(config.dmarc, mode="off"))
    return Runtime(config=config, resolver=None,  # type: ignore[arg-type]
                   clock=lambda: 1704067200.0)


HEADERS = [("From", "Ann <ann@example.com>"), ("To", "bob@example.org"),
           ("Subject", "Hello"), ("Date", "Mon, 01 Jan 2024 00:00:00 +0000"),
           ("Message-Id", "<1@example.com>")]


def tx_of(headers: list[tuple[str, str]], body: bytes) -> Transaction:
    s = session(headers, body)
    tx = s.transaction()
    tx.message = s.message()
    return tx


def edits(verdict: Verdict, kind: type) -> list:  # type: ignore[type-arg]
    return [h for h in verdict.headers if isinstance(h, kind)]


async def test_gtube_is_rejected_with_default_actions() -> None:
    tx = tx_of(HEADERS, f"test\r\n{GTUBE}\r\n".encode())
    verdict = await run_message(tx, runtime(Config()))
    assert verdict.extra["spam_action"] == "reject" and verdict.score >= 1000
    assert verdict.decision is not None and verdict.decision.code == 550
    assert verdict.decided_by == "actions"
    assert [s.name for s in tx.results["rules"].symbols] == ["GTUBE"]
    assert tx.parsed is not None and tx.parsed.subject == "Hello"


async def test_gtube_tagged_when_reject_is_off() -> None:
    c = cfg(reject=0.0, rewrite_subject=10.0)
    tx = tx_of(HEADERS, GTUBE.encode())
    verdict = await run_message(tx, runtime(c))
    assert verdict.extra["spam_action"] == "rewrite_subject" and verdict.decision is None
    names = [h.name for h in edits(verdict, HeaderEdit) if h.name.startswith("X-Spam")]
    assert names[:2] == ["X-Spam-Flag", "X-Spam-Status"]
    assert HeaderChange.change("Subject", "***SPAM*** Hello") in verdict.headers


async def test_ham_control_no_action_and_earlier_scores_count() -> None:
    rt = runtime(Config())
    tx = tx_of(HEADERS, b"Lunch at noon?\r\n")
    verdict = await run_message(tx, rt)
    assert verdict.extra["spam_action"] == NO_ACTION and tx.results["rules"].symbols == []
    status = [h.value for h in edits(verdict, HeaderEdit) if h.name == "X-Spam-Status"]
    assert status[0].startswith("No, score=0.0")


async def test_earlier_symbols_count_towards_actions_and_tests_list() -> None:
    from mxguard.checks import PIPELINE
    from mxguard.core import runner

    async def spf_fail(tx: Transaction, rt: Runtime) -> CheckResult:
        return CheckResult("fake", [Symbol("SPF_FAIL", 5.5)])

    row = runner.CheckSpec("fake", Stage.EOM, None, spf_fail)
    table = dataclasses.replace(PIPELINE, rows=(row, *PIPELINE.rows))
    tx = tx_of(HEADERS, b"Lunch at noon?\r\n")
    verdict = await runner.run_message(tx, runtime(Config()), table)
    assert verdict.extra["spam_action"] == "add_header" and verdict.score == 5.5
    status = [h.value for h in edits(verdict, HeaderEdit) if h.name == "X-Spam-Status"]
    assert "tests=SPF_FAIL" in status[0]


async def test_partial_scan_of_large_message_is_logged(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    c = dataclasses.replace(Config(), milter=MilterConfig(max_scan_size=65536))
    body = b"x" * 70000 + b"\r\n" + GTUBE.encode()
    tx = tx_of(HEADERS, body)
    with caplog.at_level("INFO", logger="mxguard"):
        await run_message(tx, runtime(c))
    assert tx.parsed is not None and tx.parsed.truncated
    assert "GTUBE" not in [s.name for s in tx.results["rules"].symbols]  # beyond the bound
    assert "partial scan" in caplog.text


async def test_ruleset_loaded_once_and_report_safe_supported(caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    rt = runtime(cfg(content_report_safe=True))
    with caplog.at_level("WARNING", logger="mxguard"):
        await run_message(tx_of(HEADERS, b"hi\r\n"), rt)
        first = rt.services[rules.RULES_SERVICE]
        await run_message(tx_of(HEADERS, b"hi\r\n"), rt)
    assert rt.services[rules.RULES_SERVICE] is first
    assert "not supported" not in caplog.text  # report_safe is implemented (content/report.py)


async def test_missing_message_is_an_empty_scan() -> None:
    verdict = await run_message(Transaction(), runtime(Config()))
    assert verdict.extra["spam_action"] == NO_ACTION


@pytest.mark.parametrize(("size", "inline"), [
    (0, True), (core_runtime.INLINE_BYTES, True),  # small mail: parsed and scanned in place
    (core_runtime.INLINE_BYTES + 1, False), (10 * 1024 * 1024, False),  # big: a worker thread
])
async def test_off_loop_runs_small_messages_in_place(size: int, inline: bool) -> None:
    import threading

    here = threading.get_ident()
    where = await core_runtime.off_loop(size, threading.get_ident)
    assert (where == here) is inline
