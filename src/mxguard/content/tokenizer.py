"""Bayes tokens of a message: selected headers, decoded text, URIs, attachments.

The tokenizer turns what the MIME parser decoded into a list of short strings
(features) for the Bayes classifier. Each token says only *that* a feature
occurs, not how often (the classifier counts messages, not occurrences), so
the result is de-duplicated, in first-seen order, and bounded:
at most :data:`MAX_TOKENS` tokens, at most :data:`MAX_TEXT_CHARS` characters
of text read, at most :data:`MAX_URIS` URIs. The same input always gives the
same list (no hashing salt, no set iteration order).

Token shapes (the prefix names where a token came from):

* body words of 3-20 characters, lower-cased: ``money``;
  longer words are summarised as ``skip:<first char> <length rounded down to 10>``
  (``skip:h 30``), numbers by their shape (``num:999-999-9999``, ``num:$99``),
  e-mail addresses in text as ``email:<domain>``;
* pairs of adjacent body words, ``bi:<word> <word>`` (at most :data:`MAX_PAIRS`,
  added after everything else so they never crowd out single words);
* share of 8-bit characters in a text part: ``8bit:<bucket>`` (``8bit:50%``);
* ``subject:<word>`` (words of 2-20 characters, longer ones ``subject:skip:...``),
  ``subject:re:`` (reply/forward prefix), ``subject:caps``, ``subject:!``, ``subject:$``;
* ``from:addr:``, ``from:dom:``, ``from:local:`` (digits folded to ``#``),
  ``from:name:<word>`` / ``from:noname``; ``to:count:<bucket>``,
  ``to:domains:<bucket>`` (how many recipients / domains, not which: the
  recipient domain is the site's own), the same for ``cc:``;
  ``reply-to:dom:``, ``reply-to:differs``; ``return-path:dom:``;
* ``rcvd:host:<last two labels>``, ``rcvd:ip:<a.b.c>``, ``rcvd:with:<protocol>``
  from the first :data:`MAX_RECEIVED` Received headers;
* ``ctype:<type>``, ``charset:<name>``, ``cte:<encoding>``; ``mailer:<word>``;
  ``msgid:dom:<domain>`` / ``msgid:none``;
* URIs: ``proto:<scheme>``, ``url:<host suffix>`` (each suffix of 2-4 labels),
  ``url:ip``, ``url:port``, ``url:userinfo``, ``url:p:<path piece>``;
* attachments: ``attach:ext:<ext>``, ``attach:type:<type>``, ``attach:magic:<kind>``;
* ``hdr:<name>`` for each header present, ``hdr:x-priority=<value>`` and the
  like for priority headers; ``html:<tag>`` for each tag name of HTML parts;
  ``part:<type>``, ``partcharset:<charset>``, ``urltag:<element>`` from the parser.

* shapes (``shape:``), the form of a message rather than its words:
  ``shape:mid:<9.a@a.a>``, ``shape:date:...``, ``shape:from:...`` (runs of
  letters as ``a``, of digits as ``9``), ``shape:subj:tag`` (a random tag at
  the end), ``shape:rcvd:<bucket>``, ``shape:mime:<text parts>+<n>att``,
  ``shape:url:labels:<bucket>``, ``shape:url:depth:<bucket>``,
  ``shape:url:query``, ``shape:url:hostdigits``, ``shape:url:randompiece``.
  Added in 0.x after data may have been learned: older Bayes data simply has
  no counts for them until mail is learned again (the other tokens are
  unchanged, so nothing learned before goes stale).

Headers that are stamps of other filters or of mailing-list software
(``X-Spam-*``, ``X-MailScanner*``, ``List-*`` ...) are deliberately not
tokenized: they describe the path a message took to this corpus or mailbox,
not the message, and a classifier that latches onto them learns the path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from email.utils import getaddresses
from itertools import pairwise, repeat
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from mxguard.content.mime import ParsedMessage

MAX_TOKENS = 4000
MAX_PAIRS = 2000  # of which word pairs (added last)
MAX_TEXT_CHARS = 200_000
MAX_URIS = 64
MAX_RECEIVED = 4
MAX_ADDRESSES = 20
MAX_HEADER_CHARS = 2000
MIN_WORD = 3
MAX_WORD = 20


_WORD_SPLIT = re.compile(r"\S+")
_STRIP = "\"'`.,;:!?()[]{}<>*_=|~^\\/#+-"
_NUMERIC = re.compile(r"^[$€£¥]?[\d][\d.,:/\-]*[%$€£¥]?$|^[$€£¥]\d")
_DIGITS = re.compile(r"\d")
_EMAIL = re.compile(r"^[\w.+\-]+@([\w\-]+(?:\.[\w\-]+)+)$")
_URL_IN_TEXT = re.compile(r"(?i)\b(?:https?://|ftp://|www\.)[^\s<>\"'()]+")
_RCVD_FROM = re.compile(r"(?is)^\s*from\s+(\S+)(?:\s+\(([^)]*)\))?")
_RCVD_WITH = re.compile(r"(?i)\bwith\s+([a-z0-9]+)")
_IPV4 = re.compile(r"\b(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.\d{1,3}\b")
_HOSTNAME = re.compile(r"^[a-z0-9][a-z0-9\-]*(?:\.[a-z0-9\-]+)+$")
_PATH_SPLIT = re.compile(r"[/?=&.;_\-+%:,~!#]+")
_MSGID_DOM = re.compile(r"@([^>\s]+)>?\s*$")
_CHARSET = re.compile(r"(?i)charset\s*=\s*\"?([\w.:\-]+)")
_SUBJECT_PREFIX = re.compile(r"(?i)^\s*(re|fwd?|aw|sv)\s*:")
_SUBJECT_WORD = re.compile(r"\w{2,}|[$!]+")
_8BIT = re.compile(r"[^\x00-\x7f]")
_LETTERS = re.compile(r"[^\W\d_]")
_UPPER = re.compile(r"[A-Z]")
_NOT_WORDS = ("num:", "email:", "skip:")
_HTML_TAG = re.compile(r"<\s*([a-zA-Z][a-zA-Z0-9]{0,15})\b")
MAX_HTML_CHARS = 100_000
# Header names not turned into ``hdr:`` tokens: stamps of filters (ours included:
# X-Spam-*, Authentication-Results), of list software and of mailbox software.
# They tell where a message was kept, not what it is.
_UNNAMED_HEADERS = re.compile(
    r"^(x-spam|x-mailscanner|x-spamcop|x-spamadvice|x-virus|x-pyzor|x-razor|x-dcc|"
    r"x-greylist|received-spf|authentication-results|arc-|dkim-signature|"
    r"domainkey-signature|list-|x-list|x-mailman|x-beenthere|mailing-list|"
    r"x-mailing-list|x-egroups|x-yahoo|x-apparently-to|precedence|errors-to|sender$|"
    r"x-loop|x-original|delivered-to|delivery-date|x-keywords|x-status$|status$|x-uid|"
    r"x-evolution|lines$|content-length|x-imap|x-gmail|x-mozilla|x-account-key|"
    r"return-receipt|x-envelope|envelope-to|x-rcpt-to|x-delivered)")
_VALUED_HEADERS = frozenset(("x-priority", "x-msmail-priority", "importance", "priority"))


class _Bag:
    """Ordered, de-duplicated, bounded token collection."""

    __slots__ = ("limit", "tokens")

    def __init__(self, limit: int) -> None:
        self.tokens: dict[str, None] = {}
        self.limit = limit

    def add(self, token: str) -> None:
        if len(self.tokens) < self.limit:
            self.tokens[token] = None

    @property
    def full(self) -> bool:
        return len(self.tokens) >= self.limit


def _word_token(word: str) -> str | None:
    """The token of one whitespace-separated body word, or None."""
    word = word.strip(_STRIP)
    n = len(word)
    if n < MIN_WORD:
        return None
    if _NUMERIC.match(word):
        return "num:" + _DIGITS.sub("9", word)[:MAX_WORD]
    if "@" in word:
        m = _EMAIL.match(word)
        if m:
            return "email:" + m.group(1).lower()
    if n > MAX_WORD:
        return f"skip:{word[0].lower()} {n // 10 * 10}"
    return word.lower()


# Raw body word -> its token (or None). Mail is Zipf-distributed: a few thousand
# words make most of it, so this saves the strip/regex/lower work for nearly
# every word. Bounded: emptied when full (a cheap, deterministic policy).
_WORD_CACHE: dict[str, str | None] = {}
_MARK_CACHE: dict[str, str] = {}  # raw word -> its token if a word token (pairs), else ""
WORD_CACHE_MAX = 50_000
_MISS = "\0miss"  # compared by identity: an equal word token is still a hit


def _text_tokens(text: str, bag: _Bag, urls: list[str], pairs: _Bag) -> None:
    # the URL pattern needs "://" or (any case) "www.": test that first, in C
    if ("://" in text or "www." in text.lower()) and _URL_IN_TEXT.search(text):
        urls.extend(m.group(0) for m in _URL_IN_TEXT.finditer(text))
        text = _URL_IN_TEXT.sub(" ", text)
    words = text.split()  # str.split() and the regex \S+ split on the same whitespace
    cache = _WORD_CACHE
    toks, limit = bag.tokens, bag.limit
    ptoks, plimit = pairs.tokens, pairs.limit
    seq = list(map(cache.get, words, repeat(_MISS)))  # raw word -> token, in C
    if _MISS in seq:
        if len(cache) + len(words) > WORD_CACHE_MAX:  # full: start again (both caches)
            cache.clear()
            _MARK_CACHE.clear()
            seq = [_MISS] * len(words)
        for i, tok in enumerate(seq):
            if tok is _MISS:
                word = words[i]
                tok = cache.get(word, _MISS)
                if tok is _MISS:
                    tok = cache[word] = _word_token(word)
                    _MARK_CACHE[word] = tok if tok is not None and not tok.startswith(
                        _NOT_WORDS) else ""
                seq[i] = tok
    # word tokens (not num:/email:/skip:) pair with their neighbours; others break pairs
    marks: list[str | None] = list(map(_MARK_CACHE.get, words))
    if None in marks:  # only if another thread emptied the caches meanwhile
        marks = [t if t is not None and not t.startswith(_NOT_WORDS) else "" for t in seq]
    new = dict.fromkeys(filter(None, seq))
    if len(toks) + len(new) < limit:  # all fits: the whole text in a few C calls
        toks.update(new)
        if len(ptoks) < plimit:
            adjacent = dict.fromkeys(pairwise(marks))
            adjacent.pop(("", ""), None)
            pair_list = [f"bi:{a} {b}" for a, b in adjacent if a and b]
            for pair in pair_list:
                if len(ptoks) >= plimit:
                    break
                ptoks[pair] = None
    else:  # the bag fills up inside this text: word by word, stop when full
        prev = ""
        for tok, mark in zip(seq, marks, strict=True):
            if tok is None:
                prev = ""
                continue
            if mark:
                if prev and len(ptoks) < plimit:
                    ptoks[f"bi:{prev} {tok}"] = None
                prev = tok
            else:
                prev = ""
            toks[tok] = None
            if len(toks) >= limit:
                return
    if not text.isascii():  # an ASCII text has no 8-bit share to report
        letters = len(_LETTERS.findall(text))
        if letters >= 20:
            high = len(_8BIT.findall(text))
            if high:
                bag.add(f"8bit:{min(100, (high * 100 // letters) // 10 * 10)}%")


def _domain_of(addr: str) -> str:
    return addr.rpartition("@")[2].strip().strip(">").lower() if "@" in addr else ""


def _addresses(value: str) -> list[tuple[str, str]]:
    try:
        return getaddresses([value[:MAX_HEADER_CHARS]])[:MAX_ADDRESSES]
    except (ValueError, IndexError, TypeError):  # pragma: no cover - stdlib quirks
        return []


def _count_bucket(n: int) -> str:
    return "0" if n == 0 else "1" if n == 1 else "2-3" if n <= 3 else "4-10" if n <= 10 else "11+"


def _from_tokens(value: str, bag: _Bag) -> str:
    addrs = _addresses(value)
    if not addrs:
        bag.add("from:none")
        return ""
    name, addr = addrs[0]
    addr = addr.lower()
    dom = _domain_of(addr)
    if addr:
        bag.add("from:addr:" + addr[:80])
        bag.add("from:local:" + _DIGITS.sub("#", addr.partition("@")[0])[:40])
    if dom:
        bag.add("from:dom:" + dom)
    words = [w.lower() for w in re.findall(r"\w+", name)[:6]]
    if not words:
        bag.add("from:noname")
    for w in words:
        bag.add("from:name:" + w[:MAX_WORD])
    return dom


def _recipient_tokens(prefix: str, value: str, bag: _Bag) -> None:
    """How many recipients and domains, not which: the recipient domain is the
    site's own (a constant) in production and a collection artefact in corpora."""
    addrs = [a for _, a in _addresses(value) if a]
    bag.add(f"{prefix}:count:" + _count_bucket(len(addrs)))
    doms = {_domain_of(a) for a in addrs} - {""}
    if len(doms) > 1:
        bag.add(f"{prefix}:domains:" + _count_bucket(len(doms)))
    if "undisclosed" in value.lower():
        bag.add(f"{prefix}:undisclosed")


