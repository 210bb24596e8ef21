"""Sendmail milter protocol, version 6 as Postfix speaks it: a sans-I/O codec.

Every packet is a 4-byte big-endian length (command byte included), one
command byte, then data. Strings are NUL-terminated; numbers are 32-bit
(16-bit for the client port) big-endian. This module turns bytes into one
small frozen dataclass per packet and back -- both directions, so tests can
play the MTA -- and knows nothing about DKIM, SPF or spam.

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

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, ClassVar, Generic, Self, TypeVar

VERSION = 6
MAX_PACKET_LIMIT = 64 * 1024 * 1024  # hard ceiling for any declared length
DEFAULT_MAX_PACKET = 1024 * 1024  # Postfix: body chunks 65535, headers <= header_size_limit
BODY_CHUNK = 65535  # largest body piece per packet, both ways (libmilter MILTER_CHUNK_SIZE)

# Actions the milter may request (SMFIF_*).
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100

# Protocol flags (SMFIP_*): events the MTA may leave out, replies we won't send.
SMFIP_NOCONNECT = 1 << 0
SMFIP_NOHELO = 1 << 1
SMFIP_NOMAIL = 1 << 2
SMFIP_NORCPT = 1 << 3
SMFIP_NOBODY = 1 << 4
SMFIP_NOHDRS = 1 << 5
SMFIP_NOEOH = 1 << 6
SMFIP_NR_HDR = 1 << 7
SMFIP_NOUNKNOWN = 1 << 8
SMFIP_NODATA = 1 << 9
SMFIP_SKIP = 1 << 10
SMFIP_RCPT_REJ = 1 << 11
SMFIP_NR_CONN = 1 << 12
SMFIP_NR_HELO = 1 << 13
SMFIP_NR_MAIL = 1 << 14
SMFIP_NR_RCPT = 1 << 15
SMFIP_NR_DATA = 1 << 16
SMFIP_NR_UNKN = 1 << 17
SMFIP_NR_EOH = 1 << 18
SMFIP_NR_BODY = 1 << 19
SMFIP_HDR_LEADSPC = 1 << 20

# Macro list stages in the OPTNEG reply (SMFIM_*). Note EOM (5) < EOH (6).
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

# What we ask for. Actions: header edits, body replacement ([content] report_safe),
# quarantine, our own macro lists.
DEFAULT_ACTIONS = (SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_CHGBODY | SMFIF_QUARANTINE
                   | SMFIF_SETSYMLIST)
# Protocol: exact header values; SKIP understood; no reply for the stages that
# have no hook (DATA, headers, EOH) and no UNKNOWN events at all. Body chunks
# keep their reply so we can answer SMFIR_SKIP past max_message_size.
DEFAULT_PROTOCOL = (SMFIP_HDR_LEADSPC | SMFIP_SKIP | SMFIP_NR_HDR | SMFIP_NR_EOH
                    | SMFIP_NR_DATA | SMFIP_NOUNKNOWN | SMFIP_NR_UNKN)
DEFAULT_MACROS: tuple[tuple[int, str], ...] = (
    (SMFIM_CONNECT, "j {daemon_name} {daemon_addr} {daemon_port} {client_addr} "
                    "{client_name} {client_ptr} {client_port} {client_resolve} _ v"),
    (SMFIM_HELO, "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}"),
    (SMFIM_ENVFROM, "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                    "{mail_mailer}"),
    (SMFIM_ENVRCPT, "i {rcpt_addr} {rcpt_host} {rcpt_mailer}"),
    (SMFIM_DATA, "i"),
    (SMFIM_EOH, "i"),
    (SMFIM_EOM, "i {msg_id}"),  # {msg_id}: Sendmail only; Postfix skips unknown names
)

_LEN = struct.Struct(">I")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII except ':'


class MilterProtocolError(Exception):
    """The peer broke the protocol; close the connection."""


def frame(code: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte included), command byte, data."""
    return _LEN.pack(len(data) + 1) + code + data


