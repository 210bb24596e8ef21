"""MIME parsing for content checks: one pass, bounded, never raises.

:func:`parse_message` turns a raw message (``bytes``) or the milter's
``(headers, body)`` pair into a :class:`ParsedMessage`:

* ``headers`` -- ``(name, value)`` with folding removed and RFC 2047 encoded
  words decoded; ``raw_headers`` -- ``(name, value)`` exactly as received
  (folding kept, ``\\n`` line ends, no decoding);
* ``parts`` -- every text part (:class:`TextPart`) decoded from its transfer
  encoding (base64, quoted-printable) and charset (unknown charsets and broken
  bytes become U+FFFD / cp1252, never an error); HTML is rendered to text
  (``text``) and kept as source (``raw``);
* ``uris`` -- every URI of the text and HTML parts (:class:`Uri`), normalised
  (scheme and host lower-case, obfuscated numeric IPv4 hosts as dotted quads,
  user-info dropped), with the link text of ``<a>`` elements so rules can spot
  a link that shows one domain and goes to another;
* ``attachments`` -- every non-text or named part (:class:`Attachment`):
  file name (RFC 2231 too), content type, decoded size, a magic-bytes kind
  (``pe``, ``zip`` ...) and, for zip archives, the member names (read from the
  central directory only: nothing is decompressed);
* ``truncated`` and ``problems`` -- what the bounds cut and what was broken.

Bounds (bad input, MIME bombs): at most ``max_bytes`` of the message are
read; at most ``max_parts`` MIME entities are decoded; nesting deeper than
:data:`MAX_DEPTH` is not followed; HTML beyond
:data:`~mxguard.content.mime_html.MAX_HTML` characters per part is not
rendered (:mod:`.mime_html`); at most :data:`~mxguard.content.mime_uri.MAX_URIS`
URIs are kept (:mod:`.mime_uri` normalises them). Parsing is
iterative (no recursion), so deep nesting cannot exhaust the stack.

This module is the one contract between content rules and the Bayes
tokenizer: the dataclasses below are a stable API.
"""

from __future__ import annotations

import binascii
import codecs
import io
import re
import urllib.parse
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

from mxguard.content.mime_html import render_html
from mxguard.content.mime_uri import Uri, add_uris, text_uris

MAX_DEPTH = 20  # MIME nesting followed
MAX_ZIP_NAMES = 100  # member names listed per zip attachment
MAX_HEADER_LINE = 65536  # characters of one header value kept
DEFAULT_MAX_PARTS = 1000
DEFAULT_MAX_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TextPart:
    """A decoded ``text/*`` part. ``text`` is what a reader sees (HTML rendered),
    ``raw`` the decoded source (equal to ``text`` for plain text)."""

    content_type: str  # lower case, e.g. "text/plain", "text/html"
    charset: str  # the charset used to decode (after fallbacks)
    text: str
    raw: str
    filename: str = ""

    @property
    def is_html(self) -> bool:
        return self.content_type == "text/html"


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    size: int  # decoded bytes
    magic: str = ""  # kind from the first bytes: pe, elf, zip, rar, 7z, gzip, pdf, ole, iso
    inner_names: tuple[str, ...] = ()  # member names of a zip archive

    @property
    def extension(self) -> str:
        name = self.filename.rstrip(". ").lower()
        return name.rpartition(".")[2] if "." in name else ""


@dataclass(slots=True)
class ParsedMessage:
    headers: list[tuple[str, str]] = field(default_factory=list)
    raw_headers: list[tuple[str, str]] = field(default_factory=list)
    parts: list[TextPart] = field(default_factory=list)
    uris: list[Uri] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    truncated: bool = False
    problems: list[str] = field(default_factory=list)
    size: int = 0  # bytes of the message as given (before truncation)
    entities: int = 0  # MIME entities seen (containers and leaves)
    raw_body: str = ""  # undecoded body (after truncation), latin-1 view of the bytes

    def get(self, name: str) -> list[str]:
        """Decoded values of every header called ``name`` (case-insensitive)."""
        key = name.lower()
        return [v for n, v in self.headers if n.lower() == key]

    def get_raw(self, name: str) -> list[str]:
        key = name.lower()
        return [v for n, v in self.raw_headers if n.lower() == key]

    def first(self, name: str, default: str = "") -> str:
        values = self.get(name)
        return values[0] if values else default

    @property
    def subject(self) -> str:
        return self.first("Subject")

    @property
    def text(self) -> str:
        """All text parts as a reader sees them, one after another."""
        return "\n".join(p.text for p in self.parts)

    @property
    def html_parts(self) -> list[TextPart]:
        return [p for p in self.parts if p.is_html]

    @property
    def full(self) -> str:
        """The whole message as received (headers, blank line, raw body)."""
        head = "".join(f"{n}:{v}\n" if v[:1] in (" ", "\t") else f"{n}: {v}\n"
                       for n, v in self.raw_headers)
        return head + "\n" + self.raw_body


