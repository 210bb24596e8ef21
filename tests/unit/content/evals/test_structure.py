"""The shape evals of :mod:`mxguard.content.evals.structure`: each case a
message that must make the eval true next to a close one that must not."""

from __future__ import annotations

import base64

import pytest

from mxguard.content.evals import EVALS, ScanContext
from mxguard.content.mime import parse_message

HEAD = ("From: Ann <ann@example.com>\nTo: bob@example.org\nSubject: {subject}\n"
        "Date: Mon, 01 Jan 2024 00:00:00 +0000\nMessage-Id: <1@example.com>\n{extra}\n")


def msg(body: str = "Hello\n", subject: str = "Lunch", extra: str = "") -> ScanContext:
    raw = HEAD.format(subject=subject, extra=extra) + body
    return ScanContext(parse_message(raw.encode()))


def b64word(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?B?{base64.b64encode(text.encode(charset)).decode()}?="


HTML = "Content-Type: text/html\n"
ALT = ('MIME-Version: 1.0\nContent-Type: multipart/alternative; boundary="B"\n')


def alternative(plain: str, html: str) -> str:
    return (f"--B\nContent-Type: text/plain\n\n{plain}\n--B\nContent-Type: text/html\n\n"
            f"{html}\n--B--\n")


WORDS = " ".join(f"word{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(40))

# (eval, args, context that must be true, control that must be false)
CASES: list[tuple[str, tuple[str, ...], ScanContext, ScanContext]] = [
    ("mxg_encoded_ascii", ("Subject",), msg(subject=b64word("Cheap pills now")),
     msg(subject=b64word("Grüße aus Köln"))),
    ("mxg_encoded_ascii", ("Subject", "q"), msg(subject="=?us-ascii?Q?Cheap_pills_now?="),
     msg(subject=b64word("Cheap pills now"))),
    ("mxg_encoded_ascii", ("From",),
     ScanContext(parse_message(f"From: {b64word('Deals')} <d@example.com>\n\nhi".encode())),
     msg()),
    ("mxg_subject_random_tail", (), msg(subject="Special offer 4u qz7k2m9"),
     msg(subject="Release notes for x86 2024")),
    ("mxg_subject_random_tail", (), msg(subject="Your order [a1b2c3d4]"),
     msg(subject="Ticket 123456")),
    ("mxg_html_word_split", (), msg("<p>V<!-- q -->iagra</p>", extra=HTML),
     msg("<p>Hello <!-- x --> world</p>", extra=HTML)),
    ("mxg_html_word_split", (), msg("<p>Via<b></b>gra</p>", extra=HTML),
     msg("<p>Via <b>bold</b> gra</p>", extra=HTML)),
    ("mxg_alternative_differs", ("0.3",),
     msg(alternative("Your mail program cannot show HTML.", f"<p>{WORDS}</p>"), extra=ALT),
     msg(alternative(WORDS, f"<p>{WORDS}</p>"), extra=ALT)),
    ("mxg_uri_obscured_host", (), msg("go http://%77%77%77.example.com/x"),
     msg("go http://www.example.com/%77x")),
    ("mxg_uri_obscured_host", (), msg("go http://0x7f.0x0.0x0.0x1/x"),
     msg("go http://127.0.0.1/x")),
    ("mxg_uri_obscured_host", (), msg("go http://3232235777/x"),
     msg("go http://example.com/3232235777")),
    ("mxg_uri_userinfo", (), msg("go http://www.bank.example@evil.example/"),
     msg("go http://www.bank.example/?u=ann@example.com")),
    ("mxg_charset_far_script", (), msg(extra='Content-Type: text/plain; charset="euc-kr"\n'),
     msg(extra='Content-Type: text/plain; charset="iso-8859-1"\n')),
    ("mxg_charset_far_script", (), msg(subject=b64word("Hi", "gb2312")),
     msg(subject=b64word("Hi", "utf-8"))),
    ("mxg_html_tag_count", ("font", "3"), msg("<font>a</font>" * 3, extra=HTML),
     msg("<font>a</font>" * 2, extra=HTML)),
    ("mxg_image_links_few_words", ("3", "100"),
     msg('<img src="http://i.example/1"><img src="http://i.example/2">'
         '<img src="http://i.example/3"> buy', extra=HTML),
     msg('<img src="http://i.example/1"><img src="http://i.example/2">'
         '<img src="http://i.example/3"> ' + "text " * 120, extra=HTML)),
    ("mxg_from_local_digits", ("4",),
     ScanContext(parse_message(b"From: jsmith48213@example.com\n\nhi")),
     ScanContext(parse_message(b"From: jsmith48@example.com\n\nhi"))),
]


@pytest.mark.parametrize(("name", "args", "hit", "control"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_eval_fires_and_control_does_not(name: str, args: tuple[str, ...], hit: ScanContext,
                                         control: ScanContext) -> None:
    assert EVALS[name](hit, *args)
    assert not EVALS[name](control, *args)


@pytest.mark.parametrize("name", sorted({c[0] for c in CASES}))
def test_eval_survives_an_empty_message(name: str) -> None:
    args = next(c[1] for c in CASES if c[0] == name)
    assert not EVALS[name](ScanContext(parse_message(b"")), *args)
