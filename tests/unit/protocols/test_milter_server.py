"""The milter server on a loopback port, with the test playing Postfix.

Each behaviour is paired with a control case that must not show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from mxguard.core.transaction import Action, Decision, HeaderChange, HeaderEdit, Stage
from mxguard.protocols import milter as m
from mxguard.server.milter import MilterServer, MilterServerSettings
from mxguard.server.milter_session import (
    BaseMilterHandler,
    MilterAction,
    MilterResult,
    MilterSession,
)
from tests.unit.protocols.test_milter_codec import POSTFIX_OFFER, capture_stream

TIMEOUT = 10.0  # generous bound for a reply that must come; never asserted as a figure


class Recorder(BaseMilterHandler):
    """Continues everywhere; remembers what the session held at each stage."""

    def __init__(self, result: MilterResult | None = None) -> None:
        self.result = result or MilterResult()
        self.seen: list[dict[str, Any]] = []

    def snap(self, stage: str, s: MilterSession) -> None:
        body = s.read_body() if not s.body_on_disk else b""
        self.seen.append({
            "stage": stage, "helo": s.helo, "client": (s.client_address, s.client_port),
            "from": s.mail_from, "rcpts": list(s.rcpts), "headers": list(s.headers),
            "body": body, "queue_id": s.queue_id, "auth": s.auth_user, "macros": s.macros,
            "tx": s.transaction(),
        })

    async def on_helo(self, session: MilterSession) -> MilterResult | None:
        self.snap("helo", session)
        return None

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        self.snap("eom", session)
        return self.result


@contextlib.asynccontextmanager
async def running(handler: Any, **settings: Any) -> AsyncIterator[MilterServer]:
    server = MilterServer(MilterServerSettings(listen="127.0.0.1:0", **settings), handler)
    await server.start()
    try:
        yield server
    finally:
        await server.close(1.0)


NO_REPLY_FLAGS: dict[type, int] = {m.Connect: m.SMFIP_NR_CONN, m.Helo: m.SMFIP_NR_HELO,
                                   m.Mail: m.SMFIP_NR_MAIL, m.Rcpt: m.SMFIP_NR_RCPT,
                                   m.Body: m.SMFIP_NR_BODY}


class Mta:
    """One milter connection as Postfix's smtpd keeps it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = m.ReplyDecoder()
        self.pending: list[m.Reply] = []
        self.protocol = 0  # negotiated: like Postfix, no reply awaited for SMFIP_NR_* stages

    @classmethod
    async def open(cls, server: MilterServer) -> Mta:
        address = server.address
        assert isinstance(address, tuple)
        return cls(*await asyncio.open_connection(*address))

    async def send(self, *packets: m.Packet | bytes) -> None:
        self.writer.write(b"".join(p if isinstance(p, bytes) else p.encode() for p in packets))
        await self.writer.drain()

    async def read(self, count: int) -> list[m.Reply]:
        while len(self.pending) < count:
            data = await asyncio.wait_for(self.reader.read(65536), TIMEOUT)
            if not data:
                raise ConnectionError("milter closed the connection")
            self.pending += self.decoder.feed(data)
        out, self.pending = self.pending[:count], self.pending[count:]
        return out

    async def ask(self, *packets: m.Packet, replies: int = 1) -> list[m.Reply]:
        """Send; read the replies. A stage command the milter negotiated no reply
        for (SMFIP_NR_*) reads nothing and counts as Continue, as Postfix does."""
        await self.send(*packets)
        flag = NO_REPLY_FLAGS.get(type(packets[-1]), 0) if packets else 0
        if self.protocol & flag:
            return [m.Continue()]
        out = await self.read(replies)
        if out and isinstance(out[0], m.OptNegReply):
            self.protocol = out[0].protocol
        return out

    async def stage(self, flag: int, *packets: m.Packet) -> list[m.Reply]:
        return await self.ask(*packets)

    async def until_final(self) -> list[m.Reply]:
        """Replies up to and including the final one of an end-of-message."""
        out: list[m.Reply] = []
        while not out or isinstance(out[-1], m.Progress | m.AddHeader | m.InsertHeader
                                    | m.ChangeHeader | m.Quarantine | m.ReplaceBody):
            out += await self.read(1)
        return out

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), TIMEOUT) == b""
        except ConnectionResetError:
            return True

    async def start(self, helo: str = "mail.example.org") -> m.OptNegReply:
        (neg,) = await self.ask(POSTFIX_OFFER)
        assert isinstance(neg, m.OptNegReply)
        self.protocol = neg.protocol
        assert await self.stage(
            m.SMFIP_NR_CONN, m.Macro("C", {"j": "mx.conf.test", "{daemon_addr}": "127.0.0.1"}),
            m.Connect("mail.example.org", "4", 40001, "192.0.2.10")) == [m.Continue()]
        assert await self.stage(m.SMFIP_NR_HELO, m.Macro("H", {}), m.Helo(helo)) == [
            m.Continue()]
        return neg

    async def envelope(self, sender: str = "<alice@example.org>",
                       rcpts: tuple[str, ...] = ("<bob@conf.test>",)) -> None:
        await self.send(m.Abort())  # Postfix sends it before each MAIL
        assert await self.stage(m.SMFIP_NR_MAIL,
                                m.Macro("M", {"{mail_addr}": sender.strip("<>"),
                                              "{auth_authen}": "alice"}),
                                m.Mail((sender, "SIZE=100"))) == [m.Continue()]
        for i, rcpt in enumerate(rcpts):
            assert await self.stage(m.SMFIP_NR_RCPT,
                                    m.Macro("R", {"i": "QID1", "{rcpt_addr}": rcpt}),
                                    m.Rcpt((rcpt,))) == [m.Continue()], i

    async def content(self, headers: list[tuple[str, str]], body: bytes) -> list[m.Reply]:
        """DATA, headers, body; returns the end-of-message replies."""
        await self.send(m.Macro("T", {"i": "QID1"}), m.Data())  # NR_DATA: no reply
        await self.send(*(m.Header(n, v) for n, v in headers), m.EndOfHeaders())
        for i in range(0, len(body), 65535):
            assert await self.ask(m.Body(body[i:i + 65535])) == [m.Continue()]
        await self.send(m.Macro("E", {"i": "QID1"}), m.EndOfMessage())
        return await self.until_final()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


