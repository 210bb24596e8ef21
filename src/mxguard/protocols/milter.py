"""Sendmail milter protocol, version 6 as Postfix speaks it: a sans-I/O codec.

Every packet is a 4-byte big-endian length (command byte included), one
command byte, then data. Strings are NUL-terminated; numbers are 32-bit
(16-bit for the client port) big-endian. The codec turns bytes into one
small frozen dataclass per packet and back -- both directions, so tests can
play the MTA -- and knows nothing about DKIM, SPF or spam.

This module is the codec's public face (``from mxguard.protocols import milter
as m``; ``m.Connect``, ``m.SMFIP_SKIP`` ...): it re-exports the pieces, which
live in :mod:`~mxguard.protocols.milter_wire` (constants, framing, string and
number codecs), :mod:`~mxguard.protocols.milter_commands` (MTA -> milter) and
:mod:`~mxguard.protocols.milter_replies` (milter -> MTA), and holds the stream
decoders and the negotiation:

* :class:`CommandDecoder` / :class:`ReplyDecoder` -- feed bytes, get packets.
  A declared length above ``max_packet`` (at most :data:`MAX_PACKET_LIMIT`), an
  unknown command byte or malformed data raise :class:`MilterProtocolError`;
  the server logs it and closes that connection.
* ``packet.encode()`` -- the wire bytes of any command or reply.
* :func:`negotiate` -- our OPTNEG answer to what the MTA offers.

Facts from Postfix (``src/milter/milter8.c``) and the capture in
``conformance/postfix-3.7-capture``:

* Postfix 3.7 offers actions ``0x1ff`` and protocol flags ``0x1fffff``.
* Without ``SMFIP_HDR_LEADSPC`` Postfix eats one space (not a tab) after the
  colon and re-adds one to headers we add; with it, header values arrive and
  must be sent with their leading whitespace exactly as on the wire. Folded
  header lines are joined with ``\\n`` (no CR).
* A ``SMFIR_REPLYCODE`` text is ``"550 5.7.1 text"`` (multi-line:
  ``"550-5.7.1 a\\r\\n550 5.7.1 b"``). Sendmail uses it as a format string and
  Postfix turns ``%%`` into ``%`` and drops single ``%``: so ``%`` is doubled.
  Postfix also requires the enhanced code's class to match the reply code.
* Header edits and body replacement are only accepted in reply to
  end-of-message. A replacement body (``SMFIR_REPLBODY``, CRLF line ends) may
  be split over several packets of at most 64 KB; Postfix concatenates them.
* Header insert index 0 is the very top (above Postfix's own ``Received:``);
  change index is the 1-based occurrence of that header name.
* If the OPTNEG reply carries any macro list, Postfix sends no macros for the
  stages the list leaves out.

Text is decoded as UTF-8 with ``surrogateescape``: 8-bit header bytes survive
the round trip (``value.encode("utf-8", "surrogateescape")`` is the wire).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, TypeVar

from mxguard.protocols.milter_commands import (
    COMMANDS,
    Abort,
    Body,
    Command,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Macro,
    Mail,
    OptNeg,
    Quit,
    QuitNewConnection,
    Rcpt,
    Unknown,
)
from mxguard.protocols.milter_replies import (
    REPLIES,
    Accept,
    AddHeader,
    AddRcpt,
    ChangeHeader,
    Continue,
    DelRcpt,
    Discard,
    InsertHeader,
    OptNegReply,
    Progress,
    Quarantine,
    Reject,
    ReplaceBody,
    Reply,
    ReplyCode,
    Skip,
    Tempfail,
    check_header,
    replace_body_packets,
    wire_value,
)
from mxguard.protocols.milter_wire import (
    BODY_CHUNK,
    DEFAULT_ACTIONS,
    DEFAULT_MACROS,
    DEFAULT_MAX_PACKET,
    DEFAULT_PROTOCOL,
    LEN,
    MAX_PACKET_LIMIT,
    SMFIF_ADDHDRS,
    SMFIF_ADDRCPT,
    SMFIF_ADDRCPT_PAR,
    SMFIF_CHGBODY,
    SMFIF_CHGFROM,
    SMFIF_CHGHDRS,
    SMFIF_DELRCPT,
    SMFIF_QUARANTINE,
    SMFIF_SETSYMLIST,
    SMFIM_CONNECT,
    SMFIM_DATA,
    SMFIM_ENVFROM,
    SMFIM_ENVRCPT,
    SMFIM_EOH,
    SMFIM_EOM,
    SMFIM_HELO,
    SMFIP_HDR_LEADSPC,
    SMFIP_NOBODY,
    SMFIP_NOCONNECT,
    SMFIP_NODATA,
    SMFIP_NOEOH,
    SMFIP_NOHDRS,
    SMFIP_NOHELO,
    SMFIP_NOMAIL,
    SMFIP_NORCPT,
    SMFIP_NOUNKNOWN,
    SMFIP_NR_BODY,
    SMFIP_NR_CONN,
    SMFIP_NR_DATA,
    SMFIP_NR_EOH,
    SMFIP_NR_HDR,
    SMFIP_NR_HELO,
    SMFIP_NR_MAIL,
    SMFIP_NR_RCPT,
    SMFIP_NR_UNKN,
    SMFIP_RCPT_REJ,
    SMFIP_SKIP,
    VERSION,
    MilterProtocolError,
    Packet,
    Reader,
    frame,
)

# ---------------------------------------------------------------- framing

P = TypeVar("P", bound=Packet)


class PacketDecoder(Generic[P]):
    """Feed bytes, get complete packets. Raises :class:`MilterProtocolError`.

    After an error the decoder stays broken: the connection must be closed.
    """

    def __init__(self, table: Mapping[bytes, type[P]],
                 max_packet: int = DEFAULT_MAX_PACKET) -> None:
        if not 1 <= max_packet <= MAX_PACKET_LIMIT:
            raise ValueError(f"max_packet must be 1..{MAX_PACKET_LIMIT}")
        self.table = table
        self.max_packet = max_packet
        self._buf = bytearray()
        self._error: str | None = None

    @property
    def pending(self) -> bool:
        """True when part of a packet has arrived but not its end."""
        return bool(self._buf)

    @property
    def buffered(self) -> int:
        """Bytes held: the part of a packet that has arrived (at most ``max_packet`` + 4)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[P]:
        if self._error is not None:
            raise MilterProtocolError(self._error)
        self._buf += data
        out: list[P] = []
        try:
            while (packet := self._next()) is not None:
                out.append(packet)
        except MilterProtocolError as exc:
            self._error = str(exc)
            raise
        return out

    def _next(self) -> P | None:
        if len(self._buf) < 4:
            return None
        (length,) = LEN.unpack_from(self._buf)
        if length < 1:
            raise MilterProtocolError("packet of length 0 has no command byte")
        if length > self.max_packet:
            raise MilterProtocolError(f"packet of {length} bytes exceeds {self.max_packet}")
        if len(self._buf) < 4 + length:
            return None
        code, data = bytes(self._buf[4:5]), bytes(self._buf[5:4 + length])
        del self._buf[:4 + length]
        kind = self.table.get(code)
        if kind is None:
            raise MilterProtocolError(f"unknown command {code!r}")
        try:
            return kind.parse(Reader(data))
        except ValueError as exc:
            raise MilterProtocolError(f"bad {kind.__name__}: {exc}") from exc


