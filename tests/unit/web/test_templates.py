"""The page templates render history records, with everything from mail escaped."""

from __future__ import annotations

from typing import Any

import pytest

from mxguard.store.history import HistoryRecord
from mxguard.web.app import ENV, Auth, parse_when


def render(name: str, **ctx: Any) -> str:
    ctx.setdefault("auth", Auth("session", "admin", "n", "c" * 64))
    ctx.setdefault("path", "/")
    return ENV.get_template(name).render(**ctx)


def record(**kw: Any) -> dict[str, Any]:
    base = {"id": "0abc", "time": 1796300000.0, "queue_id": "4QID", "sender": "a@b.test",
            "recipients": ["c@d.test"], "subject": "Hello", "action": "reject", "score": 16.0,
            "symbols": [{"name": "GTUBE", "score": 1000.0, "detail": "the GTUBE string"}],
            "timings": {"rules": 0.5}, "headers_added": [["X-Spam-Flag", "YES"]]}
    base.update(kw)
    return HistoryRecord.from_dict(base).to_dict()


@pytest.mark.parametrize(("field", "value", "shown"), [
    ("subject", "<script>alert(1)</script>", "&lt;script&gt;alert(1)&lt;/script&gt;"),
    ("sender", '"><img src=x onerror=alert(1)>@evil.test',
     "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;@evil.test"),
    ("subject", "Plain subject", "Plain subject"),  # control: ordinary text as it is
])
def test_history_and_message_escape(field: str, value: str, shown: str) -> None:
    r = record(**{field: value})
    for html in (render("history.html", records=[r], form=dict.fromkeys(
                        ("queue_id", "sender", "recipient", "client", "action", "symbol",
                         "text", "since", "until", "limit"), ""), actions=["reject"], more=""),
                 render("message.html", r=r, explanation="rejected: " + value, raw_kept=True,
                        raw_size=10, bayes=(1, 2), bayes_on=True, keep_messages=5, done="")):
        assert shown in html
        if "<" in value:
            assert value not in html


def test_message_page_parts() -> None:
    html = render("message.html", r=record(), explanation="rejected, spam score 16",
                  raw_kept=False, raw_size=0, bayes=None, bayes_on=True, keep_messages=0,
                  done="")
    assert "GTUBE" in html and "the GTUBE string" in html and "+1000.00" in html
    assert "X-Spam-Flag" in html and "rules" in html and "rejected, spam score 16" in html
    assert 'id="not-kept"' in html and "learn-spam" not in html
    kept = render("message.html", r=record(), explanation="", raw_kept=True, raw_size=10,
                  bayes=(3, 4), bayes_on=True, keep_messages=5, done="")
    assert 'id="learn-spam"' in kept and 'value="' + "c" * 64 + '"' in kept
    assert "3 spam, 4 ham" in kept


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("2h", 10000.0 - 7200), ("30m", 10000.0 - 1800), ("1d", 10000.0 - 86400),
    ("5000", 5000.0), ("1970-01-01T01:00:00", 3600.0), ("1970-01-01T01:00:00+01:00", 0.0),
])
def test_parse_when(text: str, expected: float | None) -> None:
    assert parse_when(text, 10000.0) == expected


def test_parse_when_refuses() -> None:
    with pytest.raises(ValueError, match=r"give e\.g\."):
        parse_when("yesterday", 0.0)