def _host_tail(host: str) -> str:
    labels = host.lower().rstrip(".").split(".")
    return ".".join(labels[-2:])


def _received_tokens(value: str, bag: _Bag) -> None:
    m = _RCVD_FROM.match(value)
    if m:
        for part in (m.group(1), m.group(2) or ""):
            for word in part.replace("[", " ").replace("]", " ").split():
                word = word.strip("()").lower()
                if _HOSTNAME.match(word) and not _IPV4.fullmatch(word):
                    bag.add("rcvd:host:" + _host_tail(word))
    for a, b, c in _IPV4.findall(value)[:2]:
        bag.add(f"rcvd:ip:{a}.{b}.{c}")
    w = _RCVD_WITH.search(value)
    if w:
        bag.add("rcvd:with:" + w.group(1).lower())


def _subject_tokens(value: str, bag: _Bag) -> None:
    prefix = _SUBJECT_PREFIX.match(value)
    if prefix:
        bag.add("subject:re:")
        value = value[prefix.end():]
    letters = _LETTERS.findall(value)
    if len(letters) >= 5:
        upper = len(_UPPER.findall(value))
        if upper * 10 >= len(letters) * 6:
            bag.add("subject:caps")
    for w in _SUBJECT_WORD.findall(value[:MAX_HEADER_CHARS]):
        if w[0] in "$!":
            bag.add("subject:" + w[:3])
        elif len(w) > MAX_WORD:
            bag.add(f"subject:skip:{w[0].lower()} {len(w) // 10 * 10}")
        else:
            bag.add("subject:" + w.lower())