Source = bytes | bytearray | tuple[Sequence[tuple[str, str]], "bytes | IO[bytes]"]


def parse_message(source: Source, *, max_parts: int = DEFAULT_MAX_PARTS,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> ParsedMessage:
    """Parse ``source``: the raw message bytes, or ``(headers, body)`` as the
    milter holds them (header values with ``\\n`` between folded lines; body
    bytes or a binary file positioned anywhere -- it is read from the start)."""
    msg = ParsedMessage()
    try:
        _parse(msg, source, max_parts, max_bytes)
    except Exception as exc:
        msg.problems.append(f"parser error: {type(exc).__name__}")
    return msg


def _parse(msg: ParsedMessage, source: Source, max_parts: int, max_bytes: int) -> None:
    if isinstance(source, bytes | bytearray):
        data = bytes(source)
        msg.size = len(data)
        if len(data) > max_bytes:
            data, msg.truncated = data[:max_bytes], True
        data = data.replace(b"\r\n", b"\n")
        head, body = _split_head(data, msg)
        raw_headers = _header_fields(head, msg)
    else:
        given, body_src = source
        raw_headers = [(n, _unfold_keep(v)) for n, v in given]
        body = _read_body(body_src, max_bytes, msg)
    msg.raw_headers = raw_headers
    msg.headers = [(n, decode_header_value(v)) for n, v in raw_headers]
    msg.raw_body = body.decode("latin-1")
    _walk(msg, raw_headers, body, max_parts)
    if msg.truncated:
        msg.problems.append(f"message larger than {max_bytes} bytes: scanned partially")


def _read_body(src: bytes | IO[bytes], max_bytes: int, msg: ParsedMessage) -> bytes:
    if isinstance(src, bytes | bytearray):
        data = bytes(src)
    else:
        src.seek(0)
        data = src.read(max_bytes + 1)
        src.seek(0, io.SEEK_END)
        msg.size = src.tell()
    msg.size = max(msg.size, len(data))
    if len(data) > max_bytes:
        data, msg.truncated = data[:max_bytes], True
    return data.replace(b"\r\n", b"\n")


# ------------------------------------------------------------------ headers

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def _split_head(data: bytes, msg: ParsedMessage) -> tuple[bytes, bytes]:
    """Header block and body; a line that is no header ends the block."""
    if data.startswith(b"From "):  # mbox separator line
        data = data.partition(b"\n")[2]
    pos = 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        line = data[pos:] if end < 0 else data[pos:end]
        if not line.strip(b"\r"):
            return data[:pos], data[end + 1:] if end >= 0 else b""
        if line[:1] not in (b" ", b"\t") and not _FIELD.match(line):
            if pos:
                msg.problems.append("header block not ended by an empty line")
            return data[:pos], data[pos:]
        if end < 0:
            return data, b""
        pos = end + 1
    return data, b""


def _to_str(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace")


def _header_fields(head: bytes, msg: ParsedMessage) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for line in _to_str(head).split("\n"):
        if line[:1] in (" ", "\t") and out:
            name, value = out[-1]
            if len(value) < MAX_HEADER_LINE:
                out[-1] = (name, value + "\n" + line)
            continue
        name, sep, value = line.partition(":")
        if not sep:
            continue
        out.append((name.strip(), value))
    return out


def _unfold_keep(value: str) -> str:
    return value.replace("\r\n", "\n")


_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)\s+(=\?)")


def _decode_word(match: re.Match[str]) -> str:
    charset, enc, text = match.group(1).partition("*")[0], match.group(2), match.group(3)
    try:
        if enc in "bB":
            raw = binascii.a2b_base64(_fix_b64(text.encode("ascii", "ignore")))
        else:
            raw = binascii.a2b_qp(text.replace("_", " ").encode("ascii", "ignore"), header=True)
    except (binascii.Error, ValueError):
        return match.group(0)
    return decode_bytes(raw, charset)[0]


def decode_header_value(value: str) -> str:
    """Unfold and decode RFC 2047 encoded words; never raises."""
    text = value.replace("\r", "").replace("\n", "").strip()
    if "=?" in text:
        text = _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub(r"\1\2", text))
    return text


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """``text/plain; charset="x"`` -> ("text/plain", {"charset": "x"}), RFC 2231 too."""
    parts = _split_params(value.replace("\n", " "))
    main = parts[0].strip().lower() if parts else ""
    params: dict[str, str] = {}
    continued: dict[str, list[tuple[int, str, bool]]] = {}
    for part in parts[1:]:
        key, sep, val = part.partition("=")
        if not sep:
            continue
        key, val = key.strip().lower(), val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = val[1:-1].replace('\\"', '"')
        m = re.fullmatch(r"([^*]+)\*(?:(\d+)\*?|)", key)
        if m is None:
            params.setdefault(key, val)
            continue
        idx = int(m.group(2)) if m.group(2) else 0
        continued.setdefault(m.group(1), []).append((idx, val, key.endswith("*")))
    for key, pieces in continued.items():
        params[key] = _rfc2231(sorted(pieces))
    return main, params


