"""Fuzzing the codecs and parsers that read what strangers send (hypothesis).

Targets: the policy decoder, the milter CommandDecoder, MIME
``parse_message``, DKIM tag lists and ``verify``, SPF record parsing and
evaluation. Each may only answer with its documented error (or a result),
never another exception. DNS is a stub: no network.

The run is bounded and deterministic (``derandomize=True``): about 300
examples per target, a few seconds in all. A longer run::

    MXGUARD_FUZZ_EXAMPLES=100000 python -m pytest tests/unit/test_fuzz.py -s

(``-s`` shows the per-target input counts; they are also written to the
terminal summary at the end of the module.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import random
import string
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mxguard.auth import dkim, spf
from mxguard.auth.dkim_canon import TagListError, parse_tag_list
from mxguard.content.mime import parse_message
from mxguard.dns import Answer, DnsTempError
from mxguard.protocols import milter as m
from mxguard.protocols.policy import (
    KNOWN_ATTRIBUTES,
    PolicyDecoder,
    PolicyProtocolError,
    encode_reply,
)

EXAMPLES = int(os.environ.get("MXGUARD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])
TRIED: Counter[str] = Counter()


def count_lines() -> list[str]:
    lines = [f"fuzz inputs tried (max_examples={EXAMPLES}):"]
    lines += [f"  {name:<28} {n}" for name, n in sorted(TRIED.items())]
    lines.append(f"  {'total':<28} {sum(TRIED.values())}")
    return lines


class _Summary:
    """Writes the counts into pytest's terminal summary (also without ``-s``)."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if TRIED:
            terminalreporter.section("fuzz")
            for line in count_lines():
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def report_counts(request: pytest.FixtureRequest) -> Iterator[None]:
    plugin = _Summary()
    if not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "mxguard-fuzz-summary")
    yield
    print("\n" + "\n".join(count_lines()))  # shown with -s


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given (sorted, deduplicated) offsets."""
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


# --------------------------------------------------------------- policy


def feed_policy(data: bytes, cuts: list[int]) -> None:
    dec = PolicyDecoder(max_bytes=4096, max_attributes=64)
    try:
        for piece in chunks(data, cuts):
            for req in dec.feed(piece):
                assert req.attrs.get("request") == "smtpd_access_policy"
                req.transaction()  # never raises either
                encode_reply(req.attrs.get("sender", "DUNNO"))
    except PolicyProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=8))
def test_policy_decoder_random_bytes(data: bytes, cuts: list[int]) -> None:
    TRIED["policy random bytes"] += 1
    feed_policy(data, cuts)


_NAMES = st.one_of(st.sampled_from(sorted(KNOWN_ATTRIBUTES)), st.text(max_size=12))
_VALUES = st.one_of(st.text(max_size=40), st.sampled_from(
    ["", "RCPT", "DATA", "END-OF-MESSAGE", "smtpd_access_policy", "-1", "99999999999999999999",
     "1e9", "\udcff", "a=b", " ", "[127.0.0.1]", "<>", "user@example.test"]))


@st.composite
def policy_stream(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        attrs = [("request", "smtpd_access_policy")]
        attrs += draw(st.lists(st.tuples(_NAMES, _VALUES), max_size=12))
        if draw(st.booleans()):
            random.Random(draw(st.integers(0, 2**16))).shuffle(attrs)
        text = "".join(f"{k}={v}\n" for k, v in attrs)
        raw = text.encode("utf-8", "surrogateescape")
        mutation = draw(st.sampled_from(["none", "crlf", "flip", "cut", "insert", "dup"]))
        if mutation == "crlf":
            raw = raw.replace(b"\n", b"\r\n")
        elif mutation == "flip" and raw:
            i = draw(st.integers(0, len(raw) - 1))
            raw = raw[:i] + bytes([raw[i] ^ (1 << draw(st.integers(0, 7)))]) + raw[i + 1:]
        elif mutation == "cut" and raw:
            raw = raw[:draw(st.integers(0, len(raw)))]
        elif mutation == "insert":
            i = draw(st.integers(0, len(raw)))
            raw = raw[:i] + draw(st.binary(max_size=8)) + raw[i:]
        elif mutation == "dup":
            raw = raw * draw(st.integers(2, 40))
        out += raw + draw(st.sampled_from([b"\n", b"\r\n", b"", b"\n\n"]))
    return out


@FUZZ
@given(policy_stream(), st.lists(st.integers(0, 4096), max_size=8))
def test_policy_decoder_structured(data: bytes, cuts: list[int]) -> None:
    TRIED["policy structured"] += 1
    feed_policy(data, cuts)


# --------------------------------------------------------------- milter

_CODES = [*sorted(m.COMMANDS), b"\x00", b"Z", b"\xff"]


def feed_milter(data: bytes, cuts: list[int], max_packet: int = 65536) -> None:
    dec = m.CommandDecoder(max_packet=max_packet)
    try:
        for piece in chunks(data, cuts):
            for packet in dec.feed(piece):
                assert isinstance(packet, m.Packet)
    except m.MilterProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=2048), st.lists(st.integers(0, 4096), max_size=6))
def test_milter_decoder_random_bytes(data: bytes, cuts: list[int]) -> None:
    TRIED["milter random bytes"] += 1
    feed_milter(data, cuts)


_CSTR = st.one_of(st.binary(max_size=30).map(lambda b: b.replace(b"\0", b"") + b"\0"),
                  st.binary(max_size=30))


@st.composite
def milter_payload(draw: st.DrawFn, code: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "strings", "shaped"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "strings":
        return b"".join(draw(st.lists(_CSTR, max_size=6)))
    # roughly the right shape for the command, then random
    if code == b"O":
        return draw(st.binary(min_size=0, max_size=16))
    if code == b"C":
        return (draw(_CSTR) + draw(st.sampled_from([b"4", b"6", b"L", b"U", b"X", b""]))
                + draw(st.binary(max_size=2)) + draw(_CSTR))
    if code == b"D":
        return draw(st.sampled_from([b"C", b"H", b"M", b"R", b"", b"\0"])) + b"".join(
            draw(st.lists(_CSTR, max_size=7)))
    return b"".join(draw(st.lists(_CSTR, max_size=4))) + draw(st.binary(max_size=8))


@st.composite
def milter_stream(draw: st.DrawFn) -> bytes:
    out = b""
    for _ in range(draw(st.integers(1, 6))):
        code = draw(st.sampled_from(_CODES))
        payload = draw(milter_payload(code))
        length = len(payload) + 1
        how = draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "zero",
                                    "huge", "truncated"]))
        if how == "short":
            length = max(0, length - draw(st.integers(1, 5)))
        elif how == "long":
            length += draw(st.integers(1, 5))
        elif how == "zero":
            length = 0
        elif how == "huge":
            length = draw(st.sampled_from([65537, 2**24, 2**31, 2**32 - 1]))
        packet = length.to_bytes(4, "big") + code + payload
        if how == "truncated":
            packet = packet[:draw(st.integers(0, len(packet)))]
        out += packet
    return out


@FUZZ
@given(milter_stream(), st.lists(st.integers(0, 4096), max_size=6))
def test_milter_decoder_framed(data: bytes, cuts: list[int]) -> None:
    TRIED["milter framed"] += 1
    feed_milter(data, cuts)


@FUZZ
@given(st.sampled_from([m.Connect("h", "4", 25, "192.0.2.1"), m.Helo("x"),
                        m.Mail(("<a@b>", "SIZE=1")), m.Rcpt(("<c@d>",)),
                        m.Header("Subject", " hi"), m.Body(b"body"), m.OptNeg(6, 0x1FF, 0x1FFFFF),
                        m.Macro("C", {"j": "mx"})]),
       st.integers(0, 200), st.integers(0, 7))
def test_milter_decoder_bit_flips(packet: m.Packet, where: int, bit: int) -> None:
    TRIED["milter bit flips"] += 1
    raw = bytearray(packet.encode())
    raw[where % len(raw)] ^= 1 << bit
    feed_milter(bytes(raw), [])


# --------------------------------------------------------------- MIME

_CTYPES = ["text/plain", "text/html", "multipart/mixed", "multipart/alternative",
           "multipart/related", "message/rfc822", "application/octet-stream",
           "application/zip", "image/png", "text/plain; format=flowed", "bogus", ""]
_CTES = ["7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode", "bogus", ""]
_CHARSETS = ["utf-8", "us-ascii", "iso-8859-1", "windows-1252", "koi8-r", "shift_jis",
             "gb2312", "utf-16", "utf-7", "x-unknown", "", "\"utf-8\"", "utf-8'en'"]


def _text_body(draw: st.DrawFn) -> bytes:
    text = draw(st.text(max_size=200))
    choice = draw(st.sampled_from(["utf8", "latin1", "html", "raw"]))
    if choice == "html":
        text = f"<html><body><a href=\"http://{text[:20]}.example/x\">{text}</a></body></html>"
    if choice == "raw":
        return draw(st.binary(max_size=200))
    return text.encode("latin-1" if choice == "latin1" else "utf-8", "replace")


def _encode(body: bytes, cte: str, draw: st.DrawFn) -> bytes:
    if cte == "base64":
        enc = base64.encodebytes(body)
        return enc if draw(st.booleans()) else enc[:draw(st.integers(0, len(enc)))] + b"!="
    if cte == "quoted-printable":
        import quopri
        enc = quopri.encodestring(body)
        return enc if draw(st.booleans()) else enc + b"=\r\n=Z"
    return body


@st.composite
def mime_entity(draw: st.DrawFn, depth: int = 0) -> bytes:
    ctype = draw(st.sampled_from(_CTYPES))
    charset = draw(st.sampled_from(_CHARSETS))
    cte = draw(st.sampled_from(_CTES))
    headers = [f"Content-Type: {ctype}" + (f"; charset={charset}" if charset else "")]
    if draw(st.booleans()):
        headers[0] += f"; name*0*=utf-8''%E2%82%AC{draw(st.text(string.printable, max_size=5))}"
    headers.append(f"Content-Transfer-Encoding: {cte}")
    if draw(st.booleans()):
        headers.append('Content-Disposition: attachment; filename="=?utf-8?b?'
                       + base64.b64encode(draw(st.binary(max_size=12))).decode() + '?="')
    if draw(st.booleans()):
        headers.append("Subject: =?" + charset.strip('"') + "?"
                       + draw(st.sampled_from(["B", "Q", "X"])) + "?"
                       + draw(st.text(string.printable.replace("\r", "").replace("\n", ""),
                                      max_size=20)) + "?=")
    if ctype.startswith("multipart/") and depth < 6:
        boundary = draw(st.sampled_from(["b1", "==b==", "", "a b", "x" * 80]))
        headers[0] = f'Content-Type: {ctype}; boundary="{boundary}"'
        parts = draw(st.lists(mime_entity(depth + 1), max_size=3))
        body = b"preamble\r\n"
        for p in parts:
            body += f"--{boundary}\r\n".encode() + p + b"\r\n"
        if draw(st.booleans()):
            body += f"--{boundary}--\r\n".encode()
    elif ctype == "message/rfc822" and depth < 6:
        body = draw(mime_entity(depth + 1))
    else:
        body = _encode(_text_body(draw), cte, draw)
    head = "\r\n".join(headers).encode("utf-8", "surrogateescape")
    return head + b"\r\n\r\n" + body


@FUZZ
@given(st.binary(max_size=4096))
def test_mime_random_bytes(data: bytes) -> None:
    TRIED["mime random bytes"] += 1
    check_mime(data)


@FUZZ
@given(mime_entity(), st.sampled_from(["", "From: a@b.example\r\n", "From: =?utf-8?q?=E2?=\r\n"]),
       st.booleans())
def test_mime_structured(entity: bytes, top: str, lf_only: bool) -> None:
    TRIED["mime structured"] += 1
    data = top.encode() + entity
    if lf_only:
        data = data.replace(b"\r\n", b"\n")
    check_mime(data)


def check_mime(data: bytes) -> None:
    msg = parse_message(data, max_parts=50, max_bytes=1 << 20)
    # parse_message swallows exceptions into problems: a swallowed one is a crash
    crashes = [p for p in msg.problems if p.startswith("parser error")]
    assert not crashes, (crashes, data[:300])
    msg.text, msg.subject, msg.full  # noqa: B018 - properties must not raise either


# --------------------------------------------------------------- DKIM


class NxResolver:
    """Every name is NXDOMAIN (or a temporary failure): no network."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    async def query(self, name: str, rdtype: str) -> Answer:
        if self.fail:
            raise DnsTempError(name, rdtype, "timeout")
        return Answer(name, rdtype, "NXDOMAIN")


