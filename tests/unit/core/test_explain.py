"""``explain``: the headline is worded for each deciding check (with a control
case next to each that must not get that wording), the details list every
symbol, the timings and what observe mode held back."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mxguard.config import Config
from mxguard.core.explain import explain, headline
from mxguard.store.history import HistoryRecord


def sym(name: str, score: float, detail: str = "") -> dict[str, Any]:
    return {"name": name, "score": score, "detail": detail}


def rec(**kw: Any) -> HistoryRecord:
    base: dict[str, Any] = dict(id="0123456789abcdef0123", time=1764000000.0, host="mx1",
                                door="milter", queue_id="4ABCD", client_address="192.0.2.7",
                                client_name="mail.example.net", helo="mail.example.net",
                                sender="alice@example.com", recipients=["bob@example.org"])
    base.update(kw)
    return HistoryRecord(**base)


CASES: list[tuple[str, HistoryRecord, list[str], list[str]]] = [
    ("spf fail",
     rec(door="policy", action="reject", decided_by="spf",
         reply="550 5.7.23 SPF fail", symbols=[sym("SPF_FAIL", 5.0,
                                                   "example.com from 192.0.2.7 (matched -all)")]),
     ["rejected: SPF fail for example.com from 192.0.2.7; the domain allows only the hosts "
      "its SPF record lists (matched -all)"], []),
    ("spf control: a pass is not a reason",
     rec(door="policy", action="reject", decided_by="helo", reply="504 5.5.2 need fqdn",
         helo="localhost",
         symbols=[sym("SPF_PASS", -0.5, "example.com from 192.0.2.7 (matched ip4:192.0.2.0/24)"),
                  sym("HELO_NOT_FQDN", 2.0, "localhost")]),
     ["rejected: HELO name 'localhost' is not a fully-qualified hostname"], ["SPF"]),
    ("spf softfail deferred",
     rec(door="policy", action="defer", decided_by="spf", reply="451 4.7.23 x",
         symbols=[sym("SPF_SOFTFAIL", 1.0, "example.com from 192.0.2.7 (matched ~all)")]),
     ["deferred: SPF softfail for example.com", "probably not allowed", "(matched ~all)"], []),
    ("spf old detail: only a domain",
     rec(door="policy", action="reject", decided_by="spf", reply="550 5.7.23 x",
         symbols=[sym("SPF_FAIL", 5.0, "example.com")]),
     ["rejected: SPF fail for example.com from 192.0.2.7"], []),
    ("dmarc reject",
     rec(action="reject", decided_by="dmarc", reply="reject",
         symbols=[sym("DMARC_REJECT", 0.0, "example.com p=reject aligned=none")]),
     ["rejected: DMARC fail for example.com (policy p=reject): neither SPF nor DKIM passed"],
     []),
    ("dmarc control: a pass does not explain a score reject",
     rec(action="reject", decided_by="actions", score=12.0, spam=True, reply="reject",
         symbols=[sym("DMARC_PASS", -0.1, "example.com p=reject aligned=SPF"),
                  sym("BAYES_99", 5.0), sym("URIBL_BLACK", 7.1)]),
     ["rejected, spam score 12 of 15: URIBL_BLACK 7.1, BAYES_99 5, DMARC_PASS -0.1"],
     ["DMARC fail"]),
    ("greylist new",
     rec(door="policy", action="defer_if_permit", decided_by="greylist",
         reply="DEFER_IF_PERMIT 4.2.0 Greylisted",
         symbols=[sym("GREYLIST_DEFERRED", 0.0, "new, 300s left")]),
     ["deferred: greylisted, first time this client network, sender and recipient were "
      "seen; a retry after 300s is accepted"], []),
    ("greylist early",
     rec(door="policy", action="defer", decided_by="greylist", reply="450 4.2.0 Greylisted",
         symbols=[sym("GREYLIST_DEFERRED", 0.0, "early, 120s left")]),
     ["deferred: greylisted, retried before the greylisting delay was over; a retry after "
      "120s"], ["first time"]),
    ("helo unknown",
     rec(door="policy", action="reject", decided_by="helo", helo="nx.example",
         reply="550 5.7.1 <nx.example>: Helo command rejected: Host not found",
         symbols=[sym("HELO_UNKNOWN", 1.5, "nx.example")]),
     ["rejected: HELO name 'nx.example' has no A, AAAA or MX record"], []),
    ("content spam accepted with a flag",
     rec(action="accept", score=7.2, spam=True, reply="accept",
         symbols=[sym("BAYES_99", 5.0), sym("HTML_ONLY", 2.2), sym("SPF_PASS", 0.0)]),
     ["accepted, spam score 7.2 of 5 (X-Spam-Flag added): BAYES_99 5, HTML_ONLY 2.2"],
     ["SPF_PASS"]),
    ("content control: ham",
     rec(action="accept", score=1.2, reply="accept",
         symbols=[sym("HTML_ONLY", 1.2), sym("SPF_PASS", 0.0)]),
     ["accepted, score 1.2 (spam from 5): HTML_ONLY 1.2"], ["spam score", "X-Spam-Flag"]),
    ("content greylist by score",
     rec(action="defer", decided_by="actions", score=6.5, spam=True, reply="tempfail",
         symbols=[sym("BAYES_80", 6.5)]),
     ["deferred, spam score 6.5 of 6: BAYES_80 6.5"], []),
    ("another check: the reply text",
     rec(action="defer", decided_by="dnsbl", reply="451 4.3.0 Temporary local problem"),
     ["deferred by dnsbl: Temporary local problem"], []),
    ("policy accept",
     rec(door="policy", action="accept", reply="DUNNO"),
     ["accepted: no check objected at the policy stage"], ["score"]),
]


@pytest.mark.parametrize(("name", "record", "wanted", "unwanted"), CASES,
                         ids=[c[0] for c in CASES])
def test_headline_per_decider(name: str, record: HistoryRecord, wanted: list[str],
                              unwanted: list[str]) -> None:
    actions = dataclasses.replace(Config().actions, greylist=6.0)  # default 0: off
    line = headline(record, actions)
    for text in wanted:
        assert text in line, line
    for text in unwanted:
        assert text not in line, line
    assert "\n" not in line


def test_details_list_symbols_timings_and_observed() -> None:
    r = rec(action="accept", score=3.0, symbols=[sym("HTML_ONLY", 1.0, "only HTML"),
                                                 sym("BAYES_50", 2.0, "0.50")],
            timings={"spf": 1.25, "rules": 3.5}, observed=["helo:504 5.5.2 need fqdn"],
            headers_added=[["X-Spam-Status", "No"]], reply="accept", subject="Hi", kept=True)
    text = explain(r)
    lines = text.splitlines()
    assert lines[0].startswith("accepted, score 3")
    assert "4ABCD" in text and "192.0.2.7 (mail.example.net)" in text
    assert "Subject: Hi" in text
    sym_lines = [ln.strip() for ln in lines if ln.startswith("    ")]
    assert sym_lines[0].startswith("BAYES_50") and sym_lines[1].startswith("HTML_ONLY")
    assert "only HTML" in sym_lines[1]
    assert "timings (ms): spf 1.2, rules 3.5; total 4.8" in text
    assert "observe mode held back: helo:504 5.5.2 need fqdn" in text
    assert "headers added: X-Spam-Status" in text and "raw message kept" in text


def test_details_without_a_message_leave_message_lines_out() -> None:
    text = explain(rec(door="policy", action="reject", decided_by="spf", reply="550 5.7.23 x",
                       symbols=[sym("SPF_FAIL", 5.0, "example.com")]))
    assert "Subject:" not in text and "policy request 4ABCD" in text