def _content_type_tokens(value: str, bag: _Bag) -> None:
    ctype = value.split(";", 1)[0].strip().lower()
    if ctype:
        bag.add("ctype:" + ctype[:60])
    m = _CHARSET.search(value)
    if m:
        bag.add("charset:" + m.group(1).lower()[:40])


def header_tokens(headers: Iterable[tuple[str, str]], bag: _Bag) -> None:
    """Tokens of the selected headers (see the module docstring)."""
    received = 0
    from_dom = ""
    reply_dom = ""
    seen_msgid = False
    names: dict[str, None] = {}
    for raw_name, raw_value in headers:
        name = raw_name.strip().lower()
        value = raw_value[:MAX_HEADER_CHARS]
        if name not in names and len(names) < 100 and not _UNNAMED_HEADERS.match(name):
            names[name] = None
            bag.add("hdr:" + name[:40])
            if name in _VALUED_HEADERS:
                bag.add(f"hdr:{name}={value.strip().lower()[:20]}")
        if name == "subject":
            _subject_tokens(value, bag)
        elif name == "from":
            from_dom = _from_tokens(value, bag)
        elif name in ("to", "cc"):
            _recipient_tokens(name, value, bag)
        elif name == "reply-to":
            addrs = _addresses(value)
            reply_dom = _domain_of(addrs[0][1]) if addrs else ""
            if reply_dom:
                bag.add("reply-to:dom:" + reply_dom)
        elif name == "return-path":
            dom = _domain_of(value)
            bag.add("return-path:dom:" + dom if dom else "return-path:none")
        elif name == "received":
            received += 1
            if received <= MAX_RECEIVED:
                _received_tokens(value, bag)
        elif name == "content-type":
            _content_type_tokens(value, bag)
        elif name == "content-transfer-encoding":
            bag.add("cte:" + value.strip().lower()[:30])
        elif name in ("x-mailer", "user-agent"):
            for w in re.findall(r"[A-Za-z]{3,20}", value)[:3]:
                bag.add("mailer:" + w.lower())
        elif name == "message-id":
            seen_msgid = True
            m = _MSGID_DOM.search(value.strip())
            bag.add("msgid:dom:" + m.group(1).lower()[:60] if m else "msgid:nodomain")
    if not seen_msgid:
        bag.add("msgid:none")
    if reply_dom and from_dom and reply_dom != from_dom:
        bag.add("reply-to:differs")


