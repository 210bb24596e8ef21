"""Milter commands (MTA -> milter): one frozen dataclass per packet, parse and encode.

:data:`COMMANDS` maps each command byte to its class, for
:class:`~mxguard.protocols.milter.CommandDecoder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Self

from mxguard.protocols.milter_wire import (
    U16,
    U32,
    VERSION,
    Chunk,
    MilterProtocolError,
    Packet,
    Reader,
    cstr,
)


@dataclass(frozen=True, slots=True)
class OptNeg(Packet):
    CODE: ClassVar[bytes] = b"O"
    version: int = VERSION
    actions: int = 0
    protocol: int = 0

    def payload(self) -> bytes:
        return U32.pack(self.version) + U32.pack(self.actions) + U32.pack(self.protocol)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        out = cstr(self.hostname) + self.family.encode("ascii")
        if self.family == "U":
            return out
        return out + U16.pack(self.port) + cstr(self.address)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        return cstr(self.name)

    @classmethod
    def parse(cls, r: Reader) -> Self:
        name = r.string()
        r.end()
        return cls(name)


@dataclass(frozen=True, slots=True)
class _Args(Packet):
    """MAIL / RCPT: ``args[0]`` is ``<address>``, then ESMTP parameters."""

    args: tuple[str, ...] = ()

    def payload(self) -> bytes:
        return b"".join(cstr(a) for a in self.args)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        return cstr(self.name) + cstr(self.value)

    @classmethod
    def parse(cls, r: Reader) -> Self:
        name, value = r.string(), r.string()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class EndOfHeaders(Packet):
    CODE: ClassVar[bytes] = b"N"


@dataclass(frozen=True, slots=True)
class Body(Chunk):
    """A body chunk, CRLF line ends, at most 65535 bytes from Postfix."""

    CODE: ClassVar[bytes] = b"B"


@dataclass(frozen=True, slots=True)
class EndOfMessage(Chunk):
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
        return cstr(self.command)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        pairs = b"".join(cstr(k) + cstr(v) for k, v in self.macros.items())
        return self.for_command.encode("ascii") + pairs

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
