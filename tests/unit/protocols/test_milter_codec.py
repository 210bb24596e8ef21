"""The milter codec: framing, every command and reply, limits, and the
packets a real Postfix 3.7.11 sent (tests/data/postfix-3.7-capture)."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import pytest

from mxguard.protocols import milter as m
from tests.support import DATA

CAPTURE = DATA / "postfix-3.7-capture"
POSTFIX_OFFER = m.OptNeg(6, 0x1FF, 0x1FFFFF)  # what Postfix 3.7 offers (capture)


def pkt(code: bytes, data: bytes = b"") -> bytes:
    """Wire bytes written out by hand, independent of the codec's encoder."""
    return struct.pack(">I", len(data) + 1) + code + data


def u32(*values: int) -> bytes:
    return b"".join(struct.pack(">I", v) for v in values)


# (packet, its wire bytes) for every command the MTA sends.
COMMANDS: list[tuple[m.Command, bytes]] = [
    (m.OptNeg(6, 0x1FF, 0x1FFFFF), pkt(b"O", u32(6, 0x1FF, 0x1FFFFF))),
    (m.Connect("mail.example.org", "4", 40001, "192.0.2.10"),
     pkt(b"C", b"mail.example.org\0" + b"4" + b"\x9c\x41" + b"192.0.2.10\0")),
    (m.Connect("[2001:db8::1]", "6", 25, "2001:db8::1"),
     pkt(b"C", b"[2001:db8::1]\0" + b"6" + b"\x00\x19" + b"2001:db8::1\0")),
    (m.Connect("localhost", "L", 0, "/run/smtp.sock"),
     pkt(b"C", b"localhost\0L\x00\x00/run/smtp.sock\0")),
    (m.Connect("unknown", "U"), pkt(b"C", b"unknown\0U")),
    (m.Helo("mail.example.org"), pkt(b"H", b"mail.example.org\0")),
    (m.Mail(("<alice@example.org>", "SIZE=78305", "BODY=8BITMIME")),
     pkt(b"M", b"<alice@example.org>\0SIZE=78305\0BODY=8BITMIME\0")),
    (m.Mail(("<>",)), pkt(b"M", b"<>\0")),
    (m.Rcpt(("<bob@conf.test>", "NOTIFY=NEVER")), pkt(b"R", b"<bob@conf.test>\0NOTIFY=NEVER\0")),
    (m.Header("Subject", " capture test\n folded"),
     pkt(b"L", b"Subject\0 capture test\n folded\0")),
    (m.Header("X-8bit", "caf\udce9"), pkt(b"L", b"X-8bit\0caf\xe9\0")),  # raw 8-bit survives
    (m.EndOfHeaders(), pkt(b"N")),
    (m.Body(b"Hello.\r\n"), pkt(b"B", b"Hello.\r\n")),
    (m.Body(b"\0\xff binary"), pkt(b"B", b"\0\xff binary")),
    (m.EndOfMessage(), pkt(b"E")),
    (m.EndOfMessage(b"last chunk\r\n"), pkt(b"E", b"last chunk\r\n")),
    (m.Abort(), pkt(b"A")),
    (m.Quit(), pkt(b"Q")),
    (m.QuitNewConnection(), pkt(b"K")),
    (m.Data(), pkt(b"T")),
    (m.Unknown("FOOBAR"), pkt(b"U", b"FOOBAR\0")),
    (m.Macro("C", {"j": "mx.conf.test", "{daemon_name}": "mx.conf.test"}),
     pkt(b"D", b"Cj\0mx.conf.test\0{daemon_name}\0mx.conf.test\0")),
    (m.Macro("H", {}), pkt(b"D", b"H")),
]

