"""Bayes tokenizer: header, body, URI and attachment tokens; bounds; determinism."""

from __future__ import annotations

import pytest

from mxguard.content import tokenizer
from mxguard.content.mime import parse_message
from mxguard.content.tokenizer import tokenize, tokenize_message

HEADERS = [
    ("From", '"Alice Example" <alice123@mail.example.com>'),
    ("To", "bob@b.example, carol@c.example"),
    ("Subject", "Re: FREE money NOW!!!"),
    ("Received", "from relay.sender.example (relay.sender.example [192.0.2.33]) "
                 "by mx.b.example with ESMTP id 1234"),
    ("Content-Type", 'text/plain; charset="ISO-8859-1"'),
    ("Message-ID", "<abc.123@mail.example.com>"),
    ("X-Mailer", "Microsoft Outlook Express 6.00"),
    ("X-Spam-Status", "Yes, score=20.0"),
    ("List-Id", "<users.lists.example>"),
    ("X-Priority", "1"),
]


@pytest.mark.parametrize(("token", "present"), [
    ("subject:free", True),
    ("subject:money", True),
    ("subject:re:", True),
    ("subject:!!!", True),
    ("from:addr:alice123@mail.example.com", True),
    ("from:dom:mail.example.com", True),
    ("from:local:alice###", True),
    ("from:name:alice", True),
    ("to:count:2-3", True),
    ("to:domains:2-3", True),
    ("to:dom:b.example", False),  # which recipient domain: never a token
    ("rcvd:host:sender.example", True),
    ("rcvd:ip:192.0.2", True),
    ("rcvd:with:esmtp", True),
    ("ctype:text/plain", True),
    ("charset:iso-8859-1", True),
    ("msgid:dom:mail.example.com", True),
    ("mailer:microsoft", True),
    ("hdr:x-mailer", True),
    ("hdr:x-priority=1", True),
    # stamps of filters and list software are never tokens (control cases)
    ("hdr:x-spam-status", False),
    ("hdr:list-id", False),
    ("subject:re", False),  # the reply prefix is its own token, not a word
    ("msgid:none", False),
])
def test_header_tokens(token: str, present: bool) -> None:
    assert (token in tokenize(HEADERS)) is present


def test_missing_message_id_and_reply_to_mismatch() -> None:
    toks = tokenize([("From", "a@one.example"), ("Reply-To", "x@two.example")])
    assert "msgid:none" in toks
    assert "reply-to:differs" in toks
    same = tokenize([("From", "a@one.example"), ("Reply-To", "b@one.example"),
                     ("Message-ID", "<1@one.example>")])
    assert "reply-to:differs" not in same and "msgid:none" not in same


@pytest.mark.parametrize(("text", "expected", "absent"), [
    ("Hello World, hello again", ["hello", "world", "again"], []),
    ("a an the", ["the"], ["an", "a"]),  # words shorter than 3 are dropped
    ("x" * 20, ["x" * 20], []),  # 20 characters: still a word
    ("Supercalifragilisticexpialidocious!", ["skip:s 30"], ["supercalifragilisticexpialidocious"]),
    ("call 309-407-7378 now", ["num:999-999-9999", "call", "now"], ["309-407-7378"]),
    ("only $50 today", ["num:$99", "only", "today"], []),
    ("mail me: someone@spam.example", ["email:spam.example"], []),
    ("Grüße aus München", ["grüße", "münchen", "aus"], []),
])
def test_body_words(text: str, expected: list[str], absent: list[str]) -> None:
    toks = tokenize(texts=[text])
    for t in expected:
        assert t in toks
    for t in absent:
        assert t not in toks


def test_eight_bit_share() -> None:
    assert "8bit:100%" in tokenize(texts=["ЖЖЖЖЖЖЖЖЖЖ ЖЖЖЖЖЖЖЖЖЖ ЖЖЖЖЖЖЖЖЖЖ"])
    assert not any(t.startswith("8bit:") for t in tokenize(texts=["plain ascii " * 5]))


@pytest.mark.parametrize(("uri", "expected"), [
    ("http://www.shop.example.com/buy/now.html?id=77", ["proto:http", "url:example.com",
                                                        "url:shop.example.com",
                                                        "url:www.shop.example.com",
                                                        "url:p:buy", "url:p:now",
                                                        "url:p:html"]),
    ("https://192.0.2.7:8080/x", ["proto:https", "url:ip", "url:port"]),
    ("http://user@evil.example/", ["url:userinfo", "url:evil.example"]),
    ("http://[::1", ["url:bad"]),
])
def test_uri_tokens(uri: str, expected: list[str]) -> None:
    toks = tokenize(uris=[uri])
    for t in expected:
        assert t in toks