@FUZZ
@given(st.text(max_size=300))
def test_dkim_tag_list_random_text(text: str) -> None:
    TRIED["dkim tag list"] += 1
    try:
        tags = parse_tag_list(text)
    except TagListError:
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items())


_B64 = st.binary(min_size=0, max_size=64).map(lambda b: base64.b64encode(b).decode())
_TAGS = {
    "v": st.sampled_from(["1", "0.5", "", "2", "1 "]),
    "a": st.sampled_from(["rsa-sha256", "ed25519-sha256", "rsa-sha1", "x", ""]),
    "c": st.sampled_from(["relaxed/relaxed", "simple", "relaxed", "simple/bogus", "/", ""]),
    "d": st.sampled_from(["sender.test", "", ".", "a..b", "xn--", "é.test", "x" * 300]),
    "s": st.sampled_from(["sel", "", "a.b", "-", "x" * 70]),
    "h": st.sampled_from(["from:subject", "From", "", ":", "from::to", "x" * 100]),
    "i": st.sampled_from(["@sender.test", "a@sub.sender.test", "", "@", "@other.test", "@@"]),
    "l": st.sampled_from(["0", "10", "-1", "99999999999999999999999", "x", ""]),
    "t": st.sampled_from(["0", "1700000000", "-5", "9" * 30, ""]),
    "x": st.sampled_from(["0", "1", "9" * 30, "abc", ""]),
    "q": st.sampled_from(["dns/txt", "dns", "http", ""]),
    "bh": _B64,
    "b": _B64,
    "z": st.sampled_from(["From:a=40b|To:c", "", "|||"]),
}