REPLIES: list[tuple[m.Reply, bytes]] = [
    (m.OptNegReply(6, 0x133, 0x1406A0), pkt(b"O", u32(6, 0x133, 0x1406A0))),
    (m.OptNegReply(6, 0x100, 0, ((m.SMFIM_CONNECT, "j _"), (m.SMFIM_EOM, "i"))),
     pkt(b"O", u32(6, 0x100, 0) + u32(0) + b"j _\0" + u32(5) + b"i\0")),
    (m.Continue(), pkt(b"c")),
    (m.Accept(), pkt(b"a")),
    (m.Reject(), pkt(b"r")),
    (m.Tempfail(), pkt(b"t")),
    (m.Discard(), pkt(b"d")),
    (m.Progress(), pkt(b"p")),
    (m.Skip(), pkt(b"s")),
    (m.ReplyCode("550 5.7.1 Go away"), pkt(b"y", b"550 5.7.1 Go away\0")),
    (m.AddHeader("X-Spam", " yes"), pkt(b"h", b"X-Spam\0 yes\0")),
    (m.InsertHeader(0, "Authentication-Results", " mx; spf=pass"),
     pkt(b"i", u32(0) + b"Authentication-Results\0 mx; spf=pass\0")),
    (m.ChangeHeader(2, "Subject", " [SPAM] hi"), pkt(b"m", u32(2) + b"Subject\0 [SPAM] hi\0")),
    (m.ChangeHeader(1, "X-Old", ""), pkt(b"m", u32(1) + b"X-Old\0\0")),
    (m.AddRcpt("<archive@conf.test>"), pkt(b"+", b"<archive@conf.test>\0")),
    (m.DelRcpt("<bob@conf.test>"), pkt(b"-", b"<bob@conf.test>\0")),
    (m.Quarantine("looks like spam"), pkt(b"q", b"looks like spam\0")),
    (m.ReplaceBody(b"new body\r\n"), pkt(b"b", b"new body\r\n")),
    (m.ReplaceBody(b"\0\xff raw"), pkt(b"b", b"\0\xff raw")),  # no NUL terminator, any byte
    (m.ReplaceBody(b""), pkt(b"b")),
]


def test_every_command_and_reply_code_is_in_a_table() -> None:
    assert {type(p) for p, _ in COMMANDS} == set(m.COMMANDS.values())
    assert {type(p) for p, _ in REPLIES} == set(m.REPLIES.values())


@pytest.mark.parametrize(("packet", "wire"), COMMANDS, ids=lambda x: type(x).__name__)
def test_command_encodes_and_decodes(packet: m.Command, wire: bytes) -> None:
    assert packet.encode() == wire
    assert m.CommandDecoder().feed(wire) == [packet]


@pytest.mark.parametrize(("packet", "wire"), REPLIES, ids=lambda x: type(x).__name__)
def test_reply_encodes_and_decodes(packet: m.Reply, wire: bytes) -> None:
    assert packet.encode() == wire
    assert m.ReplyDecoder().feed(wire) == [packet]


def test_framing_split_at_every_byte_boundary() -> None:
    stream = b"".join(w for _, w in COMMANDS)
    want = [p for p, _ in COMMANDS]
    for cut in range(len(stream) + 1):
        dec = m.CommandDecoder()
        got = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert got == want, cut
        assert not dec.pending


def test_framing_one_byte_at_a_time() -> None:
    stream = b"".join(w for _, w in COMMANDS)
    dec = m.CommandDecoder()
    got: list[m.Command] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i:i + 1])
        assert dec.pending == (sum(len(w) for w in _prefix_wires(len(got))) < i + 1)
    assert got == [p for p, _ in COMMANDS]


def _prefix_wires(n: int) -> list[bytes]:
    return [w for _, w in COMMANDS[:n]]


def test_largest_allowed_packet_passes() -> None:  # control for the oversize case
    dec = m.CommandDecoder(max_packet=1000)
    (body,) = dec.feed(pkt(b"B", b"x" * 999))
    assert isinstance(body, m.Body) and len(body.chunk) == 999


