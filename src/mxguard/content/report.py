"""``[content] report_safe``: deliver spam as a report with the original attached.

The milter cannot write a new message, only edit headers and replace the
body, so the wrapped message is built from the one we have:

* top-level headers stay as they are (the X-Spam-* headers and the subject
  tag are added by the caller as usual), except the ones describing the old
  body: ``Content-Type`` becomes ``multipart/mixed; boundary=...``,
  ``MIME-Version`` becomes (or is added as) ``1.0``, and
  ``Content-Transfer-Encoding`` and the other body-describing ``Content-*``
  headers are removed;
* the new body has two parts: a ``text/plain`` note saying why the message
  was classified as spam (score, threshold, rules hit with their
  descriptions) and the original message -- every header as received and the
  body, byte for byte -- as a ``message/rfc822`` attachment.

:func:`build_report_safe` returns the header edits (in the order they must
be applied) and the new body (CRLF line ends). Header values are given
without a leading space; the milter server adds it.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import IO

from mxguard.core.transaction import HeaderChange, Symbol

CRLF = b"\r\n"
READ_CHUNK = 64 * 1024
# Top-level headers that describe the body we replace; Content-Type and
# MIME-Version are rewritten, these go.
BODY_HEADERS = ("content-transfer-encoding", "content-disposition", "content-description",
                "content-id", "content-md5", "content-location", "content-base")
DESCRIPTION_WIDTH = 200


def _printable(text: str) -> str:
    return " ".join("".join(c if " " <= c <= "~" else " " for c in text).split())


def new_boundary() -> str:
    """A boundary no message can contain by chance or by design (random, 128 bits)."""
    return f"=_mxguard_report_{secrets.token_hex(16)}"


def raw_headers(headers: Iterable[tuple[str, str]], headers_exact: bool = True) -> bytes:
    """The header block as received (``Name:value`` CRLF each), like
    ``MilterSession.raw_headers``: byte-exact when ``headers_exact``."""
    out = []
    for name, value in headers:
        if not headers_exact:
            value = " " + value
        out.append((f"{name}:{value}".replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n")
                   .encode("utf-8", "surrogateescape"))
    return b"".join(out)


def report_text(score: float, required: float, symbols: Sequence[Symbol],
                descriptions: Mapping[str, str] | None = None, hostname: str = "") -> str:
    """The explanation part (plain ASCII, CRLF line ends)."""
    where = f" at {_printable(hostname)}" if hostname.strip() else ""
    lines = [
        f"The mail filter{where} judged this message to be spam, so it was",
        "delivered wrapped in this notice. The message itself is attached below",
        "exactly as it arrived; open it only if you know and trust the sender.",
        "If it is wanted mail, please tell your mail administrator so the filter",
        "can be corrected.",
        "",
        f"Spam score:      {score:.1f}",
        f"Spam threshold:  {required:.1f}",
        "",
    ]
    scored = sorted((s for s in symbols if s.score), key=lambda s: (-s.score, s.name))
    if scored:
        lines.append("Rules that matched (points, rule, what it means):")
        width = max(len(s.name) for s in scored)
        for s in scored:
            desc = _printable((descriptions or {}).get(s.name) or s.detail)[:DESCRIPTION_WIDTH]
            lines.append(f"  {s.score:7.1f}  {_printable(s.name):<{width}}  {desc}".rstrip())
    else:
        lines.append("No individual rule scored; the score comes from other checks.")
    return "\r\n".join(lines) + "\r\n"


def header_edits(headers: Sequence[tuple[str, str]], boundary: str) -> list[HeaderChange]:
    """Content-Type -> multipart/mixed, MIME-Version -> 1.0, body headers removed.

    Duplicates are deleted highest occurrence first so the others keep their
    numbers.
    """
    seen: dict[str, list[tuple[int, str]]] = {}  # lower name -> (occurrence, name as sent)
    for name, _value in headers:
        found = seen.setdefault(name.strip().lower(), [])
        found.append((len(found) + 1, name.strip()))
    content_type = f'multipart/mixed;\r\n\tboundary="{boundary}"'
    edits: list[HeaderChange] = []
    for key, value in (("content-type", content_type), ("mime-version", "1.0")):
        found = seen.get(key, [])
        if not found:
            edits.append(HeaderChange.add("MIME-Version" if key == "mime-version"
                                          else "Content-Type", value))
            continue
        edits += [HeaderChange.delete(name, n) for n, name in reversed(found[1:])]
        edits.append(HeaderChange.change(found[0][1], value, 1))
    for key in BODY_HEADERS:
        edits += [HeaderChange.delete(name, n) for n, name in reversed(seen.get(key, []))]
    return edits


def _has_8bit(block: bytes, body: IO[bytes]) -> bool:
    if any(b > 0x7F for b in block):
        return True
    start = body.tell()
    try:
        while chunk := body.read(READ_CHUNK):
            if max(chunk) > 0x7F:
                return True
        return False
    finally:
        body.seek(start)


def write_report_safe(out: IO[bytes], headers: Sequence[tuple[str, str]], body: IO[bytes], *,
                      score: float, required: float, symbols: Sequence[Symbol],
                      descriptions: Mapping[str, str] | None = None, hostname: str = "",
                      headers_exact: bool = True, boundary: str | None = None
                      ) -> list[HeaderChange]:
    """Write the new body to ``out``; return the top-level header edits.

    ``body`` (the original body, CRLF line ends) must be seekable; it is read
    from its current position to its end.
    """
    boundary = boundary or new_boundary()
    original_head = raw_headers(headers, headers_exact)
    cte = "8bit" if _has_8bit(original_head, body) else "7bit"
    delimiter = b"--" + boundary.encode("ascii")
    out.write(b"This is a MIME message: a spam report and the original message as an "
              b"attachment.\r\n")
    out.write(CRLF + delimiter + CRLF)
    out.write(b"Content-Type: text/plain; charset=us-ascii\r\n"
              b"Content-Disposition: inline\r\n"
              b"Content-Description: spam report\r\n"
              b"Content-Transfer-Encoding: 7bit\r\n\r\n")
    out.write(report_text(score, required, symbols, descriptions, hostname).encode("ascii"))
    out.write(CRLF + delimiter + CRLF)
    out.write(b"Content-Type: message/rfc822\r\n"
              b'Content-Disposition: attachment; filename="original-message.eml"\r\n'
              b"Content-Description: the original message, unchanged\r\n"
              b"Content-Transfer-Encoding: " + cte.encode("ascii") + b"\r\n\r\n")
    out.write(original_head + CRLF)
    while chunk := body.read(READ_CHUNK):
        out.write(chunk)
    # The CRLF before a delimiter belongs to the delimiter: the attached
    # message ends exactly where the original body ended.
    out.write(CRLF + delimiter + b"--" + CRLF)
    return header_edits(headers, boundary)


def build_report_safe(headers: Sequence[tuple[str, str]], body: bytes | IO[bytes], *,
                      score: float, required: float, symbols: Sequence[Symbol],
                      descriptions: Mapping[str, str] | None = None, hostname: str = "",
                      headers_exact: bool = True, boundary: str | None = None
                      ) -> tuple[list[HeaderChange], bytes]:
    """(header edits, new body) for a report-safe rewrite of a spam message.

    ``headers``: ``(name, value)`` as the milter received them (with
    ``headers_exact``, values keep their leading whitespace); ``body``: the
    original body, CRLF line ends.
    """
    src = io.BytesIO(body) if isinstance(body, bytes) else body
    out = io.BytesIO()
    edits = write_report_safe(out, headers, src, score=score, required=required,
                              symbols=symbols, descriptions=descriptions, hostname=hostname,
                              headers_exact=headers_exact, boundary=boundary)
    return edits, out.getvalue()


__all__ = ["build_report_safe", "header_edits", "new_boundary", "raw_headers", "report_text",
           "write_report_safe"]