HEADERS = [("From", " Alice <alice@example.org>"), ("Subject", " hi\n folded"),
           ("X-No-Space", "v"), ("X-Lead", "    four")]


async def test_full_message_flow_and_header_edits_in_order() -> None:
    result = MilterResult(headers=[
        HeaderEdit("Authentication-Results", "mx.conf.test; spf=pass"),
        HeaderEdit("X-Spam-Score", "1.5", op="append"),
        HeaderEdit("Received-SPF", "pass (mx.conf.test)"),
        HeaderChange.change("Subject", "[SPAM] hi", 1),
        HeaderChange.delete("X-No-Space"),
        HeaderChange.insert(3, "X-Mid", " here"),
    ])
    rec = Recorder(result)
    async with running(rec) as server:
        mta = await Mta.open(server)
        neg = await mta.start()
        assert not neg.protocol & m.SMFIP_NR_BODY  # control: skip_large_bodies by default
        await mta.envelope(rcpts=("<bob@conf.test>", "<carol@conf.test>"))
        replies = await mta.content(HEADERS, b"Hello.\r\n")
        await mta.close()
    # Recorder hooks HELO and EOM only: no reply asked for connect, MAIL, RCPT
    assert neg.actions == 0x133 and neg.protocol == (
        m.DEFAULT_PROTOCOL | m.SMFIP_NR_CONN | m.SMFIP_NR_MAIL | m.SMFIP_NR_RCPT)
    assert replies == [
        m.InsertHeader(0, "Authentication-Results", " mx.conf.test; spf=pass"),
        m.AddHeader("X-Spam-Score", " 1.5"),
        m.InsertHeader(1, "Received-SPF", " pass (mx.conf.test)"),  # after the first prepend
        m.ChangeHeader(1, "Subject", " [SPAM] hi"),
        m.ChangeHeader(1, "X-No-Space", ""),  # delete: no space added
        m.InsertHeader(3, "X-Mid", " here"),
        m.Continue(),
    ]
    eom = rec.seen[-1]
    assert eom["headers"] == HEADERS  # raw, in order, leading spaces kept
    assert eom["from"] == "alice@example.org"
    assert eom["rcpts"] == ["bob@conf.test", "carol@conf.test"]
    assert eom["body"] == b"Hello.\r\n"
    assert (eom["queue_id"], eom["auth"]) == ("QID1", "alice")
    assert eom["macros"]["j"] == "mx.conf.test"
    tx = eom["tx"]
    assert (tx.stage, tx.client_address, tx.helo, tx.server_address) == (
        Stage.EOM, "192.0.2.10", "mail.example.org", "127.0.0.1")


