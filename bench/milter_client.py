"""A fake MTA for the milter benchmark: the MTA side of milter protocol 6 as
Postfix 3.7 speaks it, built on mxguard's sans-I/O codec
(:mod:`mxguard.protocols.milter` encodes commands and decodes replies).

What it does like Postfix (``src/milter/milter8.c``):

* offers version 6, actions ``0x1ff``, protocol ``0x1fffff``; honours what the
  milter answers: ``SMFIP_NO*`` events are not sent, ``SMFIP_NR_*`` events get
  no reply awaited, macro lists from the OPTNEG reply replace Postfix's default
  ``milter_*_macros`` (only macros that have a value are sent; macros of an
  event the milter does not want are sent all the same, as Postfix does);
* per SMTP session: OPTNEG, macros + connect, macros + HELO; per message:
  macros + MAIL, macros + RCPT, macros + DATA, one packet per header (value
  with its leading space when ``SMFIP_HDR_LEADSPC`` is negotiated, else
  without; folded lines joined with LF), macros + end-of-headers, body chunks
  of at most 65535 bytes with CRLF line ends, macros + end-of-message, then
  ABORT before the next message on the same connection; QUIT at the end;
* a reply other than continue before end of message ends the message there
  (Postfix sends nothing more for it); ``SMFIR_SKIP`` to a body chunk skips
  the rest of the body; ``SMFIR_PROGRESS`` at end of message is waited past.

Unlike Postfix, commands that get no reply are written together with the next
command that does (one ``write()`` per round trip): the throughput benchmark
measures the milter, not Nagle. Latency through a real Postfix is measured
with a real Postfix.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from mxguard.protocols import milter as m

POSTFIX_ACTIONS = 0x1FF
POSTFIX_PROTOCOL = 0x1FFFFF
BODY_CHUNK = 65535
# Postfix's default milter_*_macros, by the command they come with.
DEFAULT_MACROS: dict[str, str] = {
    "C": "j {daemon_name} {daemon_addr} v _",
    "H": "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    "M": "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} {mail_mailer}",
    "R": "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    "T": "i",
    "N": "i",
    "E": "i",
}
_STAGE_CMD = {m.SMFIM_CONNECT: "C", m.SMFIM_HELO: "H", m.SMFIM_ENVFROM: "M",
              m.SMFIM_ENVRCPT: "R", m.SMFIM_DATA: "T", m.SMFIM_EOH: "N", m.SMFIM_EOM: "E"}
_FINAL = (m.Continue, m.Accept, m.Reject, m.Tempfail, m.Discard, m.ReplyCode, m.Skip)


@dataclass(frozen=True)
class Client:
    """The SMTP client as Postfix describes it to milters."""

    address: str = "127.0.0.1"
    port: int = 40000
    name: str = ""  # "" : unknown (Postfix then sends "[address]")
    helo: str = "client.bench.test"


@dataclass
class Message:
    """A message as the milter sees it, pre-encoded once for reuse."""

    sender: str
    rcpts: Sequence[str]
    headers: list[tuple[str, str]]  # value without the one space after the colon
    raw_headers: list[tuple[str, str]]  # value exactly as after the colon
    body_chunks: list[bytes]
    size: int

    @classmethod
    def parse(cls, raw: bytes, sender: str, rcpts: Sequence[str]) -> Message:
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            head, body = raw, b""
        fields: list[tuple[str, str]] = []
        for line in head.decode("utf-8", "surrogateescape").split("\r\n"):
            if line[:1] in (" ", "\t") and fields:
                name, value = fields[-1]
                fields[-1] = (name, value + "\n" + line)
            elif line:
                name, _, value = line.partition(":")
                fields.append((name, value))
        plain = [(n, v[1:] if v.startswith(" ") else v) for n, v in fields]
        chunks = [body[i:i + BODY_CHUNK] for i in range(0, len(body), BODY_CHUNK)]
        return cls(sender, list(rcpts), plain, fields, chunks, len(raw))


@dataclass
class Outcome:
    """What the milter answered for one message."""

    edits: list[m.Reply] = field(default_factory=list)  # header edits, quarantine ...
    final: m.Reply | None = None
    stage: str = "E"  # command that got the final reply (E: end of message)

    def added(self, name: str) -> list[str]:
        """Values of headers ``name`` added or inserted."""
        low = name.lower()
        return [e.value for e in self.edits
                if isinstance(e, m.AddHeader | m.InsertHeader) and e.name.lower() == low]

    @property
    def delivered(self) -> bool:
        return self.stage == "E" and isinstance(self.final, m.Continue | m.Accept)


class MilterError(Exception):
    """The milter closed the connection or broke the protocol."""


class MilterClient:
    """One milter connection, one message at a time, as one Postfix smtpd process."""

    def __init__(self, target: str, *, queue_prefix: str = "B", timeout: float = 30.0) -> None:
        self.target = target  # "inet:host:port" or "unix:/path"
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.decoder = m.ReplyDecoder(m.MAX_PACKET_LIMIT)
        self.pending: deque[m.Reply] = deque()
        self.out: list[bytes] = []
        self.negotiated: m.OptNegReply | None = None
        self.macro_names: dict[str, list[str]] = {}
        self.queue_prefix = queue_prefix
        self.count = 0
        self.in_message = False

    # -- connection -------------------------------------------------------------

    async def open(self, client: Client) -> m.Reply | None:
        """Connect, negotiate, send connect and HELO. Returns a refusal, or None."""
        kind, _, where = self.target.partition(":")
        if kind == "unix":
            self.reader, self.writer = await asyncio.open_unix_connection(where)
        else:
            host, _, port = where.rpartition(":")
            self.reader, self.writer = await asyncio.open_connection(host, int(port))
        self.writer.write(m.OptNeg(m.VERSION, POSTFIX_ACTIONS, POSTFIX_PROTOCOL).encode())
        reply = await self.reply()
        if not isinstance(reply, m.OptNegReply):
            raise MilterError(f"OPTNEG answered with {reply!r}")
        self.negotiated = reply
        lists = {_STAGE_CMD[stage]: names for stage, names in reply.macros
                 if stage in _STAGE_CMD}
        self.macro_names = {cmd: (lists.get(cmd) or DEFAULT_MACROS[cmd]).split()
                            for cmd in DEFAULT_MACROS}
        self.client = client
        conn_macros = {"j": "mx.bench.test", "{daemon_name}": "smtpd",
                       "{daemon_addr}": "127.0.0.1", "{daemon_port}": "25",
                       "v": "Postfix 3.7.11", "_": f"{client.name or 'unknown'}"
                       f"[{client.address}]", "{client_addr}": client.address,
                       "{client_name}": client.name or "unknown",
                       "{client_ptr}": client.name or "unknown",
                       "{client_port}": str(client.port), "{client_resolve}": "OK"}
        hostname = client.name or f"[{client.address}]"
        for cmd, macros, packet, no, nr in (
                ("C", conn_macros, m.Connect(hostname, "4", client.port, client.address),
                 m.SMFIP_NOCONNECT, m.SMFIP_NR_CONN),
                ("H", {}, m.Helo(client.helo), m.SMFIP_NOHELO, m.SMFIP_NR_HELO)):
            reply = await self.step(cmd, macros, packet, no, nr)
            if reply is not None and not isinstance(reply, m.Continue):
                return reply
        return None

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            self.writer.write(m.Quit().encode())
            self.writer.close()
            await self.writer.wait_closed()
        except (OSError, RuntimeError):  # already closed by the milter
            pass
        self.writer = None

    # -- one message ------------------------------------------------------------

    async def message(self, msg: Message, auth: str = "") -> Outcome:
        """Send one message; ``auth``: SASL login (sets {auth_type}, {auth_authen})."""
        if self.in_message:
            self.out.append(m.Abort().encode())  # Postfix: ABORT before the next message
        self.in_message = True
        self.count += 1
        qid = f"{self.queue_prefix}{self.count:X}"
        sender = msg.sender
        mail = {"i": qid, "{mail_addr}": sender, "{mail_host}": sender.rpartition("@")[2],
                "{mail_mailer}": "smtp"}
        if auth:
            mail.update({"{auth_type}": "PLAIN", "{auth_authen}": auth, "{auth_author}": ""})
        steps: list[tuple[str, dict[str, str], m.Command, int, int]] = [
            ("M", mail, m.Mail((f"<{sender}>",)), m.SMFIP_NOMAIL, m.SMFIP_NR_MAIL)]
        for rcpt in msg.rcpts:
            steps.append(("R", {"i": qid, "{rcpt_addr}": rcpt,
                                "{rcpt_host}": rcpt.rpartition("@")[2], "{rcpt_mailer}": "smtp"},
                          m.Rcpt((f"<{rcpt}>",)), m.SMFIP_NORCPT, m.SMFIP_NR_RCPT))
        steps.append(("T", {"i": qid}, m.Data(), m.SMFIP_NODATA, m.SMFIP_NR_DATA))
        for cmd, macros, packet, no, nr in steps:
            reply = await self.step(cmd, macros, packet, no, nr)
            if reply is not None and not isinstance(reply, m.Continue):
                return Outcome(final=reply, stage=cmd)
        exact = self.has(m.SMFIP_HDR_LEADSPC)
        if not self.has(m.SMFIP_NOHDRS):
            for name, value in (msg.raw_headers if exact else msg.headers):
                reply = await self.step("", {}, m.Header(name, value), 0, m.SMFIP_NR_HDR)
                if reply is not None and not isinstance(reply, m.Continue):
                    return Outcome(final=reply, stage="L")
        reply = await self.step("N", {"i": qid}, m.EndOfHeaders(), m.SMFIP_NOEOH,
                                m.SMFIP_NR_EOH)
        if reply is not None and not isinstance(reply, m.Continue):
            return Outcome(final=reply, stage="N")
        if not self.has(m.SMFIP_NOBODY):
            for chunk in msg.body_chunks:
                reply = await self.step("", {}, m.Body(chunk), 0, m.SMFIP_NR_BODY)
                if isinstance(reply, m.Skip):
                    break
                if reply is not None and not isinstance(reply, m.Continue):
                    return Outcome(final=reply, stage="B")
        self.macros("E", {"i": qid})
        self.out.append(m.EndOfMessage().encode())
        self.flush()
        out = Outcome()
        while True:
            reply = await self.reply()
            if isinstance(reply, m.Progress):
                continue
            if isinstance(reply, _FINAL):
                out.final = reply
                return out
            out.edits.append(reply)

    # -- plumbing ---------------------------------------------------------------

    def has(self, flag: int) -> bool:
        return self.negotiated is not None and bool(self.negotiated.protocol & flag)

    def macros(self, cmd: str, values: dict[str, str]) -> None:
        names = self.macro_names.get(cmd, ())
        sent = {k: values[k] for k in names if values.get(k)}
        if sent:
            self.out.append(m.Macro(cmd, sent).encode())

    async def step(self, cmd: str, macros: dict[str, str], packet: m.Command, no: int,
                   nr: int) -> m.Reply | None:
        """Macros + one command; the reply when one is due, else None (nothing waited).

        Like Postfix, the macros go even when the milter asked not to get the event.
        """
        if cmd:
            self.macros(cmd, macros)
        if no and self.has(no):
            return None
        self.out.append(packet.encode())
        if self.has(nr):
            return None
        self.flush()
        return await self.reply()

    def flush(self) -> None:
        if self.out:
            assert self.writer is not None
            self.writer.write(b"".join(self.out))
            self.out.clear()

    async def reply(self) -> m.Reply:
        assert self.reader is not None
        while not self.pending:
            data = await asyncio.wait_for(self.reader.read(262144), self.timeout)
            if not data:
                raise MilterError("milter closed the connection")
            try:
                self.pending.extend(self.decoder.feed(data))
            except m.MilterProtocolError as exc:
                raise MilterError(str(exc)) from exc
        return self.pending.popleft()