@st.composite
def dkim_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(1, 3))):
        names = draw(st.lists(st.sampled_from(sorted(_TAGS)), unique=True, max_size=len(_TAGS)))
        value = "; ".join(f"{n}={draw(_TAGS[n])}" for n in names)
        if draw(st.booleans()):
            value += draw(st.sampled_from([";", "; ; ", "; x", "; b=1; b=2", "\r\n\t;",
                                           "\r\nfoo", "\x00", "=", " =;"]))
        raw = value.encode("utf-8", "surrogateescape")
        if draw(st.integers(0, 4)) == 0:
            raw = draw(st.binary(max_size=200))
        headers.append((draw(st.sampled_from([b"DKIM-Signature", b"dkim-signature ",
                                              b"DKIM-Signature\t"])), b" " + raw))
    headers += [(b"From", b" alice@sender.test"), (b"Subject", b" fuzz")]
    if draw(st.booleans()):
        headers += draw(st.lists(st.tuples(st.binary(min_size=1, max_size=12),
                                           st.binary(max_size=40)), max_size=4))
    random.Random(draw(st.integers(0, 2**16))).shuffle(headers)
    return headers


@FUZZ
@given(dkim_headers(), st.binary(max_size=300), st.booleans(), st.booleans())
def test_dkim_verify_random_headers(headers: list[tuple[bytes, bytes]], body: bytes,
                                    fail: bool, historic: bool) -> None:
    TRIED["dkim verify"] += 1
    results = asyncio.run(dkim.verify(headers, body, NxResolver(fail), now=1_800_000_000,
                                      historic=historic))
    assert all(r.result in ("pass", "fail", "neutral", "policy", "temperror", "permerror")
               for r in results), results
    # nothing can pass: no key exists
    assert not any(r.result == "pass" for r in results), results


