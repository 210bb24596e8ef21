"""Milter replies (milter -> MTA): one frozen dataclass per packet, build and encode.

Also what keeps a reply acceptable to Postfix: :meth:`ReplyCode.build`,
:func:`check_header`, :func:`wire_value`, :func:`replace_body_packets`.
:data:`REPLIES` maps each reply byte to its class, for
:class:`~mxguard.protocols.milter.ReplyDecoder` (tests playing the MTA).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, ClassVar, Self

from mxguard.protocols.milter_wire import (
    BODY_CHUNK,
    U32,
    VERSION,
    Chunk,
    Packet,
    Reader,
    cstr,
)

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # printable ASCII except ':'



@dataclass(frozen=True, slots=True)
class OptNegReply(Packet):
    """Our negotiation answer; ``macros`` are (SMFIM stage, space-separated names)."""

    CODE: ClassVar[bytes] = b"O"
    version: int = VERSION
    actions: int = 0
    protocol: int = 0
    macros: tuple[tuple[int, str], ...] = ()

    def payload(self) -> bytes:
        head = U32.pack(self.version) + U32.pack(self.actions) + U32.pack(self.protocol)
        return head + b"".join(U32.pack(stage) + cstr(names) for stage, names in self.macros)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        return cstr(self.text)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        return cstr(self.name) + cstr(self.value)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        return U32.pack(self.index) + cstr(self.name) + cstr(self.value)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        return cstr(self.address)

    @classmethod
    def parse(cls, r: Reader) -> Self:
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
        return cstr(self.reason)

    @classmethod
    def parse(cls, r: Reader) -> Self:
        reason = r.string()
        r.end()
        return cls(reason)


@dataclass(frozen=True, slots=True)
class ReplaceBody(Chunk):
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