def test_urls_in_text_become_url_tokens_not_words() -> None:
    toks = tokenize(texts=["visit http://deals.example.net/offer today"])
    assert "url:deals.example.net" in toks and "visit" in toks and "today" in toks
    assert not any("http" in t for t in toks if not t.startswith(("url:", "proto:")))


def test_attachments() -> None:
    toks = tokenize(attachments=[("invoice.PDF.exe", "application/octet-stream")])
    assert "attach:ext:exe" in toks and "attach:type:application/octet-stream" in toks


def test_deduplicated_and_ordered() -> None:
    toks = tokenize(texts=["spam spam eggs spam eggs ham"])
    assert toks == ["msgid:none", "spam", "eggs", "ham",  # words first, then pairs
                    "bi:spam spam", "bi:spam eggs", "bi:eggs spam", "bi:eggs ham"]


@pytest.mark.parametrize(("text", "pairs"), [
    ("buy cheap pills", ["bi:buy cheap", "bi:cheap pills"]),
    ("buy 100 pills", []),  # a number breaks the chain
    ("buy it now", []),  # so does a word too short to be a token
    ("click http://x.example/ here now", ["bi:click here", "bi:here now"]),
])
def test_word_pairs(text: str, pairs: list[str]) -> None:
    toks = tokenize(texts=[text])
    assert [t for t in toks if t.startswith("bi:")] == pairs
    assert not any(t.startswith("bi:") for t in tokenize(texts=[text], bigrams=False))


def test_pairs_never_crowd_out_words() -> None:
    text = " ".join(f"word{i:06d}" for i in range(5000))
    toks = tokenize(texts=[text], max_tokens=3000)
    assert sum(not t.startswith("bi:") for t in toks) == 3000


def test_deterministic() -> None:
    args = (HEADERS, ["some body text with words and more words"], ["http://a.example/x"])
    assert tokenize(*args) == tokenize(*args)


def test_bounded_token_count() -> None:
    text = " ".join(f"word{i:06d}" for i in range(20000))
    toks = tokenize(texts=[text])
    assert len(toks) == tokenizer.MAX_TOKENS
    assert len(tokenize(texts=[text], max_tokens=50)) == 50


def test_bounded_text_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer, "MAX_TEXT_CHARS", 20)
    toks = tokenize(texts=["alpha bravo charlie", "delta echo foxtrot golf"])
    assert "alpha" in toks and "delta" not in toks  # second part beyond the budget


def test_huge_header_and_line_do_not_blow_up() -> None:
    toks = tokenize([("Subject", "A" * 1_000_000), ("To", ", ".join(["x@y.example"] * 10000))],
                    texts=["z" * 5_000_000])
    assert f"skip:z {tokenizer.MAX_TEXT_CHARS}" in toks  # text read up to the bound
    assert "subject:skip:a 2000" in toks  # header read up to its bound
    assert "to:count:11+" in toks


def test_tokenize_parsed_message() -> None:
    raw = (b"From: Shop <deals@shop.example>\r\nTo: you@example.org\r\n"
           b"Subject: Great offer\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n"
           b"--XX\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><body><p>Cheap <b>pills</b> <a href='http://pills.example/buy'>here</a>"
           b"</p></body></html>\r\n"
           b"--XX\r\nContent-Type: application/octet-stream; name=run.exe\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAA=\r\n--XX--\r\n")
    toks = tokenize_message(parse_message(raw))
    for t in ("subject:great", "cheap", "pills", "url:pills.example", "urltag:a",
              "part:text/html", "partcharset:utf-8", "html:b", "html:a", "attach:ext:exe",
              "attach:magic:pe", "from:dom:shop.example"):
        assert t in toks, t
    assert "html" not in toks  # tags are not words: HTML was rendered to text


CACHE_TEXTS = [
    "the cheap pills the cheap pills 555-1234 bob@example.com " * 3,
    "Free money FREE money, call $99 now! " + "x" * 30,
    "plain words only here",  # control: short, nothing special
]


