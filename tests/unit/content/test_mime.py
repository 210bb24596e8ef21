"""MIME parsing: decoding, HTML, URIs, attachments, and bad input that must not raise."""

from __future__ import annotations

import base64
import io
import zipfile

import pytest

from mxguard.content.mime import decode_header_value, header_params, parse_message, rendered_body
from mxguard.content.mime_uri import normalize_uri


def msg(headers: str, body: bytes | str) -> bytes:
    raw = body.encode() if isinstance(body, str) else body
    return headers.replace("\n", "\r\n").encode() + b"\r\n" + raw


# ------------------------------------------------------------------ decoding

@pytest.mark.parametrize(("ctype", "cte", "body", "expected"), [
    ("text/plain; charset=utf-8", "8bit", "Grüße".encode(), "Grüße"),
    ("text/plain; charset=iso-8859-1", "quoted-printable", b"Caf=E9 =\r\nnoir", "Café noir"),
    ("text/plain; charset=utf-8", "base64", base64.b64encode("naïve".encode()), "naïve"),
    ("text/plain; charset=koi8-r", "8bit", "привет".encode("koi8-r"), "привет"),
    ("text/plain; charset=x-no-such-charset", "8bit", b"plain ascii", "plain ascii"),
    ("text/plain", "8bit", b"caf\xe9", "café"),  # no charset, not UTF-8: cp1252
    ("text/plain; charset=utf-8", "8bit", b"bad \xff\xfe bytes", "bad \ufffd\ufffd bytes"),
    ("text/plain; charset=base64", "8bit", b"codec name that is no text codec", "codec name "
     "that is no text codec"),
])
def test_text_part_decoding(ctype: str, cte: str, body: bytes, expected: str) -> None:
    parsed = parse_message(msg(f"Content-Type: {ctype}\nContent-Transfer-Encoding: {cte}\n",
                               body))
    assert parsed.parts[0].text == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ("=?utf-8?B?SGVsbG8gd29ybGQ=?=", "Hello world"),
    ("=?iso-8859-1?Q?Caf=E9_cr=E8me?=", "Café crème"),
    ("=?utf-8?q?a?= =?utf-8?q?b?=", "ab"),  # white space between encoded words goes
    ("plain\n  folded", "plain  folded"),
    ("=?bogus?X?broken?=", "=?bogus?X?broken?="),  # not an encoded word: kept
    ("=?utf-8?B?###?=", ""),  # broken base64 decodes to nothing rather than raising
])
def test_header_decoding(raw: str, expected: str) -> None:
    assert decode_header_value(raw) == expected


def test_rfc2231_filename_and_params() -> None:
    main, params = header_params("attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf; size=3")
    assert main == "attachment"
    assert params["filename"] == "résumé.pdf"
    assert params["size"] == "3"
    main, params = header_params('text/plain; charset="utf-8"; name="a;b.txt"')
    assert (main, params["charset"], params["name"]) == ("text/plain", "utf-8", "a;b.txt")


def test_headers_decoded_and_raw_kept() -> None:
    parsed = parse_message(msg("Subject: =?utf-8?Q?Hi_there?=\nX-Long: one\n two\n", "body"))
    assert parsed.subject == "Hi there"
    assert parsed.get_raw("x-long") == [" one\n two"]
    assert parsed.get("X-LONG") == ["one two"]


# ------------------------------------------------------------------ HTML and URIs

HTML = """<html><head><title>T</title><style>p {color: red}</style>
<script>var x = "http://script.example/";</script></head>
<body><p>Hello&nbsp;<b>world</b></p><div>Visit <a href="http://evil.example/login">
https://www.bank.example/</a></div><img src="http://img.example/a.png" alt="logo">
<form action="http://form.example/post"></form></body></html>"""


def test_html_rendered_and_links_recorded() -> None:
    parsed = parse_message(msg("Content-Type: text/html; charset=utf-8\n", HTML))
    part = parsed.parts[0]
    assert part.is_html and "<p>" in part.raw
    assert "Hello world" in part.text.replace("\xa0", " ")
    assert "color" not in part.text and "script.example" not in part.text
    by_tag = {u.tag: u for u in parsed.uris}
    assert by_tag["a"].host == "evil.example"
    assert by_tag["a"].text == "https://www.bank.example/"
    assert by_tag["img"].host == "img.example"
    assert by_tag["form"].host == "form.example"
    assert "logo" in part.text  # alt text counts as text
    # the URL shown as text is found as a plain-text URI too
    assert any(u.host == "www.bank.example" and u.tag == "text" for u in parsed.uris)


@pytest.mark.parametrize(("url", "host", "normalised"), [
    ("HTTP://WWW.Example.COM/Path", "www.example.com", "http://www.example.com/Path"),
    ("www.example.com", "www.example.com", "http://www.example.com/"),
    ("http://3232235777/x", "192.168.1.1", "http://192.168.1.1/x"),
    ("http://0xC0A80101/", "192.168.1.1", "http://192.168.1.1/"),
    ("http://0300.0250.1.1/", "192.168.1.1", "http://192.168.1.1/"),
    ("http://user:pw@real.example:8080/a", "real.example", "http://real.example:8080/a"),
    ("http://[2001:db8::1]/", "2001:db8::1", "http://[2001:db8::1]/"),
    ("http://example.com./", "example.com", "http://example.com/"),
    ("mailto:Bob@Example.ORG?subject=x", "example.org", "mailto:Bob@Example.ORG"),
])
def test_uri_normalisation(url: str, host: str, normalised: str) -> None:
    uri = normalize_uri(url)
    assert uri is not None
    assert (uri.host, uri.url) == (host, normalised)


@pytest.mark.parametrize("url", ["javascript:alert(1)", "cid:part1", "", "http://[bad/"])
def test_uri_ignored(url: str) -> None:
    assert normalize_uri(url) is None