async def test_no_edits_means_a_bare_continue() -> None:  # control
    async with running(Recorder()) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        assert await mta.content(HEADERS, b"x\r\n") == [m.Continue()]
        await mta.close()


async def test_raw_headers_are_byte_exact_with_leadspc() -> None:
    rec = Recorder()
    seen: list[list[bytes]] = []

    async def eom(session: MilterSession) -> MilterResult:
        seen.append(session.raw_headers())
        return MilterResult()

    rec.on_end_of_message = eom  # type: ignore[method-assign]
    async with running(rec) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        await mta.content(HEADERS, b"x\r\n")
        await mta.close()
    assert seen[0] == [b"From: Alice <alice@example.org>\r\n", b"Subject: hi\r\n folded\r\n",
                       b"X-No-Space:v\r\n", b"X-Lead:    four\r\n"]


class Slow(BaseMilterHandler):
    """Finishes only when the test says so."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        await self.release.wait()
        return MilterResult(headers=[HeaderEdit("X-Checked", "yes")])


async def test_slow_handler_gets_progress_keepalives() -> None:
    handler = Slow()
    async with running(handler, progress_interval=0.02) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        await mta.send(m.Data(), m.Header("From", " a@b"), m.EndOfHeaders(), m.EndOfMessage())
        assert await mta.read(2) == [m.Progress(), m.Progress()]
        handler.release.set()
        tail = await mta.until_final()
        await mta.close()
    assert tail[-2:] == [m.InsertHeader(0, "X-Checked", " yes"), m.Continue()]
    assert all(r == m.Progress() for r in tail[:-2])


async def test_fast_handler_sends_no_progress() -> None:  # control
    handler = Slow()
    handler.release.set()
    async with running(handler, progress_interval=0.02) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        replies = await mta.content([("From", " a@b")], b"")
        await mta.close()
    assert replies == [m.InsertHeader(0, "X-Checked", " yes"), m.Continue()]


class Broken(BaseMilterHandler):
    def __init__(self, stage: str) -> None:
        self.stage = stage

    async def on_rcpt(self, session: MilterSession) -> MilterResult | None:
        if self.stage == "rcpt":
            raise RuntimeError("store down")
        return None

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        if self.stage == "eom":
            raise RuntimeError("bug")
        return MilterResult()


@pytest.mark.parametrize(("fail_action", "want"), [
    ("tempfail", m.Tempfail()), ("reject", m.Reject()), ("accept", m.Continue()),
])
async def test_handler_raising_at_eom_answers_fail_action(fail_action: str, want: m.Reply,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    async with running(Broken("eom"), fail_action=fail_action) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        assert await mta.content([("From", " a@b")], b"x\r\n") == [want]
        # the connection lives on: a second message is handled
        await mta.envelope()
        await mta.close()
        assert server.stats["handler_errors"] == 1
    assert "handler on_end_of_message failed" in caplog.text


async def test_handler_raising_at_rcpt_tempfails_that_rcpt() -> None:
    async with running(Broken("rcpt")) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.send(m.Abort())
        assert await mta.ask(m.Mail(("<a@b>",))) == [m.Continue()]
        assert await mta.ask(m.Rcpt(("<c@d>",))) == [m.Tempfail()]
        await mta.close()


async def test_handler_not_raising_continues() -> None:  # control
    async with running(Broken("none")) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        assert await mta.content([("From", " a@b")], b"x\r\n") == [m.Continue()]
        await mta.close()
        assert server.stats["handler_errors"] == 0


async def test_handler_returning_the_wrong_type_gets_fail_action() -> None:
    class Wrong(BaseMilterHandler):
        async def on_helo(self, session: MilterSession) -> MilterResult | None:
            return "REJECT"  # type: ignore[return-value]

    async with running(Wrong()) as server:
        mta = await Mta.open(server)
        await mta.ask(POSTFIX_OFFER)
        await mta.ask(m.Connect("h", "U"))
        assert await mta.ask(m.Helo("x")) == [m.Tempfail()]
        await mta.close()


async def test_hung_stage_handler_times_out_to_tempfail() -> None:
    class Hung(BaseMilterHandler):
        async def on_mail(self, session: MilterSession) -> MilterResult | None:
            await asyncio.Event().wait()
            return None

    async with running(Hung(), stage_timeout=0.05) as server:
        mta = await Mta.open(server)
        await mta.start()
        assert await mta.ask(m.Mail(("<a@b>",))) == [m.Tempfail()]
        await mta.close()


async def test_abort_resets_the_message_but_keeps_connect_and_helo() -> None:
    rec = Recorder()
    async with running(rec) as server:
        mta = await Mta.open(server)
        await mta.start(helo="first.example")
        await mta.envelope(sender="<one@example.org>", rcpts=("<x@conf.test>",))
        await mta.send(m.Data(), m.Header("Subject", " one"), m.EndOfHeaders())
        assert await mta.ask(m.Body(b"first body\r\n")) == [m.Continue()]
        await mta.send(m.Abort())  # RSET mid-message
        await mta.envelope(sender="<two@example.org>", rcpts=("<y@conf.test>",))
        await mta.content([("Subject", " two")], b"second body\r\n")
        await mta.close()
    eom = rec.seen[-1]
    assert eom["helo"] == "first.example"
    assert eom["client"] == ("192.0.2.10", 40001)
    assert eom["macros"]["j"] == "mx.conf.test"  # connect macros survive
    assert eom["from"] == "two@example.org"
    assert eom["rcpts"] == ["y@conf.test"]
    assert eom["headers"] == [("Subject", " two")]
    assert eom["body"] == b"second body\r\n"


async def test_two_messages_without_abort_do_not_mix() -> None:  # control: EOM resets too
    rec = Recorder()
    async with running(rec) as server:
        mta = await Mta.open(server)
        await mta.start()
        for n in (1, 2):
            assert await mta.ask(m.Mail((f"<s{n}@example.org>",))) == [m.Continue()]
            assert await mta.ask(m.Rcpt((f"<r{n}@conf.test>",))) == [m.Continue()]
            await mta.content([("Subject", f" m{n}")], f"body {n}\r\n".encode())
        await mta.close()
    assert [(s["from"], s["rcpts"], s["headers"], s["body"]) for s in rec.seen[1:]] == [
        ("s1@example.org", ["r1@conf.test"], [("Subject", " m1")], b"body 1\r\n"),
        ("s2@example.org", ["r2@conf.test"], [("Subject", " m2")], b"body 2\r\n"),
    ]


async def test_quit_new_connection_resets_everything() -> None:
    rec = Recorder()
    async with running(rec) as server:
        mta = await Mta.open(server)
        await mta.start(helo="old.example")
        await mta.send(m.QuitNewConnection())
        assert await mta.ask(m.Connect("[198.51.100.1]", "4", 1, "198.51.100.1")) == [
            m.Continue()]
        assert await mta.ask(m.Mail(("<a@b>",))) == [m.Continue()]
        assert await mta.ask(m.Rcpt(("<c@d>",))) == [m.Continue()]
        await mta.content([("From", " a@b")], b"")
        await mta.close()
    eom = rec.seen[-1]
    assert (eom["helo"], eom["client"]) == ("", ("198.51.100.1", 1))
    assert "j" not in eom["macros"]
    assert eom["tx"].client_name == "unknown"  # Postfix's "[addr]" form


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.0\r\n\r\n",  # length 0x47455420: oversize
    m.frame(b"Z", b"what"),  # unknown command
    m.frame(b"C", b"no-nul"),  # malformed
    m.frame(b"B", b"x" * 2000),  # over max_packet
])
async def test_garbage_closes_that_connection_only(garbage: bytes) -> None:
    async with running(Recorder(), max_packet=1024) as server:
        good = await Mta.open(server)
        await good.start()
        bad = await Mta.open(server)
        await bad.ask(POSTFIX_OFFER)
        await bad.ask(m.Connect("h", "U"))
        await bad.send(garbage)
        assert await bad.closed()
        await good.envelope()  # the other connection is still served
        assert await good.content([("From", " a@b")], b"x\r\n") == [m.Continue()]
        other = await Mta.open(server)  # and new ones are accepted
        await other.start()
        for c in (good, bad, other):
            await c.close()
        assert server.stats["protocol_errors"] == 1


async def test_commands_before_negotiation_close_the_connection() -> None:
    async with running(Recorder()) as server:
        mta = await Mta.open(server)
        await mta.send(m.Helo("x"))
        assert await mta.closed()


class BodyProbe(BaseMilterHandler):
    def __init__(self) -> None:
        self.facts: dict[str, Any] = {}

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        f = session.body_file()
        self.facts = {"on_disk": session.body_on_disk, "size": session.body_size,
                      "sha": hashlib.sha256(f.read()).hexdigest(),
                      "truncated": session.truncated}
        if session.body_on_disk:
            self.facts["file_size"] = os.fstat(f.fileno()).st_size
        return MilterResult()


async def test_big_body_is_spooled_to_disk() -> None:
    body = b"".join(b"line %07d of a big body\r\n" % i for i in range(200_000))
    assert len(body) > 5 * 1024 * 1024
    probe = BodyProbe()
    async with running(probe, max_body_memory=1024 * 1024) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        assert await mta.content([("From", " a@b")], body) == [m.Continue()]
        await mta.close()
    assert probe.facts["on_disk"] is True  # the session holds a file, not bytes
    assert probe.facts["file_size"] == probe.facts["size"] == len(body)
    assert probe.facts["sha"] == hashlib.sha256(body).hexdigest()
    assert probe.facts["truncated"] is False


async def test_small_body_stays_in_memory() -> None:  # control
    probe = BodyProbe()
    async with running(probe, max_body_memory=1024 * 1024) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        await mta.content([("From", " a@b")], b"small\r\n")
        await mta.close()
    assert probe.facts["on_disk"] is False
    assert probe.facts["size"] == 7


class Counting(BodyProbe):
    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        self.runs += 1
        return await super().on_end_of_message(session)


BIG_BODY = b"x" * 65535 * 2
REJECTED = [m.ReplyCode("552 5.3.4 Message size exceeds fixed limit")]
SIZE_LIMITS = dict(max_message_size=100_000)


@pytest.mark.parametrize(("settings", "headers", "body", "replies"), [
    (SIZE_LIMITS, [("From", " a@b")], BIG_BODY, REJECTED),
    (SIZE_LIMITS, [("From", " a@b")], BIG_BODY[:65535], None),  # control: fits
    ({"max_headers": 100}, [("X", "")] * 101, b"hi\r\n", [m.ReplyCode(
        "552 5.3.4 Message header exceeds fixed limit (too many lines)")]),
    ({"max_headers": 100}, [("X", "")] * 100, b"hi\r\n", None),  # control: 100 are fine
    ({"max_header_bytes": 65536}, [("X", " " + "v" * 30000)] * 3, b"hi\r\n", [m.ReplyCode(
        "552 5.3.4 Message header exceeds fixed limit")]),
    ({"max_header_bytes": 65536}, [("X", " " + "v" * 30000)] * 2, b"hi\r\n", None),  # control
    ({**SIZE_LIMITS, "limit_action": "tempfail"}, [("From", " a@b")], BIG_BODY,
     [m.ReplyCode("452 4.3.4 Message size exceeds fixed limit")]),
    ({**SIZE_LIMITS, "limit_action": "accept"}, [("From", " a@b")], BIG_BODY, [m.Continue()]),
])
async def test_message_past_a_limit_gets_limit_action_without_the_handler(
        settings: dict[str, Any], headers: list[tuple[str, str]], body: bytes,
        replies: list[m.Reply] | None, caplog: pytest.LogCaptureFixture) -> None:
    probe = Counting()
    async with running(probe, skip_large_bodies=False, **settings) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        await mta.send(m.Data(), *(m.Header(n, v) for n, v in headers), m.EndOfHeaders(),
                       *(m.Body(body[i:i + 65535]) for i in range(0, len(body), 65535)))
        got = await mta.ask(m.EndOfMessage())
        assert got == (replies or [m.Continue()])
        # the connection keeps serving: the next message is checked as usual
        await mta.envelope()
        assert await mta.content([("From", " a@b")], b"next\r\n") == [m.Continue()]
        await mta.close()
        over = server.stats["over_limit"]
    assert probe.runs == (1 if replies else 2)  # past a limit: the handler is not run
    assert over == (1 if replies else 0)
    assert ("milter.limit_action" in caplog.text) == bool(replies)


async def test_body_past_max_message_size_is_skipped_and_dropped() -> None:
    probe = Counting()
    async with running(probe, max_message_size=100_000) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        await mta.send(m.Data(), m.Header("From", " a@b"), m.EndOfHeaders())
        assert await mta.ask(m.Body(b"x" * 65535)) == [m.Continue()]
        assert await mta.ask(m.Body(b"x" * 65535)) == [m.Skip()]  # Postfix stops sending
        assert await mta.ask(m.EndOfMessage()) == REJECTED
        session = next(iter(server.connections)).session
        assert session.headers == [] and session.body_size == 0  # nothing kept of it
        await mta.close()
    assert probe.runs == 0


@pytest.mark.parametrize(("conns", "shed"), [(6, True), (3, False)])  # control: within budget
async def test_incomplete_packets_of_all_connections_are_bounded(conns: int, shed: bool,
                                                                 caplog: pytest.LogCaptureFixture
                                                                 ) -> None:
    partial = m.LEN.pack(200_001) + b"L" + b"x" * 150_000  # a header packet, never finished
    async with running(Recorder(), max_buffered_total=600_000) as server:
        mtas = []
        for _ in range(conns):
            mta = await Mta.open(server)
            await mta.start()
            await mta.send(partial)
            mtas.append(mta)
        for _ in range(100):
            if server.buffered_total + server.stats["shed"] * 150_005 >= conns * 150_005:
                break
            await asyncio.sleep(0.02)
        assert server.buffered_total <= 600_000
        assert (server.stats["shed"] > 0) == shed
        assert ("milter.max_buffered_total" in caplog.text) == shed
        for _ in range(100):  # the closed ones are gone, the others kept
            if len(server.connections) == conns - server.stats["shed"]:
                break
            await asyncio.sleep(0.02)
        assert len(server.connections) == conns - server.stats["shed"]
        fresh = await Mta.open(server)  # others are served meanwhile
        await fresh.start()
        await fresh.envelope()
        assert await fresh.content([("From", " a@b")], b"hi\r\n") == [m.Continue()]
        for mta in [*mtas, fresh]:
            await mta.close()
        for _ in range(100):
            if not server.connections:
                break
            await asyncio.sleep(0.02)
    assert server.buffered_total == 0  # every byte counted was given back


class Refuser(BaseMilterHandler):
    def __init__(self, result: MilterResult) -> None:
        self.result = result

    async def on_rcpt(self, session: MilterSession) -> MilterResult | None:
        return self.result if session.rcpts[-1] == "bad@conf.test" else None

    async def on_end_of_message(self, session: MilterSession) -> MilterResult:
        return self.result


@pytest.mark.parametrize(("result", "want"), [
    (MilterResult.reject("No such user here", 550, "5.1.1"),
     m.ReplyCode("550 5.1.1 No such user here")),
    (MilterResult.tempfail("Greylisted, 100% sure"),
     m.ReplyCode("451 4.7.1 Greylisted, 100%% sure")),
    (MilterResult.from_decision(Decision(Action.DEFER, 450, "4.2.0", "Try later")),
     m.ReplyCode("450 4.2.0 Try later")),
    (MilterResult(MilterAction.REJECT), m.Reject()),  # control: no custom reply
    (MilterResult(MilterAction.TEMPFAIL), m.Tempfail()),
    (MilterResult(MilterAction.REJECT, Decision(Action.REJECT, 250, "2.0.0", "ok")), m.Reject()),
])
async def test_custom_reply_codes(result: MilterResult, want: m.Reply) -> None:
    async with running(Refuser(result)) as server:
        mta = await Mta.open(server)
        await mta.start()
        assert await mta.ask(m.Mail(("<a@b>",))) == [m.Continue()]
        assert await mta.ask(m.Rcpt(("<good@conf.test>",))) == [m.Continue()]  # control
        assert await mta.ask(m.Rcpt(("<bad@conf.test>",))) == [want]
        assert await mta.content([("From", " a@b")], b"x\r\n") == [want]
        await mta.close()


async def test_quarantine_and_discard_at_end_of_message() -> None:
    for result, want in [
        (MilterResult(MilterAction.QUARANTINE, quarantine_reason="spam score 20"),
         [m.Quarantine("spam score 20"), m.Continue()]),
        (MilterResult(MilterAction.DISCARD), [m.Discard()]),
        (MilterResult(MilterAction.ACCEPT), [m.Accept()]),
    ]:
        async with running(Recorder(result)) as server:
            mta = await Mta.open(server)
            await mta.start()
            await mta.envelope()
            assert await mta.content([("From", " a@b")], b"x\r\n") == want
            await mta.close()


async def test_replace_body_is_sent_in_packets_before_the_final_reply() -> None:
    new = b"replaced\r\n" * 10000  # 100000 bytes: two packets
    for body, action, final in [(new, MilterAction.CONTINUE, m.Continue()),
                                (io.BytesIO(new), MilterAction.ACCEPT, m.Accept())]:
        result = MilterResult(action, headers=[HeaderChange.change("Content-Type", "text/x")],
                              replace_body=body)
        async with running(Recorder(result)) as server:
            mta = await Mta.open(server)
            neg = await mta.start()
            assert neg.actions & m.SMFIF_CHGBODY
            await mta.envelope()
            replies = await mta.content([("From", " a@b"), ("Content-Type", " text/plain")],
                                        b"old\r\n")
            await mta.close()
        assert replies[0] == m.ChangeHeader(1, "Content-Type", " text/x")
        assert [type(r) for r in replies[1:-1]] == [m.ReplaceBody, m.ReplaceBody]
        assert b"".join(r.chunk for r in replies[1:-1] if isinstance(r, m.ReplaceBody)) == new
        assert replies[-1] == final


async def test_replace_body_without_chgbody_is_dropped(caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    rec = Recorder(MilterResult(replace_body=b"new\r\n"))
    async with running(rec) as server:
        mta = await Mta.open(server)
        (neg,) = await mta.ask(m.OptNeg(6, 0x1FF & ~m.SMFIF_CHGBODY, 0x1FFFFF))
        assert isinstance(neg, m.OptNegReply) and not neg.actions & m.SMFIF_CHGBODY
        await mta.ask(m.Connect("h", "U"))
        await mta.ask(m.Mail(("<a@b>",)))
        await mta.send(m.Header("From", " a@b"), m.EndOfHeaders(), m.EndOfMessage())
        assert await mta.until_final() == [m.Continue()]
        await mta.close()
    assert "did not grant CHGBODY" in caplog.text


async def test_no_replace_body_sends_no_body_packet() -> None:  # control
    async with running(Recorder(MilterResult(headers=[HeaderEdit("X-A", "b")]))) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.envelope()
        replies = await mta.content([("From", " a@b")], b"x\r\n")
        await mta.close()
    assert not any(isinstance(r, m.ReplaceBody) for r in replies)
    assert replies[-1] == m.Continue()


async def test_header_edits_without_leadspc_get_no_added_space() -> None:
    rec = Recorder(MilterResult(headers=[HeaderEdit("X-A", "b")]))
    async with running(rec) as server:
        mta = await Mta.open(server)
        (neg,) = await mta.ask(m.OptNeg(6, 0x1FF, 0x1FFFFF & ~m.SMFIP_HDR_LEADSPC))
        assert isinstance(neg, m.OptNegReply) and not neg.protocol & m.SMFIP_HDR_LEADSPC
        await mta.ask(m.Connect("h", "U"))
        await mta.ask(m.Mail(("<a@b>",)))
        await mta.send(m.Header("From", "a@b"), m.EndOfHeaders(), m.EndOfMessage())
        assert await mta.until_final() == [m.InsertHeader(0, "X-A", "b"), m.Continue()]
        await mta.close()


async def test_old_mta_without_no_reply_flags_gets_a_reply_per_header() -> None:
    async with running(Recorder()) as server:
        mta = await Mta.open(server)
        (neg,) = await mta.ask(m.OptNeg(2, 0x3F, 0x7F))
        assert isinstance(neg, m.OptNegReply) and neg.protocol == 0 and neg.macros == ()
        await mta.ask(m.Connect("h", "U"))
        await mta.ask(m.Mail(("<a@b>",)))
        assert await mta.ask(m.Data(), m.Header("From", "a@b"), m.EndOfHeaders(),
                             replies=3) == [m.Continue()] * 3
        await mta.close()


async def test_postfix_37_capture_replayed_through_the_server() -> None:
    rec = Recorder()
    stream, _ = capture_stream("milter-B.jsonl", 5)
    async with running(rec) as server:
        mta = await Mta.open(server)
        mta.writer.write(stream)  # all at once: the server keeps order
        # O, helo, 2 body chunks, eom, body, eom: Recorder does not hook connect,
        # MAIL and RCPT, so the server negotiated no replies for them
        replies = await mta.read(7)
        assert await mta.closed()  # after QUIT
    assert isinstance(replies[0], m.OptNegReply)
    assert replies[1:] == [m.Continue()] * 6
    first, second = rec.seen[1], rec.seen[2]
    assert first["rcpts"] == ["bob@conf.test", "reject-me@conf.test", "carol@conf.test"]
    assert first["queue_id"] == "D021821A862"
    assert ("X-Leading-Spaces", "    three extra spaces") in first["headers"]
    assert ("Subject", " capture test\n folded continuation of subject") in first["headers"]
    assert (second["from"], second["queue_id"]) == ("", "D4C5521A872")
    assert second["macros"]["{client_addr}"] == "192.0.2.10"


async def test_max_connections_refuses_extra() -> None:
    async with running(Recorder(), max_connections=1) as server:
        first = await Mta.open(server)
        await first.start()
        extra = await Mta.open(server)
        assert await extra.closed()
        await first.envelope()  # control: the first one is still served
        await first.close()
        await extra.close()


async def test_idle_connection_is_swept_busy_one_is_not() -> None:
    handler = Slow()
    async with running(handler, idle_timeout=1.0, progress_interval=0.05) as server:
        idle = await Mta.open(server)
        await idle.start()
        busy = await Mta.open(server)
        await busy.start()
        await busy.envelope()
        await busy.send(m.Data(), m.EndOfHeaders(), m.EndOfMessage())
        assert await idle.closed()
        assert await busy.read(1) == [m.Progress()]  # control: still there
        handler.release.set()
        assert (await busy.until_final())[-1] == m.Continue()
        for c in (idle, busy):
            await c.close()


async def test_graceful_close_lets_the_message_in_progress_finish() -> None:
    handler = Slow()
    server = MilterServer(MilterServerSettings(listen="127.0.0.1:0", progress_interval=0.01),
                          handler)
    await server.start()
    mta = await Mta.open(server)
    await mta.start()
    await mta.envelope()
    await mta.send(m.Data(), m.EndOfHeaders(), m.EndOfMessage())
    assert await mta.read(1) == [m.Progress()]
    closing = asyncio.ensure_future(server.close(TIMEOUT))
    await asyncio.sleep(0)
    handler.release.set()
    assert (await mta.until_final())[-1] == m.Continue()
    assert await mta.closed()
    await closing
    await mta.close()


async def test_pipelined_flood_pauses_reading_then_resumes() -> None:
    class Gate(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.open = asyncio.Event()

        async def on_mail(self, session: MilterSession) -> MilterResult | None:
            await self.open.wait()
            return None

    gate = Gate()
    headers = [(f"X-H{i}", f" {'v' * 5000} {i}") for i in range(600)]  # > 64 packets, > 1 MiB
    async with running(gate, max_header_bytes=4 * 1024 * 1024) as server:
        mta = await Mta.open(server)
        await mta.start()
        await mta.send(m.Mail(("<a@b>",)), m.Data(), *(m.Header(n, v) for n, v in headers),
                       m.EndOfHeaders(), m.EndOfMessage())
        (conn,) = server.connections
        for _ in range(1000):  # the worker is stuck in on_mail while packets pile up
            if conn.paused:
                break
            await asyncio.sleep(0.01)
        assert conn.paused
        assert conn.queued_bytes <= 2 * 1024 * 1024  # bounded, not all 3 MB
        gate.open.set()
        assert await mta.read(2) == [m.Continue(), m.Continue()]
        assert not conn.paused
        await mta.close()
    assert gate.seen[-1]["headers"] == headers
