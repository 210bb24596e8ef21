"""Milter wire primitives: protocol constants, packet framing, string and number codecs.

The pieces every packet of :mod:`mxguard.protocols.milter` is built from; see
that module for the protocol (and :mod:`~mxguard.protocols.milter_commands` /
:mod:`~mxguard.protocols.milter_replies` for the packets of each direction).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar, Self

VERSION = 6
MAX_PACKET_LIMIT = 64 * 1024 * 1024  # hard ceiling for any declared length
DEFAULT_MAX_PACKET = 256 * 1024  # Postfix: body chunks 65535, headers <= header_size_limit
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

LEN = struct.Struct(">I")
U32 = struct.Struct(">I")
U16 = struct.Struct(">H")


class MilterProtocolError(Exception):
    """The peer broke the protocol; close the connection."""


def frame(code: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte included), command byte, data."""
    return LEN.pack(len(data) + 1) + code + data


def _enc(text: str) -> bytes:
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"NUL byte in milter string {text[:40]!r}")
    return raw


def cstr(text: str) -> bytes:
    return _enc(text) + b"\0"


def _dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class Reader:
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
        return int(self._unpack(U32))

    def u16(self) -> int:
        return int(self._unpack(U16))

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
    def parse(cls, r: Reader) -> Self:
        r.end()
        return cls()

    def encode(self) -> bytes:
        return frame(self.CODE, self.payload())


@dataclass(frozen=True, slots=True)
class Chunk(Packet):
    """A packet whose data is raw bytes: body pieces, both ways."""

    chunk: bytes = b""

    def payload(self) -> bytes:
        return self.chunk

    @classmethod
    def parse(cls, r: Reader) -> Self:
        return cls(r.rest())