def test_plain_text_uris_trailing_punctuation() -> None:
    parsed = parse_message(msg("", "See http://a.example/x. Or (www.b.example), ok?"))
    assert [u.url for u in parsed.uris] == ["http://a.example/x", "http://www.b.example/"]


# ------------------------------------------------------------------ structure


def multipart(parts: list[str], boundary: str = "B") -> bytes:
    body = "".join(f"--{boundary}\r\n{p}\r\n" for p in parts) + f"--{boundary}--\r\n"
    return msg(f'Content-Type: multipart/mixed; boundary="{boundary}"\n', body)


def zip_bytes(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for n in names:
            zf.writestr(n, b"x")
    return buf.getvalue()


def test_attachments_listed_with_magic_and_zip_members() -> None:
    exe = base64.b64encode(b"MZ\x90\x00" + b"\x00" * 60).decode()
    zipped = base64.b64encode(zip_bytes(["invoice.pdf.exe", "readme.txt"])).decode()
    raw = multipart([
        "Content-Type: text/plain\r\n\r\nsee attached",
        f'Content-Type: application/octet-stream; name="setup.exe"\r\n'
        f"Content-Transfer-Encoding: base64\r\n\r\n{exe}",
        f"Content-Type: application/zip\r\nContent-Disposition: attachment; "
        f'filename="docs.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n{zipped}',
        "Content-Type: text/plain\r\nContent-Disposition: attachment; filename=\"notes.txt\""
        "\r\n\r\nattached text",
    ])
    parsed = parse_message(raw)
    atts = {a.filename: a for a in parsed.attachments}
    assert atts["setup.exe"].magic == "pe" and atts["setup.exe"].extension == "exe"
    assert atts["setup.exe"].size == 64
    assert atts["docs.zip"].inner_names == ("invoice.pdf.exe", "readme.txt")
    assert "notes.txt" in atts  # a named text part is an attachment and text
    assert [p.text for p in parsed.parts] == ["see attached", "attached text"]


def test_message_rfc822_and_digest() -> None:
    inner = "Subject: inner\r\nContent-Type: text/plain\r\n\r\ninner body"
    parsed = parse_message(multipart([f"Content-Type: message/rfc822\r\n\r\n{inner}"]))
    assert [p.text for p in parsed.parts] == ["inner body"]


def test_rendered_body_is_subject_then_paragraphs() -> None:
    parsed = parse_message(msg("Subject: Hello\n", "line one\nline  two\n\nsecond para\n"))
    assert rendered_body(parsed) == "Hello\nline one line two\nsecond para"


def test_milter_input_headers_and_body_file() -> None:
    body = io.BytesIO(b"Hello http://x.example/\r\n")
    body.seek(5)
    parsed = parse_message(([("Subject", "Hi"), ("From", "a@b.example")], body))
    assert parsed.subject == "Hi"
    assert parsed.parts[0].text == "Hello http://x.example/\n"
    assert parsed.size == len(b"Hello http://x.example/\r\n")


# ------------------------------------------------------------------ bad input

def nested(depth: int) -> bytes:
    body = "Content-Type: text/plain\r\n\r\ndeepest"
    for i in range(depth):
        body = (f'Content-Type: multipart/mixed; boundary="b{i}"\r\n\r\n--b{i}\r\n{body}\r\n'
                f"--b{i}--")
    return body.encode()


@pytest.mark.parametrize(("name", "raw", "check"), [
    ("deep nesting is cut, no recursion error", nested(5000),
     lambda p: any("nesting deeper" in x for x in p.problems) and not p.parts),
    ("shallow nesting is followed (control)", nested(5),
     lambda p: [x.text for x in p.parts] == ["deepest"] and not p.problems),
    ("thousands of parts bounded by max_parts",
     multipart(["Content-Type: text/plain\r\n\r\nx"] * 3000),
     lambda p: p.truncated and len(p.parts) < 1000),
    ("broken base64 decodes what it can",
     msg("Content-Transfer-Encoding: base64\n", "SGVsbG8*!!!gd29y\x00bGQ"),
     lambda p: isinstance(p.parts[0].text, str)),
    ("missing closing boundary noted",
     msg('Content-Type: multipart/mixed; boundary="B"\n', "--B\r\n\r\ntext"),
     lambda p: p.parts[0].text == "text" and any("closing" in x for x in p.problems)),
    ("multipart without boundary read as text",
     msg("Content-Type: multipart/mixed\n", "just text"),
     lambda p: p.parts[0].text == "just text"),
    ("huge single line", msg("", "A" * 3_000_000),
     lambda p: len(p.parts[0].text) == 3_000_000),
    ("binary garbage", bytes(range(256)) * 200, lambda p: True),
    ("empty input", b"", lambda p: p.parts[0].text == ""),
    ("header block without end", b"Subject: x\r\nno colon here\r\nmore",
     lambda p: p.subject == "x" and "no colon here" in p.parts[0].text),
    ("html garbage", msg("Content-Type: text/html\n", "<a href='http://x.example/'><<<<>>>&#99999999;<"
                         "![CDATA[ <script>"), lambda p: any(u.host == "x.example"
                                                             for u in p.uris)),
])
def test_bad_input_never_raises(name: str, raw: bytes, check: object) -> None:
    parsed = parse_message(raw)
    assert callable(check) and check(parsed), name


def test_size_bound_marks_partial_scan() -> None:
    raw = msg("Subject: big\n", "x" * 200_000)
    parsed = parse_message(raw, max_bytes=100_000)
    assert parsed.truncated and parsed.size == len(raw)
    assert any("scanned partially" in p for p in parsed.problems)
    control = parse_message(raw)
    assert not control.truncated
