"""One PREPEND per policy reply: each header once per message, the rest later."""

from __future__ import annotations

from mxguard.core.transaction import HeaderEdit
from mxguard.server.policy_headers import HeaderMemory

SPF = HeaderEdit("Received-SPF", "pass (x)")
GREY = HeaderEdit("X-Greylist", "delayed 300 seconds")


def test_two_headers_come_out_over_two_requests_of_one_message() -> None:
    m = HeaderMemory()
    assert m.next_header("i1", [SPF, GREY]) == SPF
    assert m.next_header("i1", [SPF]) == GREY  # second recipient: SPF not repeated
    assert m.next_header("i1", [SPF]) is None
    assert m.next_header("i1", []) is None  # DATA stage: nothing left


def test_other_messages_are_independent() -> None:  # control
    m = HeaderMemory()
    assert m.next_header("i1", [SPF]) == SPF
    assert m.next_header("i2", [SPF]) == SPF


def test_without_instance_the_first_header_is_used() -> None:
    assert HeaderMemory().next_header("", [GREY, SPF]) == GREY


def test_memory_is_bounded() -> None:
    m = HeaderMemory(size=10)
    for i in range(100):
        m.next_header(f"i{i}", [SPF, GREY])
    assert len(m._by_instance) == 10