class CommandDecoder(PacketDecoder[Command]):
    """What the milter reads: commands from the MTA."""

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        super().__init__(COMMANDS, max_packet)


class ReplyDecoder(PacketDecoder[Reply]):
    """What the MTA reads: replies from the milter (used by tests playing Postfix)."""

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        super().__init__(REPLIES, max_packet)


def negotiate(offer: OptNeg, actions: int = DEFAULT_ACTIONS, protocol: int = DEFAULT_PROTOCOL,
              macros: tuple[tuple[int, str], ...] = DEFAULT_MACROS) -> OptNegReply:
    """Our OPTNEG answer: what we want, masked with what the MTA offers.

    Postfix refuses a reply whose actions are not a subset of its offer, so
    masking is required, not polite. Macro lists go only with SETSYMLIST.
    """
    if offer.version < 2:
        raise MilterProtocolError(f"milter protocol version {offer.version} is too old")
    act = actions & offer.actions
    proto = protocol & offer.protocol
    lists = macros if act & SMFIF_SETSYMLIST else ()
    return OptNegReply(min(offer.version, VERSION), act, proto, lists)


__all__ = ["BODY_CHUNK", "COMMANDS", "DEFAULT_ACTIONS", "DEFAULT_MACROS", "DEFAULT_MAX_PACKET",
           "DEFAULT_PROTOCOL", "MAX_PACKET_LIMIT", "REPLIES", "SMFIF_ADDHDRS", "SMFIF_ADDRCPT",
           "SMFIF_ADDRCPT_PAR", "SMFIF_CHGBODY", "SMFIF_CHGFROM", "SMFIF_CHGHDRS", "SMFIF_DELRCPT",
           "SMFIF_QUARANTINE", "SMFIF_SETSYMLIST", "SMFIM_CONNECT", "SMFIM_DATA", "SMFIM_ENVFROM",
           "SMFIM_ENVRCPT", "SMFIM_EOH", "SMFIM_EOM", "SMFIM_HELO", "SMFIP_HDR_LEADSPC",
           "SMFIP_NOBODY", "SMFIP_NOCONNECT", "SMFIP_NODATA", "SMFIP_NOEOH", "SMFIP_NOHDRS",
           "SMFIP_NOHELO", "SMFIP_NOMAIL", "SMFIP_NORCPT", "SMFIP_NOUNKNOWN", "SMFIP_NR_BODY",
           "SMFIP_NR_CONN", "SMFIP_NR_DATA", "SMFIP_NR_EOH", "SMFIP_NR_HDR", "SMFIP_NR_HELO",
           "SMFIP_NR_MAIL", "SMFIP_NR_RCPT", "SMFIP_NR_UNKN", "SMFIP_RCPT_REJ", "SMFIP_SKIP",
           "VERSION", "Abort", "Accept", "AddHeader", "AddRcpt", "Body", "ChangeHeader", "Command",
           "CommandDecoder", "Connect", "Continue", "Data", "DelRcpt", "Discard", "EndOfHeaders",
           "EndOfMessage", "Header", "Helo", "InsertHeader", "Macro", "Mail",
           "MilterProtocolError", "OptNeg", "OptNegReply", "Packet", "PacketDecoder", "Progress",
           "Quarantine", "Quit", "QuitNewConnection", "Rcpt", "Reject", "ReplaceBody", "Reply",
           "ReplyCode", "ReplyDecoder", "Skip", "Tempfail", "Unknown", "check_header", "frame",
           "negotiate", "replace_body_packets", "wire_value"]
