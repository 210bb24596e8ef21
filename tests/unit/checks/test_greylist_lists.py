"""Client whitelists: the (address, name) memo gives the same answers as a fresh
match, forgets them when an entry is added, and stays bounded."""

from __future__ import annotations

import pytest

from mxguard.checks import greylist_lists
from mxguard.checks.greylist_lists import ClientList, parse_ip


@pytest.mark.parametrize("address, name, expected", [
    ("192.0.2.7", "unknown", "192.0.2.0/24"),
    ("198.51.100.1", "mx.example.com", "example.com"),
    ("198.51.100.1", "unknown", None),  # control: a name that is not verified
    ("203.0.113.9", "mail.other.example", None),  # control: not listed
])
def test_memo_answers_as_a_fresh_match(address: str, name: str, expected: str | None) -> None:
    lists = ClientList()
    for entry in ("192.0.2.0/24", "example.com"):
        lists.add(entry)
    ip = parse_ip(address)
    assert lists.match(ip, name) == expected
    assert lists.match(ip, name) == expected  # from the memo
    assert ClientList._match(lists, ip, name) == expected


def test_add_forgets_the_memo_and_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    lists = ClientList()
    ip = parse_ip("203.0.113.9")
    assert lists.match(ip, "unknown") is None
    lists.add("203.0.113.0/24")
    assert lists.match(ip, "unknown") == "203.0.113.0/24"
    monkeypatch.setattr(greylist_lists, "MATCH_MEMO", 8)
    for i in range(50):
        lists.match(parse_ip(f"198.51.100.{i}"), "unknown")
    assert len(lists._memo) <= 8