def _enc(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"NUL byte in milter string {text[:40]!r}")
    return raw


def _cstr(text: str) -> bytes:
    return _enc(text) + b"\0"


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class _Reader:
    """Cursor over one packet's data; every short read is a protocol error."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def string(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise MilterProtocolError("string without NUL terminator")
        text = _dec(self.data[self.pos:end])
        self.pos = end + 1
        return text

    def strings(self) -> list[str]:
        """NUL-terminated strings up to the end of the packet (one split in C)."""
        if self.done:
            return []
        rest = self.data[self.pos:]
        if not rest.endswith(b"\0"):
            raise MilterProtocolError("string without NUL terminator")
        self.pos = len(self.data)
        return [_dec(item) for item in rest[:-1].split(b"\0")]

    def u32(self) -> int:
        return int(self._unpack(_U32))

    def u16(self) -> int:
        return int(self._unpack(_U16))

    def _unpack(self, fmt: struct.Struct) -> int:
        if self.pos + fmt.size > len(self.data):
            raise MilterProtocolError("packet too short")
        (value,) = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return int(value)

    def byte(self) -> str:
        if self.pos >= len(self.data):
            raise MilterProtocolError("packet too short")
        self.pos += 1
        return chr(self.data[self.pos - 1])

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def end(self) -> None:
        if not self.done:
            raise MilterProtocolError(f"{len(self.data) - self.pos} unexpected trailing bytes")


@dataclass(frozen=True, slots=True)
class Packet:
    """Base of every command and reply: ``CODE`` plus data."""

    CODE: ClassVar[bytes] = b""

    def payload(self) -> bytes:
        return b""

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        r.end()
        return cls()

    def encode(self) -> bytes:
        return frame(self.CODE, self.payload())


# ---------------------------------------------------------------- commands (MTA -> milter)


@dataclass(frozen=True, slots=True)
class OptNeg(Packet):
    CODE: ClassVar[bytes] = b"O"
    version: int = VERSION
    actions: int = 0
    protocol: int = 0

    def payload(self) -> bytes:
        return _U32.pack(self.version) + _U32.pack(self.actions) + _U32.pack(self.protocol)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        out = cls(r.u32(), r.u32(), r.u32())
        r.rest()  # later protocol versions may append data; ignore it
        return out


@dataclass(frozen=True, slots=True)
class Connect(Packet):
    """Client connection. ``family``: '4', '6', 'L' (unix) or 'U' (unknown: no port/address)."""

    CODE: ClassVar[bytes] = b"C"
    hostname: str = ""
    family: str = "U"
    port: int = 0
    address: str = ""

    def payload(self) -> bytes:
        out = _cstr(self.hostname) + self.family.encode("ascii")
        if self.family == "U":
            return out
        return out + _U16.pack(self.port) + _cstr(self.address)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        hostname, family = r.string(), r.byte()
        if family == "U":
            r.end()
            return cls(hostname, family)
        if family not in "46L":
            raise MilterProtocolError(f"unknown address family {family!r}")
        port, address = r.u16(), r.string()
        r.end()
        return cls(hostname, family, port, address)


@dataclass(frozen=True, slots=True)
class Helo(Packet):
    CODE: ClassVar[bytes] = b"H"
    name: str = ""

    def payload(self) -> bytes:
        return _cstr(self.name)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        name = r.string()
        r.end()
        return cls(name)


@dataclass(frozen=True, slots=True)
class _Args(Packet):
    """MAIL / RCPT: ``args[0]`` is ``<address>``, then ESMTP parameters."""

    args: tuple[str, ...] = ()

    def payload(self) -> bytes:
        return b"".join(_cstr(a) for a in self.args)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        args = tuple(r.strings())
        if not args:
            raise MilterProtocolError(f"{cls.__name__} without an address")
        return cls(args)

    @property
    def address(self) -> str:
        """The address without one pair of angle brackets; ``""`` for ``<>``."""
        addr = self.args[0] if self.args else ""
        if addr.startswith("<") and addr.endswith(">"):
            return addr[1:-1]
        return addr

    @property
    def esmtp_args(self) -> tuple[str, ...]:
        return self.args[1:]


@dataclass(frozen=True, slots=True)
class Mail(_Args):
    CODE: ClassVar[bytes] = b"M"


@dataclass(frozen=True, slots=True)
class Rcpt(_Args):
    CODE: ClassVar[bytes] = b"R"


@dataclass(frozen=True, slots=True)
class Header(Packet):
    """One header as the MTA sends it: folded lines joined by ``\\n``."""

    CODE: ClassVar[bytes] = b"L"
    name: str = ""
    value: str = ""

    def payload(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        name, value = r.string(), r.string()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class EndOfHeaders(Packet):
    CODE: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class _Chunk(Packet):
    chunk: bytes = b""

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        return cls(r.rest())


@dataclass(frozen=True, slots=True)
class Body(_Chunk):
    """A body chunk, CRLF line ends, at most 65535 bytes from Postfix."""

    CODE: ClassVar[bytes] = b"B"


@dataclass(frozen=True, slots=True)
class EndOfMessage(_Chunk):
    """End of body; Sendmail may attach a last chunk, Postfix sends it empty."""

    CODE: ClassVar[bytes] = b"E"


@dataclass(frozen=True, slots=True)
class Abort(Packet):
    CODE: ClassVar[bytes] = b"A"


@dataclass(frozen=True, slots=True)
class Quit(Packet):
    CODE: ClassVar[bytes] = b"Q"


@dataclass(frozen=True, slots=True)
class QuitNewConnection(Packet):
    CODE: ClassVar[bytes] = b"K"


@dataclass(frozen=True, slots=True)
class Data(Packet):
    CODE: ClassVar[bytes] = b"T"


@dataclass(frozen=True, slots=True)
class Unknown(Packet):
    CODE: ClassVar[bytes] = b"U"
    command: str = ""

    def payload(self) -> bytes:
        return _cstr(self.command)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        command = r.string()
        r.end()
        return cls(command)


@dataclass(frozen=True, slots=True)
class Macro(Packet):
    """Macros for the next command ``for_command`` (its code, e.g. ``"C"``)."""

    CODE: ClassVar[bytes] = b"D"
    for_command: str = "C"
    macros: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        pairs = b"".join(_cstr(k) + _cstr(v) for k, v in self.macros.items())
        return self.for_command.encode("ascii") + pairs

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        for_command = r.byte()
        items = r.strings()
        if len(items) % 2:
            raise MilterProtocolError("macro name without value")
        return cls(for_command, dict(zip(items[::2], items[1::2], strict=True)))


Command = (OptNeg | Connect | Helo | Mail | Rcpt | Header | EndOfHeaders | Body | EndOfMessage
           | Abort | Quit | QuitNewConnection | Data | Unknown | Macro)
COMMANDS: dict[bytes, type[Command]] = {c.CODE: c for c in (
    OptNeg, Connect, Helo, Mail, Rcpt, Header, EndOfHeaders, Body, EndOfMessage, Abort, Quit,
    QuitNewConnection, Data, Unknown, Macro)}


# ---------------------------------------------------------------- replies (milter -> MTA)


@dataclass(frozen=True, slots=True)
class OptNegReply(Packet):
    """Our negotiation answer; ``macros`` are (SMFIM stage, space-separated names)."""

    CODE: ClassVar[bytes] = b"O"
    version: int = VERSION
    actions: int = 0
    protocol: int = 0
    macros: tuple[tuple[int, str], ...] = ()

    def payload(self) -> bytes:
        head = _U32.pack(self.version) + _U32.pack(self.actions) + _U32.pack(self.protocol)
        return head + b"".join(_U32.pack(stage) + _cstr(names) for stage, names in self.macros)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        version, actions, protocol = r.u32(), r.u32(), r.u32()
        macros: list[tuple[int, str]] = []
        while not r.done:
            macros.append((r.u32(), r.string()))
        return cls(version, actions, protocol, tuple(macros))


@dataclass(frozen=True, slots=True)
class Continue(Packet):
    CODE: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class Accept(Packet):
    CODE: ClassVar[bytes] = b"a"


@dataclass(frozen=True, slots=True)
class Reject(Packet):
    CODE: ClassVar[bytes] = b"r"


@dataclass(frozen=True, slots=True)
class Tempfail(Packet):
    CODE: ClassVar[bytes] = b"t"


@dataclass(frozen=True, slots=True)
class Discard(Packet):
    CODE: ClassVar[bytes] = b"d"


@dataclass(frozen=True, slots=True)
class Progress(Packet):
    CODE: ClassVar[bytes] = b"p"


@dataclass(frozen=True, slots=True)
class Skip(Packet):
    CODE: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class ReplyCode(Packet):
    """A custom SMTP reply in wire form (``%`` doubled); build it with :meth:`build`."""

    CODE: ClassVar[bytes] = b"y"
    text: str = ""

    def payload(self) -> bytes:
        return _cstr(self.text)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        text = r.string()
        r.end()
        return cls(text)

    @classmethod
    def build(cls, code: int, enhanced: str, text: str | Sequence[str]) -> ReplyCode:
        """``build(550, "5.7.1", "No")``; a list of lines gives a multi-line reply.

        Text is made one ASCII line each (CR, LF, NUL become spaces, others ``?``).
        """
        if not 400 <= code <= 599:
            raise ValueError(f"milter reply code must be 4xx or 5xx, not {code}")
        if not _ENHANCED.fullmatch(enhanced) or enhanced[0] != str(code)[0]:
            raise ValueError(f"enhanced code {enhanced!r} does not fit reply code {code}")
        lines = [text] if isinstance(text, str) else list(text) or [""]
        cleaned = [" ".join(line.replace("\0", " ").split()).replace("%", "%%")
                   .encode("ascii", "replace").decode("ascii") for line in lines]
        last = len(cleaned) - 1
        return cls("\r\n".join(f"{code}{' ' if i == last else '-'}{enhanced} {line}"
                               for i, line in enumerate(cleaned)))

    @property
    def lines(self) -> list[str]:
        """The reply lines as the SMTP client will see them (``%%`` undone)."""
        return [line.replace("%%", "%") for line in self.text.split("\r\n")]


def check_header(name: str, value: str) -> None:
    """Refuse a header Postfix would reject or that would smuggle in another header."""
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"bad header name {name!r}")
    if "\0" in value or "\r" in value.replace("\r\n", ""):
        raise ValueError(f"NUL or bare CR in value of header {name}")
    lines = value.replace("\r\n", "\n").split("\n")
    if any(line[:1] not in (" ", "\t") for line in lines[1:]):
        raise ValueError(f"header {name}: a folded line must start with a space or tab")


def wire_value(value: str, leading_space: bool) -> str:
    """A header value for an add/insert/change reply.

    Folding uses ``\\n``; with ``SMFIP_HDR_LEADSPC`` negotiated Postfix adds no
    space after the colon, so we add one unless the value brings its own.
    """
    value = value.replace("\r\n", "\n")
    if leading_space and value and value[0] not in " \t":
        return " " + value
    return value


@dataclass(frozen=True, slots=True)
class _HeaderReply(Packet):
    name: str = ""
    value: str = ""

    def __post_init__(self) -> None:
        check_header(self.name, self.value)

    def payload(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        name, value = r.string(), r.string()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class AddHeader(_HeaderReply):
    """Append a header at the end of the header block."""

    CODE: ClassVar[bytes] = b"h"


@dataclass(frozen=True, slots=True)
class _IndexedHeaderReply(Packet):
    index: int = 0
    name: str = ""
    value: str = ""

    def __post_init__(self) -> None:
        check_header(self.name, self.value)
        if not 0 <= self.index < 2**31:
            raise ValueError(f"header index {self.index} out of range")

    def payload(self) -> bytes:
        return _U32.pack(self.index) + _cstr(self.name) + _cstr(self.value)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        index, name, value = r.u32(), r.string(), r.string()
        r.end()
        return cls(index, name, value)


@dataclass(frozen=True, slots=True)
class InsertHeader(_IndexedHeaderReply):
    """Insert at 0-based ``index`` (0: top, above Postfix's own Received:)."""

    CODE: ClassVar[bytes] = b"i"


@dataclass(frozen=True, slots=True)
class ChangeHeader(_IndexedHeaderReply):
    """Replace the ``index``-th (1-based) header called ``name``; empty value deletes it."""

    CODE: ClassVar[bytes] = b"m"

    def __post_init__(self) -> None:
        _IndexedHeaderReply.__post_init__(self)
        if self.index < 1:
            raise ValueError("change header index is 1-based")


@dataclass(frozen=True, slots=True)
class _AddressReply(Packet):
    address: str = ""

    def payload(self) -> bytes:
        return _cstr(self.address)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        address = r.string()
        r.end()
        return cls(address)


@dataclass(frozen=True, slots=True)
class AddRcpt(_AddressReply):
    CODE: ClassVar[bytes] = b"+"


@dataclass(frozen=True, slots=True)
class DelRcpt(_AddressReply):
    CODE: ClassVar[bytes] = b"-"


@dataclass(frozen=True, slots=True)
class Quarantine(Packet):
    """Put the message on hold (Postfix: hold queue); not a final reply."""

    CODE: ClassVar[bytes] = b"q"
    reason: str = ""

    def payload(self) -> bytes:
        return _cstr(self.reason)

    @classmethod
    def parse(cls, r: _Reader) -> Self:
        reason = r.string()
        r.end()
        return cls(reason)


@dataclass(frozen=True, slots=True)
class ReplaceBody(_Chunk):
    """One piece of the new body (CRLF line ends); several packets are concatenated.

    Build them with :func:`replace_body_packets`; needs ``SMFIF_CHGBODY``.
    """

    CODE: ClassVar[bytes] = b"b"


def replace_body_packets(body: bytes | IO[bytes], size: int = BODY_CHUNK) -> list[ReplaceBody]:
    """The new body as ``SMFIR_REPLBODY`` packets of at most ``size`` bytes each.

    A file is read from where it stands to its end. An empty body is one
    empty packet (the MTA still replaces the body, with nothing).
    """
    if not 1 <= size <= BODY_CHUNK:
        raise ValueError(f"body chunk size must be 1..{BODY_CHUNK}")
    if isinstance(body, bytes | bytearray | memoryview):
        data = bytes(body)
        out = [ReplaceBody(data[i:i + size]) for i in range(0, len(data), size)]
    else:
        out = []
        while piece := body.read(size):
            out.append(ReplaceBody(bytes(piece)))
    return out or [ReplaceBody(b"")]


Reply = (OptNegReply | Continue | Accept | Reject | Tempfail | Discard | Progress | Skip
         | ReplyCode | AddHeader | InsertHeader | ChangeHeader | AddRcpt | DelRcpt | Quarantine
         | ReplaceBody)
REPLIES: dict[bytes, type[Reply]] = {c.CODE: c for c in (
    OptNegReply, Continue, Accept, Reject, Tempfail, Discard, Progress, Skip, ReplyCode,
    AddHeader, InsertHeader, ChangeHeader, AddRcpt, DelRcpt, Quarantine, ReplaceBody)}


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
        (length,) = _LEN.unpack_from(self._buf)
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
            return kind.parse(_Reader(data))
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