@pytest.mark.parametrize(("name", "data"), [
    ("one byte too big", pkt(b"B", b"x" * 1000)),
    ("declared only, data never sent", struct.pack(">I", 10**8) + b"B"),
    ("zero length", b"\0\0\0\0"),
    ("unknown command", pkt(b"Z", b"x")),
    ("HTTP garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("connect without NUL", pkt(b"C", b"host4")),
    ("connect with unknown family", pkt(b"C", b"host\0X\0\0addr\0")),
    ("connect truncated port", pkt(b"C", b"host\x004\x01")),
    ("helo with trailing bytes", pkt(b"H", b"a\0b")),
    ("mail without address", pkt(b"M")),
    ("header without value", pkt(b"L", b"Subject\0")),
    ("macro name without value", pkt(b"D", b"Cj\0")),
    ("abort with data", pkt(b"A", b"x")),
    ("optneg too short", pkt(b"O", u32(6, 1))),
])
def test_bad_input_is_a_protocol_error(name: str, data: bytes) -> None:
    dec = m.CommandDecoder(max_packet=1000)
    with pytest.raises(m.MilterProtocolError):
        dec.feed(data)
    with pytest.raises(m.MilterProtocolError):  # and the decoder stays broken
        dec.feed(m.Abort().encode())


def test_packet_bound_has_a_ceiling() -> None:
    assert m.CommandDecoder(m.MAX_PACKET_LIMIT).max_packet == m.MAX_PACKET_LIMIT
    with pytest.raises(ValueError):
        m.CommandDecoder(m.MAX_PACKET_LIMIT + 1)
    with pytest.raises(m.MilterProtocolError):
        m.CommandDecoder(m.MAX_PACKET_LIMIT).feed(struct.pack(">I", m.MAX_PACKET_LIMIT + 1))


def test_partial_packet_is_pending_not_an_error() -> None:
    dec = m.CommandDecoder()
    assert dec.feed(pkt(b"H", b"mail.example.org\0")[:7]) == []
    assert dec.pending


# ---------------------------------------------------------------- reply details


@pytest.mark.parametrize(("args", "text"), [
    ((550, "5.7.1", "Rejected by policy"), "550 5.7.1 Rejected by policy"),
    ((451, "4.7.1", "Try again later"), "451 4.7.1 Try again later"),
    ((550, "5.7.1", "Spam score 100%"), "550 5.7.1 Spam score 100%%"),  # Postfix undoes %%
    ((550, "5.7.1", "line\r\nBcc: injected"), "550 5.7.1 line Bcc: injected"),
    ((550, "5.7.1", "Gr\u00fc\u00dfe\0x"), "550 5.7.1 Gr??e x"),
    ((550, "5.7.1", ["first line", "second line"]),
     "550-5.7.1 first line\r\n550 5.7.1 second line"),
])
def test_reply_code_text(args: tuple[Any, ...], text: str) -> None:
    assert m.ReplyCode.build(*args).text == text


def test_reply_code_lines_are_what_the_client_sees() -> None:
    r = m.ReplyCode.build(550, "5.7.1", ["100% spam", "bye"])
    assert r.lines == ["550-5.7.1 100% spam", "550 5.7.1 bye"]


@pytest.mark.parametrize(("code", "enhanced"), [
    (250, "2.0.0"), (550, "4.7.1"), (451, "5.7.1"), (550, "5.7"), (550, ""), (600, "6.0.0"),
])
def test_reply_code_refuses_what_postfix_calls_malformed(code: int, enhanced: str) -> None:
    with pytest.raises(ValueError):
        m.ReplyCode.build(code, enhanced, "text")


@pytest.mark.parametrize(("name", "value"), [
    ("X Bad", "v"), ("X:Bad", "v"), ("", "v"), ("X-\u00e9", "v"),
    ("X-Ok", "v\nBcc: evil@example.org"), ("X-Ok", "v\rx"), ("X-Ok", "v\0"),
])
def test_header_replies_refuse_injection(name: str, value: str) -> None:
    with pytest.raises(ValueError):
        m.AddHeader(name, value)


def test_header_replies_accept_folding() -> None:  # control
    assert m.AddHeader("X-Ok", " a\n\tb\n c").value == " a\n\tb\n c"
    assert m.InsertHeader(0, "X-Ok", "").index == 0


def test_change_header_index_is_one_based() -> None:
    with pytest.raises(ValueError):
        m.ChangeHeader(0, "Subject", "x")


@pytest.mark.parametrize(("value", "leadspc", "wire"), [
    ("pass", True, " pass"),
    (" pass", True, " pass"),  # brings its own
    ("\tpass", True, "\tpass"),
    ("pass", False, "pass"),  # Postfix adds the space itself
    ("a\r\n\tb", True, " a\n\tb"),
    ("", True, ""),  # empty stays empty (a change to "" deletes)
])
def test_wire_value(value: str, leadspc: bool, wire: str) -> None:
    assert m.wire_value(value, leadspc) == wire


def test_replace_body_packets_split_at_64k() -> None:
    body = bytes(range(256)) * 600  # 153600 bytes: 65535 + 65535 + 22530
    packets = m.replace_body_packets(body)
    assert [len(p.chunk) for p in packets] == [65535, 65535, 22530]
    assert b"".join(p.chunk for p in packets) == body
    wire = b"".join(p.encode() for p in packets)
    assert m.ReplyDecoder().feed(wire) == packets
    assert all(len(p.encode()) <= 65535 + 5 for p in packets)


def test_replace_body_packets_from_a_file_and_small_bodies() -> None:
    body = b"line\r\n" * 20000  # 120000 bytes
    src = io.BytesIO(body)
    packets = m.replace_body_packets(src)
    assert [len(p.chunk) for p in packets] == [65535, 120000 - 65535]
    assert b"".join(p.chunk for p in packets) == body
    assert m.replace_body_packets(b"x\r\n") == [m.ReplaceBody(b"x\r\n")]  # control: one
    assert m.replace_body_packets(b"") == [m.ReplaceBody(b"")]  # empty body still replaces
    with pytest.raises(ValueError):
        m.replace_body_packets(b"x", size=65536)


# ---------------------------------------------------------------- negotiation


def test_negotiate_with_postfix_37() -> None:
    reply = m.negotiate(POSTFIX_OFFER)
    assert reply.version == 6
    assert reply.actions == (m.SMFIF_ADDHDRS | m.SMFIF_CHGHDRS | m.SMFIF_CHGBODY
                             | m.SMFIF_QUARANTINE | m.SMFIF_SETSYMLIST) == 0x133
    assert reply.protocol == m.DEFAULT_PROTOCOL
    assert reply.protocol & m.SMFIP_HDR_LEADSPC
    assert not reply.protocol & (m.SMFIP_NR_CONN | m.SMFIP_NR_HELO | m.SMFIP_NR_MAIL
                                 | m.SMFIP_NR_RCPT | m.SMFIP_NR_BODY | m.SMFIP_RCPT_REJ)
    stages = dict(reply.macros)
    assert set(stages) == {0, 1, 2, 3, 4, 5, 6}  # Postfix sends none for a stage left out
    assert "{client_ptr}" in stages[m.SMFIM_CONNECT].split()
    assert {"{auth_authen}", "{mail_addr}", "i"} <= set(stages[m.SMFIM_ENVFROM].split())
    assert m.ReplyDecoder().feed(reply.encode()) == [reply]


def test_negotiate_masks_with_an_old_mta_offer() -> None:
    old = m.OptNeg(2, m.SMFIF_ADDHDRS | m.SMFIF_CHGBODY | m.SMFIF_ADDRCPT, 0x7F)  # no SETSYMLIST
    reply = m.negotiate(old)
    assert reply.version == 2
    assert reply.actions == m.SMFIF_ADDHDRS | m.SMFIF_CHGBODY  # ADDRCPT offered, not asked
    assert reply.protocol == 0
    assert reply.macros == ()


def test_negotiate_asks_chgbody_only_when_offered() -> None:
    without = m.negotiate(m.OptNeg(6, 0x1FF & ~m.SMFIF_CHGBODY, 0x1FFFFF))
    assert not without.actions & m.SMFIF_CHGBODY
    assert without.actions == 0x131  # the rest unchanged
    assert m.negotiate(POSTFIX_OFFER).actions & m.SMFIF_CHGBODY  # control


def test_negotiate_refuses_version_1() -> None:
    with pytest.raises(m.MilterProtocolError):
        m.negotiate(m.OptNeg(1, 0x1FF, 0))


# ---------------------------------------------------------------- Postfix 3.7 capture replay

_NAMES = {
    "SMFIC_OPTNEG": "O", "SMFIC_MACRO": "D", "SMFIC_CONNECT": "C", "SMFIC_HELO": "H",
    "SMFIC_MAIL": "M", "SMFIC_RCPT": "R", "SMFIC_DATA": "T", "SMFIC_HEADER": "L",
    "SMFIC_EOH": "N", "SMFIC_BODY": "B", "SMFIC_BODYEOB": "E", "SMFIC_ABORT": "A",
    "SMFIC_QUIT": "Q", "SMFIC_UNKNOWN": "U", "SMFIC_QUIT_NC": "K",
}


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def body_chunk(rec: dict[str, Any]) -> bytes:
    """The capture keeps length, head and tail of a body chunk; fill the middle."""
    head, tail = str(rec["head"]).encode(), str(rec["tail"]).encode()
    n = int(rec["length"])
    if n <= len(head):
        return head[:n]
    return head + b"x" * (n - len(head) - len(tail)) + tail


def wire_from_record(rec: dict[str, Any]) -> bytes:
    """Re-encode one captured mta->milter packet from its decoded fields, by hand."""
    code = _NAMES[rec["cmd"]]
    if code == "O":
        data = u32(rec["version"], int(rec["actions"], 16), int(rec["protocol"], 16))
    elif code == "D":
        data = _NAMES[rec["for_cmd"]].encode() + b"".join(
            _s(k) + _s(v) for k, v in rec["macros"].items())
    elif code == "C":
        data = (_s(rec["hostname"]) + rec["family"].encode() + struct.pack(">H", rec["port"])
                + _s(rec["address"]))
    elif code in "HMRU":
        data = b"".join(_s(a) for a in rec["args"])
    elif code == "L":
        data = _s(rec["name"]) + _s(rec["value"])
    elif code == "B":
        data = body_chunk(rec)
    else:
        data = b""
    return pkt(code.encode(), data)


def capture(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (CAPTURE / name).read_text().splitlines()]


def capture_stream(name: str, conn: int) -> tuple[bytes, list[dict[str, Any]]]:
    """All bytes the MTA sent on one captured milter connection, and the records."""
    recs = [r for r in capture(name) if r["conn"] == conn and r["dir"] == "mta->milter"]
    return b"".join(wire_from_record(r) for r in recs), recs


def assert_matches(cmd: m.Command, rec: dict[str, Any]) -> None:
    assert cmd.CODE.decode() == _NAMES[rec["cmd"]]
    match cmd:
        case m.OptNeg():
            assert (cmd.version, hex(cmd.actions), hex(cmd.protocol)) == (
                rec["version"], rec["actions"], rec["protocol"])
        case m.Macro():
            assert cmd.for_command == _NAMES[rec["for_cmd"]]
            assert cmd.macros == rec["macros"]
        case m.Connect():
            assert (cmd.hostname, cmd.family, cmd.port, cmd.address) == (
                rec["hostname"], rec["family"], rec["port"], rec["address"])
        case m.Helo():
            assert [cmd.name] == rec["args"]
        case m.Mail() | m.Rcpt():
            assert list(cmd.args) == rec["args"]
        case m.Unknown():
            assert [cmd.command] == rec["args"]
        case m.Header():
            assert (cmd.name, cmd.value) == (rec["name"], rec["value"])
        case m.Body():
            assert len(cmd.chunk) == rec["length"]
            assert cmd.chunk.startswith(rec["head"].encode())
            assert cmd.chunk.endswith(rec["tail"].encode())


@pytest.mark.parametrize("name", ["milter-A.jsonl", "milter-B.jsonl"])
def test_replay_every_packet_postfix_37_sent(name: str) -> None:
    conns = sorted({r["conn"] for r in capture(name)})
    total = 0
    for conn in conns:
        stream, recs = capture_stream(name, conn)
        dec = m.CommandDecoder()
        got: list[m.Command] = []
        for i in range(0, len(stream), 4093):  # odd-sized reads across packet edges
            got += dec.feed(stream[i:i + 4093])
        assert not dec.pending
        assert len(got) == len(recs)
        for cmd, rec in zip(got, recs, strict=True):
            assert_matches(cmd, rec)
        total += len(got)
    assert total > 60


def _decoded(name: str) -> list[m.Command]:
    out: list[m.Command] = []
    for conn in sorted({r["conn"] for r in capture(name)}):
        out += m.CommandDecoder().feed(capture_stream(name, conn)[0])
    return out


def _headers(name: str) -> dict[str, str]:
    """Headers of the first captured message (first occurrence of each name)."""
    out: dict[str, str] = {}
    for c in _decoded(name):
        if isinstance(c, m.Header):
            out.setdefault(c.name, c.value)
    return out


def test_capture_header_values_without_and_with_leadspc() -> None:
    a, b = _headers("milter-A.jsonl"), _headers("milter-B.jsonl")
    # A: protocol 0, so Postfix ate exactly one space after the colon.
    assert a["Subject"] == "capture test\n folded continuation of subject"  # folded: \n
    assert a["X-No-Space"] == "value-without-space"
    assert a["X-Leading-Spaces"] == "   three extra spaces"
    # B: HDR_LEADSPC, the value is byte-exact (what DKIM simple canonicalization needs).
    assert b["Subject"] == " capture test\n folded continuation of subject"
    assert b["X-No-Space"] == "value-without-space"
    assert b["X-Leading-Spaces"] == "    three extra spaces"
    assert b["X-Capture-A"] == " added by capture milter"  # added by milter A, space re-added


def test_capture_header_added_without_leadspc_has_postfix_add_the_space() -> None:
    # Milter A (no HDR_LEADSPC) sent an 'h' of 36 data bytes; B later saw the value
    # with one leading space: Postfix adds it, so we must not (wire_value(.., False)).
    sent = [r for r in capture("milter-A.jsonl") if r["cmd"] == "h"]
    h = m.AddHeader("X-Capture-A", m.wire_value("added by capture milter", False))
    assert {r["len"] for r in sent} == {len(h.payload())} == {36}


def test_capture_null_sender_unknown_command_and_bodies() -> None:
    cmds = _decoded("milter-A.jsonl")
    mails = [c for c in cmds if isinstance(c, m.Mail)]
    assert [c.address for c in mails] == ["alice@example.org", ""]
    assert mails[0].esmtp_args == ("SIZE=78305", "BODY=8BITMIME")
    assert [c.command for c in cmds if isinstance(c, m.Unknown)] == ["FOOBAR"]
    assert [len(c.chunk) for c in cmds if isinstance(c, m.Body)] == [65535, 12503, 7]
    eoms = [c for c in cmds if isinstance(c, m.EndOfMessage)]
    assert len(eoms) == 2 and all(c.chunk == b"" for c in eoms)  # Postfix: chunk sent apart


def test_capture_optneg_reply_without_macros_is_12_bytes() -> None:
    (rec,) = [r for r in capture("milter-A.jsonl") if r["cmd"] == "O"][:1]
    assert len(m.OptNegReply(6, 0x1FF, 0).payload()) == rec["len"] == 12