def uri_tokens(uris: Iterable[str], bag: _Bag) -> None:
    """Scheme, host suffixes and path pieces of up to :data:`MAX_URIS` URIs."""
    seen: set[str] = set()
    for uri in uris:
        uri = uri.strip()
        if not uri or uri in seen:
            continue
        seen.add(uri)
        if len(seen) > MAX_URIS:
            break
        if uri.lower().startswith("www."):
            uri = "http://" + uri
        try:
            parts = urlsplit(uri[:2000])
            host = (parts.hostname or "").lower()
            port = parts.port
        except ValueError:
            bag.add("url:bad")
            continue
        if parts.scheme:
            bag.add("proto:" + parts.scheme.lower()[:10])
        if parts.username is not None:
            bag.add("url:userinfo")
        if port is not None:
            bag.add("url:port")
        if host:
            if _IPV4.fullmatch(host) or ":" in host or host.isdigit():
                bag.add("url:ip")
            else:
                labels = host.rstrip(".").split(".")
                for n in range(2, min(len(labels), 4) + 1):
                    bag.add("url:" + ".".join(labels[-n:]))
            if "%" in host or host.startswith("xn--") or ".xn--" in host:
                bag.add("url:encodedhost")
        pieces = 0
        for piece in _PATH_SPLIT.split(parts.path + "?" + parts.query):
            if MIN_WORD <= len(piece) <= MAX_WORD:
                bag.add("url:p:" + piece.lower())
                pieces += 1
                if pieces >= 8:
                    break
        if bag.full:
            return