# --------------------------------------------------------------- SPF

_TERMS = st.sampled_from([
    "all", "-all", "~all", "?all", "+all", "ip4:127.0.0.1", "ip4:192.0.2.0/24", "ip4:300.1.1.1",
    "ip4:1.2.3.4/33", "ip6:2001:db8::/32", "ip6:::1/129", "a", "a:mail.fuzz.test", "a/24",
    "a//64", "a:%{d}/0", "mx", "mx:fuzz.test/16//48", "ptr", "ptr:fuzz.test", "exists:%{i}.x",
    "exists:%{ir}.%{l1r+-}._spf.%{d}", "include:inc.fuzz.test", "include:fuzz.test",
    "redirect=fuzz.test", "redirect=other.fuzz.test", "exp=exp.fuzz.test", "foo=%{x}",
    "foo=%", "%{", "include:", "mx:", "a:.", "-include:%{d2}", "unknown:bla", "v=spf1",
    "exists:%{p}", "a:%{h}", "mx/33", "?exists:%{c}", "exists:%{r}",
])


@st.composite
def spf_record(draw: st.DrawFn) -> str:
    terms = draw(st.lists(st.one_of(_TERMS, st.text(string.printable, max_size=15)),
                          max_size=12))
    head = draw(st.sampled_from(["v=spf1", "v=spf1", "v=spf1 ", "V=SPF1", "v=spf10", ""]))
    text = " ".join([head, *terms])
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.text(max_size=120))
    return text


