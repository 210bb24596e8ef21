"""The legitimate-sender evals of :mod:`mxguard.content.evals.sender`: each case
a message that must make the eval true next to a close one that must not."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from mxguard.content.evals import EVALS, RuleLists, ScanContext
from mxguard.content.evals.base import DomainSet
from mxguard.content.mime import parse_message

LISTS = RuleLists(freemail_domains=DomainSet(["gmail.com", "yahoo.com"]))


@dataclass
class Tx:
    sender: str


def msg(headers: str, tx: Tx | None = None, body: str = "Hello\n") -> ScanContext:
    raw = (f"{headers}\nTo: bob@example.org\nSubject: News\n"
           f"Date: Mon, 01 Jan 2024 00:00:00 +0000\nMessage-Id: <1@example.com>\n\n{body}\n")
    return ScanContext(parse_message(raw.encode()), tx=tx, lists=LISTS)


FROM = "From: Example News <news@example.com>"

# (eval, context that must be true, control that must be false)
CASES: list[tuple[str, ScanContext, ScanContext]] = [
    # VERP in From's own registrable domain, by Return-Path (mxguard scan) ...
    ("mxg_bulk_bounce_same_org",
     msg(f"Return-Path: <bounce-1234-5678@bounces.example.com>\n{FROM}"),
     msg(f"Return-Path: <bounce-1234-5678@bounces.example.net>\n{FROM}")),
    # ... or by the SMTP envelope sender (the milter), which wins over Return-Path
    ("mxg_bulk_bounce_same_org",
     msg(f"Return-Path: <news@example.com>\n{FROM}", Tx("n+bob=example.org@example.com")),
     msg(f"Return-Path: <bounce-1234-5678@example.com>\n{FROM}", Tx("news@example.com"))),
    # an encoded recipient counts like digits; a plain other mailbox does not
    ("mxg_bulk_bounce_same_org",
     msg(f"Return-Path: <news-bob=example.org@example.com>\n{FROM}"),
     msg(f"Return-Path: <newsletter-admin@example.com>\n{FROM}")),
    # throw-away freemail accounts: the envelope *is* From, or From is freemail
    ("mxg_bulk_bounce_same_org",
     msg("Return-Path: <deals-20240101@example.com>\nFrom: deals@example.com"),
     msg("Return-Path: <deals-20240101@gmail.com>\nFrom: deals@gmail.com")),
    ("mxg_bulk_bounce_same_org",
     msg("Return-Path: <x-4711@mail.example.co.uk>\nFrom: a@example.co.uk"),
     msg("Return-Path: <sales4711@example.com>\nFrom: sales4711@example.com")),
    ("mxg_list_unsubscribe_from_domain",
     msg(f"{FROM}\nList-Unsubscribe: <mailto:leave-42@lists.example.com>"),
     msg(f"{FROM}\nList-Unsubscribe: <mailto:leave-42@lists.example.net>")),
    ("mxg_list_unsubscribe_from_domain",
     msg(f"{FROM}\nList-Unsubscribe: <https://esp.example.net/u>, <https://www.example.com/u>"),
     msg("From: deals@gmail.com\nList-Unsubscribe: <https://mail.gmail.com/u>")),
    ("mxg_list_unsubscribe_from_domain",
     msg(f"{FROM}\nList-Unsubscribe: <http://example.com/unsubscribe?u=1>"),
     msg(f"{FROM}\nList-Id: <news.example.com>")),
    # half the links or more to From's registrable domain
    ("mxg_links_sender_domain",
     msg(FROM, body="See https://www.example.com/sale and http://shop.example.com/x "
         "or http://cdn.example.net/i"),
     msg(FROM, body="See https://www.example.net/sale and http://shop.example.net/x "
         "or http://www.example.com/i")),
    ("mxg_links_sender_domain",
     msg(FROM, body="See https://www.example.com/sale"),
     msg("From: deals@gmail.com", body="See https://mail.gmail.com/sale")),
    ("mxg_links_sender_domain",
     msg(FROM, body="Write to https://user@www.example.com/"),
     msg(FROM, body="Write to sales@example.com, no links")),
]


@pytest.mark.parametrize(("name", "hit", "control"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_sender_eval(name: str, hit: ScanContext, control: ScanContext) -> None:
    assert EVALS[name](hit)
    assert not EVALS[name](control)