def html_tag_tokens(source: str) -> list[str]:
    """``html:<tag>`` for each distinct tag name of an HTML source (bounded)."""
    tags = dict.fromkeys(m.group(1).lower() for m in _HTML_TAG.finditer(source[:MAX_HTML_CHARS]))
    return ["html:" + t for t in list(tags)[:200]]


# ------------------------------------------------------------------ shapes
# Tokens for the *form* of a message rather than its words: how its
# Message-ID, Date and From are written, how its links are built, how its
# MIME tree is laid out. Mail software and spam kits keep their shapes for
# years while the words change with every campaign, so these tokens still
# mean something when the learned data is old. All start with "shape:".

_SHAPE_RUNS = re.compile(r"[A-Za-z]+|\d+")
SHAPE_CHARS = 40


def shape_of(value: str, limit: int = SHAPE_CHARS) -> str:
    """``value`` with each run of letters as ``a`` and of digits as ``9``
    (``<20021101.JavaMail@host.example>`` -> ``<9.a@a.a>``), bounded."""
    return _SHAPE_RUNS.sub(lambda m: "9" if m.group(0)[0].isdigit() else "a",
                           value.strip()[:200])[:limit]


def _mixed_run(word: str) -> bool:
    """Letters and digits interleaved (``x7k2q9``), as generated tags are."""
    flips = sum(1 for a, b in pairwise(word) if a.isdigit() != b.isdigit())
    return flips >= 3


def header_shape_tokens(headers: Iterable[tuple[str, str]]) -> list[str]:
    """``shape:`` tokens of the Message-ID, Date, From and Subject, and of
    the number of Received headers."""
    out: list[str] = []
    received = 0
    for raw_name, value in headers:
        name = raw_name.strip().lower()
        if name == "received":
            received += 1
        elif name == "message-id":
            out.append("shape:mid:" + shape_of(value))
        elif name == "date":
            out.append("shape:date:" + shape_of(value))
        elif name == "from":
            out.append("shape:from:" + shape_of(value.replace('"', "")))
        elif name == "subject":
            words = value.split()
            if words and _mixed_run(words[-1].strip("()[]#")):
                out.append("shape:subj:tag")
            if value != value.strip() or "  " in value.strip():
                out.append("shape:subj:spaces")
    out.append("shape:rcvd:" + _count_bucket(received))
    return out