class SpfStub:
    """A resolver answering from the fuzzed records; unknown names NXDOMAIN."""

    def __init__(self, records: dict[str, list[str]], temp: set[str]) -> None:
        self.records, self.temp = records, temp

    async def query(self, name: str, rdtype: str, *, timeout: float | None = None) -> Answer:
        name = name.lower().rstrip(".")
        if name in self.temp:
            raise DnsTempError(name, rdtype, "timeout")
        if rdtype == "TXT" and name in self.records:
            return Answer(name, rdtype, "NOERROR", tuple(self.records[name]))
        if rdtype == "A" and name.endswith("fuzz.test"):
            return Answer(name, rdtype, "NOERROR", ("127.0.0.1", "192.0.2.7"))
        if rdtype == "AAAA" and name.endswith("fuzz.test"):
            return Answer(name, rdtype, "NOERROR", ("2001:db8::7",))
        if rdtype == "MX" and name.endswith("fuzz.test"):
            return Answer(name, rdtype, "NOERROR", ((10, "mail.fuzz.test"), (20, ".")))
        if rdtype == "PTR":
            return Answer(name, rdtype, "NOERROR", ("mail.fuzz.test",))
        return Answer(name, rdtype, "NXDOMAIN")


@FUZZ
@given(st.text(max_size=200))
def test_spf_parse_random_text(text: str) -> None:
    TRIED["spf parse"] += 1
    with contextlib.suppress(spf.PermError):
        spf.parse_record(text)


@FUZZ
@given(spf_record(), spf_record(), st.sampled_from(["127.0.0.1", "192.0.2.99", "2001:db8::7",
                                                     "::ffff:127.0.0.1"]),
       st.sampled_from(["alice@fuzz.test", "", "a.b-c@other.fuzz.test", "@fuzz.test",
                        "x@[127.0.0.1]", "é@fuzz.test"]),
       st.sampled_from(["mail.fuzz.test", "", "[127.0.0.1]", "x", "a..b"]),
       st.sets(st.sampled_from(["inc.fuzz.test", "mail.fuzz.test", "fuzz.test"]), max_size=1))
def test_spf_eval_random_records(main: str, inc: str, ip: str, sender: str, helo: str,
                                 temp: set[str]) -> None:
    TRIED["spf eval"] += 1
    stub = SpfStub({"fuzz.test": [main], "other.fuzz.test": [main, inc],
                    "inc.fuzz.test": [inc], "exp.fuzz.test": ["%{i} is not %{s}"]}, temp)
    res = asyncio.run(spf.check_host(stub, ip, "fuzz.test", sender, helo,  # type: ignore[arg-type]
                                     timeout=5.0))
    assert res.result in ("pass", "fail", "softfail", "neutral", "none", "permerror",
                          "temperror"), res
    spf.received_spf(res, "mx.fuzz.test")
    spf.spf_comment(res, "mx.fuzz.test")


# ------------------------------------------------------------------ DMARC From parsing

_FROM_ALPHABET = "aZ09 .'_-\"<>@,;:()\\\t=?"


def _plain_from() -> st.SearchStrategy[str]:
    from mxguard.auth import dmarc

    return st.from_regex(dmarc._PLAIN_FROM, fullmatch=True)


@FUZZ
@given(st.one_of(st.text(alphabet=_FROM_ALPHABET, max_size=60), _plain_from()))
def test_dmarc_plain_from_fast_path_agrees(value: str) -> None:
    """Whenever the fast path takes a From value, it says what both stdlib
    parsers say (the DMARC author domain must not depend on the shortcut)."""
    from mxguard.auth import dmarc

    TRIED["dmarc from"] += 1
    value = value.replace("\r", "").replace("\n", "")  # as _domains_of unfolds first
    if dmarc._PLAIN_FROM.fullmatch(value) is not None:
        TRIED["dmarc from (fast path)"] += 1
        assert sorted(dmarc._domains_of(value)) == sorted(dmarc._domains_by_parsers(value))


# ------------------------------------------------------------------ Bayes message keys

@FUZZ
@given(st.lists(st.sampled_from([b"a", b" ", b"\t", b"\r", b"\n", b"\r\n", b"x ", b" \r\n",
                                 b"\xff", b"\x00"]), max_size=40))
def test_message_key_normalisation_matches_the_regex(parts: list[bytes]) -> None:
    """Learned message keys are stored: the line-based normalisation must give
    exactly what the original regex gave."""
    import re

    from mxguard.content.bayes import normalise_body

    TRIED["bayes key normalise"] += 1
    body = b"".join(parts)
    assert normalise_body(body) == re.sub(rb"[ \t]*\r?\n", b"\n", body).rstrip()
