"""Content scoring at end of message: actions by score, SpamAssassin-style headers,
the subject tag, and evaluate_content on a milter session."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from mxguard.checks import content
from mxguard.checks.content import (
    NO_ACTION,
    choose_action,
    decision_for,
    evaluate_content,
    spam_headers,
    status_value,
    subject_change,
)
from mxguard.config import ActionsConfig, Config, ContentConfig, MilterConfig
from mxguard.core.runner import Runtime
from mxguard.core.transaction import Action, Symbol, Transaction
from mxguard.server.milter import HeaderChange, MilterSession

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


# ------------------------------------------------------------------ evaluate_content

def session(headers: list[tuple[str, str]], body: bytes) -> MilterSession:
    s = MilterSession()
    s.start_message("sender@example.com", [])
    for name, value in headers:
        s.add_header(name, value)
    s.add_body(body)
    return s


def runtime(config: Config) -> Runtime:
    return Runtime(config=config, resolver=None,  # type: ignore[arg-type]
                   clock=lambda: 1704067200.0)


HEADERS = [("From", "Ann <ann@example.com>"), ("To", "bob@example.org"),
           ("Subject", "Hello"), ("Date", "Mon, 01 Jan 2024 00:00:00 +0000"),
           ("Message-Id", "<1@example.com>")]


async def test_gtube_is_rejected_with_default_actions() -> None:
    tx = Transaction(message=session(HEADERS, f"test\r\n{GTUBE}\r\n".encode()))
    out = await evaluate_content(tx, runtime(Config()))
    assert out.action == "reject" and out.total >= 1000
    assert out.result.decision is not None and out.result.decision.code == 550
    assert [s.name for s in out.result.symbols] == ["GTUBE"]
    assert out.parsed is not None and out.parsed.subject == "Hello"


async def test_gtube_tagged_when_reject_is_off() -> None:
    c = cfg(reject=0.0, rewrite_subject=10.0)
    tx = Transaction(message=session(HEADERS, GTUBE.encode()))
    out = await evaluate_content(tx, runtime(c))
    assert out.action == "rewrite_subject" and out.result.decision is None
    names = [h.name for h in out.headers]
    assert names[:2] == ["X-Spam-Flag", "X-Spam-Status"]
    assert out.subject == HeaderChange.change("Subject", "***SPAM*** Hello")


async def test_ham_control_no_action_and_base_score_counts() -> None:
    tx = Transaction(message=session(HEADERS, b"Lunch at noon?\r\n"))
    rt = runtime(Config())
    out = await evaluate_content(tx, rt)
    assert out.action == NO_ACTION and out.content_score == 0
    assert out.headers[0].value.startswith("No, score=0.0")
    # Earlier checks' symbols count towards the total and the tests= list
    out = await evaluate_content(tx, rt, base_score=5.5,
                                 base_symbols=[Symbol("SPF_FAIL", 5.5)])
    assert out.action == "add_header" and out.total == 5.5
    assert "tests=SPF_FAIL" in out.headers[1].value


async def test_partial_scan_of_large_message_is_logged(caplog: pytest.LogCaptureFixture
                                                      ) -> None:
    c = dataclasses.replace(Config(), milter=MilterConfig(max_scan_size=65536))
    body = b"x" * 70000 + b"\r\n" + GTUBE.encode()
    tx = Transaction(message=session(HEADERS, body))
    with caplog.at_level("INFO", logger="mxguard"):
        out = await evaluate_content(tx, runtime(c))
    assert out.parsed is not None and out.parsed.truncated
    assert "GTUBE" not in [s.name for s in out.result.symbols]  # beyond the bound
    assert "partial scan" in caplog.text


async def test_ruleset_loaded_once_and_report_safe_supported(caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    rt = runtime(cfg(content_report_safe=True))
    tx = Transaction(message=session(HEADERS, b"hi\r\n"))
    with caplog.at_level("WARNING", logger="mxguard"):
        await evaluate_content(tx, rt)
        first = rt.services[content.RULES_SERVICE]
        await evaluate_content(tx, rt)
    assert rt.services[content.RULES_SERVICE] is first
    assert "not supported" not in caplog.text  # report_safe is implemented (content/report.py)


async def test_missing_message_is_an_empty_scan() -> None:
    out = await evaluate_content(Transaction(), runtime(Config()))
    assert out.action == NO_ACTION


@pytest.mark.parametrize(("size", "inline"), [
    (0, True), (content.INLINE_BYTES, True),  # small mail: parsed and scanned in place
    (content.INLINE_BYTES + 1, False), (10 * 1024 * 1024, False),  # big: a worker thread
])
async def test_off_loop_runs_small_messages_in_place(size: int, inline: bool) -> None:
    import threading

    here = threading.get_ident()
    where = await content.off_loop(size, threading.get_ident)
    assert (where == here) is inline
