"""``eval:`` functions on the shape of a message rather than its words: header
encodings, Subject tails, HTML obfuscation, alternative parts that disagree,
URLs that hide their host, character sets of a far script.

They back the "structure and obfuscation" block of the built-in ruleset
(``mxguard.cf``). Each is written to be true of a trick, not of a topic, so
it holds across years of spam. ``mxg_alternative_differs``,
``mxg_html_tag_count`` and ``mxg_from_local_digits`` are for users' own
rules: the built-in set leaves them out because company newsletters show
them as often as spam does (measured on the corpus' train half).
"""

from __future__ import annotations

import base64
import binascii
import quopri
import re
from itertools import pairwise

from mxguard.content.evals.base import ScanContext, address, num, register

_ENCODED_WORD = re.compile(r"=\?[^?\s]{1,40}\?([bBqQ])\?([^?\s]{1,2000})\?=")


def _decoded_words(raw: str) -> list[bytes]:
    out: list[bytes] = []
    for m in _ENCODED_WORD.finditer(raw[:8000]):
        data = m.group(2)
        try:
            if m.group(1) in "bB":
                out.append(base64.b64decode(data + "=" * (-len(data) % 4)))
            else:
                out.append(quopri.decodestring(data.replace("_", " ").encode(), header=True))
        except (binascii.Error, ValueError):
            continue
    return out


@register("mxg_encoded_ascii")
def encoded_ascii(ctx: ScanContext, name: str, enc: str = "any") -> bool:
    """The raw header ``name`` hides plain ASCII text in RFC 2047 encoded words
    (mail programs encode only text that needs it; ``enc``: ``b``, ``q`` or any)."""
    for raw in ctx.msg.get_raw(name):
        words = [m for m in _ENCODED_WORD.finditer(raw[:8000])
                 if enc == "any" or m.group(1).lower() == enc.lower()]
        if not words:
            continue
        decoded = _decoded_words(" ".join(m.group(0) for m in words))
        text = b"".join(decoded)
        if len(text) >= 4 and text.isascii() and all(32 <= c < 127 for c in text):
            return True
    return False


_TAIL_TOKEN = re.compile(r"(?:^|\s)[\[(#]?([A-Za-z0-9]{5,16})[\])]?\s*$")


@register("mxg_subject_random_tail")
def subject_random_tail(ctx: ScanContext) -> bool:
    """The Subject ends in a random-looking tag that makes each copy unique:
    a run of letters and digits interleaved (``xk29dq7``)."""
    subject = ctx.msg.subject.rstrip()
    if not subject or len(subject) > 300:
        return False
    m = _TAIL_TOKEN.search(subject)
    if m is None:
        return False
    tok = m.group(1)
    digits = sum(c.isdigit() for c in tok)
    letters = len(tok) - digits
    if digits < 2 or letters < 2:
        return False
    # letters and digits interleaved (not a word followed by a number, "RH8", "x86")
    changes = sum(1 for a, b in pairwise(tok) if a.isdigit() != b.isdigit())
    return changes >= 3


_COMMENT_IN_WORD = re.compile(r"[A-Za-z]<!--[^>]{0,80}?-->[A-Za-z]")
_EMPTY_TAG_IN_WORD = re.compile(
    r"[a-z](?:<(b|i|u|font|span)\b[^>]{0,60}>\s*</\1\s*>)+[a-z]", re.I)


@register("mxg_html_word_split")
def html_word_split(ctx: ScanContext) -> bool:
    """An HTML comment or an empty inline element splits a word in two
    (``V<!-- x -->iagra``): the reader sees the word, a filter does not."""
    return any(_COMMENT_IN_WORD.search(p.raw[:200_000]) or
               _EMPTY_TAG_IN_WORD.search(p.raw[:200_000]) for p in ctx.msg.html_parts)


_WORDS = re.compile(r"[a-z]{3,}")


@register("mxg_alternative_differs")
def alternative_differs(ctx: ScanContext, overlap: str = "0.3") -> bool:
    """multipart/alternative whose text and HTML parts share fewer than
    ``overlap`` of their words: the two are not the same message."""
    if not any("multipart/alternative" in v.lower() for v in ctx.msg.get("Content-Type")) and \
            "multipart/alternative" not in ctx.msg.raw_body[:20000].lower():
        return False
    plain = [p for p in ctx.msg.parts if p.content_type == "text/plain"]
    html = ctx.msg.html_parts
    if not plain or not html:
        return False
    a = set(_WORDS.findall(plain[0].text[:50_000].lower()))
    b = set(_WORDS.findall(html[0].text[:50_000].lower()))
    if len(b) < 20:
        return False
    return len(a & b) / len(a | b) < num(overlap, 0.3)