@pytest.mark.parametrize("limit", [1, 3, 50_000])
def test_word_cache_size_never_changes_the_tokens(monkeypatch: pytest.MonkeyPatch,
                                                  limit: int) -> None:
    """The word cache is emptied when full, also in the middle of a text: the
    tokens must be the same as computed without it."""
    want = [tokenize(texts=[t], max_tokens=10_000) for t in CACHE_TEXTS]
    monkeypatch.setattr(tokenizer, "WORD_CACHE_MAX", limit)
    tokenizer._WORD_CACHE.clear()
    tokenizer._MARK_CACHE.clear()
    for _ in range(2):  # cold, then warm
        assert [tokenize(texts=[t], max_tokens=10_000) for t in CACHE_TEXTS] == want


def test_bag_filling_inside_a_text_stops_there() -> None:
    toks = tokenize(texts=["alpha beta gamma delta epsilon"], max_tokens=3)
    assert toks == ["msgid:none", "alpha", "beta"]  # no room left for pairs either
    assert tokenize(texts=["alpha beta"], max_tokens=10) == [  # control
        "msgid:none", "alpha", "beta", "bi:alpha beta"]


def test_marks_lost_meanwhile_fall_back_to_the_tokens() -> None:
    text = CACHE_TEXTS[0]
    want = tokenize(texts=[text], max_tokens=10_000)  # warms both caches
    tokenizer._MARK_CACHE.clear()  # as if another thread emptied it in between
    assert tokenize(texts=[text], max_tokens=10_000) == want
    assert any(t.startswith("bi:") for t in want)  # control: pairs were there to lose


# ------------------------------------------------------------------ shape tokens

@pytest.mark.parametrize(("value", "shape"), [
    ("<20021101.JavaMail@host.example>", "<9.a@a.a>"),
    ("Mon, 01 Jan 2024 00:00:00 +0000", "a, 9 a 9 9:9:9 +9"),
    ("  x  ", "a"),
])
def test_shape_of_folds_runs(value: str, shape: str) -> None:
    assert tokenizer.shape_of(value) == shape


SHAPE_MSG = (b"From: Deals <deals4u@shop.example>\nTo: bob@example.org\n"
             b"Subject: Your offer qz7k2m9\nDate: Mon, 01 Jan 2024 00:00:00 +0000\n"
             b"Message-ID: <20240101.99@shop.example>\nReceived: from a by b; "
             b"Mon, 01 Jan 2024 00:00:00 +0000\n\n"
             b"See http://x1.track.shop.example/c/a/b?id=ab12cd34ef56gh\n")
PLAIN_MSG = (b"From: Ann <ann@example.com>\nTo: bob@example.org\nSubject: Lunch\n"
             b"Date: Mon, 01 Jan 2024 00:00:00 +0000\nMessage-ID: <1@example.com>\n\n"
             b"See https://example.com/menu\n")


@pytest.mark.parametrize(("token", "in_shape_msg", "in_plain_msg"), [
    ("shape:mid:<9.9@a.a>", True, False),
    ("shape:date:a, 9 a 9 9:9:9 +9", True, True),
    ("shape:from:a <a9a@a.a>", True, False),
    ("shape:subj:tag", True, False),
    ("shape:rcvd:1", True, False),
    ("shape:rcvd:0", False, True),
    ("shape:mime:text/plain+0att", True, True),
    ("shape:url:labels:4-10", True, False),
    ("shape:url:labels:2-3", False, True),
    ("shape:url:hostdigits", False, False),  # the registrable label has no digits
    ("shape:url:depth:2-3", True, False),
    ("shape:url:query", True, False),
    ("shape:url:randompiece", True, False),
])
def test_shape_tokens(token: str, in_shape_msg: bool, in_plain_msg: bool) -> None:
    assert (token in tokenize_message(parse_message(SHAPE_MSG))) is in_shape_msg
    assert (token in tokenize_message(parse_message(PLAIN_MSG))) is in_plain_msg


def test_shape_tokens_are_bounded_for_many_links() -> None:
    body = " ".join(f"http://h{i}.example{i}.com/{'a/' * i}?q={i}" for i in range(500))
    raw = b"From: a@example.com\nSubject: x\n\n" + body.encode()
    toks = [t for t in tokenize_message(parse_message(raw)) if t.startswith("shape:url:")]
    assert len(toks) == len(set(toks)) <= 20
