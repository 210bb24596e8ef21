"""DKIM canonicalization, tag lists and body hashing (mxguard.auth.dkim_canon)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mxguard.auth.dkim_canon import (
    BodyCanonicalizer,
    BodyHasher,
    TagListError,
    canon_header,
    decode_base64,
    decode_qp,
    header_data,
    iter_body,
    parse_message,
    parse_tag_list,
    select_headers,
    split_canonicalization,
    strip_b_value,
)

# RFC 6376 §3.4.6 example.
RFC_HEADERS = [(b"A", b" X"), (b"B ", b" Y\t\r\n\tZ  ")]
RFC_BODY = b" C \r\nD \t E\r\n\r\n\r\n"


def canon_body(body: bytes, method: str, chunks: list[int] | None = None) -> bytes:
    out: list[bytes] = []
    canon = BodyCanonicalizer(method, out.append)
    pos = 0
    for n in chunks or []:
        canon.update(body[pos:pos + n])
        pos += n
    canon.update(body[pos:])
    canon.finish()
    return b"".join(out)


def reference_body(body: bytes, method: str) -> bytes:
    """RFC 6376 §3.4.3/§3.4.4 written the obvious, whole-body way."""
    lines = body.split(b"\r\n")
    if method == "relaxed":
        lines = [re.sub(rb"[ \t]+", b" ", line).rstrip(b" ") for line in lines]
    text = b"\r\n".join(lines)
    while text.endswith(b"\r\n"):
        text = text[:-2]
    if method == "relaxed":
        return text + b"\r\n" if text else b""
    return text + b"\r\n"


# ------------------------------------------------------------------ headers


def test_rfc6376_example_headers_relaxed() -> None:
    got = [canon_header(n, v, "relaxed") for n, v in RFC_HEADERS]
    assert got == [b"a:X\r\n", b"b:Y Z\r\n"]


def test_rfc6376_example_headers_simple() -> None:
    got = [canon_header(n, v, "simple") for n, v in RFC_HEADERS]
    assert got == [b"A: X\r\n", b"B : Y\t\r\n\tZ  \r\n"]


@pytest.mark.parametrize(("name", "value", "method", "expected"), [
    (b"Subject", b" hi\n there", "simple", b"Subject: hi\r\n there\r\n"),   # milter LF fold
    (b"Subject", b" hi\n there", "relaxed", b"subject:hi there\r\n"),
    (b"Subject", b"", "relaxed", b"subject:\r\n"),
    (b"Subject", b"   ", "relaxed", b"subject:\r\n"),
    (b"X-8bit", b" caf\xe9 \xff", "relaxed", b"x-8bit:caf\xe9 \xff\r\n"),   # bytes kept
    (b"X-Mixed", b"\tA\r\n B", "simple", b"X-Mixed:\tA\r\n B\r\n"),         # control: CRLF kept
])
def test_header_canonicalization(name: bytes, value: bytes, method: str,
                                 expected: bytes) -> None:
    assert canon_header(name, value, method) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (b" v=1; b=abc; bh=xyz", b" v=1; b=; bh=xyz"),
    (b" v=1; bh=xyz; b= ab\r\n\tcd ", b" v=1; bh=xyz; b="),
    (b" v=1; bh=xyz;\r\n b\t= ab", b" v=1; bh=xyz;\r\n b\t="),
    (b" bh=xyz", b" bh=xyz"),                                    # control: no b= at all
])
def test_strip_b_value(value: bytes, expected: bytes) -> None:
    assert strip_b_value(value) == expected


def test_select_headers_bottom_up_and_missing() -> None:
    headers = [(b"Received", b" 1"), (b"From", b" a"), (b"To", b" x"), (b"from", b" b")]
    picked = select_headers(headers, ["From", "from", "FROM", "Cc", "To"])
    assert picked == [(b"from", b" b"), (b"From", b" a"), (b"To", b" x")]


def test_header_data_ends_with_signature_without_crlf() -> None:
    data = header_data([(b"From", b" a@example.com")], ["from"], "relaxed",
                       b"DKIM-Signature", b" v=1; b=QUJD")
    assert data == b"from:a@example.com\r\ndkim-signature:v=1; b="


# --------------------------------------------------------------------- body


def test_rfc6376_example_body() -> None:
    assert canon_body(RFC_BODY, "relaxed") == b" C\r\nD E\r\n"
    assert canon_body(RFC_BODY, "simple") == b" C \r\nD \t E\r\n"


@pytest.mark.parametrize(("body", "simple", "relaxed"), [
    (b"", b"\r\n", b""),                                  # empty body
    (b"\r\n\r\n", b"\r\n", b""),                          # only empty lines
    (b"abc", b"abc\r\n", b"abc\r\n"),                     # no final CRLF
    (b"abc\r\n", b"abc\r\n", b"abc\r\n"),                 # control: already canonical
    (b"  \t \r\n \r\n", b"  \t \r\n \r\n", b""),          # whitespace-only lines
    (b"a  b \t\r\n\r\nc\r\n\r\n", b"a  b \t\r\n\r\nc\r\n", b"a b\r\n\r\nc\r\n"),
    (b"bare\nlf\n", b"bare\nlf\n\r\n", b"bare\nlf\n\r\n"),  # bare LF is line content
    (b"x\r", b"x\r\r\n", b"x\r\r\n"),
])
def test_body_canonicalization_table(body: bytes, simple: bytes, relaxed: bytes) -> None:
    assert canon_body(body, "simple") == simple
    assert canon_body(body, "relaxed") == relaxed


_PIECES = st.sampled_from([b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n\r\n"])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=24), st.lists(st.integers(0, 6), max_size=8),
       st.sampled_from(["simple", "relaxed"]))
def test_incremental_equals_whole_body(pieces: list[bytes], chunks: list[int],
                                       method: str) -> None:
    body = b"".join(pieces)
    assert canon_body(body, method, chunks) == reference_body(body, method)


def test_body_hasher_length_and_limit() -> None:
    body = b"hello  world\r\nsecond line\r\n\r\n"
    full = BodyHasher("relaxed")
    full.update(body)
    canon = b"hello world\r\nsecond line\r\n"
    assert full.digest() == hashlib.sha256(canon).digest()
    assert full.length == len(canon)
    part = BodyHasher("relaxed", limit=5)
    for i in range(len(body)):
        part.update(body[i:i + 1])
    assert part.digest() == hashlib.sha256(canon[:5]).digest()
    assert part.length == len(canon)


def test_body_hasher_large_body_in_chunks() -> None:
    line = b"x" * 70 + b"  \r\n"
    hasher = BodyHasher("relaxed")
    for _ in range(2000):
        hasher.update(line * 10)
    assert hasher.length == 2000 * 10 * 72


def test_body_hasher_empty_line_run_is_not_quadratic() -> None:
    hasher = BodyHasher("simple")
    hasher.update(b"\r\n" * 500_000 + b"end")
    assert hasher.digest() == hashlib.sha256(b"\r\n" * 500_000 + b"end\r\n").digest()


# ---------------------------------------------------------------- tag lists


@pytest.mark.parametrize(("text", "expected"), [
    ("v=1; a=rsa-sha256", {"v": "1", "a": "rsa-sha256"}),
    ("v=1;", {"v": "1"}),                                       # trailing ;
    (" v = 1 ;\r\n\ta=x ; ", {"v": "1", "a": "x"}),             # FWS everywhere
    ("h=from : to", {"h": "from : to"}),                        # inner FWS kept
    ("n=; p=abc", {"n": "", "p": "abc"}),                       # empty value
    ("x_1=a;; y=b", {"x_1": "a", "y": "b"}),                    # empty spec tolerated
    ("", {}),
])
def test_tag_list_valid(text: str, expected: dict[str, str]) -> None:
    assert parse_tag_list(text) == expected


@pytest.mark.parametrize("text", [
    "v=1; v=1",             # duplicate
    "v=1; synerr",          # no '='
    "1v=1",                 # bad tag name
    "=1",                   # empty name
    "a-b=1",                # bad tag name
    "v=1\x00",              # control character
    "v=1\r\nx=2",           # line break not followed by WSP
])
def test_tag_list_malformed(text: str) -> None:
    with pytest.raises(TagListError):
        parse_tag_list(text)


def test_tag_names_are_case_sensitive() -> None:
    assert parse_tag_list("V=1; v=2") == {"V": "1", "v": "2"}


@pytest.mark.parametrize(("value", "ok"), [
    ("QUJD", True), ("QU JD\r\n\t", True), ("QUI=", True),
    ("QUJ", False), ("QU*D", False), ("Q===", False),
])
def test_decode_base64(value: str, ok: bool) -> None:
    if ok:
        assert decode_base64(value) == base64.b64decode(value.replace(" ", "").strip())
    else:
        with pytest.raises(ValueError):
            decode_base64(value)


@pytest.mark.parametrize(("value", "expected"), [
    ("=6Along@messiah.edu", "jlong@messiah.edu"),
    ("user@example.com", "user@example.com"),
    ("a=3Db@x", "a=b@x"),
])
def test_decode_qp(value: str, expected: str) -> None:
    assert decode_qp(value) == expected


def test_decode_qp_bad_escape() -> None:
    with pytest.raises(ValueError):
        decode_qp("a=zz@x")


@pytest.mark.parametrize(("value", "expected"), [
    ("simple/simple", ("simple", "simple")),
    ("relaxed", ("relaxed", "simple")),
    ("relaxed/relaxed", ("relaxed", "relaxed")),
])
def test_split_canonicalization(value: str, expected: tuple[str, str]) -> None:
    assert split_canonicalization(value) == expected


@pytest.mark.parametrize("value", ["future", "relaxed/future", "", "Relaxed"])
def test_split_canonicalization_unknown(value: str) -> None:
    with pytest.raises(ValueError):
        split_canonicalization(value)


# ---------------------------------------------------------- message parsing


def test_parse_message_lf_folding_and_mbox_line() -> None:
    raw = b"From sender Fri Jul  8 12:08:34 2011\nSubject: a\n b\nTo: x\n\nbody\n"
    headers, body = parse_message(raw)
    assert headers == [(b"Subject", b" a\r\n b"), (b"To", b" x")]
    assert body == b"body\r\n"


def test_parse_message_without_body() -> None:
    assert parse_message(b"A: b\r\n") == ([(b"A", b" b")], b"")


def test_iter_body_forms() -> None:
    import io
    assert list(iter_body(b"ab")) == [b"ab"]
    assert b"".join(iter_body(io.BytesIO(b"x" * 200_000))) == b"x" * 200_000
    assert list(iter_body([b"a", b"b"])) == [b"a", b"b"]