_DWORD_HOST = re.compile(r"^(?:\d{8,10}|0x[0-9a-f]{6,8}|(?:0x[0-9a-f]{1,2}|0[0-7]{1,3})"
                         r"(?:\.(?:0x[0-9a-f]{1,2}|0[0-7]{1,3}|\d{1,3})){3})$", re.I)
_URL_HOSTPART = re.compile(r"^[a-z][a-z0-9+.-]*://([^/?#]*)", re.I)
_RAW_LINK_HOST = re.compile(r"(?i)\bhttps?:/{1,3}([^/\s\"'<>?#\\]{1,255})")


@register("mxg_uri_obscured_host")
def uri_obscured_host(ctx: ScanContext) -> bool:
    """A link's host, as written in the message, is %-escaped, or an IP
    address as one decimal number, in hex or in octal (the parser
    normalises them, so this reads the text parts' source)."""
    for part in ctx.msg.parts[:50]:
        src = part.raw[:500_000]
        if "://" not in src:
            continue
        for m in _RAW_LINK_HOST.finditer(src):
            host = m.group(1).rpartition("@")[2].partition(":")[0].rstrip(".")
            if "%" in host or _DWORD_HOST.match(host):
                return True
    return False


@register("mxg_uri_userinfo")
def uri_userinfo(ctx: ScanContext) -> bool:
    """A web link, as written in the message, with text before an ``@`` in
    its host part (``http://www.bank.example@evil.example/``): browsers go to
    what follows the ``@``."""
    for part in ctx.msg.parts[:50]:
        src = part.raw[:500_000]
        if "://" not in src or "@" not in src:
            continue
        for m in _RAW_LINK_HOST.finditer(src):
            user, at, host = m.group(1).rpartition("@")
            if at and user and host:
                return True
    return False


_FAR_CHARSETS = re.compile(
    r"^(?:gb2312|gbk|gb18030|big5(?:-hkscs)?|euc-(?:kr|jp|cn|tw)|ks_c_5601(?:-1987)?|"
    r"iso-2022-(?:jp|kr|cn)|shift_jis|sjis|windows-(?:874|936|949|950)|tis-620|koi8-[ru]|"
    r"windows-1251|cp1251|iso-8859-5)$", re.I)
_CHARSET_PARAM = re.compile(r"(?i)charset\s*=\s*\"?([\w.:-]+)")


@register("mxg_charset_far_script")
def charset_far_script(ctx: ScanContext) -> bool:
    """A text part (or the message) declares a character set of CJK, Thai or
    Cyrillic script."""
    for part in ctx.msg.parts:
        if part.charset and _FAR_CHARSETS.match(part.charset):
            return True
    for value in ctx.msg.get("Content-Type") + ctx.msg.get_raw("Subject"):
        m = _CHARSET_PARAM.search(value)
        if m and _FAR_CHARSETS.match(m.group(1)):
            return True
        for w in _ENCODED_WORD.finditer(value):
            cs = w.group(0)[2:].partition("?")[0]
            if _FAR_CHARSETS.match(cs):
                return True
    return False


@register("mxg_html_tag_count")
def html_tag_count(ctx: ScanContext, tag: str, lo: str) -> bool:
    """At least ``lo`` ``<tag`` elements in one HTML part."""
    pat = re.compile(rf"(?i)<{re.escape(tag)}\b")
    need = int(num(lo, 1))
    for part in ctx.msg.html_parts:
        for count, _ in enumerate(pat.finditer(part.raw[:200_000]), 1):
            if count >= need:
                return True
    return False


@register("mxg_image_links_few_words")
def image_links_few_words(ctx: ScanContext, images: str, words: str) -> bool:
    """HTML with at least ``images`` images and fewer than ``words`` words of text."""
    html = ctx.msg.html_parts
    if not html:
        return False
    if sum(1 for u in ctx.msg.uris if u.tag == "img") < num(images, 3):
        return False
    return sum(len(p.text.split()) for p in html) < num(words, 150)


@register("mxg_from_local_digits")
def from_local_digits(ctx: ScanContext, lo: str = "4") -> bool:
    """The From address's local part carries a run of ``lo`` or more digits
    (``jsmith48213@``: a generated mailbox)."""
    local = address(ctx.msg.first("From")).partition("@")[0]
    need = int(num(lo, 4))
    run = longest = 0
    for ch in local:
        run = run + 1 if ch.isdigit() else 0
        longest = max(longest, run)
    return longest >= need and not local.isdigit()


__all__ = ["alternative_differs", "charset_far_script", "encoded_ascii", "from_local_digits",
           "html_tag_count", "html_word_split", "image_links_few_words", "subject_random_tail",
           "uri_obscured_host", "uri_userinfo"]
