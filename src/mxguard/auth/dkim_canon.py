"""DKIM building blocks without I/O: tag lists, canonicalization, body hashing.

* :func:`parse_tag_list` -- RFC 6376 §3.2 tag=value lists (signatures and key
  records). Malformed input raises :class:`TagListError`, a ``ValueError``.
* :func:`canon_header` -- §3.4.1 / §3.4.2 header canonicalization of one
  ``(name, value)`` field, the value as received (everything after the colon,
  folding included). A bare LF in a value is taken as CRLF: Postfix hands
  milters folded headers joined by ``\\n``, on the wire they are CRLF.
* :class:`BodyHasher` -- §3.4.3 / §3.4.4 body canonicalization and hashing fed
  chunk by chunk, so a body never needs to sit in memory. It also counts the
  canonical length, for ``l=``.
* Input helpers shared by signer and verifier: :func:`normalize_headers`
  (``str`` values are UTF-8 with surrogate escapes, as the milter codec gives
  them), :func:`iter_body` (bytes, iterable of chunks or binary file),
  :func:`parse_message` (a whole message file, LF or CRLF), and
  :func:`header_data` -- what a signature's header hash covers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import IO

SIMPLE = "simple"
RELAXED = "relaxed"
CANONICALIZATIONS = (SIMPLE, RELAXED)

_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_BAD_VALUE_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f;]")
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}\Z")
_FWS_CHARS = re.compile(r"[ \t\r\n]+")

_WSP_RUN = re.compile(rb"\t[ \t]*| [ \t]+")  # runs that are not already one SP
_BARE_LF = re.compile(rb"(?<!\r)\n")
_LINE_BREAK = re.compile(rb"\r?\n")
_CRLF = b"\r\n"
_REVERSED_CRLFS = re.compile(rb"(?:\n\r)*")
_EMIT_BLOCK = 1 << 16
_READ_SIZE = 1 << 16
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+\Z")

Header = tuple[bytes, bytes]
HeaderInput = Sequence[tuple[bytes | str, bytes | str]]
BodyInput = bytes | bytearray | memoryview | Iterable[bytes] | IO[bytes]


class TagListError(ValueError):
    """A tag list that does not follow RFC 6376 §3.2."""


def parse_tag_list(text: str) -> dict[str, str]:
    """``"v=1; a=rsa-sha256"`` -> ``{"v": "1", "a": "rsa-sha256"}``.

    Values keep their inner whitespace (unfolded) but lose the whitespace
    around them. Tag names are case-sensitive. Empty specs (``;;``, a trailing
    ``;``) are tolerated; a duplicated tag, a spec without ``=``, a bad tag name
    or a control character in a value raises :class:`TagListError`.
    """
    unfolded = _FOLD.sub("", text)
    if "\r" in unfolded or "\n" in unfolded:
        raise TagListError("line break not followed by whitespace")
    tags: dict[str, str] = {}
    for spec in unfolded.split(";"):
        if not spec.strip(" \t"):
            continue
        name, eq, value = spec.partition("=")
        name = name.strip(" \t")
        if not eq:
            raise TagListError(f"tag {name!r} has no '='")
        if not _TAG_NAME.match(name):
            raise TagListError(f"bad tag name {name!r}")
        if _BAD_VALUE_CHAR.search(value):
            raise TagListError(f"control character in the value of {name}=")
        if name in tags:
            raise TagListError(f"duplicate tag {name}=")
        tags[name] = value.strip(" \t")
    return tags


def decode_base64(value: str) -> bytes:
    """Base64 with folding whitespace removed; raises ``ValueError`` when invalid."""
    compact = _FWS_CHARS.sub("", value)
    if not _B64.match(compact) or len(compact) % 4:
        raise ValueError("invalid base64")
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error as exc:
        raise ValueError("invalid base64") from exc


def decode_qp(value: str) -> str:
    """DKIM-Quoted-Printable (RFC 6376 §2.11), as used by ``i=`` and ``z=``."""
    compact = _FWS_CHARS.sub("", value)
    out = bytearray()
    i = 0
    while i < len(compact):
        ch = compact[i]
        if ch == "=":
            hexpair = compact[i + 1:i + 3]
            if len(hexpair) != 2 or not all(c in "0123456789ABCDEFabcdef" for c in hexpair):
                raise ValueError("bad quoted-printable escape")
            out.append(int(hexpair, 16))
            i += 3
            continue
        out.extend(ch.encode("utf-8", "surrogateescape"))
        i += 1
    return out.decode("utf-8", "surrogateescape")


def split_canonicalization(value: str) -> tuple[str, str]:
    """``c=`` value -> (header, body); ``ValueError`` for unknown algorithms."""
    header, _, body = value.partition("/")
    body = body or SIMPLE
    if header not in CANONICALIZATIONS or body not in CANONICALIZATIONS:
        raise ValueError(f"unknown canonicalization {value!r}")
    return header, body


# ----------------------------------------------------------------- headers


def canon_header(name: bytes, value: bytes, method: str) -> bytes:
    """One header field canonicalized, CRLF-terminated."""
    if method == RELAXED:
        unfolded = _LINE_BREAK.sub(b"", value)
        collapsed = _WSP_RUN.sub(b" ", unfolded).strip(b" ")
        return name.rstrip(b" \t").lower() + b":" + collapsed + _CRLF
    return name + b":" + _BARE_LF.sub(_CRLF, value) + _CRLF


def strip_b_value(value: bytes) -> bytes:
    """The DKIM-Signature value with the ``b=`` value (and its surrounding
    whitespace) removed, as it is hashed (RFC 6376 §3.7)."""
    specs = value.split(b";")
    for i, spec in enumerate(specs):
        name, eq, _ = spec.partition(b"=")
        if eq and _LINE_BREAK.sub(b"", name).strip(b" \t") == b"b":
            specs[i] = name + eq
    return b";".join(specs)


# -------------------------------------------------------------------- body


class BodyCanonicalizer:
    """Incremental body canonicalization (simple or relaxed).

    Output goes to ``sink`` as it becomes final. Held back: a run of empty
    lines (they only count if more content follows) and, for relaxed, the
    trailing whitespace of the current line.
    """

    def __init__(self, method: str, sink: Callable[[bytes], None]) -> None:
        self.relaxed = method == RELAXED
        self.sink = sink
        self.held_lines = 0      # empty lines not yet emitted
        self.mid_line = False    # content of the current line already emitted
        self.partial = b""       # unprocessed tail of the current line
        self.emitted = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self.emitted += len(data)
            self.sink(data)

    def _emit_held(self) -> None:
        while self.held_lines:
            n = min(self.held_lines, _EMIT_BLOCK)
            self._emit(_CRLF * n)
            self.held_lines -= n

    def _canon(self, data: bytes) -> bytes:
        if not self.relaxed:
            return data
        return _WSP_RUN.sub(b" ", data).replace(b" \r\n", _CRLF)

    def update(self, chunk: bytes) -> None:
        data = self.partial + chunk if self.partial else chunk
        end = data.rfind(_CRLF)
        if end >= 0:
            self._lines(self._canon(data[:end + 2]))
            data = data[end + 2:]
        keep = len(data.rstrip(b" \t\r" if self.relaxed else b"\r"))
        if keep:
            self._emit_held()
            self._emit(self._canon(data[:keep]))
            self.mid_line = True
        self.partial = data[keep:]

    def _lines(self, text: bytes) -> None:
        """Complete canonical lines (``text`` ends with CRLF)."""
        if self.mid_line:
            first = text.index(_CRLF) + 2
            self._emit(text[:first])
            self.mid_line = False
            text = text[first:]
        if not text:
            return
        empty = _count_trailing_crlf(text)
        body = text[:len(text) - 2 * empty]
        if not body:
            self.held_lines += empty
            return
        self._emit_held()
        self._emit(body + _CRLF)
        self.held_lines = empty - 1

    def finish(self) -> None:
        tail = self._canon(self.partial)
        if self.relaxed:
            tail = tail.rstrip(b" \t")
        self.partial = b""
        if self.mid_line:
            self._emit(tail + _CRLF)
        elif tail:
            self._emit_held()
            self._emit(tail + _CRLF)
        elif not self.relaxed and not self.emitted:
            self._emit(_CRLF)
        self.mid_line = False
        self.held_lines = 0


def _count_trailing_crlf(text: bytes) -> int:
    """How many CRLF pairs end ``text`` (linear time)."""
    suffix = text[len(text.rstrip(b"\r\n")):]
    match = _REVERSED_CRLFS.match(suffix[::-1])
    return len(match.group()) // 2 if match else 0


class BodyHasher:
    """Canonicalize and hash a body, fed chunk by chunk.

    ``limit`` (``l=``) hashes only that many canonical bytes; ``length`` is
    always the full canonical length.
    """

    def __init__(self, method: str = RELAXED, hash_name: str = "sha256",
                 limit: int | None = None) -> None:
        self.method, self.hash_name, self.limit = method, hash_name, limit
        self._hash = hashlib.new(hash_name)
        self.length = 0
        self._canon = BodyCanonicalizer(method, self._take)
        self._digest: bytes | None = None

    def _take(self, data: bytes) -> None:
        if self.limit is not None and self.length + len(data) > self.limit:
            room = max(self.limit - self.length, 0)
            self._hash.update(data[:room])
        else:
            self._hash.update(data)
        self.length += len(data)

    def update(self, chunk: bytes) -> None:
        if self._digest is not None:
            raise RuntimeError("body hasher already finished")
        if chunk:
            self._canon.update(chunk)

    def digest(self) -> bytes:
        """Finish (idempotent) and return the body hash."""
        if self._digest is None:
            self._canon.finish()
            self._digest = self._hash.digest()
        return self._digest


# ------------------------------------------------------------------- input


def to_bytes(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode("utf-8", "surrogateescape")


def normalize_headers(headers: HeaderInput) -> list[Header]:
    return [(to_bytes(name), to_bytes(value)) for name, value in headers]


def iter_body(body: BodyInput) -> Iterator[bytes]:
    """Chunks of ``body`` (bytes, iterable of bytes or a binary file object)."""
    if isinstance(body, bytes | bytearray | memoryview):
        yield bytes(body)
    elif hasattr(body, "read"):
        while chunk := body.read(_READ_SIZE):
            yield chunk
    else:
        yield from body


def parse_message(raw: bytes) -> tuple[list[Header], bytes]:
    """Split a whole message (LF or CRLF line ends) into header fields and body.

    Line ends become CRLF. Lines of the header section that are not a field
    (an mbox ``From `` line, junk without a colon) are skipped.
    """
    raw = _LINE_BREAK.sub(_CRLF, raw)
    if raw.startswith(_CRLF):
        return [], raw[2:]
    head, sep, body = raw.partition(b"\r\n\r\n")
    headers: list[Header] = []
    for line in head.split(_CRLF):
        if line[:1] in (b" ", b"\t"):
            if headers:
                name, value = headers[-1]
                headers[-1] = (name, value + _CRLF + line)
            continue
        name, colon, value = line.partition(b":")
        if colon and _FIELD_NAME.match(name.rstrip(b" \t")):
            headers.append((name, value))
    return headers, body if sep else b""


# ------------------------------------------------------------ header hash


def select_headers(headers: Sequence[Header], names: Sequence[str]) -> list[Header]:
    """The fields ``names`` picks: for each name the last not yet used instance."""
    slots: dict[bytes, list[int]] = {}
    for i, (name, _) in enumerate(headers):
        slots.setdefault(name.rstrip(b" \t").lower(), []).append(i)
    chosen: list[Header] = []
    for wanted in names:
        found = slots.get(to_bytes(wanted).lower())
        if found:
            chosen.append(headers[found.pop()])
    return chosen


def header_data(headers: Sequence[Header], names: Sequence[str], method: str,
                sig_name: bytes, sig_value: bytes) -> bytes:
    """What a signature covers: the selected fields, then the signature field
    itself with ``b=`` emptied and no final CRLF (RFC 6376 §3.7)."""
    parts = [canon_header(n, v, method) for n, v in select_headers(headers, names)]
    parts.append(canon_header(sig_name, strip_b_value(sig_value), method)[:-2])
    return b"".join(parts)