def _split_params(value: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _rfc2231(pieces: list[tuple[int, str, bool]]) -> str:
    charset = "us-ascii"
    raw = b""
    for n, (_, val, encoded) in enumerate(pieces):
        if encoded:
            if n == 0 and val.count("'") >= 2:
                charset, _, val = val.split("'", 2)
            raw += urllib.parse.unquote_to_bytes(val)
        else:
            raw += val.encode("utf-8", "replace")
    return decode_bytes(raw, charset or "us-ascii")[0]


# ------------------------------------------------------------------ decoding

_CHARSET_ALIASES = {"unknown-8bit": "cp1252", "x-unknown": "cp1252", "unknown": "cp1252",
                    "default": "cp1252", "x-user-defined": "cp1252", "iso-8859-8-i": "iso-8859-8",
                    "ascii": "cp1252", "us-ascii": "cp1252", "ansi_x3.4-1968": "cp1252"}


def decode_bytes(raw: bytes, charset: str) -> tuple[str, str]:
    """(text, charset used). Unknown charsets fall back to UTF-8 then cp1252;
    bytes a charset cannot decode become U+FFFD."""
    name = charset.strip().strip('"').lower()
    name = _CHARSET_ALIASES.get(name, name)
    if name and name != "cp1252":
        try:
            info = codecs.lookup(name)
            if getattr(info, "_is_text_encoding", True):
                return raw.decode(info.name, "replace"), info.name
        except (LookupError, ValueError, TypeError):
            pass
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return raw.decode("cp1252", "replace"), "cp1252"


_B64_JUNK = re.compile(rb"[^A-Za-z0-9+/]")


def _fix_b64(data: bytes) -> bytes:
    data = _B64_JUNK.sub(b"", data.partition(b"=")[0] if b"=" in data else data)
    data = data[: len(data) - len(data) % 4] if len(data) % 4 == 1 else data
    return data + b"=" * (-len(data) % 4)


def decode_transfer(body: bytes, cte: str, msg: ParsedMessage) -> bytes:
    cte = cte.strip().lower()
    if cte == "base64":
        if len(_B64_JUNK.sub(b"", body.partition(b"=")[0])) % 4 == 1:
            msg.problems.append("broken base64")
        try:
            return binascii.a2b_base64(_fix_b64(body))
        except (binascii.Error, ValueError):
            msg.problems.append("broken base64")
            return b""
    if cte == "quoted-printable":
        try:
            return binascii.a2b_qp(body)
        except (binascii.Error, ValueError):
            msg.problems.append("broken quoted-printable")
            return body
    return body


# ------------------------------------------------------------------ structure


def _walk(msg: ParsedMessage, top: list[tuple[str, str]], body: bytes, max_parts: int) -> None:
    """Depth-first over the MIME tree with an explicit stack (no recursion)."""
    stack: list[tuple[list[tuple[str, str]], bytes, int, str]] = [(top, body, 0, "text/plain")]
    while stack:
        headers, data, depth, default_type = stack.pop()
        if msg.entities >= max_parts:
            msg.truncated = True
            msg.problems.append(f"more than {max_parts} MIME parts: the rest not scanned")
            return
        msg.entities += 1
        ctype_value = _field(headers, "content-type")
        ctype, params = header_params(ctype_value) if ctype_value else (default_type, {})
        if "/" not in ctype:
            ctype = "text/plain"
        if ctype.startswith("multipart/"):
            if depth >= MAX_DEPTH:
                msg.problems.append(f"MIME nesting deeper than {MAX_DEPTH}: not followed")
                continue
            children = _split_multipart(data, params.get("boundary", ""), msg)
            if children is None:  # no usable boundary: read it as text
                _leaf(msg, headers, data, "text/plain", {})
                continue
            sub_default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
            for child in reversed(children):
                head, child_body = _split_head(child, msg)
                stack.append((_header_fields(head, msg), child_body, depth + 1, sub_default))
        elif ctype == "message/rfc822" and depth < MAX_DEPTH:
            inner = decode_transfer(data, _field(headers, "content-transfer-encoding"), msg)
            head, inner_body = _split_head(inner, msg)
            stack.append((_header_fields(head, msg), inner_body, depth + 1, "text/plain"))
        else:
            _leaf(msg, headers, data, ctype, params)


def _field(headers: list[tuple[str, str]], name: str) -> str:
    for n, v in headers:
        if n.lower() == name:
            return v
    return ""


def _split_multipart(data: bytes, boundary: str, msg: ParsedMessage) -> list[bytes] | None:
    boundary = boundary.strip()
    if not boundary or len(boundary) > 200:
        msg.problems.append("multipart without a usable boundary")
        return None
    delim = re.compile(rb"^--" + re.escape(boundary.encode("utf-8", "replace")) +
                       rb"(--)?[ \t]*$", re.M)
    parts: list[bytes] = []
    start = -1
    closed = False
    for m in delim.finditer(data):
        if start >= 0:
            parts.append(data[start:max(start, m.start() - 1)])
        start = m.end() + 1
        if m.group(1):
            closed = True
            break
    if start < 0:
        msg.problems.append("multipart boundary never found")
        return None
    if not closed:
        msg.problems.append("multipart without a closing boundary")
        parts.append(data[start:])
    return parts


def _filename(headers: list[tuple[str, str]], params: dict[str, str]) -> tuple[str, bool]:
    disp_value = _field(headers, "content-disposition")
    disp, dparams = header_params(disp_value) if disp_value else ("", {})
    name = dparams.get("filename") or params.get("name") or ""
    return decode_header_value(name), disp == "attachment"


def _leaf(msg: ParsedMessage, headers: list[tuple[str, str]], data: bytes, ctype: str,
          params: dict[str, str]) -> None:
    decoded = decode_transfer(data, _field(headers, "content-transfer-encoding"), msg)
    filename, is_attachment = _filename(headers, params)
    if ctype in ("text/plain", "text/html") or (ctype.startswith("text/") and not filename):
        text, charset = decode_bytes(decoded, params.get("charset", ""))
        if ctype == "text/html":
            rendered = render_html(text, msg)
            msg.parts.append(TextPart(ctype, charset, rendered, text, filename))
        else:
            msg.parts.append(TextPart(ctype, charset, text, text, filename))
            add_uris(msg, text_uris(text))
        if not (filename or is_attachment):
            return
    magic = sniff(decoded)
    inner = _zip_names(decoded) if magic == "zip" else ()
    msg.attachments.append(Attachment(filename, ctype, len(decoded), magic, inner))


_MAGIC = ((b"MZ", "pe"), (b"\x7fELF", "elf"), (b"PK\x03\x04", "zip"), (b"Rar!", "rar"),
          (b"7z\xbc\xaf\x27\x1c", "7z"), (b"\x1f\x8b", "gzip"), (b"%PDF", "pdf"),
          (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "ole"))


def sniff(data: bytes) -> str:
    """The kind of file from its first bytes ('' when unknown)."""
    for prefix, kind in _MAGIC:
        if data.startswith(prefix):
            return kind
    if len(data) > 0x8006 and data[0x8001:0x8006] == b"CD001":
        return "iso"
    return ""


def _zip_names(data: bytes) -> tuple[str, ...]:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return tuple(info.filename for info in zf.infolist()[:MAX_ZIP_NAMES])
    except Exception:
        return ()


# ------------------------------------------------------------------ the body rules see


def rendered_body(msg: ParsedMessage) -> str:
    """The body as SpamAssassin's ``body`` rules see it: the Subject as the
    first line, then each paragraph of every text part on one line (line
    breaks inside a paragraph and runs of white space become one space)."""
    lines = [msg.subject]
    for part in msg.parts:
        for para in re.split(r"\n[ \t\r\f\v\xa0]*\n+", part.text):
            squeezed = " ".join(para.split())
            if squeezed:
                lines.append(squeezed)
    return "\n".join(lines)


# Uri is re-exported: with the dataclasses above it is the parser's stable API.
__all__ = ["Attachment", "ParsedMessage", "TextPart", "Uri", "decode_bytes",
           "decode_header_value", "header_params", "parse_message", "rendered_body", "sniff"]
