"""The policy door: a ``policy_context=helo`` request moves HELO checks to the
HELO restriction for that SMTP session only, never for other clients (a
per-request attribute must not change shared state)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from mxguard.config import Config
from mxguard.core.runtime import Runtime
from mxguard.core.transaction import Mode
from mxguard.protocols.policy import PolicyRequest
from mxguard.server.policy_door import PolicyDoor


def door(max_sessions: int = 100) -> PolicyDoor:
    cfg = dataclasses.replace(
        Config(), spf=dataclasses.replace(Config().spf, mode=Mode.OFF),
        greylist=dataclasses.replace(Config().greylist, mode=Mode.OFF),
        helo=dataclasses.replace(Config().helo, reject_unknown=False))  # no DNS here
    daemon = SimpleNamespace(runtime=Runtime(config=cfg, resolver=None))  # type: ignore[arg-type]
    return PolicyDoor(daemon, max_sessions=max_sessions)  # type: ignore[arg-type]


def request(client: str, port: str, context: str = "", helo: str = "localhost") -> PolicyRequest:
    return PolicyRequest({"request": "smtpd_access_policy", "protocol_state": "RCPT",
                          "client_address": client, "client_port": port, "helo_name": helo,
                          "sender": "a@example.com", "recipient": "b@example.org",
                          "policy_context": context})


async def test_helo_context_of_one_session_leaves_other_clients_checked() -> None:
    d = door()
    first = await d(request("192.0.2.1", "40001", context="helo"))
    assert first.startswith(b"action=504 5.5.2 need fully-qualified hostname")
    # the same session's recipient request: HELO already judged in smtpd_helo_restrictions
    assert await d(request("192.0.2.1", "40001")) == b"action=DUNNO\n\n"
    # another client, same bad HELO, no helo context: still checked at RCPT
    other = await d(request("198.51.100.2", "50002"))
    assert other.startswith(b"action=504 5.5.2 <localhost>: Helo command rejected")


@pytest.mark.parametrize(("helo", "rejected"), [("localhost", True), ("mail.example.com", False)])
async def test_without_helo_context_helo_runs_at_rcpt(helo: str, rejected: bool) -> None:
    reply = await door()(request("192.0.2.9", "1", helo=helo))
    assert reply.startswith(b"action=504") is rejected


async def test_sessions_remembered_are_bounded() -> None:
    d = door(max_sessions=3)
    for port in range(10):
        await d(request("192.0.2.1", str(port), context="helo"))
    # the oldest session was forgotten: its HELO is checked again at RCPT (never skipped wrongly)
    assert (await d(request("192.0.2.1", "0"))).startswith(b"action=504")
