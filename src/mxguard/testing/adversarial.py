"""Adversarial message shapes for the content path (MIME parser, URI
extraction, rule evals, tokenizer): what a crafted message does to make a
scan superlinear. Shared by the fuzz tests and ``bench/content_worst.py``.

Each shape is ``fn(size) -> bytes``, a message of about ``size`` bytes.
"""

from __future__ import annotations

from collections.abc import Callable

_HEAD = (b"From: Sender <sender@example.com>\nTo: user@example.net\n"
         b"Subject: hello\nDate: Mon, 1 Jan 2024 10:00:00 +0000\n"
         b"Message-ID: <x@example.com>\n")


def _labels(n: int) -> str:
    return "a." * n + "example.com"


def many_labels_url(size: int) -> bytes:
    """One plain-text URL whose host has ~size/2 labels (a.a.a....example.com)."""
    host = _labels(max(1, size // 2 - 40))
    return _HEAD + b"\nsee http://" + host.encode() + b"/x\n"


def many_labels_urls(size: int) -> bytes:
    """Many URLs, each host with 200 labels (plain text and HTML links)."""
    host = _labels(200)
    one = f'<a href="http://{host}/p">http://{host}/</a>\n'
    count = max(1, size // len(one))
    html = "<html><body>" + one * count + "</body></html>"
    return (_HEAD + b"MIME-Version: 1.0\nContent-Type: text/html\n\n" + html.encode())


def many_labels_headers(size: int) -> bytes:
    """From, Reply-To, Return-Path, Message-ID and Received with many-label hosts."""
    host = _labels(max(1, size // 12))
    h = host.encode()
    return (b"Return-Path: <x@" + h + b">\nReceived: from " + h + b" (" + h +
            b" [192.0.2.1]) by mx.example.net with ESMTP; Mon, 1 Jan 2024 10:00:00 +0000\n"
            b"From: \"x@" + h + b"\" <x@" + h + b">\nReply-To: y@" + h + b"\n"
            b"To: user@example.net\nSubject: hi\nMessage-ID: <1@" + h + b">\n\nbody\n")


def run_of(char: bytes) -> Callable[[int], bytes]:
    def shape(size: int) -> bytes:
        return _HEAD + b"\n" + char * size + b"\n"
    shape.__doc__ = f"a body of one long run of {char!r}"
    shape.__name__ = f"run_of_{char.decode('latin-1')!r}"
    return shape


def run_in_html(size: int) -> bytes:
    """An HTML part that is one long run of '<'."""
    return _HEAD + b"Content-Type: text/html\n\n<html>" + b"<" * size + b"\n"


def long_line_url(size: int) -> bytes:
    """A URL of one long run of characters after the scheme."""
    return _HEAD + b"\nhttp://" + b"a" * size + b"\n"


def deep_nesting(size: int) -> bytes:
    """multipart inside multipart, as deep as the size allows."""
    depth = max(1, size // 60)
    head, tail = [], []
    for i in range(depth):
        head.append(f"Content-Type: multipart/mixed; boundary=\"b{i}\"\n\n--b{i}\n")
        tail.append(f"\n--b{i}--\n")
    body = "".join(head) + "Content-Type: text/plain\n\nleaf\n" + "".join(reversed(tail))
    return _HEAD + b"MIME-Version: 1.0\n" + body.encode()


def many_parts(size: int) -> bytes:
    """A multipart with as many tiny text parts as the size allows."""
    one = b"--b\nContent-Type: text/plain\n\nx\n"
    count = max(1, size // len(one))
    return (_HEAD + b"MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b\"\n\n"
            + one * count + b"--b--\n")


def many_headers(size: int) -> bytes:
    """As many tiny header fields as the size allows."""
    count = max(1, size // 5)
    return _HEAD + b"X: y\n" * count + b"\nbody\n"


def many_received(size: int) -> bytes:
    """Many Received headers with a date each."""
    one = b"Received: from h.example.com ([192.0.2.1]) by mx; Mon, 1 Jan 2024 10:00:00 +0000\n"
    return one * max(1, size // len(one)) + _HEAD + b"\nbody\n"


def many_encoded_words(size: int) -> bytes:
    """A Subject of many RFC 2047 encoded words."""
    count = max(1, size // 12)
    return (b"From: a@example.com\nTo: b@example.net\nSubject: " + b"=?utf-8?q?a?= " * count +
            b"\n\nbody\n")


def many_params(size: int) -> bytes:
    """A Content-Type with many RFC 2231 continuation parameters."""
    count = max(1, size // 16)
    params = "".join(f";\n name*{i}*=a" for i in range(count))
    return (_HEAD + b"Content-Type: application/octet-stream" + params.encode() +
            b"\nContent-Transfer-Encoding: base64\n\nAAAA\n")


def many_addresses(size: int) -> bytes:
    """A To header with very many addresses."""
    count = max(1, size // 16)
    return (b"From: a@example.com\nSubject: s\nTo: " + b"u@example.net, " * count +
            b"\n\nbody\n")


SHAPES: dict[str, Callable[[int], bytes]] = {
    "many_labels_url": many_labels_url,
    "many_labels_urls": many_labels_urls,
    "many_labels_headers": many_labels_headers,
    "run_of_a": run_of(b"a"),
    "run_of_dot": run_of(b"."),
    "run_of_at": run_of(b"@"),
    "run_of_lt": run_of(b"<"),
    "run_of_eq": run_of(b"="),
    "run_of_space": run_of(b" "),
    "run_of_newline": run_of(b"\n"),
    "run_in_html": run_in_html,
    "long_line_url": long_line_url,
    "deep_nesting": deep_nesting,
    "many_parts": many_parts,
    "many_headers": many_headers,
    "many_received": many_received,
    "many_encoded_words": many_encoded_words,
    "many_params": many_params,
    "many_addresses": many_addresses,
}


__all__ = ["SHAPES"]
