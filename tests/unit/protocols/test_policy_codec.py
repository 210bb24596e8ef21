"""The policy codec: bytes in, requests out; verdicts in, reply bytes out."""

from __future__ import annotations

import json

import pytest

from mxguard.core.transaction import Action, Decision, HeaderEdit, Stage, Verdict
from mxguard.protocols.policy import (
    PolicyDecoder,
    PolicyProtocolError,
    encode_action,
    encode_reply,
)
from tests.support import DATA

CAPTURE = DATA / "postfix-3.7-capture"


def req(**attrs: str) -> bytes:
    attrs.setdefault("request", "smtpd_access_policy")
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


def test_every_request_postfix_37_sent_decodes() -> None:
    lines = (CAPTURE / "policy.jsonl").read_text().splitlines()
    assert len(lines) > 10
    dec = PolicyDecoder()
    for line in lines:
        rec = json.loads(line)
        wire = "".join(f"{k}={v}\n" for k, v in rec["request"]).encode() + b"\n"
        (got,) = dec.feed(wire)
        assert got.unknown == ()
        assert got.attrs == dict(rec["request"])
        tx = got.transaction()
        assert tx.client_address == got.attrs["client_address"]


def test_requests_split_anywhere_and_pipelined() -> None:
    wire = req(protocol_state="RCPT", recipient="a@b.example") + req(protocol_state="DATA")
    dec = PolicyDecoder()
    out = []
    for i in range(len(wire)):
        out.extend(dec.feed(wire[i:i + 1]))
    assert [r.attrs["protocol_state"] for r in out] == ["RCPT", "DATA"]
    assert out[0].transaction().stage is Stage.RCPT
    assert out[0].transaction().recipients == ["a@b.example"]
    assert not dec.pending


def test_crlf_and_values_with_equals_and_utf8() -> None:
    wire = (b"request=smtpd_access_policy\r\nsender=a=b@x.example\r\n"
            b"helo_name=\xc3\xa9.example\r\n\r\n")
    (r,) = PolicyDecoder().feed(wire)
    assert r.attrs["sender"] == "a=b@x.example"
    assert r.attrs["helo_name"] == "é.example"


def test_known_and_unknown_names_decode_alike() -> None:
    """The all-known fast path and the line-by-line path give the same attributes."""
    (fast,) = PolicyDecoder().feed(req(protocol_state="RCPT", sender="a=b@c", helo_name=""))
    (slow,) = PolicyDecoder().feed(req(protocol_state="RCPT", sender="a=b@c", helo_name="",
                                       future_thing="1"))
    assert fast.attrs == {k: v for k, v in slow.attrs.items() if k != "future_thing"}
    assert fast.attrs["sender"] == "a=b@c" and fast.attrs["helo_name"] == ""
    assert (fast.unknown, slow.unknown) == ((), ("future_thing",))


def test_unknown_attributes_are_kept_and_reported() -> None:
    (r,) = PolicyDecoder().feed(req(protocol_state="RCPT", future_thing="1"))
    assert r.unknown == ("future_thing",)
    (control,) = PolicyDecoder().feed(req(protocol_state="RCPT"))
    assert control.unknown == ()


@pytest.mark.parametrize(("wire", "match"), [
    (b"request=smtpd_access_policy\nnonsense\n\n", "name=value"),
    (b"request=smtpd_access_policy\n=value\n\n", "name=value"),  # an empty name
    (b"request=smtpd_access_policy\nsender=a@b\nnonsense\n\n", "name=value"),
    (b"sender=a@b\n\n", "unsupported request"),  # known names only, no request=
    (b"\x00\x01\x02binary\n\n", "NUL"),
    (b"\n", "empty request"),
    (b"request=other\n\n", "unsupported request"),
    (b"x=" + b"a" * 70000, "longer than"),
    (b"x=1\n" * 40000, "longer than"),
    (b"".join(b"a%d=1\n" % i for i in range(300)) + b"\n", "attributes"),
])
def test_malformed_input_raises(wire: bytes, match: str) -> None:
    with pytest.raises(PolicyProtocolError, match=match):
        PolicyDecoder(max_bytes=65536, max_attributes=256).feed(wire)


def test_long_but_allowed_request_passes() -> None:  # control for the length limit
    (r,) = PolicyDecoder(max_bytes=65536).feed(req(sender="a" * 60000 + "@x.example"))
    assert len(r.attrs["sender"]) > 60000


@pytest.mark.parametrize(("verdict", "action"), [
    (Verdict(), "DUNNO"),
    (Verdict(headers=[HeaderEdit("X-Greylist", "delayed 300 seconds")]),
     "PREPEND X-Greylist: delayed 300 seconds"),
    (Verdict(action=Action.DEFER_IF_PERMIT,
             decision=Decision(Action.DEFER_IF_PERMIT, 450, "4.2.0", "Greylisted, see x")),
     "DEFER_IF_PERMIT 4.2.0 Greylisted, see x"),
    (Verdict(action=Action.REJECT, decision=Decision(
        Action.REJECT, 504, "5.5.2", "need fully-qualified hostname",
        prefix="<foo>: Helo command rejected: ")),
     "504 5.5.2 <foo>: Helo command rejected: need fully-qualified hostname"),
    (Verdict(action=Action.DEFER, decision=Decision(Action.DEFER, 450, "4.7.1", "a\r\nb")),
     "450 4.7.1 a b"),
])
def test_encode(verdict: Verdict, action: str) -> None:
    assert encode_action(verdict) == action
    assert encode_reply(action) == f"action={action}\n\n".encode()