def uri_shape_tokens(uris: Iterable[str]) -> list[str]:
    """``shape:url:`` tokens of how links are built: host depth, digits in the
    host, path depth, query, long random pieces."""
    out: dict[str, None] = {}
    for i, uri in enumerate(uris):
        if i >= MAX_URIS:
            break
        try:
            parts = urlsplit(uri.strip()[:2000])
            host = (parts.hostname or "").lower()
        except ValueError:
            continue
        if not host:
            continue
        labels = host.split(".")
        out["shape:url:labels:" + _count_bucket(len(labels))] = None
        if any(c.isdigit() for c in labels[0 if len(labels) < 2 else -2]):
            out["shape:url:hostdigits"] = None
        depth = len([p for p in parts.path.split("/") if p])
        out["shape:url:depth:" + _count_bucket(depth)] = None
        if parts.query:
            out["shape:url:query"] = None
        if any(len(piece) >= 12 and _mixed_run(piece)
               for piece in _PATH_SPLIT.split(parts.path + "?" + parts.query)):
            out["shape:url:randompiece"] = None
    return list(out)


def mime_shape_token(msg: ParsedMessage) -> str:
    """The message's text parts and attachments as one token
    (``shape:mime:text/plain+text/html+1att``)."""
    kinds = "+".join(dict.fromkeys(p.content_type[:20] for p in msg.parts[:8]))
    atts = len(msg.attachments)
    return f"shape:mime:{kinds or 'none'}+{min(atts, 3)}att"


def tokenize(headers: Iterable[tuple[str, str]] = (), texts: Iterable[str] = (),
             uris: Iterable[str] = (), attachments: Iterable[tuple[str, str]] = (), *,
             extra: Iterable[str] = (), max_tokens: int = MAX_TOKENS,
             bigrams: bool = True) -> list[str]:
    """All tokens of one message (de-duplicated, first-seen order, bounded).

    ``headers`` decoded (name, value) pairs; ``texts`` decoded text (HTML already
    rendered); ``uris`` URLs; ``attachments`` (file name, content type);
    ``extra`` ready-made tokens added after the headers."""
    bag = _Bag(max_tokens)
    header_tokens(headers, bag)
    for tok in extra:
        bag.add(tok)
    found_urls: list[str] = []
    pairs = _Bag(MAX_PAIRS if bigrams else 0)
    budget = MAX_TEXT_CHARS
    for text in texts:
        if budget <= 0 or bag.full:
            break
        chunk = text[:budget]
        budget -= len(chunk)
        _text_tokens(chunk, bag, found_urls, pairs)
    uri_tokens([*uris, *found_urls], bag)
    for filename, ctype in attachments:
        ext = filename.rstrip(". ").rpartition(".")[2].lower() if "." in filename else ""
        if ext and len(ext) <= 10:
            bag.add("attach:ext:" + ext)
        if ctype:
            bag.add("attach:type:" + ctype.lower()[:60])
    for pair in pairs.tokens:  # last: word pairs never crowd out words
        bag.add(pair)
    return list(bag.tokens)


def tokenize_message(msg: ParsedMessage, *, max_tokens: int = MAX_TOKENS) -> list[str]:
    """Tokens of a :class:`mxguard.content.mime.ParsedMessage`: its decoded headers,
    rendered text parts (with their type and charset), URIs (with the HTML element
    they came from) and attachments (with their magic-bytes kind)."""
    extra: list[str] = []
    for part in msg.parts:
        extra.append("part:" + part.content_type[:40])
        if part.charset:
            extra.append("partcharset:" + part.charset.lower()[:40])
        if part.is_html:
            extra.extend(html_tag_tokens(part.raw))
    for uri in msg.uris:
        if uri.tag != "text":
            extra.append("urltag:" + uri.tag)
        if uri.scheme == "mailto" and uri.host:
            extra.append("mailto:" + uri.host)
    for att in msg.attachments:
        if att.magic:
            extra.append("attach:magic:" + att.magic)
    if msg.truncated:
        extra.append("msg:truncated")
    extra.extend(header_shape_tokens(msg.headers))
    extra.append(mime_shape_token(msg))
    extra.extend(uri_shape_tokens(u.url for u in msg.uris if u.scheme != "mailto"))
    return tokenize(msg.headers, [p.text for p in msg.parts],
                    [u.url for u in msg.uris if u.scheme != "mailto"],
                    [(a.filename, a.content_type) for a in msg.attachments],
                    extra=extra, max_tokens=max_tokens)


__all__ = ["MAX_TOKENS", "header_tokens", "html_tag_tokens", "tokenize", "tokenize_message",
           "uri_tokens"]
