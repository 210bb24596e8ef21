"""report_safe: the new body (report + original as message/rfc822) and the
top-level header edits, checked with the standard library's MIME parser."""

from __future__ import annotations

import email
import email.message
import email.policy
import io
from typing import IO, cast

from mxguard.content.report import build_report_safe, header_edits, raw_headers, report_text
from mxguard.core.transaction import HeaderChange, Symbol

# As the milter receives them with HDR_LEADSPC: values keep their leading space.
HEADERS = [
    ("From", " alice@sender.test"),
    ("To", " bob@example.test"),
    ("Subject", " cheap\n\tpills"),  # folded: joined with \n
    ("MIME-Version", " 1.0"),
    ("Content-Type", " text/plain; charset=utf-8"),
    ("Content-Transfer-Encoding", " 8bit"),
]
BODY = "Caf\u00e9 prices.\r\nSecond line.\r\n".encode()
SYMBOLS = [Symbol("GTUBE", 1000.0, "gtube"), Symbol("MISSING_DATE", 1.4),
           Symbol("ZERO_RULE", 0.0)]
DESCRIPTIONS = {"GTUBE": "Generic Test for Unsolicited Bulk Email"}
BOUNDARY = "=_test_boundary_0123"


def build(headers: list[tuple[str, str]] = HEADERS, body: bytes | IO[bytes] = BODY,
          **kw: object) -> tuple[list[HeaderChange], bytes]:
    args: dict[str, object] = {"score": 1001.4, "required": 5.0, "symbols": SYMBOLS,
                               "descriptions": DESCRIPTIONS, "hostname": "mx.example.test",
                               "boundary": BOUNDARY}
    args.update(kw)
    return build_report_safe(headers, body, **args)  # type: ignore[arg-type]


def original() -> bytes:
    return raw_headers(HEADERS) + b"\r\n" + BODY


def outer(edits: list[HeaderChange], body: bytes) -> email.message.Message:
    """The message Postfix would deliver: edits applied to HEADERS, new body."""
    headers = list(HEADERS)
    for e in edits:
        hits = [i for i, (n, _) in enumerate(headers) if n.lower() == e.name.lower()]
        if e.op == "add":
            headers.append((e.name, " " + e.value))
        elif e.op == "change":
            headers[hits[e.index - 1]] = (e.name, " " + e.value)
        elif e.op == "delete":
            del headers[hits[e.index - 1]]
    raw = raw_headers(headers) + b"\r\n" + body
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def test_spam_is_wrapped_with_the_original_attached_byte_for_byte() -> None:
    edits, body = build()
    msg = outer(edits, body)
    assert msg.get_content_type() == "multipart/mixed"
    assert msg.get_boundary() == BOUNDARY
    assert msg["MIME-Version"].strip() == "1.0"
    assert msg["Content-Transfer-Encoding"] is None
    report, attached = cast(list[email.message.Message], msg.get_payload())
    assert report.get_content_type() == "text/plain"
    text = str(report.get_payload())
    assert "spam" in text and "1001.4" in text and "5.0" in text
    assert "GTUBE" in text and "Generic Test for Unsolicited Bulk Email" in text
    assert "MISSING_DATE" in text and "ZERO_RULE" not in text  # unscored rules left out
    assert attached.get_content_type() == "message/rfc822"
    assert attached["Content-Transfer-Encoding"] == "8bit"  # the original has 8-bit bytes
    # byte for byte: everything between the part's header block and the closing delimiter
    part = body.split(b"\r\n--" + BOUNDARY.encode())[2]
    assert part.split(b"\r\n\r\n", 1)[1] == original()
    assert body.endswith(b"\r\n--" + BOUNDARY.encode() + b"--\r\n")


def test_header_edits_rewrite_content_type_and_mime_version() -> None:
    edits = header_edits(HEADERS, BOUNDARY)
    assert HeaderChange.change("Content-Type", f'multipart/mixed;\r\n\tboundary="{BOUNDARY}"',
                               1) in edits
    assert HeaderChange.change("MIME-Version", "1.0", 1) in edits
    assert HeaderChange.delete("Content-Transfer-Encoding", 1) in edits
    assert not any(e.name in ("From", "To", "Subject") for e in edits)  # control: kept


def test_plain_message_without_mime_headers_gets_them_added() -> None:
    headers = [("From", " a@b.test"), ("Subject", " hi")]
    edits, body = build(headers, b"just text\r\n")
    assert [e.op for e in edits] == ["add", "add"]
    assert {e.name for e in edits} == {"Content-Type", "MIME-Version"}
    assert b"Content-Transfer-Encoding: 7bit\r\n\r\nFrom: a@b.test\r\n" in body  # 7-bit
    assert b"\r\n\r\njust text\r\n\r\n--" + BOUNDARY.encode() + b"--\r\n" in body


def test_duplicates_deleted_highest_first() -> None:
    headers = [("Content-Type", " text/plain"), ("content-type", " text/html"),
               ("Content-Transfer-Encoding", " 7bit"), ("Content-Transfer-Encoding", " qp"),
               ("MIME-Version", " 1.0")]
    edits = header_edits(headers, BOUNDARY)
    assert [(e.op, e.name.lower(), e.index) for e in edits if e.op == "delete"] == [
        ("delete", "content-type", 2), ("delete", "content-transfer-encoding", 2),
        ("delete", "content-transfer-encoding", 1)]


def test_body_without_final_newline_and_file_input() -> None:
    _, from_bytes = build(body=b"no newline")
    _, from_file = build(body=io.BytesIO(b"no newline"))
    assert from_bytes == from_file
    part = from_bytes.split(b"\r\n--" + BOUNDARY.encode())[2]
    assert part.endswith(b"\r\n\r\nno newline")  # the closing CRLF is the delimiter's


def test_headers_without_leadspc_get_their_space_back() -> None:
    assert raw_headers([("Subject", "hi\n\tthere")], headers_exact=False) == \
        b"Subject: hi\r\n\tthere\r\n"
    assert raw_headers([("Subject", "  hi")]) == b"Subject:  hi\r\n"  # exact: kept as is


def test_random_boundary_differs_per_message() -> None:
    a = build(boundary=None)[1]
    b = build(boundary=None)[1]
    assert a != b  # control for the fixed-boundary cases above


def test_report_text_is_ascii_and_sanitised() -> None:
    text = report_text(7.0, 5.0, [Symbol("R", 7.0, "bad \u2603\r\nInjected: x")])
    text.encode("ascii")
    assert "\r\nInjected" not in text
    assert "No individual rule" in report_text(6.0, 5.0, [Symbol("R", 0.0)])
